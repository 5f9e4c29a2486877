//go:build linux

// Package migrate runs one migration: the source and destination state
// machines of the commit rule (docs/design.md), each driven by a Session,
// one goroutine whose loop waits with epoll on the migration's sockets (its
// two connections, CRIU's page socket, CRIU's RPC sockets) and on an
// eventfd that stops it. CRIU is behind a small interface (CRIU) so the rule
// can be tested without root against a fake.
package migrate

import (
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/loop"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// Session is one migration on this daemon, as the source or as the
// destination.
type Session struct {
	ID        wire.SessionID
	Direction string // api.DirectionOut or api.DirectionIn
	Peer      string
	Started   time.Time

	// Fields below are written by the loop goroutine and read by others.
	// peer, once set, names the peer better than Peer: a source
	// daemon's own address (its host, and the port it listens on).
	peer  atomic.Value // string
	pid   atomic.Int64
	phase atomic.Value // string
	bytes atomic.Int64
	// container is the id of the container it moves ("" if none yet).
	container atomic.Value // string

	l       *loop.Loop
	m       machine
	crashed atomic.Bool
	// pending counts work running off the loop (see work); the session
	// does not end before it is done. Loop only.
	pending int
	// working is the same work, for a loop that panicked: cleanup waits
	// for it before it closes what the work uses.
	working sync.WaitGroup
	done    chan struct{}
	// end is set before done is closed.
	end End
}

// End is how a session ended, as far as this side knows.
type End struct {
	Result api.Result
	// Err is why it did not commit; nil if it did, but for a panic after
	// the commit (a *PanicError, with Outcome committed).
	Err error
	// Outcome is api.OutcomeCommitted, api.OutcomeRolledBack or
	// api.OutcomeInDoubt (a source that asked the commit and lost its
	// answer: a resolver must settle it).
	Outcome string
	// Record is the session's record at the end.
	Record store.Record
	// Crashed: the session was ended by Crash; nothing was cleaned up.
	Crashed bool
}

func newSession(id wire.SessionID, dir, peer string) (*Session, error) {
	l, err := loop.New()
	if err != nil {
		return nil, err
	}
	s := &Session{ID: id, Direction: dir, Peer: peer, Started: time.Now(), l: l, done: make(chan struct{})}
	s.phase.Store("starting")
	return s, nil
}

// start makes a session for the migration id and its machine (made by
// machine, which owns rpc and mem from then on); on error both links are
// closed.
func start(id wire.SessionID, dir, peer string, rpc, mem *transport.Link, machine func(*Session) (machine, error)) (*Session, error) {
	s, err := newSession(id, dir, peer)
	if err != nil {
		rpc.Close()
		mem.Close()
		return nil, err
	}
	m, err := machine(s)
	if err != nil {
		s.l.Close()
		return nil, err
	}
	s.m = m
	return s, nil
}

// Stop asks the session to stop: it ends as its commit rule says for the
// phase it is in (rolled back before the commit). It does not wait; see
// Done.
func (s *Session) Stop() { s.l.RequestStop() }

// Done is closed when the session has ended; End then says how.
func (s *Session) Done() <-chan struct{} { return s.done }

// End is how the session ended. Call it after Done is closed.
func (s *Session) End() End { return s.end }

// call runs fn on the session's loop and waits for it. It returns false if
// the session ended before fn could run.
func (s *Session) call(fn func()) bool {
	ran := make(chan struct{})
	s.l.Post(func() { fn(); close(ran) })
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

// Cancel is the operator's cancel: it rolls back if the commit has not
// been asked yet, and refuses otherwise.
func (s *Session) Cancel() error {
	var err error
	if !s.call(func() { err = s.m.cancel() }) {
		return api.Errorf(api.CodeNotFound, "session %s has just ended", s.ID)
	}
	return err
}

// Crash ends the session as the death of its daemon would: every
// descriptor it holds is closed, and nothing else happens (no message to
// the peer, no record written, no process signalled). The unit tier of
// the commit rule uses it to test recovery from the records.
func (s *Session) Crash() {
	s.crashed.Store(true)
	s.l.Wake()
}

// Info describes the session for the control API.
func (s *Session) Info() api.Session {
	return api.Session{
		ID:        s.ID.String(),
		Direction: s.Direction,
		PID:       int(s.pid.Load()),
		Container: s.containerID(),
		Peer:      s.PeerName(),
		Phase:     s.phase.Load().(string),
		Bytes:     s.bytes.Load(),
		Started:   s.Started,
		AgeMS:     time.Since(s.Started).Milliseconds(),
	}
}

// PeerName is the other daemon: its address as the source says it, or
// as the connection shows it.
func (s *Session) PeerName() string {
	if p, _ := s.peer.Load().(string); p != "" {
		return p
	}
	return s.Peer
}

func (s *Session) containerID() string {
	id, _ := s.container.Load().(string)
	return id
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
	// crash releases what the kernel releases at the daemon's death:
	// it closes every descriptor (sockets, CRIU's RPC sockets, locks,
	// pidfds, files), each through its owner, and kills the children
	// that die with phauld; it sends nothing, records nothing, signals
	// no tree.
	crash()
	// outcome is how the machine ended.
	outcome() End
	// cancel is the operator's cancel: it rolls back if the commit has
	// not been asked yet, and refuses otherwise.
	cancel() error
}

// Run drives the session's machine on the calling goroutine until it has
// finished, then cleans up and closes Done. A panic is turned into the
// session's error (End.Err, a *PanicError) after cleanup has made the
// state safe.
func (s *Session) Run() {
	defer close(s.done)
	if crashed := s.run(); crashed {
		s.end = End{Crashed: true, Err: api.Errorf(api.CodeAborted, "crashed"), Outcome: api.OutcomeInDoubt}
	}
}

func (s *Session) run() (crashed bool) {
	var err error
	defer func() {
		if crashed {
			return
		}
		if r := recover(); r != nil {
			err = &PanicError{Value: r, Stack: debug.Stack()}
		}
		// Work off the loop may still use the tree's pidfds and the
		// links; each is bounded (see work).
		s.working.Wait()
		// Clean-up makes the outcome safe; a panic in it must not take
		// the daemon down either.
		func() {
			defer func() {
				if r := recover(); r != nil && err == nil {
					err = &PanicError{Value: r, Stack: debug.Stack()}
				}
			}()
			s.m.cleanup()
		}()
		s.l.Close()
		if err != nil {
			// Committed stays committed: the copy there is the process,
			// whatever went wrong here after (the manager logs err).
			s.end = s.m.outcome()
			s.end.Err = err
		}
	}()
	if err = s.m.begin(); err != nil {
		s.end = s.m.outcome()
		if s.end.Err == nil {
			s.end.Err = err
		}
		err = nil
		return false
	}
	stopped := false
	for !s.m.finished() || s.pending > 0 {
		if _, werr := s.l.RunOnce(); werr != nil {
			err = fmt.Errorf("session loop: %w", werr)
			return false
		}
		if s.crashed.Load() {
			s.m.crash()
			s.l.Close()
			return true
		}
		if s.l.StopRequested() && !stopped {
			stopped = true
			s.m.stop()
		}
	}
	s.end = s.m.outcome()
	return false
}

// work runs fn on a goroutine of its own, so that nothing that may take
// time (waiting for processes, calls to systemd) blocks the loop, and then
// done on the loop. The session does not end before done has run; done
// must check that what fn was for still holds (the session may have moved
// on meanwhile). fn must be bounded in time. A panic in fn is the
// session's: it is raised again on the loop. Call it on the loop.
func (s *Session) work(fn, done func()) {
	s.pending++
	s.working.Add(1)
	go func() {
		var p any
		func() {
			defer func() { p = recover() }()
			fn()
		}()
		s.working.Done()
		s.l.Post(func() {
			s.pending--
			if p != nil {
				panic(p)
			}
			done()
		})
	}()
}

// PanicError is a session that panicked. The manager logs it once, with
// its stack.
type PanicError struct {
	Value any
	Stack []byte
}

func (e *PanicError) Error() string { return fmt.Sprintf("session panicked: %v", e.Value) }

// Resolve answers a source that lost the session's connections and asks
// how it ended; it runs on the session's loop, ordered with everything
// else the session does. ok is false if s is not a destination, or ended
// before it could answer.
func (s *Session) Resolve() (outcome string, pid int, ok bool) {
	d, isDest := s.m.(*dest)
	if !isDest {
		return "", 0, false
	}
	ok = s.call(func() { outcome, pid = d.resolve() })
	return outcome, pid, ok
}

// Close releases a session that will never run (its daemon is shutting
// down): its connections close, and nothing else happens.
func (s *Session) Close() {
	s.m.cleanup()
	s.l.Close()
	s.end = s.m.outcome()
	close(s.done)
}
