//go:build linux

package epoll

import (
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func newPipe(t *testing.T) (r, w int) {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
	return p[0], p[1]
}

func TestWaitReportsReadyFd(t *testing.T) {
	p, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	r, w := newPipe(t)
	if err := p.Add(r, In); err != nil {
		t.Fatal(err)
	}
	evs := make([]Event, 4)
	n, woken, err := p.Wait(evs, 10*time.Millisecond)
	if err != nil || n != 0 || woken {
		t.Fatalf("idle Wait = %d, %v, %v; want 0, false, nil", n, woken, err)
	}
	if _, err := unix.Write(w, []byte("x")); err != nil {
		t.Fatal(err)
	}
	n, woken, err = p.Wait(evs, time.Second)
	if err != nil || n != 1 || woken {
		t.Fatalf("Wait = %d, %v, %v; want 1, false, nil", n, woken, err)
	}
	if evs[0].Fd != r || evs[0].Events&In == 0 {
		t.Fatalf("event = %+v, want fd %d readable", evs[0], r)
	}
	if err := p.Delete(r); err != nil {
		t.Fatal(err)
	}
	n, _, err = p.Wait(evs, 10*time.Millisecond)
	if err != nil || n != 0 {
		t.Fatalf("Wait after Delete = %d, %v; want 0, nil", n, err)
	}
}

func TestWakeInterruptsWait(t *testing.T) {
	p, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	done := make(chan bool)
	go func() {
		_, woken, err := p.Wait(make([]Event, 1), -1)
		if err != nil {
			t.Error(err)
		}
		done <- woken
	}()
	time.Sleep(20 * time.Millisecond)
	if err := p.Wake(); err != nil {
		t.Fatal(err)
	}
	select {
	case woken := <-done:
		if !woken {
			t.Fatal("Wait returned without woken")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Wake did not interrupt Wait")
	}
	// The wake-up was consumed: the next Wait times out.
	_, woken, err := p.Wait(make([]Event, 1), 10*time.Millisecond)
	if err != nil || woken {
		t.Fatalf("second Wait: woken %v, err %v; want false, nil", woken, err)
	}
}

func TestCloseWakesAndWaits(t *testing.T) {
	p, err := New()
	if err != nil {
		t.Fatal(err)
	}
	returned := make(chan struct{})
	go func() {
		defer close(returned)
		evs := make([]Event, 1)
		for {
			if _, _, err := p.Wait(evs, -1); err != nil {
				if !errors.Is(err, os.ErrClosed) {
					t.Errorf("Wait after Close: %v, want os.ErrClosed", err)
				}
				return
			}
		}
	}()
	time.Sleep(20 * time.Millisecond)
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-returned:
	case <-time.After(5 * time.Second):
		t.Fatal("Wait loop did not end after Close")
	}
	if err := p.Close(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("second Close = %v, want os.ErrClosed", err)
	}
	if err := p.Wake(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("Wake after Close = %v, want os.ErrClosed", err)
	}
	if err := p.Add(0, In); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("Add after Close = %v, want os.ErrClosed", err)
	}
}

func TestFdsAreCloseOnExec(t *testing.T) {
	p, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for _, fd := range []int{p.epfd, p.eventfd} {
		flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		if err != nil {
			t.Fatal(err)
		}
		if flags&unix.FD_CLOEXEC == 0 {
			t.Errorf("fd %d is not close-on-exec", fd)
		}
	}
}

// A Wait loop that goes straight back into Wait after being woken must not
// keep Close from taking its lock: Close once consumed its own wake-up that
// way and both hung forever.
func TestCloseRacesWaitLoop(t *testing.T) {
	for i := 0; i < 2000; i++ {
		p, err := New()
		if err != nil {
			t.Fatal(err)
		}
		returned := make(chan struct{})
		go func() {
			defer close(returned)
			evs := make([]Event, 1)
			for {
				if _, _, err := p.Wait(evs, -1); err != nil {
					return
				}
			}
		}()
		closed := make(chan error, 1)
		go func() { closed <- p.Close() }()
		select {
		case err := <-closed:
			if err != nil {
				t.Fatalf("round %d: Close: %v", i, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: Close did not return while a Wait loop ran", i)
		}
		<-returned
	}
}
