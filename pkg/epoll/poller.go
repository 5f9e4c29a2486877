//go:build linux

// Package epoll is a small Linux poller: an epoll instance plus an eventfd
// that wakes it. A phaul session loop waits on it for its sockets and for
// the eventfd that tells it to stop.
package epoll

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Event flags, re-exported so callers need not import x/sys/unix for them.
const (
	In    = unix.EPOLLIN
	Out   = unix.EPOLLOUT
	RDHup = unix.EPOLLRDHUP
	Hup   = unix.EPOLLHUP
	Err   = unix.EPOLLERR
)

// Event is one ready file descriptor.
type Event struct {
	Fd     int
	Events uint32
}

// Poller waits for readiness of registered file descriptors. Wait may be
// called by one goroutine at a time; Wake and Close may be called from any
// goroutine.
type Poller struct {
	// mu is held for reading by Wait and for writing by Close, so that
	// Close can wait until a Wait in progress has returned.
	mu sync.RWMutex
	// closing is set by Close before it wakes the poller. From then on
	// the eventfd is never drained, so every Wait, in progress or about
	// to start, returns at once and the write lock cannot starve.
	closing atomic.Bool
	epfd    int
	eventfd int
	raw     []unix.EpollEvent
}

// New returns a poller with its own epoll instance and wake-up eventfd,
// both close-on-exec.
func New() (*Poller, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	p := &Poller{epfd: epfd, eventfd: efd}
	if err := p.ctl(unix.EPOLL_CTL_ADD, efd, unix.EPOLLIN); err != nil {
		unix.Close(efd)
		unix.Close(epfd)
		return nil, err
	}
	return p, nil
}

func (p *Poller) ctl(op, fd int, events uint32) error {
	ev := unix.EpollEvent{Events: events, Fd: int32(fd)}
	for {
		err := unix.EpollCtl(p.epfd, op, fd, &ev)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("epoll_ctl fd %d: %w", fd, err)
		}
		return nil
	}
}

// Add starts watching fd for events (In, Out, RDHup; Hup and Err are always
// reported).
func (p *Poller) Add(fd int, events uint32) error {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.closing.Load() {
		return os.ErrClosed
	}
	return p.ctl(unix.EPOLL_CTL_ADD, fd, events)
}

// Modify changes the events watched for fd.
func (p *Poller) Modify(fd int, events uint32) error {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.closing.Load() {
		return os.ErrClosed
	}
	return p.ctl(unix.EPOLL_CTL_MOD, fd, events)
}

// Delete stops watching fd. Call it before closing fd.
func (p *Poller) Delete(fd int) error {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.closing.Load() {
		return os.ErrClosed
	}
	return p.ctl(unix.EPOLL_CTL_DEL, fd, 0)
}

// Wait blocks until at least one watched fd is ready, the poller is woken,
// or timeout passes (a negative timeout waits forever). It fills events and
// returns how many it filled, and whether Wake was called since the last
// Wait. After Close it returns os.ErrClosed.
func (p *Poller) Wait(events []Event, timeout time.Duration) (n int, woken bool, err error) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.closing.Load() {
		return 0, false, os.ErrClosed
	}
	if cap(p.raw) < len(events)+1 {
		p.raw = make([]unix.EpollEvent, len(events)+1)
	}
	raw := p.raw[:len(events)+1]
	msec := -1
	if timeout >= 0 {
		// Round up so a 0.5 ms timeout does not spin at 0.
		msec = int((timeout + time.Millisecond - 1) / time.Millisecond)
	}
	var got int
	for {
		got, err = unix.EpollWait(p.epfd, raw, msec)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, false, fmt.Errorf("epoll_wait: %w", err)
		}
		break
	}
	if p.closing.Load() {
		return 0, false, os.ErrClosed
	}
	for _, ev := range raw[:got] {
		if int(ev.Fd) == p.eventfd {
			p.drain()
			woken = true
			continue
		}
		if n < len(events) {
			events[n] = Event{Fd: int(ev.Fd), Events: ev.Events}
			n++
		}
	}
	return n, woken, nil
}

func (p *Poller) drain() {
	var buf [8]byte
	for {
		_, err := unix.Read(p.eventfd, buf[:])
		if err != unix.EINTR {
			return
		}
	}
}

// Wake makes a Wait in progress (or the next one) return with woken set.
func (p *Poller) Wake() error {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.closing.Load() {
		return os.ErrClosed
	}
	return p.wake()
}

func (p *Poller) wake() error {
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	for {
		_, err := unix.Write(p.eventfd, one[:])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			// The counter is saturated: a wake-up is already pending.
			return nil
		case err != nil:
			return fmt.Errorf("write eventfd: %w", err)
		}
		return nil
	}
}

// Close wakes a Wait in progress, waits for it to return, and closes the
// epoll fd and the eventfd. It does not close the watched fds. A second Close
// returns os.ErrClosed.
func (p *Poller) Close() error {
	if p.closing.Swap(true) {
		return os.ErrClosed
	}
	// Wake under the read lock, so the fds are still open. The wake-up
	// stays pending (Wait no longer drains it once closing is set), so a
	// Wait in progress returns, and so does any Wait that starts before
	// the write lock is ours.
	p.mu.RLock()
	werr := p.wake()
	p.mu.RUnlock()

	p.mu.Lock()
	defer p.mu.Unlock()
	return errors.Join(werr, unix.Close(p.eventfd), unix.Close(p.epfd))
}
