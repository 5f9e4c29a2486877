//go:build linux

package integration

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/client"
)

// notifySink is the service manager's end of sd_notify: a datagram socket
// that records what a daemon sends on it.
type notifySink struct {
	path string
	conn *net.UnixConn
	d    *daemon

	mu    sync.Mutex
	notes []note
}

// note is one sd_notify datagram.
type note struct {
	at    time.Time
	lines []string
	// serving, for a READY=1 note: whether the daemon's control socket
	// answered and its migration port accepted at the moment it came.
	serving bool
}

func listenNotify(t *testing.T, d *daemon) *notifySink {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	s := &notifySink{path: path, conn: conn, d: d}
	go s.read()
	return s
}

func (s *notifySink) read() {
	buf := make([]byte, 4096)
	for {
		n, err := s.conn.Read(buf)
		if err != nil {
			return
		}
		nt := note{at: time.Now(), lines: strings.Split(strings.TrimSpace(string(buf[:n])), "\n")}
		if nt.has("READY=1") {
			nt.serving = s.serving()
		}
		s.mu.Lock()
		s.notes = append(s.notes, nt)
		s.mu.Unlock()
	}
}

// serving checks, right now, that the daemon answers on both its sockets.
func (s *notifySink) serving() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := client.New(s.d.Socket).Status(ctx); err != nil {
		return false
	}
	c, err := net.DialTimeout("tcp", s.d.addr, 2*time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func (n note) has(line string) bool {
	for _, l := range n.lines {
		if l == line {
			return true
		}
	}
	return false
}

// all returns the notes so far.
func (s *notifySink) all() []note {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]note(nil), s.notes...)
}

// first returns the first note with a line starting with prefix, waiting
// up to limit for it.
func (s *notifySink) first(t *testing.T, prefix string, limit time.Duration) (note, string) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		for _, n := range s.all() {
			for _, l := range n.lines {
				if strings.HasPrefix(l, prefix) {
					return n, l
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("phauld %s sent no %q within %v; it sent: %v", s.d.name, prefix, limit, s.all())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestNotify runs phauld as systemd runs a Type=notify service with a
// watchdog: READY=1 comes only once both its sockets serve; STATUS= names
// a migration while it runs; WATCHDOG=1 comes at half the interval;
// STOPPING=1 comes on SIGTERM. The destination runs --one-shot: after the
// one migration it exits by itself, successfully.
func TestNotify(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17141", daemonOpts{notify: true, watchdog: 2 * time.Second})
	b := startDaemon(t, "B", "127.0.0.2:17142", daemonOpts{notify: true, flags: []string{"--one-shot"}})

	for _, d := range []*daemon{a, b} {
		ready, _ := d.notes.first(t, "READY=1", 10*time.Second)
		if !ready.serving {
			t.Errorf("phauld %s sent READY=1 before its sockets served", d.name)
		}
	}
	// A has a 2 s watchdog: pings come every second.
	time.Sleep(3200 * time.Millisecond)
	pings := 0
	for _, n := range a.notes.all() {
		if n.has("WATCHDOG=1") {
			pings++
		}
	}
	if pings < 2 {
		t.Errorf("phauld A sent %d WATCHDOG=1 in 3.2 s with WATCHDOG_USEC=2000000; want at least 2", pings)
	}
	for _, n := range b.notes.all() {
		if n.has("WATCHDOG=1") {
			t.Errorf("phauld B pinged a watchdog it was not given")
		}
	}

	// A migration long enough to be seen: STATUS names it on both sides.
	w := startWorkload(t, workloadOpts{memMiB: 256})
	before := w.report(w.pid, w.status)
	res := a.migrate(t, w.pid, b)
	w.track(res.DestPID)
	checkIntact(t, "after the migration", w.report(res.DestPID, w.status), before, w.memMiB, w.seed)
	for _, d := range []*daemon{a, b} {
		_, line := d.notes.first(t, "STATUS=serving migrations on "+d.addr+"; 1 migration(s): "+res.ID[:8], 5*time.Second)
		t.Logf("phauld %s: %s", d.name, line)
	}
	if _, line := a.notes.first(t, "STATUS=serving migrations on "+a.addr+"; idle", 5*time.Second); line == "" {
		t.Error("A's STATUS did not return to idle")
	}

	// B served its one migration: it stops by itself, cleanly.
	select {
	case <-b.Exited():
		if code := b.ExitCode(); code != 0 {
			t.Errorf("phauld B --one-shot exited %d after its migration", code)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("phauld B --one-shot still running 30 s after its migration")
	}
	if !strings.Contains(b.log(), "one migration served") {
		t.Error("B's log does not say why it stopped")
	}
	b.notes.first(t, "STOPPING=1", time.Second)
	// The migrated process outlives the daemon that restored it.
	w.report(res.DestPID, w.status)

	// A stops on SIGTERM, saying so first.
	a.terminate(t, 30*time.Second)
	a.notes.first(t, "STOPPING=1", time.Second)
	if _, err := os.Stat(a.Socket); err == nil {
		t.Errorf("A left its control socket %s behind", a.Socket)
	}
}
