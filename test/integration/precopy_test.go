package integration

import (
	"path/filepath"
	"testing"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/proc"
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
