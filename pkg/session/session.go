//go:build linux

// Package session runs migrations. A Manager accepts the pairs of
// connections that peer daemons open (rpc and mem, paired by the session id
// of their handshake), and starts outgoing migrations for the control API.
// Each migration is a Session: one goroutine, supervised by the Manager,
// whose loop waits with epoll on the session's sockets (the two
// connections, the CRIU page socket, CRIU's RPC sockets) and on an eventfd
// that stops it.
//
// docs/design.md describes the session lifecycle and the commit rule the
// source and destination state machines follow.
package session

import (
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/epoll"
	"github.com/phaul/phaul/pkg/wire"
)

// Direction of a session as seen from this daemon.
const (
	Outgoing = "out"
	Incoming = "in"
)

// Session is one migration on this daemon.
type Session struct {
	ID        wire.SessionID
	Direction string
	Peer      string
	started   time.Time

	// Fields below are written by the loop goroutine and read by others.
	pid   atomic.Int64
	phase atomic.Value // string
	bytes atomic.Int64

	l *loop
	m machine
	// calls are functions other goroutines run on the loop (cancel, a
	// peer's outcome query).
	calls chan func()
	done  chan struct{}
	// resolver, set before done is closed, settles a session that ended
	// in doubt.
	resolver *resolver
	// result and err are set before done is closed.
	result api.Result
	err    error
}

func newSession(id wire.SessionID, dir, peer string) (*Session, error) {
	l, err := newLoop()
	if err != nil {
		return nil, err
	}
	s := &Session{ID: id, Direction: dir, Peer: peer, started: time.Now(), l: l,
		calls: make(chan func(), 8), done: make(chan struct{})}
	s.phase.Store("starting")
	return s, nil
}

// Stop asks the session to stop: it ends as its commit rule says for the
// phase it is in (rolled back before the commit). It does not wait; see
// Done.
func (s *Session) Stop() { s.l.requestStop() }

// Done is closed when the session has ended.
func (s *Session) Done() <-chan struct{} { return s.done }

// call runs fn on the session's loop and waits for it. It returns false if
// the session ended before fn could run.
func (s *Session) call(fn func()) bool {
	ran := make(chan struct{})
	select {
	case s.calls <- func() { fn(); close(ran) }:
	case <-s.done:
		return false
	}
	s.l.wake()
	select {
	case <-ran:
		return true
	case <-s.done:
		select {
		case <-ran:
			return true
		default:
			return false
		}
	}
}

// Info describes the session for the control API.
func (s *Session) Info() api.Session {
	return api.Session{
		ID:        s.ID.String(),
		Direction: s.Direction,
		PID:       int(s.pid.Load()),
		Peer:      s.Peer,
		Phase:     s.phase.Load().(string),
		Bytes:     s.bytes.Load(),
		Started:   s.started,
		AgeMS:     time.Since(s.started).Milliseconds(),
	}
}

// machine is a session's role-specific state machine: what the source or
// the destination does. run drives it until it has finished.
type machine interface {
	// begin starts the machine on its loop.
	begin() error
	// finished reports whether the machine has reached an end state.
	finished() bool
	// stop handles Session.Stop: end by the commit rule.
	stop()
	// cleanup releases everything, making the outcome safe if the
	// machine did not finish (a panic): it runs even then.
	cleanup()
	// outcome is the result, or the error that ended the machine.
	outcome() (api.Result, error)
	// cancel is the operator's cancel: it rolls back if the commit has
	// not been asked yet, and refuses otherwise.
	cancel() error
}

// run drives m on the session's loop until it finishes, then cleans up.
// The caller closes s.done once it has also done its own finishing.
// A panic is turned into the session's error (logged once, by the
// manager) after cleanup has made the state safe.
func (s *Session) run(m machine) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = &panicError{value: r, stack: debug.Stack()}
		}
		// Clean-up makes the outcome safe; a panic in it must not take
		// the daemon down either.
		func() {
			defer func() {
				if r := recover(); r != nil && err == nil {
					err = &panicError{value: r, stack: debug.Stack()}
				}
			}()
			m.cleanup()
		}()
		s.l.close()
		if err != nil && s.err == nil {
			s.err = err
		}
	}()
	if err := m.begin(); err != nil {
		s.err = err
		return err
	}
	stopped := false
	for !m.finished() {
		if _, err := s.l.runOnce(); err != nil {
			return fmt.Errorf("session loop: %w", err)
		}
		for drained := false; !drained; {
			select {
			case fn := <-s.calls:
				fn()
			default:
				drained = true
			}
		}
		if s.l.stopRequested() && !stopped {
			stopped = true
			m.stop()
		}
	}
	s.result, s.err = m.outcome()
	return s.err
}

// panicError is a session that panicked. The manager logs it once, with
// its stack.
type panicError struct {
	value any
	stack []byte
}

func (e *panicError) Error() string { return fmt.Sprintf("session panicked: %v", e.value) }

// phaseTimer logs one line per phase with its duration.
type phaseTimer struct {
	s     *Session
	log   *zap.Logger
	name  string
	start time.Time
	// took records each finished phase's duration in milliseconds.
	took map[string]int64
}

func newPhaseTimer(s *Session, log *zap.Logger) *phaseTimer {
	return &phaseTimer{s: s, log: log, took: map[string]int64{}}
}

// enter ends the current phase (logging it) and starts the next.
func (p *phaseTimer) enter(name string) {
	now := time.Now()
	if p.name != "" {
		d := now.Sub(p.start)
		p.took[p.name] += d.Milliseconds()
		p.log.Info("phase done", zap.String("phase", p.name), zap.Duration("duration", d))
	}
	p.name, p.start = name, now
	p.s.phase.Store(name)
}

// criuWatch drives a CRIU request from the loop: each event goes to fn.
// It stops watching once CRIU has sent the number of responses the request
// makes (notifications do not count), or failed.
type criuWatch struct {
	op        *criu.Op
	l         *loop
	fn        func(criu.Event) error
	fail      func(error)
	responses int
	done      bool
}

// watchCRIU watches op, which will send responses responses (2 for a page
// server: its start, then WaitPID's answer).
func watchCRIU(l *loop, op *criu.Op, responses int, fn func(criu.Event) error, fail func(error)) (*criuWatch, error) {
	w := &criuWatch{op: op, l: l, fn: fn, fail: fail, responses: responses}
	if err := l.watch(op.Fd(), epoll.In, w.handle); err != nil {
		return nil, err
	}
	return w, nil
}

func (w *criuWatch) handle(uint32) {
	for !w.done {
		ev, err := w.op.Next()
		if errors.Is(err, criu.ErrAgain) {
			return
		}
		if err != nil {
			w.stop()
			w.fail(err)
			return
		}
		if ev.Notify == "" {
			w.responses--
			if w.responses <= 0 || ev.Err != nil {
				w.stop()
			}
		}
		if err := w.fn(ev); err != nil {
			w.stop()
			w.fail(err)
			return
		}
	}
}

// stop stops watching and closes the RPC socket (CRIU then finishes on
// its own; see criu.Op.Close).
func (w *criuWatch) stop() {
	if w.done {
		return
	}
	w.done = true
	w.l.unwatch(w.op.Fd())
	w.op.Close()
}

// abandonGrace is how long an abandoned CRIU request may take to exit
// before it is killed.
const abandonGrace = 3 * time.Second

// abandon stops watching a request that may be killed (not a dump) and
// makes sure its CRIU is gone: see criu.Op.Abandon.
func (w *criuWatch) abandon() (killed bool) {
	if !w.done {
		w.done = true
		w.l.unwatch(w.op.Fd())
	}
	return w.op.Abandon(abandonGrace)
}

// heartbeat keeps a session's peer honest: it pings the peer on the rpc
// connection every third of timeout, and calls silent once nothing at all
// has arrived on any of the session's connections for timeout.
type heartbeat struct {
	l        *loop
	rpc      *conn
	conns    []*conn
	timeout  time.Duration
	silent   func(time.Duration)
	seq      uint64
	lastPing time.Time
	t        *timer
}

func startHeartbeat(l *loop, rpc *conn, conns []*conn, timeout time.Duration, silent func(time.Duration)) *heartbeat {
	h := &heartbeat{l: l, rpc: rpc, conns: conns, timeout: timeout, silent: silent, lastPing: time.Now()}
	h.t = l.after(h.tick(), h.beat)
	return h
}

// tick is how often the heartbeat looks: often enough that silence is
// noticed within a few percent of timeout.
func (h *heartbeat) tick() time.Duration {
	return min(time.Second, max(h.timeout/10, 10*time.Millisecond))
}

func (h *heartbeat) beat() {
	var last time.Time
	for _, c := range h.conns {
		if c.lastRecv.After(last) {
			last = c.lastRecv
		}
	}
	if quiet := time.Since(last); quiet >= h.timeout {
		// Bytes may be waiting that this loop has not read yet (it was
		// descheduled, or the whole daemon stopped and resumed): they
		// are a word from the peer. Read them first.
		if h.pending() {
			h.t = h.l.after(time.Millisecond, h.beat)
			return
		}
		h.silent(quiet)
		return
	}
	if time.Since(h.lastPing) >= h.timeout/3 {
		h.seq++
		h.lastPing = time.Now()
		h.rpc.send(&wire.Ping{Seq: h.seq})
	}
	h.t = h.l.after(h.tick(), h.beat)
}

// pending reports whether any of the connections has bytes (or a hang-up)
// waiting to be read.
func (h *heartbeat) pending() bool {
	var fds []unix.PollFd
	for _, c := range h.conns {
		if !c.closed {
			fds = append(fds, unix.PollFd{Fd: int32(c.link.fd()), Events: unix.POLLIN})
		}
	}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0
}

// stop stops the heartbeat. A nil heartbeat is a no-op.
func (h *heartbeat) stop() {
	if h != nil {
		h.t.cancel()
	}
}

// removeAll removes dir, logging (not returning) a failure: a left-over
// directory is untidy, not harmful.
func removeAll(log *zap.Logger, dir string) {
	if err := os.RemoveAll(dir); err != nil {
		log.Warn("cannot remove session directory", zap.String("dir", dir), zap.Error(err))
	}
}
