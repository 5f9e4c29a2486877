package integration

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/test/harness"
)

// TestPrecopy migrates a process for real in mode precopy, there and
// back, between two daemons on loopback, while it rewrites part of its
// memory with new contents every 10 ms: the rounds send its memory ahead
// while it runs; at the freeze the unchanged pages cross as references
// and the destination's CRIU gets them from what it held. The process
// arrives intact (its memory's checksum, its counter going on, and every
// rewritten page holding the generation it recorded), nothing is left of
// it on the source, and nothing of the pages held ahead is left on the
// destination.
func TestPrecopy(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17471", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:17472", daemonOpts{})
	w := startWorkload(t, workloadOpts{memMiB: 64, extra: []string{"--churn", "1", "--churn-span", "8"}})
	before := w.report(w.pid, w.status)
	if before.ChurnPages != 8<<20/4096 {
		t.Fatalf("the workload reports %d rewritten pages, want %d", before.ChurnPages, 8<<20/4096)
	}
	pid, from, to := w.pid, a, b
	for leg := 0; leg < 2; leg++ {
		srcInfo, _ := proc.Stat(pid)
		res := from.migrateTo(t, pid, to.addr, "--mode", "precopy")
		w.track(res.DestPID)
		p := res.Precopy
		if res.Mode != api.ModePrecopy || p == nil {
			t.Fatalf("leg %d: mode %q, pre-copy %+v; want precopy with its rounds", leg, res.Mode, p)
		}
		t.Logf("leg %d: %d rounds %+v (%s); held %d bytes; at the freeze %d pages, %d reused; %d page bytes at the freeze as %d on the wire; frozen %d ms, total %d ms",
			leg, len(p.Rounds), p.Rounds, p.Stop, p.HeldBytes, p.FreezePages, p.ReusedPages, res.PageBytes, res.PageWireBytes, res.FrozenMS, res.TotalMS)
		if p.Method != api.PrecopyContent || len(p.Rounds) == 0 || p.Rounds[0].Sent < 64<<20/4096 {
			t.Errorf("leg %d: rounds %+v by %q: want the 64 MiB sent ahead in the first, by content", leg, p.Rounds, p.Method)
		}
		// The 64 MiB that do not change cross as references; the 8 MiB
		// being rewritten (and the runtime's own) do not all.
		if p.ReusedPages < 56<<20/4096 || p.ReusedPages >= p.FreezePages {
			t.Errorf("leg %d: %d of %d pages reused at the freeze: want the unchanged 56 MiB at least, and not all", leg, p.ReusedPages, p.FreezePages)
		}
		if max := int64(p.FreezePages-p.ReusedPages)*4096 + 1<<20; res.PageWireBytes <= 0 || res.PageWireBytes > max {
			t.Errorf("leg %d: the page stream at the freeze came to %d bytes on the wire, want at most the %d bytes of changed pages, references and CRIU's headers", leg, res.PageWireBytes, max)
		}
		waitRunning(t, res.DestPID)
		checkIntact(t, "precopy", w.report(res.DestPID, w.status), before, w.memMiB, w.seed)
		if !gone(pid, srcInfo.StartTime) {
			t.Errorf("leg %d: the source copy still exists", leg)
		}
		held, _ := filepath.Glob(filepath.Join(to.state, "sessions", "*", "precopy.pages"))
		if len(held) != 0 {
			t.Errorf("leg %d: the pages held ahead are left on the destination: %v", leg, held)
		}
		pid, from, to = res.DestPID, to, from
	}
}

// TestPrecopyShaped runs pre-copy and copy mode for real over a slow
// link: two network namespaces standing for two hosts, a veth between
// them shaped to 200 Mbit/s each way, a phauld in each, the process in
// A's. In copy mode all its memory crosses while it is frozen; in
// pre-copy only what changed since the rounds: the process arrives
// intact either way, and pre-copy's frozen page stream is a small part
// of copy's, and so is its pause. Auto measures the link and, the memory
// taking over 2 s to cross it, takes pre-copy.
func TestPrecopyShaped(t *testing.T) {
	integration(t)
	suffix := strconv.Itoa(os.Getpid())
	nsA, nsB := "phaul-pcs-a-"+suffix, "phaul-pcs-b-"+suffix
	remove, err := harness.ShapedLink(nsA, nsB, "10.215.0.1/24", "10.215.0.2/24", "200mbit", "64kb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(remove)
	a := startDaemon(t, "A", "10.215.0.1:17481", daemonOpts{wrap: []string{"nsenter", "--net=/run/netns/" + nsA, "--"}})
	b := startDaemon(t, "B", "10.215.0.2:17482", daemonOpts{wrap: []string{"nsenter", "--net=/run/netns/" + nsB, "--"}})
	frozen := map[string]api.Result{}
	for _, mode := range []string{api.ModeCopy, api.ModePrecopy, api.ModeAuto} {
		w := startWorkload(t, workloadOpts{memMiB: 64, netns: nsA, extra: []string{"--churn", "1", "--churn-span", "2"}})
		before := w.report(w.pid, w.status)
		srcInfo, _ := proc.Stat(w.pid)
		res := a.migrateTo(t, w.pid, b.addr, "--mode", mode)
		w.track(res.DestPID)
		after := w.report(res.DestPID, w.status)
		checkIntact(t, mode, after, before, w.memMiB, w.seed)
		if !gone(w.pid, srcInfo.StartTime) {
			t.Errorf("%s: the source copy still exists", mode)
		}
		frozen[mode] = res
		t.Logf("%s: frozen %d ms (the process saw %.0f ms), total %d ms, %d bytes; pages at the freeze %d, on the wire %d; pre-copy %+v",
			mode, res.FrozenMS, float64(after.GapNS)/1e6, res.TotalMS, res.Bytes, res.PageBytes, res.PageWireBytes, res.Precopy)
	}
	// auto measured the link (25 MB/s) and, 64 MiB taking over 2 s to
	// cross it, chose pre-copy.
	if au := frozen[api.ModeAuto]; au.Mode != api.ModePrecopy || au.LinkRate < 10e6 || au.LinkRate > 30e6 {
		t.Errorf("auto over 200 Mbit/s chose %q, the link measured %d B/s; want precopy, about 25 MB/s", au.Mode, au.LinkRate)
	}
	cp, pc := frozen[api.ModeCopy], frozen[api.ModePrecopy]
	if pc.Precopy == nil || pc.PageWireBytes <= 0 || pc.PageWireBytes > cp.PageBytes/5 {
		t.Errorf("pre-copy's frozen page stream came to %d bytes on the wire, copy's %d: want under a fifth", pc.PageWireBytes, cp.PageBytes)
	}
	// At 200 Mbit/s copy's 64 MiB take about 2.7 s frozen; what pre-copy
	// moves frozen takes a small part of that.
	if pc.FrozenMS*2 > cp.FrozenMS {
		t.Errorf("pre-copy froze the process %d ms, copy %d ms: want under half", pc.FrozenMS, cp.FrozenMS)
	}
}
