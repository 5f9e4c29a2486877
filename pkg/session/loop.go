//go:build linux

package session

import (
	"fmt"
	"sync/atomic"
	"time"

	"github.com/phaul/phaul/pkg/epoll"
)

// loop is one session's event loop: it waits with epoll on the session's
// sockets and on the poller's eventfd, and runs the callback registered for
// each ready fd and each due timer. Everything a session does happens on
// its loop's goroutine, so session state needs no locks; other goroutines
// only call wake (through Session.Stop).
type loop struct {
	poller  *epoll.Poller
	watches map[int]*watch
	timers  []*timer
	events  []epoll.Event
	// stop is set by another goroutine before it wakes the loop.
	stop atomic.Bool
}

type watch struct {
	events uint32
	fn     func(events uint32)
}

// timer is a one-shot callback.
type timer struct {
	at   time.Time
	fn   func()
	dead bool
}

// cancel stops the timer from firing. A nil timer is a no-op.
func (t *timer) cancel() {
	if t != nil {
		t.dead = true
	}
}

func newLoop() (*loop, error) {
	p, err := epoll.New()
	if err != nil {
		return nil, err
	}
	return &loop{poller: p, watches: map[int]*watch{}, events: make([]epoll.Event, 32)}, nil
}

// watch registers fn to run when fd is ready for events. Hang-ups and
// errors are always reported.
func (l *loop) watch(fd int, events uint32, fn func(uint32)) error {
	if err := l.poller.Add(fd, events); err != nil {
		return err
	}
	l.watches[fd] = &watch{events: events, fn: fn}
	return nil
}

// setEvents changes what fd is watched for; it does nothing if unchanged.
func (l *loop) setEvents(fd int, events uint32) error {
	w := l.watches[fd]
	if w == nil {
		return fmt.Errorf("fd %d is not watched", fd)
	}
	if w.events == events {
		return nil
	}
	if err := l.poller.Modify(fd, events); err != nil {
		return err
	}
	w.events = events
	return nil
}

// unwatch stops watching fd. Call it before closing fd.
func (l *loop) unwatch(fd int) {
	if _, ok := l.watches[fd]; ok {
		l.poller.Delete(fd)
		delete(l.watches, fd)
	}
}

// after runs fn on the loop once d has passed.
func (l *loop) after(d time.Duration, fn func()) *timer {
	t := &timer{at: time.Now().Add(d), fn: fn}
	l.timers = append(l.timers, t)
	return t
}

// wake interrupts the loop from another goroutine.
func (l *loop) wake() { l.poller.Wake() }

// requestStop asks the loop's owner to stop; see stopRequested.
func (l *loop) requestStop() {
	l.stop.Store(true)
	l.wake()
}

// stopRequested reports whether requestStop was called.
func (l *loop) stopRequested() bool { return l.stop.Load() }

// runOnce waits for one round of events (or the next timer) and runs their
// callbacks. It reports whether the loop was woken from outside.
func (l *loop) runOnce() (woken bool, err error) {
	timeout := time.Duration(-1)
	live := l.timers[:0]
	for _, t := range l.timers {
		if !t.dead {
			live = append(live, t)
		}
	}
	l.timers = live
	for _, t := range l.timers {
		if d := time.Until(t.at); timeout < 0 || d < timeout {
			timeout = max(d, 0)
		}
	}
	n, woken, err := l.poller.Wait(l.events, timeout)
	if err != nil {
		return false, err
	}
	for _, ev := range l.events[:n] {
		// A callback may have unwatched a later fd of this round.
		if w := l.watches[ev.Fd]; w != nil {
			w.fn(ev.Events)
		}
	}
	now := time.Now()
	// Callbacks may add timers; fire only those due now, in order added.
	for _, t := range l.timers {
		if !t.dead && !t.at.After(now) {
			t.dead = true
			t.fn()
		}
	}
	return woken, nil
}

// close releases the poller. The watched fds are closed by their owners.
func (l *loop) close() { l.poller.Close() }
