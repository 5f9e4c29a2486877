//go:build linux

package integration

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/wire"
	"github.com/phaul/phaul/test/faultproxy"
)

// migrateFails runs a migration of w to addr that must fail within limit
// (phaulctl is killed at twice that), and checks that the source's tree
// runs again, the same process, intact, in one copy. It returns what
// phaulctl printed on stderr and how long it took.
func migrateFails(t *testing.T, a *daemon, w *workload, addr string, limit time.Duration, extra ...string) (string, time.Duration) {
	t.Helper()
	before := w.report(w.pid, w.status)
	info, err := proc.Stat(w.pid)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*limit)
	defer cancel()
	start := time.Now()
	r, err := a.CtlContext(ctx, append([]string{"migrate", "--pid", strconv.Itoa(w.pid), "--to", addr}, extra...)...)
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if ctx.Err() != nil {
		t.Fatalf("the migration still ran after %v (phaulctl killed)", took)
	}
	if r.Code == 0 {
		t.Fatalf("the migration succeeded: %s", r.Stdout)
	}
	if took > limit {
		t.Errorf("the migration took %v to fail, want under %v", took, limit)
	}
	got := waitRunning(t, w.pid)
	if got.StartTime != info.StartTime {
		t.Fatal("the source process was replaced")
	}
	checkIntact(t, "source after the failed migration", w.report(w.pid, w.status), before, w.memMiB, w.seed)
	if n := len(w.Processes()); n != 1 {
		t.Errorf("%d copies of the process, want 1", n)
	}
	return r.Stderr, took
}

// TestTricklingPeerEnded: once the destination has restored the tree
// (the source's copy frozen), everything it sends the source is replaced
// by a frame that never completes, one byte every 200 ms, so the source
// sees bytes but no answer to its pings. The source must treat it as lost
// within its peer timeout (2 s) and resume its tree, intact; before,
// every byte counted as a word and the tree stayed frozen for as long as
// the trickle went on.
func TestTricklingPeerEnded(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:19201", daemonOpts{insecure: true, flags: []string{"--peer-timeout", "2s"}})
	b := startDaemon(t, "B", "127.0.0.2:19202", daemonOpts{insecure: true, flags: []string{"--peer-timeout", "30s"}})
	px := newFaultProxy(t, "127.0.0.3:19203", b.addr)
	w := startWorkload(t, workloadOpts{memMiB: 16})
	r := &faultproxy.Rule{Dir: faultproxy.ToSource, Type: wire.TypeRestored, Nth: 1, Action: faultproxy.Trickle,
		Bytes: wire.AppendHeader(nil, wire.TypeFileData, wire.MaxPayload), TrickleEvery: 200 * time.Millisecond}
	px.Arm(r)
	stderr, took := migrateFails(t, a, w, px.Addr(), 12*time.Second)
	select {
	case <-r.Done():
	default:
		t.Fatal("the trickle never started: the migration failed before the restore")
	}
	if !strings.Contains(stderr, "the destination stopped answering") {
		t.Errorf("phaulctl says %q, want the destination stopped answering", stderr)
	}
	t.Logf("trickling destination ended after %v", took)
	waitFor(t, "the sessions to end", 20*time.Second, func() bool {
		return len(a.sessions(t)) == 0 && len(b.sessions(t)) == 0
	})
}

// TestStalledDestinationPhaseDeadline: the destination answers every ping
// but never gets the source's Restore (the proxy swallows it), so it
// never advances while the source's tree is frozen. The source's phase
// deadline (--phase-timeout 2s) must end the migration, naming the
// phase, and resume the tree intact; before, it stayed frozen for as long
// as the destination kept answering. Both daemons run with --keep-failed
// 0: once the sessions have ended, their directories hold only their
// records.
func TestStalledDestinationPhaseDeadline(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:19211", daemonOpts{insecure: true, flags: []string{"--peer-timeout", "3s", "--phase-timeout", "2s", "--keep-failed", "0"}})
	b := startDaemon(t, "B", "127.0.0.2:19212", daemonOpts{insecure: true, flags: []string{"--peer-timeout", "3s", "--keep-failed", "0"}})
	px := newFaultProxy(t, "127.0.0.3:19213", b.addr)
	w := startWorkload(t, workloadOpts{memMiB: 16})
	r := &faultproxy.Rule{Dir: faultproxy.ToDest, Type: wire.TypeRestore, Nth: 1, Action: faultproxy.Swallow}
	px.Arm(r)
	stderr, took := migrateFails(t, a, w, px.Addr(), 12*time.Second)
	if !strings.Contains(stderr, "no progress in phase restore") || !strings.Contains(stderr, "--phase-timeout") {
		t.Errorf("phaulctl says %q, want no progress in phase restore, and the flag", stderr)
	}
	t.Logf("stalled destination ended after %v", took)
	waitFor(t, "the sessions to end", 20*time.Second, func() bool {
		return len(a.sessions(t)) == 0 && len(b.sessions(t)) == 0
	})
	for _, d := range []*daemon{a, b} {
		dirs, _ := filepath.Glob(filepath.Join(d.state, "sessions", "*"))
		if len(dirs) != 1 {
			t.Errorf("%s: %d session directories, want the failed one's", d.name, len(dirs))
		}
		for _, dir := range dirs {
			ents, _ := os.ReadDir(dir)
			for _, e := range ents {
				if e.Name() != store.RecordName {
					t.Errorf("%s: %s is still in the failed session's directory (--keep-failed 0)", d.name, e.Name())
				}
			}
		}
	}
}

// TestDiskLimits: a destination whose per-migration disk limit is below
// what the process's pages take aborts as they arrive (copy mode: lazy
// pages go to memory, not to disk), and one that would
// be left with less free space than it keeps refuses at once; each says
// which limit and which flag, and the source's tree runs on, intact.
func TestDiskLimits(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:19221", daemonOpts{insecure: true})
	cases := []struct {
		name, addr string
		flags      []string
		want       string
	}{
		{"per migration", "127.0.0.2:19222", []string{"--max-session-disk", "4M"}, "--max-session-disk"},
		{"free space", "127.0.0.3:19223", []string{"--min-free-disk", "1000T"}, "--min-free-disk"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := startDaemon(t, "B", c.addr, daemonOpts{insecure: true, flags: c.flags})
			w := startWorkload(t, workloadOpts{memMiB: 16})
			stderr, took := migrateFails(t, a, w, b.addr, 15*time.Second, "--mode", "copy")
			if !strings.Contains(stderr, c.want) {
				t.Errorf("phaulctl says %q, want it to name %s", stderr, c.want)
			}
			t.Logf("refused after %v: %s", took, strings.TrimSpace(stderr))
			waitFor(t, "the sessions to end", 20*time.Second, func() bool {
				return len(a.sessions(t)) == 0 && len(b.sessions(t)) == 0
			})
		})
	}
}

// TestSessionLimitRefused: a destination with --max-incoming 1 that holds
// one migration (stalled before its restore) refuses a second at once,
// saying which limit and which flag; both processes run on at the source,
// intact, once the first has ended by the source's phase deadline.
func TestSessionLimitRefused(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:19231", daemonOpts{insecure: true, flags: []string{"--phase-timeout", "4s"}})
	b := startDaemon(t, "B", "127.0.0.2:19232", daemonOpts{insecure: true, flags: []string{"--max-incoming", "1"}})
	px := newFaultProxy(t, "127.0.0.3:19233", b.addr)
	w1 := startWorkload(t, workloadOpts{memMiB: 16})
	w2 := startWorkload(t, workloadOpts{memMiB: 16})
	before1 := w1.report(w1.pid, w1.status)
	r := &faultproxy.Rule{Dir: faultproxy.ToDest, Type: wire.TypeRestore, Nth: 1, Action: faultproxy.Swallow}
	px.Arm(r)
	first := make(chan string, 1)
	go func() {
		res, err := a.CtlContext(context.Background(), "migrate", "--pid", strconv.Itoa(w1.pid), "--to", px.Addr())
		if err != nil || res.Code == 0 {
			first <- "the first migration did not fail"
			return
		}
		first <- ""
	}()
	select {
	case <-r.Done():
	case <-time.After(15 * time.Second):
		t.Fatal("the first migration never reached its restore")
	}
	stderr, _ := migrateFails(t, a, w2, b.addr, 10*time.Second)
	if !strings.Contains(stderr, "--max-incoming") {
		t.Errorf("phaulctl says %q, want it to name --max-incoming", stderr)
	}
	if why := <-first; why != "" {
		t.Error(why)
	}
	waitRunning(t, w1.pid)
	checkIntact(t, "the first process", w1.report(w1.pid, w1.status), before1, w1.memMiB, w1.seed)
	if n := len(w1.Processes()); n != 1 {
		t.Errorf("%d copies of the first process, want 1", n)
	}
	waitFor(t, "the sessions to end", 20*time.Second, func() bool {
		return len(a.sessions(t)) == 0 && len(b.sessions(t)) == 0
	})
}
