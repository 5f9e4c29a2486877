//go:build linux

// Package loop is a session's event loop: it waits with epoll on the
// descriptors it watches and on the poller's eventfd, and runs the callback
// registered for each ready descriptor, each due timer and each function
// another goroutine posted. Everything a migration does happens on its
// loop's goroutine, so a session's state needs no locks; other goroutines
// only Post, Wake and RequestStop.
package loop

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/phaul/phaul/pkg/epoll"
)

// Loop is one event loop. Its methods must be called on the goroutine
// that runs it, except Post, Wake, RequestStop and StopRequested.
type Loop struct {
	poller  *epoll.Poller
	watches map[int]*watch
	timers  []*Timer
	events  []epoll.Event
	round   uint64
	// stop is set by another goroutine before it wakes the loop.
	stop atomic.Bool

	mu     sync.Mutex
	posted []func()
}

type watch struct {
	// events is what the fd is waited for; 0 parks it: out of the epoll
	// set, because epoll reports a hang-up even to an empty mask, and a
	// socket whose peer has gone would wake the loop without end.
	events uint32
	fn     func(events uint32)
	// round is the RunOnce in which the watch was made: events of that
	// round are for an fd the number belonged to before.
	round uint64
}

// Timer is a one-shot callback.
type Timer struct {
	at   time.Time
	fn   func()
	dead bool
}

// Cancel stops the timer from firing. A nil timer is a no-op.
func (t *Timer) Cancel() {
	if t != nil {
		t.dead = true
	}
}

// New returns a loop with its own poller.
func New() (*Loop, error) {
	p, err := epoll.New()
	if err != nil {
		return nil, err
	}
	return &Loop{poller: p, watches: map[int]*watch{}, events: make([]epoll.Event, 32)}, nil
}

// Watch registers fn to run when fd is ready for events. Hang-ups and
// errors are always reported.
// With events 0 the fd is parked: nothing is reported for it, hang-ups
// included, until SetEvents asks for something.
func (l *Loop) Watch(fd int, events uint32, fn func(uint32)) error {
	if events != 0 {
		if err := l.poller.Add(fd, events); err != nil {
			return err
		}
	}
	l.watches[fd] = &watch{events: events, fn: fn, round: l.round}
	return nil
}

// SetEvents changes what fd is watched for; it does nothing if unchanged.
// 0 parks the fd (see Watch). An error means the fd can no longer be
// waited for: its owner must give up on it, or it would never be woken
// again.
func (l *Loop) SetEvents(fd int, events uint32) error {
	w := l.watches[fd]
	if w == nil {
		return fmt.Errorf("fd %d is not watched", fd)
	}
	var err error
	switch {
	case w.events == events:
		return nil
	case events == 0:
		err = l.poller.Delete(fd)
	case w.events == 0:
		err = l.poller.Add(fd, events)
	default:
		err = l.poller.Modify(fd, events)
	}
	if err != nil {
		return err
	}
	w.events = events
	return nil
}

// Unwatch stops watching fd. Call it before closing fd.
func (l *Loop) Unwatch(fd int) {
	if w, ok := l.watches[fd]; ok {
		if w.events != 0 {
			l.poller.Delete(fd)
		}
		delete(l.watches, fd)
	}
}

// After runs fn on the loop once d has passed.
func (l *Loop) After(d time.Duration, fn func()) *Timer {
	t := &Timer{at: time.Now().Add(d), fn: fn}
	l.timers = append(l.timers, t)
	return t
}

// Post runs fn on the loop, soon; it may be called from any goroutine.
// Functions run in the order posted. One posted after the loop has stopped
// running never runs: a caller that waits for it must also watch for the
// loop's end.
func (l *Loop) Post(fn func()) {
	l.mu.Lock()
	l.posted = append(l.posted, fn)
	l.mu.Unlock()
	l.poller.Wake()
}

// Wake interrupts the loop from another goroutine.
func (l *Loop) Wake() { l.poller.Wake() }

// RequestStop asks the loop's owner to stop; see StopRequested.
func (l *Loop) RequestStop() {
	l.stop.Store(true)
	l.Wake()
}

// StopRequested reports whether RequestStop was called.
func (l *Loop) StopRequested() bool { return l.stop.Load() }

// RunOnce waits for one round of events (or the next timer, or a posted
// function) and runs their callbacks. It reports whether the loop was
// woken from outside.
func (l *Loop) RunOnce() (woken bool, err error) {
	timeout := time.Duration(-1)
	live := l.timers[:0]
	for _, t := range l.timers {
		if !t.dead {
			live = append(live, t)
		}
	}
	clear(l.timers[len(live):])
	l.timers = live
	for _, t := range l.timers {
		if d := time.Until(t.at); timeout < 0 || d < timeout {
			timeout = max(d, 0)
		}
	}
	l.mu.Lock()
	if len(l.posted) > 0 {
		timeout = 0
	}
	l.mu.Unlock()
	l.round++
	n, woken, err := l.poller.Wait(l.events, timeout)
	if err != nil {
		return false, err
	}
	for _, ev := range l.events[:n] {
		// A callback may have unwatched a later fd of this round, or
		// closed it and watched a new one under the same number.
		if w := l.watches[ev.Fd]; w != nil && w.round != l.round && w.events != 0 {
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
	l.runPosted()
	return woken, nil
}

func (l *Loop) runPosted() {
	for {
		l.mu.Lock()
		fns := l.posted
		l.posted = nil
		l.mu.Unlock()
		if len(fns) == 0 {
			return
		}
		for _, fn := range fns {
			fn()
		}
	}
}

// Close releases the poller. The watched fds are closed by their owners.
func (l *Loop) Close() { l.poller.Close() }
