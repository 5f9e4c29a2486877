//go:build linux

package migrate

import (
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/loop"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// peerConn is a session's rpc conn on l whose peer is the far end of a
// socket pair, which the test drives.
func peerConn(t *testing.T, l *loop.Loop) (*transport.Conn, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.FileConn(os.NewFile(uintptr(fds[0]), "near"))
	if err != nil {
		t.Fatal(err)
	}
	far := os.NewFile(uintptr(fds[1]), "far")
	t.Cleanup(func() { far.Close() })
	lk, err := transport.NewLink(c)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := transport.NewConn(l, "rpc", lk, wire.RPC, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(conn.Close)
	conn.OnMessage = func(wire.Message) error { return nil }
	return conn, far
}

// answerPings reads what the session sends on far and answers each Ping
// with a Pong, until far closes; every (nil: never) it also sends a chunk
// of file data, as a sender of images would.
func answerPings(far *os.File, every time.Duration) {
	var mu sync.Mutex
	write := func(m wire.Message) {
		b, _ := wire.Marshal(m)
		mu.Lock()
		far.Write(b)
		mu.Unlock()
	}
	if every > 0 {
		go func() {
			for {
				time.Sleep(every)
				b, _ := wire.Marshal(&wire.FileData{Data: make([]byte, 4096)})
				mu.Lock()
				_, err := far.Write(b)
				mu.Unlock()
				if err != nil {
					return
				}
			}
		}()
	}
	go func() {
		dec := wire.NewDecoder(wire.RPC, 4096)
		for {
			n, err := far.Read(dec.Space())
			if err != nil {
				return
			}
			dec.Commit(n)
			for {
				m, err := dec.Next()
				if err != nil || m == nil {
					break
				}
				if p, ok := m.(*wire.Ping); ok {
					write(&wire.Pong{Seq: p.Seq})
				}
			}
		}
	}()
}

// runFor runs l for d, or until stop says so.
func runFor(t *testing.T, l *loop.Loop, d time.Duration, stop func() bool) {
	t.Helper()
	for deadline := time.Now().Add(d); time.Now().Before(deadline) && !stop(); {
		if _, err := l.RunOnce(); err != nil {
			t.Fatal(err)
		}
	}
}

func newLoop(t *testing.T) *loop.Loop {
	t.Helper()
	l, err := loop.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l
}

// TestHeartbeatTricklerIsSilent: a peer that sends a frame's header and
// then one byte of it every 20 ms, never completing it, is silent: the
// heartbeat gives up on it within its timeout (and a tick), though bytes
// keep arriving.
func TestHeartbeatTricklerIsSilent(t *testing.T) {
	l := newLoop(t)
	conn, far := peerConn(t, l)
	go func() {
		if _, err := far.Write(wire.AppendHeader(nil, wire.TypeFileData, wire.MaxPayload)); err != nil {
			return
		}
		for {
			time.Sleep(20 * time.Millisecond)
			if _, err := far.Write([]byte{0}); err != nil {
				return
			}
		}
	}()
	const timeout = 300 * time.Millisecond
	start := time.Now()
	var quiet time.Duration
	hb := startHeartbeat(l, conn, []*transport.Conn{conn}, timeout, func(q time.Duration) { quiet = q })
	defer hb.stop()
	runFor(t, l, 3*time.Second, func() bool { return quiet > 0 })
	took := time.Since(start)
	if quiet == 0 {
		t.Fatalf("a trickling peer held the session for %v (bytes in: %d)", took, conn.BytesIn())
	}
	if took > timeout+hb.tick()+200*time.Millisecond {
		t.Errorf("silence noticed after %v, want within %v and a tick", took, timeout)
	}
	if conn.BytesIn() < 10 {
		t.Errorf("only %d bytes trickled in: the test did not trickle", conn.BytesIn())
	}
}

// TestHeartbeatPongsKeepAlive: a peer that answers every Ping, and says
// nothing else, is alive.
func TestHeartbeatPongsKeepAlive(t *testing.T) {
	l := newLoop(t)
	conn, far := peerConn(t, l)
	answerPings(far, 0)
	silent := false
	hb := startHeartbeat(l, conn, []*transport.Conn{conn}, 300*time.Millisecond, func(time.Duration) { silent = true })
	defer hb.stop()
	runFor(t, l, 1200*time.Millisecond, func() bool { return silent })
	if silent {
		t.Fatal("a peer answering every ping was taken for lost")
	}
}

// TestPhaseDeadline: a peer that answers every Ping but sends nothing
// else, in a phase that never changes, stalls it: the heartbeat says so
// once the phase deadline has passed, naming the phase; until then it
// does not.
func TestPhaseDeadline(t *testing.T) {
	l := newLoop(t)
	conn, far := peerConn(t, l)
	answerPings(far, 0)
	ph := newPhaseTimer(&Session{}, zaptest.NewLogger(t))
	ph.enter("restore")
	const deadline = 400 * time.Millisecond
	start := time.Now()
	var phase string
	var waited, took time.Duration
	calls := 0
	hb := startHeartbeat(l, conn, []*transport.Conn{conn}, time.Second, func(time.Duration) { t.Error("taken for silent") })
	hb.deadline(ph, deadline, func(p string, w time.Duration) {
		phase, waited, took = p, w, time.Since(start)
		calls++
	})
	defer hb.stop()
	runFor(t, l, 1500*time.Millisecond, func() bool { return false })
	if calls != 1 {
		t.Fatalf("stalled called %d times, want once", calls)
	}
	if phase != "restore" || waited < deadline {
		t.Errorf("stalled(%q, %v), want restore and at least %v", phase, waited, deadline)
	}
	if took < deadline || took > deadline+300*time.Millisecond {
		t.Errorf("stalled after %v, want soon after %v", took, deadline)
	}
}

// TestPhaseDeadlineProgress: a phase whose data moves, or phases that
// follow each other, never stall, however long the whole takes.
func TestPhaseDeadlineProgress(t *testing.T) {
	t.Run("data moves", func(t *testing.T) {
		l := newLoop(t)
		conn, far := peerConn(t, l)
		answerPings(far, 100*time.Millisecond)
		ph := newPhaseTimer(&Session{}, zaptest.NewLogger(t))
		ph.enter("images")
		stalled := ""
		hb := startHeartbeat(l, conn, []*transport.Conn{conn}, time.Second, func(time.Duration) {})
		hb.deadline(ph, 300*time.Millisecond, func(p string, _ time.Duration) { stalled = p })
		defer hb.stop()
		runFor(t, l, 1200*time.Millisecond, func() bool { return stalled != "" })
		if stalled != "" {
			t.Fatalf("phase %s stalled while its data moved", stalled)
		}
	})
	t.Run("phases advance", func(t *testing.T) {
		l := newLoop(t)
		conn, far := peerConn(t, l)
		answerPings(far, 0)
		ph := newPhaseTimer(&Session{}, zaptest.NewLogger(t))
		ph.enter("prepare")
		stalled := ""
		hb := startHeartbeat(l, conn, []*transport.Conn{conn}, time.Second, func(time.Duration) {})
		hb.deadline(ph, 300*time.Millisecond, func(p string, _ time.Duration) { stalled = p })
		defer hb.stop()
		var next func()
		n := 0
		next = func() {
			n++
			ph.enter("phase-" + string(rune('a'+n)))
			l.After(150*time.Millisecond, next)
		}
		l.After(150*time.Millisecond, next)
		runFor(t, l, 1200*time.Millisecond, func() bool { return stalled != "" })
		if stalled != "" {
			t.Fatalf("phase %s stalled though phases advanced every 150 ms", stalled)
		}
	})
}
