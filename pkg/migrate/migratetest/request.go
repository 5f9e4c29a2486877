//go:build linux

package migratetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/criu"
)

// Errors that end a request without a response.
var (
	// errClosed: the Op's end of the socket closed.
	errClosed = errors.New("rpc socket closed")
	// errKilled: the request was killed.
	errKilled = errors.New("killed")
)

// pageConn is a page socket: a Unix stream or TCP connection.
type pageConn interface {
	net.Conn
	CloseWrite() error
}

// dupConn takes a connection of its own on f's socket, as a CRIU child
// inherits it: the caller closes f after the request started.
func dupConn(f *os.File) (pageConn, error) {
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	pc, ok := c.(pageConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("%T is not a stream socket", c)
	}
	return pc, nil
}

// request is the fake CRIU's side of an Op: what its goroutine works with.
type request struct {
	c    *CRIU
	kind string
	opts criu.Options
	log  string
	conn net.Conn // the fake CRIU's end of the RPC socket pair
	ps   pageConn // the page socket, if any

	in     chan message  // from the Op, in order
	closed chan struct{} // closed when the Op's end of the socket closed
	kill   chan struct{} // closed when the request is killed
	done   chan struct{} // closed when its goroutine has ended
	// ctx is done when the request is killed or has ended: hooks see it.
	ctx    context.Context
	cancel context.CancelFunc

	mu         sync.Mutex
	status     string // its exit status, once it has one
	closedOnce sync.Once
	killOnce   sync.Once
	restored   *child // the process a restore started
}

// start begins a fake request of kind, whose goroutine runs body. body
// returns nil for a request that succeeded, errKilled if it was killed,
// and any other error if it failed.
func (c *CRIU) start(kind string, o criu.Options, needPS bool, body func(*request) error) (*Op, error) {
	var ps pageConn
	if o.PageServer != nil {
		var err error
		if ps, err = dupConn(o.PageServer); err != nil {
			return nil, fmt.Errorf("criu %s: page socket: %w", kind, err)
		}
	} else if needPS {
		return nil, fmt.Errorf("criu %s: no page socket", kind)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		closePS(ps)
		return nil, fmt.Errorf("criu %s: socketpair: %w", kind, err)
	}
	if err := unix.SetNonblock(fds[0], true); err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		closePS(ps)
		return nil, fmt.Errorf("criu %s: %w", kind, err)
	}
	f := os.NewFile(uintptr(fds[1]), "fake-criu")
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		unix.Close(fds[0])
		closePS(ps)
		return nil, fmt.Errorf("criu %s: %w", kind, err)
	}
	r := &request{
		c: c, kind: kind, opts: o, conn: conn, ps: ps,
		in: make(chan message, 16), closed: make(chan struct{}), kill: make(chan struct{}), done: make(chan struct{}),
	}
	r.ctx, r.cancel = context.WithCancel(c.ctx)
	if o.ImagesDir != "" {
		logName := o.LogFile
		if logName == "" {
			logName = "fake-" + kind + ".log"
		}
		r.log = filepath.Join(o.ImagesDir, logName)
	}
	op := &Op{kind: kind, fd: fds[0], pid: nextPID(), buf: make([]byte, 64<<10), req: r}
	if o.LogFile != "" {
		op.log = r.log
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		unix.Close(fds[0])
		conn.Close()
		closePS(ps)
		return nil, fmt.Errorf("criu %s: fake CRIU closed", kind)
	}
	c.ops = append(c.ops, op)
	c.goroutine(r.read)
	c.goroutine(func() { r.run(body) })
	c.mu.Unlock()
	return op, nil
}

func closePS(ps pageConn) {
	if ps != nil {
		ps.Close()
	}
}

// read passes the Op's messages to the request, in order, until the Op's
// end closes.
func (r *request) read() {
	buf := make([]byte, 64<<10)
	for {
		n, err := r.conn.Read(buf)
		if err != nil || n == 0 {
			// EOF: the Op closed its end. Any other error: the request
			// closed ours, at its end.
			r.closedOnce.Do(func() { close(r.closed) })
			return
		}
		var m message
		if json.Unmarshal(buf[:n], &m) != nil {
			m = message{Type: "garbage"}
		}
		select {
		case r.in <- m:
		case <-r.done:
			return
		}
	}
}

// run runs body and exits as a CRIU process does: its sockets close, and
// what a killed restore started dies with it.
func (r *request) run(body func(*request) error) {
	defer close(r.done)
	defer r.cancel()
	r.logf("fake criu %s starting", r.kind)
	err := errors.New("no images directory")
	if r.opts.ImagesDir != "" {
		err = body(r)
	} else {
		r.respondErr(err)
	}
	switch {
	case errors.Is(err, errKilled):
		r.setStatus("signal: killed")
	case err != nil:
		r.setStatus("exit status 1")
	default:
		r.setStatus("exit status 0")
	}
	if r.killed() && r.restored != nil {
		r.restored.kill()
	}
	closePS(r.ps)
	r.conn.Close()
}

// terminate kills the request: it ends at once, leaving what it held as a
// killed CRIU leaves it (a dumped tree stays stopped; a restored process
// dies with it).
func (r *request) terminate(status string) {
	r.killOnce.Do(func() {
		r.setStatus(status)
		close(r.kill)
		r.cancel()
		// A killed process's sockets close: this also ends a page
		// transfer it is blocked in.
		closePS(r.ps)
		r.conn.Close()
	})
}

func (r *request) killed() bool {
	select {
	case <-r.kill:
		return true
	default:
		return false
	}
}

func (r *request) setStatus(s string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.status == "" {
		r.status = s
	}
}

func (r *request) exitStatus() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.status == "" {
		return "still running"
	}
	return r.status
}

// respond sends ev; errClosed if the Op's end is gone.
func (r *request) respond(ev event) error {
	if r.killed() {
		return errKilled
	}
	b, err := json.Marshal(ev)
	if err != nil {
		panic(err)
	}
	if _, err := r.conn.Write(b); err != nil {
		if r.killed() {
			return errKilled
		}
		return errClosed
	}
	return nil
}

// respondErr logs err as CRIU logs its errors and sends it as the
// request's failed response.
func (r *request) respondErr(err error) {
	r.logf("Error (fake-criu/%s): %v", r.kind, err)
	ev := event{Err: err.Error()}
	var ce *criu.Error
	var errno syscall.Errno
	switch {
	case errors.As(err, &ce):
		ev.Err, ev.Errno = ce.Msg, int(ce.Errno)
		if ev.Err == "" {
			ev.Err = err.Error()
		}
	case errors.As(err, &errno):
		ev.Errno = int(errno)
	}
	r.respond(ev)
}

// await waits for the Op's next message; errClosed once its end closed.
func (r *request) await() (message, error) {
	select {
	case m := <-r.in:
		return m, nil
	default:
	}
	select {
	case m := <-r.in:
		return m, nil
	case <-r.closed:
		select {
		case m := <-r.in:
			return m, nil
		default:
			return message{}, errClosed
		}
	case <-r.kill:
		return message{}, errKilled
	}
}

// notify sends the notification name and waits for its answer: nil for
// yes, errClosed if the socket closed first, a plain error for no.
func (r *request) notify(name string, pid int) error {
	if err := r.respond(event{Notify: name, PID: pid}); err != nil {
		return err
	}
	m, err := r.await()
	if err != nil {
		return err
	}
	if m.Type != "notify" {
		return fmt.Errorf("unexpected %q request at %s", m.Type, name)
	}
	if !m.OK {
		return fmt.Errorf("%s script failed", name)
	}
	return nil
}

// step runs the hook for s. Unless deaf (CRIU is not talking to its
// socket at that point), the Op's end closing ends the step with
// errClosed even if the hook still blocks.
func (r *request) step(s Step, deaf bool) error {
	if r.killed() {
		return errKilled
	}
	var closed <-chan struct{}
	if !deaf {
		closed = r.closed
	}
	return r.c.runHook(r.ctx, r.kill, closed, s, r.opts.ImagesDir, r.logf)
}

// runHook runs the hook for step s of a fake process whose context is ctx
// and which is killed when kill closes. closed, if not nil, also ends the
// step (errClosed): the process's RPC socket closed.
func (c *CRIU) runHook(ctx context.Context, kill, closed <-chan struct{}, s Step, dir string, logf func(string, ...any)) error {
	if *c.hook.Load() == nil {
		return nil
	}
	logf("step %s", s)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	res := make(chan error, 1)
	c.goroutine(func() { res <- c.callHook(ctx, s, dir) })
	result := func(err error) error {
		if errors.Is(err, ErrWedge) {
			logf("wedged at %s", s)
			<-kill
			return errKilled
		}
		if err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
		return nil
	}
	select {
	case err := <-res:
		return result(err)
	case <-closed:
		// The hook sees ctx done and returns: only ErrWedge keeps the
		// request from noticing.
		cancel()
		select {
		case err := <-res:
			if errors.Is(err, ErrWedge) {
				return result(err)
			}
			return errClosed
		case <-kill:
			return errKilled
		}
	case <-kill:
		return errKilled
	}
}

// fail ends the request on err as CRIU does: undo runs unless the request
// was killed (a killed CRIU undoes nothing), then the error is the
// response unless the socket is gone. It returns what run wants.
func (r *request) fail(err error, undo func()) error {
	if errors.Is(err, errKilled) || r.killed() {
		return errKilled
	}
	if undo != nil {
		undo()
	}
	if errors.Is(err, errClosed) {
		r.logf("rpc socket closed: giving up")
		return errClosed
	}
	r.respondErr(err)
	return err
}

// logf appends a line to the request's log, in CRIU's format.
func (r *request) logf(format string, args ...any) {
	if r.log == "" {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	appendLog(r.log, fmt.Sprintf(format, args...))
}

func appendLog(path, line string) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644) // as CRIU its logs
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "(%s) %s\n", time.Now().Format("05.000000"), line)
}
