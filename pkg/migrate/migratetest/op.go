//go:build linux

package migratetest

import (
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/migrate"
)

// event is one datagram from the fake CRIU: a notification, or a response.
type event struct {
	Notify string `json:"notify,omitempty"`
	PID    int    `json:"pid,omitempty"`
	Status int    `json:"status,omitempty"`
	Err    string `json:"err,omitempty"`
	Errno  int    `json:"errno,omitempty"`
}

// message is one datagram to the fake CRIU: a notification's answer or a
// WAIT_PID request.
type message struct {
	Type string `json:"type"` // "notify" or "wait-pid"
	OK   bool   `json:"ok,omitempty"`
	PID  int    `json:"pid,omitempty"`
}

// Op is a fake CRIU request in progress: it implements migrate.Op. Its Fd
// is our end of a SOCK_SEQPACKET socket pair whose other end the fake's
// goroutine holds.
type Op struct {
	kind      string
	fd        int
	pid       int
	log       string
	buf       []byte
	closeOnce sync.Once
	closed    atomic.Bool
	req       *request
}

var _ migrate.Op = (*Op)(nil)

// Fd becomes readable when the fake has sent an event (or exited).
func (op *Op) Fd() int { return op.fd }

// Pid is the request's fake CRIU pid: no process has it.
func (op *Op) Pid() int { return op.pid }

// LogPath is the request's log, in its images directory ("" without a log
// file, as CRIU's).
func (op *Op) LogPath() string { return op.log }

// Next reads one event without blocking, as criu.Op.Next does.
func (op *Op) Next() (criu.Event, error) {
	if op.closed.Load() {
		return criu.Event{}, fmt.Errorf("criu %s: read: %w", op.kind, os.ErrClosed)
	}
	var n int
	var err error
	for {
		n, err = unix.Read(op.fd, op.buf)
		if err != unix.EINTR {
			break
		}
	}
	switch {
	case err == unix.EAGAIN:
		return criu.Event{}, criu.ErrAgain
	case err != nil:
		return criu.Event{}, fmt.Errorf("criu %s: read: %w", op.kind, err)
	case n == 0:
		return criu.Event{}, op.failure(fmt.Sprintf("criu exited without answering (%s)", op.req.exitStatus()), 0)
	}
	var ev event
	if err := json.Unmarshal(op.buf[:n], &ev); err != nil {
		return criu.Event{}, fmt.Errorf("criu %s: decode response: %w", op.kind, err)
	}
	if ev.Notify != "" {
		return criu.Event{Notify: ev.Notify, PID: ev.PID}, nil
	}
	if ev.Err != "" {
		return criu.Event{Err: op.failure(ev.Err, syscall.Errno(ev.Errno))}, nil
	}
	return criu.Event{PID: ev.PID, Status: syscall.WaitStatus(ev.Status)}, nil
}

func (op *Op) failure(msg string, errno syscall.Errno) *criu.Error {
	e := &criu.Error{Op: op.kind, Msg: msg, Errno: errno, Log: op.log}
	if e.Log != "" {
		e.Lines = criu.ErrorLines(e.Log, 4)
	}
	return e
}

// Reply answers the notification Next last returned.
func (op *Op) Reply(ok bool) error { return op.send(message{Type: "notify", OK: ok}) }

// WaitPID asks a page server request to answer once pid has exited.
func (op *Op) WaitPID(pid int) error { return op.send(message{Type: "wait-pid", PID: pid}) }

func (op *Op) send(m message) error {
	if op.closed.Load() {
		return fmt.Errorf("criu %s: send request: %w", op.kind, os.ErrClosed)
	}
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("criu %s: encode request: %w", op.kind, err)
	}
	for {
		_, err = unix.Write(op.fd, b)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("criu %s: send request: %w", op.kind, err)
	}
	return nil
}

// Close closes our end of the socket; the fake then ends the request as
// CRIU does. A second Close does nothing.
func (op *Op) Close() error {
	var err error
	op.closeOnce.Do(func() {
		op.closed.Store(true)
		err = unix.Close(op.fd)
	})
	return err
}

// Abandon closes the socket and waits up to grace for the request to end;
// one that does not (see ErrWedge) is killed, with the process it
// restored, and waited for as long again. It reports whether it had to
// kill, and the fake's Killed lists the request.
func (op *Op) Abandon(grace time.Duration) bool {
	op.Close()
	select {
	case <-op.req.done:
		return false
	case <-time.After(grace):
	}
	op.req.c.mu.Lock()
	op.req.c.killed = append(op.req.c.killed, Request{Kind: op.kind, Dir: op.req.opts.ImagesDir, PID: op.pid})
	op.req.c.mu.Unlock()
	op.req.terminate("signal: killed")
	select {
	case <-op.req.done:
	case <-time.After(grace):
	}
	return true
}
