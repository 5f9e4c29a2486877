//go:build linux

package loop

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/epoll"
)

func socketpair(t *testing.T) (int, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fds[0], fds[1]
}

func newLoop(t *testing.T) *Loop {
	t.Helper()
	l, err := New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l
}

// TestParkedHangUpIsQuiet: a socket whose peer has gone reports a hang-up
// to any mask, the empty one included; parked (events 0), it must not wake
// the loop. Before parking took it out of the epoll set, a relay whose
// CRIU had closed its side spun the loop at a few hundred thousand rounds
// a second for the rest of the migration.
func TestParkedHangUpIsQuiet(t *testing.T) {
	l := newLoop(t)
	a, b := socketpair(t)
	defer unix.Close(a)
	calls := 0
	if err := l.Watch(a, epoll.In, func(uint32) { calls++ }); err != nil {
		t.Fatal(err)
	}
	unix.Close(b)
	if _, err := l.RunOnce(); err != nil || calls != 1 {
		t.Fatalf("the hang-up: %d calls, %v", calls, err)
	}
	if err := l.SetEvents(a, 0); err != nil {
		t.Fatal(err)
	}
	fired := false
	l.After(50*time.Millisecond, func() { fired = true })
	rounds := 0
	for !fired && rounds < 1000 {
		if _, err := l.RunOnce(); err != nil {
			t.Fatal(err)
		}
		rounds++
	}
	if calls != 1 || rounds > 3 {
		t.Fatalf("parked: %d more calls, %d rounds to wait 50 ms; want none, and one round", calls-1, rounds)
	}
	// Asked for again, it is reported again.
	if err := l.SetEvents(a, epoll.In); err != nil {
		t.Fatal(err)
	}
	if _, err := l.RunOnce(); err != nil || calls != 2 {
		t.Fatalf("unparked: %d calls, %v", calls, err)
	}
	l.Unwatch(a)
}

// TestReusedNumberGetsNoStaleEvent: a callback that closes another
// watched fd and watches a new one under the same number must not see the
// new watch called with the old fd's event of the same round.
func TestReusedNumberGetsNoStaleEvent(t *testing.T) {
	l := newLoop(t)
	a, pa := socketpair(t)
	c, pc := socketpair(t)
	defer unix.Close(pa)
	defer unix.Close(pc)
	for _, fd := range []int{pa, pc} {
		unix.Write(fd, []byte("x")) // both ready in the same round
	}
	stale := 0
	var swapped bool
	swap := func(other int) func(uint32) {
		return func(uint32) {
			if swapped {
				return
			}
			swapped = true
			l.Unwatch(other)
			fresh, peer := socketpair(t)
			defer unix.Close(fresh)
			t.Cleanup(func() { unix.Close(peer) })
			// The new socket takes the old one's number, and nothing
			// is ready on it.
			if err := unix.Dup3(fresh, other, unix.O_CLOEXEC); err != nil {
				t.Fatal(err)
			}
			if err := l.Watch(other, epoll.In, func(uint32) { stale++ }); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := l.Watch(a, epoll.In, swap(c)); err != nil {
		t.Fatal(err)
	}
	if err := l.Watch(c, epoll.In, swap(a)); err != nil {
		t.Fatal(err)
	}
	if _, err := l.RunOnce(); err != nil {
		t.Fatal(err)
	}
	if !swapped || stale != 0 {
		t.Fatalf("swapped %v; the new watch got %d events of the old fd", swapped, stale)
	}
	unix.Close(a)
	unix.Close(c)
}
