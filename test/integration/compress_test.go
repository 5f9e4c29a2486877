//go:build linux

package integration

import (
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/proc"
)

// cpuTicks is the CPU time (user and system, in clock ticks) pid has used.
func cpuTicks(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return u + s
}

// TestCompressZstd moves a tree holding 32 MiB of compressible memory (half
// zero pages, half text) and 8 MiB of pseudo-random memory with --compress
// zstd, to B in copy mode, back in lazy mode and to B again in pre-copy
// mode, with real CRIU over mutual TLS: each time it arrives intact, the
// result says zstd, and the page stream crosses in well under half its
// size (in pre-copy mode the pages sent ahead too: all that crossed is
// under half of the memory).
func TestCompressZstd(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17461", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:17462", daemonOpts{})
	w := startWorkload(t, workloadOpts{memMiB: 8, extra: []string{"--text", "32"}})
	before := w.report(w.pid, w.status)
	if before.TextExpect == "" {
		t.Fatal("the workload reports no compressible memory")
	}
	pid, from, to := w.pid, a, b
	for _, mode := range []string{api.ModeCopy, api.ModeLazy, api.ModePrecopy} {
		srcInfo, _ := proc.Stat(pid)
		cpuFrom, cpuTo := cpuTicks(t, from.PID()), cpuTicks(t, to.PID())
		res := from.migrateTo(t, pid, to.addr, "--mode", mode, "--compress", "zstd")
		w.track(res.DestPID)
		t.Logf("%s: pages %d as %d on the wire, images %d as %d; %d bytes in all, frozen %d ms, total %d ms; CPU ticks source %d, destination %d",
			mode, res.PageBytes, res.PageWireBytes, res.FileBytes, res.FileWireBytes, res.Bytes, res.FrozenMS, res.TotalMS,
			cpuTicks(t, from.PID())-cpuFrom, cpuTicks(t, to.PID())-cpuTo)
		if res.Compress != api.CompressZstd {
			t.Errorf("%s: result compress %q, want zstd", mode, res.Compress)
		}
		if res.PageBytes < 40<<20 || res.PageWireBytes <= 0 || res.PageWireBytes > res.PageBytes*4/10 {
			t.Errorf("%s: pages %d as %d on the wire: want the 40 MiB, in well under half", mode, res.PageBytes, res.PageWireBytes)
		}
		if res.Bytes > (res.PageBytes+res.FileBytes)/2 {
			t.Errorf("%s: %d bytes crossed for %d of pages and images", mode, res.Bytes, res.PageBytes+res.FileBytes)
		}
		if p := res.Precopy; mode == api.ModePrecopy && (p == nil || p.HeldBytes < 40<<20 || p.ReusedPages == 0) {
			t.Errorf("precopy: %+v; want the 40 MiB sent ahead, and reused at the freeze", p)
		}
		waitRunning(t, res.DestPID)
		checkIntact(t, mode, w.report(res.DestPID, w.status), before, w.memMiB, w.seed)
		if !gone(pid, srcInfo.StartTime) {
			t.Errorf("%s: the source copy still exists", mode)
		}
		pid, from, to = res.DestPID, to, from
	}
}
