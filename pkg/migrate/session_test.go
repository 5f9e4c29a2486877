//go:build linux

package migrate

import (
	"errors"
	"testing"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/wire"
)

// panicky is a machine that panics when it begins.
type panicky struct{ cleaned bool }

func (p *panicky) begin() error   { panic("boom") }
func (p *panicky) finished() bool { return true }
func (p *panicky) stop()          {}
func (p *panicky) cleanup()       { p.cleaned = true }
func (p *panicky) crash()         {}
func (p *panicky) outcome() End   { return End{Outcome: api.OutcomeRolledBack} }
func (p *panicky) cancel() error  { return nil }

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
