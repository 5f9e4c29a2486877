//go:build linux

package migrate

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/rootfs"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// A container's root filesystem, when the destination does not share its
// storage, is synced with rsync over the rpc connection: pass 1 while the
// container runs (before the dump), pass 2 while it is frozen (after the
// images, before the restore). The source runs rsync with `phauld
// rsync-pipe` as its remote shell (pkg/rootfs); the destination runs the
// receiving server into the bundle it made.

const rsyncSocket = "rsync.sock"

// syncChunk is how much of rsync's stream one SyncData carries.
const syncChunk = 256 << 10

// SyncStats are a pass's figures.
type SyncStats struct {
	Bytes int64
	Took  time.Duration
}

// syncOut reads a local end of rsync's stream (r) in a goroutine and sends
// it as SyncData on c from the loop, one chunk at a time while c's queue
// is under its high-water mark (waiting for it to drain otherwise), then
// SyncEOF.
type syncOut struct {
	s       *Session
	c       *transport.Conn
	credit  chan struct{}
	stopped chan struct{}
	once    sync.Once
	sent    int64 // on the loop
}

func newSyncOut(s *Session, c *transport.Conn) *syncOut {
	return &syncOut{s: s, c: c, credit: make(chan struct{}, 1), stopped: make(chan struct{})}
}

func (o *syncOut) run(r io.Reader) {
	buf := make([]byte, syncChunk)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			chunk := append([]byte(nil), buf[:n]...)
			o.s.l.Post(func() {
				if o.c.Closed() {
					return
				}
				o.c.Send(&wire.SyncData{Data: chunk})
				o.sent += int64(len(chunk))
				if o.c.OutLen() < transport.HighWater {
					o.give()
				} else {
					o.c.OnDrain = func() {
						o.c.OnDrain = nil
						o.give()
					}
				}
			})
			select {
			case <-o.credit:
			case <-o.stopped:
				return
			}
		}
		if err != nil {
			o.s.l.Post(func() {
				if !o.c.Closed() {
					o.c.Send(&wire.SyncEOF{})
				}
			})
			return
		}
	}
}

func (o *syncOut) give() {
	select {
	case o.credit <- struct{}{}:
	default:
	}
}

func (o *syncOut) stop() { o.once.Do(func() { close(o.stopped) }) }

// syncIn writes what arrives of rsync's stream to a local end, from a
// goroutine (the loop never blocks on rsync), and closes it (closeFn) when
// the peer's direction has ended and everything was written.
type syncIn struct {
	mu      sync.Mutex
	cond    *sync.Cond
	queue   [][]byte
	eof     bool
	stopped bool
	recv    int64
}

func newSyncIn(w io.Writer, closeFn func()) *syncIn {
	in := &syncIn{}
	in.cond = sync.NewCond(&in.mu)
	go func() {
		defer closeFn()
		for {
			in.mu.Lock()
			for len(in.queue) == 0 && !in.eof && !in.stopped {
				in.cond.Wait()
			}
			if in.stopped || (len(in.queue) == 0 && in.eof) {
				in.mu.Unlock()
				return
			}
			b := in.queue[0]
			in.queue = in.queue[1:]
			in.mu.Unlock()
			if _, err := w.Write(b); err != nil {
				return
			}
		}
	}()
	return in
}

// write queues a copy of b (a message's payload is the connection's
// buffer, reused once the handler returns).
func (in *syncIn) write(b []byte) {
	b = append([]byte(nil), b...)
	in.mu.Lock()
	in.queue = append(in.queue, b)
	in.recv += int64(len(b))
	in.cond.Signal()
	in.mu.Unlock()
}

func (in *syncIn) closeWrite() {
	in.mu.Lock()
	in.eof = true
	in.cond.Signal()
	in.mu.Unlock()
}

func (in *syncIn) stop() {
	in.mu.Lock()
	in.stopped = true
	in.cond.Signal()
	in.mu.Unlock()
}

func (in *syncIn) received() int64 {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.recv
}

// sourceSync is one pass on the source.
type sourceSync struct {
	pass       int
	cmd        *exec.Cmd
	ln         *net.UnixListener
	out        *syncOut
	in         *syncIn
	stderr     bytes.Buffer
	t0         time.Time
	clientDone bool
	clientErr  error
	clientCode int
	serverDone bool
	serverErr  string
	serverCode int
	done       func(SyncStats, error)
	ended      bool
}

// startSync runs pass of rsync from the container's rootfs to the
// destination; done is called on the loop when both rsyncs have ended.
func (m *source) startSync(pass int, done func(SyncStats, error)) error {
	sock := filepath.Join(m.p.Dir, rsyncSocket)
	os.Remove(sock)
	ln, err := transport.ListenUnixPath(sock)
	if err != nil {
		return err
	}
	y := &sourceSync{pass: pass, ln: ln, done: done, t0: time.Now(), out: newSyncOut(m.s, m.rpc)}
	y.cmd = rootfs.Command(m.p.Container.HookExe, sock, m.p.Shared.Rootfs)
	y.cmd.Stdout, y.cmd.Stderr = io.Discard, &y.stderr
	if err := y.cmd.Start(); err != nil {
		ln.Close()
		return fmt.Errorf("start rsync: %w", err)
	}
	m.sync = y
	go func() {
		ln.SetDeadline(time.Now().Add(time.Minute))
		c, err := ln.Accept()
		ln.Close()
		if err != nil {
			return // rsync did not start its pipe: its exit says why
		}
		uc := c.(*net.UnixConn)
		br := bufio.NewReader(uc)
		line, err := br.ReadBytes('\n')
		var args []string
		if err == nil {
			err = json.Unmarshal(line, &args)
		}
		if err != nil {
			uc.Close()
			return
		}
		m.s.l.Post(func() {
			if m.sync != y || y.ended {
				uc.Close()
				return
			}
			y.in = newSyncIn(uc, func() { uc.CloseWrite() })
			if err := m.rpc.Send(&wire.SyncOpen{Pass: pass, Args: args}); err != nil {
				uc.Close()
				y.clientDone, y.clientErr = true, fmt.Errorf("rsync wants to run %q on the destination, which phaul does not carry: %w", args, err)
				m.syncFinish(y)
				return
			}
			go func() {
				y.out.run(br)
			}()
		})
	}()
	go func() {
		err := y.cmd.Wait()
		y.ln.Close() // a pipe that never connected is not waited for
		m.s.l.Post(func() {
			y.clientDone = true
			if err != nil {
				y.clientErr = fmt.Errorf("rsync: %v: %s", err, strings.TrimSpace(y.stderr.String()))
				y.clientCode = exitCode(err)
			}
			m.syncFinish(y)
			if !y.ended {
				// Ours ended well: theirs has, or is about to.
				m.s.l.After(30*time.Second, func() {
					if !y.ended {
						y.serverDone, y.serverErr = true, "no word of the destination's rsync 30 s after ours ended"
						m.syncFinish(y)
					}
				})
			}
		})
	}()
	return nil
}

func (m *source) onSync(msg wire.Message) bool {
	y := m.sync
	if y == nil || y.ended {
		return false
	}
	switch msg := msg.(type) {
	case *wire.SyncData:
		if y.in != nil {
			y.in.write(msg.Data)
		}
	case *wire.SyncEOF:
		if y.in != nil {
			y.in.closeWrite()
		}
	case *wire.SyncDone:
		if msg.Pass != y.pass {
			return false
		}
		y.serverDone, y.serverErr, y.serverCode = true, msg.Error, msg.Code
		m.syncFinish(y)
	default:
		return false
	}
	return true
}

func (m *source) syncFinish(y *sourceSync) {
	if y.ended {
		return
	}
	// Over a running container (pass 1) rsync may end with files that
	// changed or vanished while it read them (23, 24): the frozen pass
	// sends them whole. Anything else fails the pass, at once.
	tolerable := func(code int) bool { return y.pass == 1 && livePartial(code) }
	serverFailed := y.serverDone && y.serverErr != "" && !tolerable(y.serverCode)
	clientFailed := y.clientDone && y.clientErr != nil && !tolerable(y.clientCode)
	if !serverFailed && !clientFailed && !(y.clientDone && y.serverDone) {
		return
	}
	var err error
	switch {
	case serverFailed:
		err = fmt.Errorf("the destination's rsync: %s", y.serverErr)
	case clientFailed:
		err = y.clientErr
	case y.clientErr != nil || y.serverErr != "":
		m.log.Info("files changed while the root filesystem was synced; the frozen pass finishes them",
			zap.Int("rsync_code", max(y.clientCode, y.serverCode)))
	}
	y.ended = true
	y.out.stop()
	if y.in != nil {
		y.in.stop()
	}
	var recv int64
	if y.in != nil {
		recv = y.in.received()
	}
	st := SyncStats{Bytes: y.out.sent + recv, Took: time.Since(y.t0)}
	if err != nil {
		y.cmd.Process.Kill()
	}
	y.done(st, err)
}

// stopSync ends a pass in progress (an abort).
func (m *source) stopSync() {
	y := m.sync
	if y == nil || y.ended {
		return
	}
	y.ended = true
	y.out.stop()
	if y.in != nil {
		y.in.stop()
	}
	y.cmd.Process.Kill()
	y.ln.Close()
}

// destSync is the destination's side of a pass.
type destSync struct {
	pass   int
	cmd    *exec.Cmd
	in     *syncIn
	out    *syncOut
	stderr bytes.Buffer
}

// onSyncOpen starts the receiving rsync server into the container's
// rootfs here, with the options the source's rsync asked for.
func (m *dest) onSyncOpen(msg *wire.SyncOpen) error {
	if m.container == nil || m.syncDir == "" {
		return protocolErr("sync-open, but no rootfs is synced")
	}
	if m.syncer != nil {
		m.syncer.stop()
	}
	opts, err := wire.RsyncServerArgs(msg.Args)
	if err != nil {
		return protocolErr("sync-open: %v", err)
	}
	y := &destSync{pass: msg.Pass, out: newSyncOut(m.s, m.rpc)}
	y.cmd = rootfs.ServerCommand(opts, m.syncDir)
	y.cmd.Stderr = &y.stderr
	stdin, err := y.cmd.StdinPipe()
	if err != nil {
		return err
	}
	stdout, err := y.cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := y.cmd.Start(); err != nil {
		return fmt.Errorf("start rsync: %w", err)
	}
	y.in = newSyncIn(stdin, func() { stdin.Close() })
	m.syncer = y
	m.log.Info("syncing the container's root filesystem", zap.Int("pass", msg.Pass), zap.String("into", m.syncDir))
	go func() {
		// Everything it wrote first: Wait closes the pipe.
		y.out.run(stdout)
		err := y.cmd.Wait()
		m.log.Debug("rsync server ended", zap.Int("pass", y.pass), zap.Error(err), zap.Int64("received", y.in.received()),
			zap.String("stderr", strings.TrimSpace(y.stderr.String())))
		m.s.l.Post(func() {
			done := &wire.SyncDone{Pass: y.pass}
			if err != nil {
				done.Error = fmt.Sprintf("%v: %s", err, strings.TrimSpace(y.stderr.String()))
				done.Code = exitCode(err)
			}
			if !m.rpc.Closed() {
				m.rpc.Send(done)
			}
		})
	}()
	return nil
}

func (y *destSync) stop() {
	y.in.stop()
	y.out.stop()
	if y.cmd.Process != nil {
		y.cmd.Process.Kill()
	}
}

// exitCode is a command's exit status (-1: it did not exit).
func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// livePartial: rsync ended well, or only with files that changed or
// vanished while it read them (23, 24), which a pass over a running
// container may meet.
func livePartial(code int) bool { return code == 0 || code == 23 || code == 24 }
