//go:build linux

package migrate

import (
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/wire"
)

// panicky is a machine that panics when it begins.
type panicky struct {
	cleaned bool
	end     string // its outcome; rolled back if ""
}

func (p *panicky) begin() error   { panic("boom") }
func (p *panicky) finished() bool { return true }
func (p *panicky) stop()          {}
func (p *panicky) cleanup()       { p.cleaned = true }
func (p *panicky) crash()         {}
func (p *panicky) outcome() End {
	if p.end == "" {
		return End{Outcome: api.OutcomeRolledBack}
	}
	return End{Outcome: p.end}
}
func (p *panicky) cancel() error { return nil }

// TestPanicEndsSession checks that a session that panics ends: its
// clean-up runs, and its error is a PanicError with the stack.
func TestPanicEndsSession(t *testing.T) {
	s, err := newSession(wire.SessionID{1}, api.DirectionIn, "test")
	if err != nil {
		t.Fatal(err)
	}
	p := &panicky{}
	s.m = p
	s.Run()
	<-s.Done()
	var pe *PanicError
	if err := s.End().Err; !errors.As(err, &pe) || !p.cleaned || len(pe.Stack) == 0 {
		t.Fatalf("panicking session: err %v, cleaned %v", err, p.cleaned)
	}
}

// TestPanicAfterCommitStaysCommitted: a session that panics once its
// machine says committed ends committed (the process is the copy there),
// with the panic as its error for the log.
func TestPanicAfterCommitStaysCommitted(t *testing.T) {
	s, err := newSession(wire.SessionID{2}, api.DirectionOut, "test")
	if err != nil {
		t.Fatal(err)
	}
	s.m = &panicky{end: api.OutcomeCommitted}
	s.Run()
	var pe *PanicError
	if e := s.End(); e.Outcome != api.OutcomeCommitted || !errors.As(e.Err, &pe) {
		t.Fatalf("a panic after the commit ended %q (%v); want committed, with the panic", e.Outcome, e.Err)
	}
}

// worker is a machine with work off its loop: one slow, one that panics.
type worker struct {
	s *Session
	// slowDone is set when the slow work has finished; sawDone is what
	// cleanup found.
	slowDone, sawDone atomic.Bool
}

func (w *worker) begin() error {
	w.s.work(func() {
		time.Sleep(100 * time.Millisecond)
		w.slowDone.Store(true)
	}, func() {})
	w.s.work(func() { panic("in work") }, func() {})
	return nil
}
func (w *worker) finished() bool { return false }
func (w *worker) stop()          {}
func (w *worker) cleanup()       { w.sawDone.Store(w.slowDone.Load()) }
func (w *worker) crash()         {}
func (w *worker) outcome() End   { return End{Outcome: api.OutcomeRolledBack} }
func (w *worker) cancel() error  { return nil }

// TestPanicInWork: a panic in work off the loop is the session's, not the
// daemon's; and cleanup waits for the session's other work, which may
// still use what cleanup closes.
func TestPanicInWork(t *testing.T) {
	s, err := newSession(wire.SessionID{3}, api.DirectionOut, "test")
	if err != nil {
		t.Fatal(err)
	}
	w := &worker{s: s}
	s.m = w
	s.Run()
	var pe *PanicError
	if err := s.End().Err; !errors.As(err, &pe) || !strings.Contains(err.Error(), "in work") {
		t.Fatalf("a panic in work: %v; want the session's PanicError", err)
	}
	if !w.sawDone.Load() {
		t.Fatal("cleanup ran while work off the loop was still running")
	}
}
