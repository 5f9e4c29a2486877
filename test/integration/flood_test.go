//go:build linux

package integration

import (
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/test/harness"
)

// TestFloodStopsNothing: while 400 idle connections are held open to the
// destination, from the source's own address, a real migration goes
// through intact (they used to fill its 256 handshake places, and
// migrations failed with "TLS handshake failed: EOF"); the destination
// logs the flood in a line, not a line per connection.
func TestFloodStopsNothing(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:19301", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:19302", daemonOpts{})
	w := startWorkload(t, workloadOpts{memMiB: 16})
	before := w.report(w.pid, w.status)
	t.Cleanup(harness.Flood("127.0.0.1", b.addr, 400, true, nil))
	time.Sleep(time.Second) // all of them in
	res := a.migrate(t, w.pid, b)
	w.track(res.DestPID)
	waitRunning(t, res.DestPID)
	after := w.report(res.DestPID, w.status)
	checkIntact(t, "after a migration through the flood", after, before, 16, w.seed)
	waitFor(t, "the flood in B's log", 15*time.Second, func() bool {
		return strings.Contains(b.log(), "connections dropped: nothing received in time")
	})
	if n := strings.Count(b.log(), "connections dropped: nothing received in time"); n > 3 {
		t.Errorf("the flood is logged %d times in a few seconds: want one line every 10 s", n)
	}
}

// refusedAtConnect runs a migration of pid from a to b that b refuses
// at its first connection, and checks that phaulctl exits 1 ("nothing
// touched") saying each of want, with pid never stopped.
func refusedAtConnect(t *testing.T, a, b *daemon, pid int, want ...string) {
	t.Helper()
	r := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(pid), "--to", b.addr)
	if r.code != 1 {
		t.Fatalf("migrate pid %d: exit %d: %s %s; want refused (1)", pid, r.code, r.stdout, r.stderr)
	}
	for _, w := range want {
		if !strings.Contains(r.stderr, w) {
			t.Errorf("the refusal does not say %q:\n%s", w, r.stderr)
		}
	}
	if strings.Contains(r.stderr, "trusted connection") || strings.Contains(r.stderr, "same CA") {
		t.Errorf("the refusal blames certificates:\n%s", r.stderr)
	}
	t.Logf("refused: %s", strings.TrimSpace(r.stderr))
	if logs, _ := filepath.Glob(filepath.Join(a.state, "sessions", "*", "dump.log")); len(logs) != 0 {
		t.Errorf("the refused migration started a dump: %v", logs)
	}
	if info, err := proc.Stat(pid); err != nil || info.Stopped() {
		t.Errorf("pid %d after the refusal: %+v, %v; want it running", pid, info, err)
	}
}

// TestRefusedConnectionsSaySo: a source whose address the destination's
// --allow-peer does not list, and daemons of different security modes,
// are refused before anything is frozen, and the source says the cause
// (not certificates, not "bad frame magic"); so does the destination's
// log. The process runs on, untouched.
func TestRefusedConnectionsSaySo(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:19311", daemonOpts{})
	w := startWorkload(t, workloadOpts{memMiB: 8})
	before := w.report(w.pid, w.status)

	b := startDaemon(t, "B", "127.0.0.2:19312", daemonOpts{flags: []string{"--allow-peer", "10.200.0.0/16", "--allow-peer", "127.0.0.2"}})
	refusedAtConnect(t, a, b, w.pid, "does not accept connections from this host's address", "--allow-peer")
	if !strings.Contains(b.log(), "not in --allow-peer") {
		t.Errorf("B's log does not say why it refused A:\n%s", b.log())
	}

	plain := startDaemon(t, "P", "127.0.0.2:19313", daemonOpts{insecure: true})
	refusedAtConnect(t, a, plain, w.pid, "runs with --insecure, and this phauld uses mutual TLS")
	waitFor(t, "P's log to name the cause", 5*time.Second, func() bool {
		return strings.Contains(plain.log(), "the peer speaks TLS (it runs with certificates), and this daemon runs with --insecure")
	})

	plainA := startDaemon(t, "Q", "127.0.0.1:19314", daemonOpts{insecure: true})
	tlsB := startDaemon(t, "T", "127.0.0.2:19315", daemonOpts{})
	refusedAtConnect(t, plainA, tlsB, w.pid, "requires mutual TLS, and this phauld runs with --insecure")
	waitFor(t, "T's log to name the cause", 5*time.Second, func() bool {
		return strings.Contains(tlsB.log(), "the peer runs with --insecure")
	})
	checkIntact(t, "after the refusals", w.report(w.pid, w.status), before, 8, w.seed)
}
