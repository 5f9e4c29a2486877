//go:build linux

package integration

import (
	"encoding/json"
	"strconv"
	"testing"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/proc"
)

// TestBWLimit moves a 32 MiB tree in copy mode at --bwlimit 8M: what
// crosses takes at least as long as the limit allows, the tree arrives
// intact, and the result says the limit. The same tree moved back with
// no limit is much quicker; moved again lazily at 8M, its pause stays
// short and its pages follow at the rate (figures: docs/operations.md).
func TestBWLimit(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17451", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:17452", daemonOpts{})
	w := startWorkload(t, workloadOpts{memMiB: 16, children: 1})
	srcInfo, _ := proc.Stat(w.pid)
	before := w.report(w.pid, w.status)

	const limit = 8 << 20
	r := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(w.pid), "--to", b.addr, "--mode", "copy", "--bwlimit", "8M", "--json")
	if r.code != 0 {
		t.Fatalf("migration at --bwlimit 8M exited %d: %s %s", r.code, r.stdout, r.stderr)
	}
	var res api.Result
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatal(err)
	}
	w.track(res.DestPID)
	// The pacer's bucket lets a twentieth of a second's worth go at
	// once; the rest waits for the rate.
	least := (res.Bytes - limit/20) * 1000 / limit
	t.Logf("--bwlimit 8M: %d bytes in %d ms (frozen %d ms); at 8 MiB/s they need at least %d ms", res.Bytes, res.TotalMS, res.FrozenMS, least)
	if res.BWLimit != limit {
		t.Errorf("result bwlimit %d, want %d", res.BWLimit, limit)
	}
	if res.Bytes < 32<<20 {
		t.Errorf("%d bytes crossed: want at least the 32 MiB the tree holds", res.Bytes)
	}
	if res.TotalMS < least {
		t.Errorf("%d bytes crossed in %d ms: faster than 8 MiB/s allows (%d ms)", res.Bytes, res.TotalMS, least)
	}
	if most := 2*least + 2000; res.TotalMS > most {
		t.Errorf("%d bytes crossed in %d ms: the pacer held them back far longer than 8 MiB/s needs (%d ms)", res.Bytes, res.TotalMS, most)
	}
	waitRunning(t, res.DestPID)
	checkIntact(t, "init", w.report(res.DestPID, w.status), before, w.memMiB, w.seed)
	kids, err := proc.Children(res.DestPID)
	if err != nil || len(kids) != 1 {
		t.Fatalf("destination children %v, %v; want 1", kids, err)
	}
	w.track(kids[0])
	if !gone(w.pid, srcInfo.StartTime) {
		t.Error("the source copy still exists")
	}

	// Back, with no limit.
	back := b.phaulctl(t, "migrate", "--pid", strconv.Itoa(res.DestPID), "--to", a.addr, "--mode", "copy", "--json")
	if back.code != 0 {
		t.Fatalf("migration back exited %d: %s %s", back.code, back.stdout, back.stderr)
	}
	var free api.Result
	if err := json.Unmarshal([]byte(back.stdout), &free); err != nil {
		t.Fatal(err)
	}
	w.track(free.DestPID)
	if ks, _ := proc.Children(free.DestPID); len(ks) == 1 {
		w.track(ks[0])
	}
	t.Logf("no limit: %d bytes in %d ms (frozen %d ms)", free.Bytes, free.TotalMS, free.FrozenMS)
	if free.BWLimit != 0 {
		t.Errorf("an unlimited migration's result has bwlimit %d", free.BWLimit)
	}
	if free.TotalMS*4 > res.TotalMS*3 {
		t.Errorf("unlimited %d ms, at 8 MiB/s %d ms: want well under (3/4)", free.TotalMS, res.TotalMS)
	}
	waitRunning(t, free.DestPID)
	checkIntact(t, "init", w.report(free.DestPID, w.status), before, w.memMiB, w.seed)

	// Lazy, at the limit again: the pause does not grow, the pages that
	// follow keep to the rate.
	lz := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(free.DestPID), "--to", b.addr, "--mode", "lazy", "--bwlimit", "8M", "--json")
	if lz.code != 0 {
		t.Fatalf("lazy migration at --bwlimit 8M exited %d: %s %s", lz.code, lz.stdout, lz.stderr)
	}
	var lres api.Result
	if err := json.Unmarshal([]byte(lz.stdout), &lres); err != nil {
		t.Fatal(err)
	}
	w.track(lres.DestPID)
	if ks, _ := proc.Children(lres.DestPID); len(ks) == 1 {
		w.track(ks[0])
	}
	lleast := (lres.Bytes - limit/20) * 1000 / limit
	t.Logf("lazy at 8M: %d bytes, frozen %d ms, last page %d ms after the resume, total %d ms; the limit allows no less than %d ms in all",
		lres.Bytes, lres.FrozenMS, lres.LazyMS, lres.TotalMS, lleast)
	if lres.Mode != api.ModeLazy || lres.BWLimit != limit {
		t.Errorf("lazy result: mode %q, bwlimit %d", lres.Mode, lres.BWLimit)
	}
	if lres.TotalMS < lleast {
		t.Errorf("lazy: %d bytes crossed in %d ms: faster than 8 MiB/s allows (%d ms)", lres.Bytes, lres.TotalMS, lleast)
	}
	if lres.FrozenMS*2 > res.FrozenMS {
		t.Errorf("lazy at 8M froze it %d ms, copy at 8M %d ms: want the lazy pause well under", lres.FrozenMS, res.FrozenMS)
	}
	waitRunning(t, lres.DestPID)
	checkIntact(t, "lazy", w.report(lres.DestPID, w.status), before, w.memMiB, w.seed)
}
