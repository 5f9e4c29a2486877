//go:build linux

package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/proc"
)

// TestMigrateTree moves a process tree (the init of its own pid namespace
// and a child, each holding 64 MiB of pseudo-random memory) from one
// phauld to another, and checks that it runs on the destination under the
// reported pid with its memory and counter intact, and that nothing of it
// is left on the source.
func TestMigrateTree(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17101", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:17102", daemonOpts{})
	w := startWorkload(t, workloadOpts{memMiB: 64, children: 1})

	srcInfo, err := proc.Stat(w.pid)
	if err != nil {
		t.Fatal(err)
	}
	srcTree, err := proc.Tree(w.pid)
	if err != nil || len(srcTree) != 2 {
		t.Fatalf("source tree = %v, %v; want the init and its child", srcTree, err)
	}
	childStart, _ := proc.Stat(srcTree[1])
	before := w.report(w.pid, w.status)
	childBefore := w.report(srcTree[1], w.childStatus(0))

	res := a.migrate(t, w.pid, b)
	w.track(res.DestPID)
	t.Logf("migrated: %+v", res)

	if res.ID == "" || res.SourcePID != w.pid || res.DestPID <= 0 || res.Dest != b.addr {
		t.Errorf("result = %+v: want id, source_pid %d, a dest_pid, dest %s", res, w.pid, b.addr)
	}
	if res.FrozenMS <= 0 || res.TotalMS < res.FrozenMS {
		t.Errorf("result timings frozen %d ms, total %d ms: want 0 < frozen <= total", res.FrozenMS, res.TotalMS)
	}
	if min := int64(2 * 64 << 20); res.Bytes < min || res.PageBytes < min {
		t.Errorf("result bytes %d (pages %d): want at least the %d bytes of memory the tree holds", res.Bytes, res.PageBytes, min)
	}

	// On the destination, under the reported pid, running.
	waitRunning(t, res.DestPID)
	after := w.report(res.DestPID, w.status)
	if after.HostPID != res.DestPID || after.NSPID != 1 {
		t.Errorf("destination process reports host pid %d, ns pid %d; want %d, 1", after.HostPID, after.NSPID, res.DestPID)
	}
	checkIntact(t, "init", after, before, w.memMiB, w.seed)

	// Its child came along.
	kids, err := proc.Children(res.DestPID)
	if err != nil || len(kids) != 1 {
		t.Fatalf("destination children = %v, %v; want 1", kids, err)
	}
	w.track(kids[0])
	waitRunning(t, kids[0])
	childAfter := w.report(kids[0], w.childStatus(0))
	// CRIU restores the pid namespace: the child keeps its pid in it.
	if childAfter.HostPID != kids[0] || childAfter.NSPID != childBefore.NSPID {
		t.Errorf("child reports host pid %d, ns pid %d; want %d, %d", childAfter.HostPID, childAfter.NSPID, kids[0], childBefore.NSPID)
	}
	checkIntact(t, "child", childAfter, childBefore, w.memMiB, w.seed+1)

	// Nothing of it on the source.
	if !gone(w.pid, srcInfo.StartTime) || !gone(srcTree[1], childStart.StartTime) {
		t.Errorf("source tree %v still exists after the migration", srcTree)
	}
	// Both daemons forgot the session and cleaned its directory.
	for _, d := range []*daemon{a, b} {
		ents, _ := os.ReadDir(filepath.Join(d.state, "sessions"))
		if len(ents) != 0 {
			t.Errorf("phauld %s kept %d session directories after success", d.name, len(ents))
		}
		st := d.phaulctl(t, "status", "--json")
		var s api.Status
		if err := json.Unmarshal([]byte(st.stdout), &s); err != nil || len(s.Sessions) != 0 {
			t.Errorf("phauld %s status: %v, sessions %v; want none", d.name, err, s.Sessions)
		}
	}
	// One log line per phase, with session, pid and peer.
	for _, phase := range []string{"prepare", "dump", "restore"} {
		if !strings.Contains(a.log(), `"phase": "`+phase+`"`) {
			t.Errorf("source log has no line for phase %s", phase)
		}
	}
	if !strings.Contains(a.log(), res.ID) || !strings.Contains(b.log(), res.ID) {
		t.Errorf("session id %s missing from a daemon's log", res.ID)
	}
}

// TestMigrateMissingPID asks for a pid that does not exist: a clear error,
// a non-zero exit, nothing else happens.
func TestMigrateMissingPID(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17111", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:17112", daemonOpts{})
	pid := unusedPID(t)

	r := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(pid), "--to", b.addr)
	if r.code == 0 {
		t.Fatalf("migrate of missing pid %d exited 0: %s", pid, r.stdout)
	}
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], "no process with pid "+strconv.Itoa(pid)) {
		t.Errorf("stderr = %q, want one line saying there is no such process", r.stderr)
	}

	r = a.phaulctl(t, "migrate", "--pid", strconv.Itoa(pid), "--to", b.addr, "--json")
	var out struct{ Error *api.Error }
	if r.code == 0 || json.Unmarshal([]byte(r.stdout), &out) != nil || out.Error == nil || out.Error.Code != api.CodeNotFound {
		t.Errorf("--json: exit %d, stdout %q; want non-zero and error code %s", r.code, r.stdout, api.CodeNotFound)
	}
	if strings.Contains(b.log(), "incoming migration") {
		t.Error("the destination was contacted for a pid that does not exist")
	}
}

// unusedPID returns a pid no process has now.
func unusedPID(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/sys/kernel/pid_max")
	if err != nil {
		t.Fatal(err)
	}
	max, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	for pid := max - 1; pid > max-1000; pid-- {
		if _, err := proc.Stat(pid); err != nil {
			return pid
		}
	}
	t.Fatal("no unused pid found")
	return 0
}

// TestRestoreFailureRollsBack makes the restore fail for real: the
// destination phauld runs in its own mount namespace, where a file the
// process holds open for writing is read-only (the same file: the checks
// before the freeze pass, and CRIU's open fails). The
// migration must fail with a clear error, and the process must run on the
// source again, not stopped, intact; nothing may be left on the
// destination.
func TestRestoreFailureRollsBack(t *testing.T) {
	integration(t)
	held := t.TempDir()
	a := startDaemon(t, "A", "127.0.0.1:17121", daemonOpts{})
	// In B's mount namespace, the held file's directory is read-only.
	b := startDaemon(t, "B", "127.0.0.2:17122", daemonOpts{wrap: readOnlyWrap(held)})
	w := startWorkload(t, workloadOpts{memMiB: 64, children: 1, extra: []string{"--hold", filepath.Join(held, "data")}})
	before := w.report(w.pid, w.status)
	srcInfo, _ := proc.Stat(w.pid)
	others := workloadPIDs(t)

	r := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(w.pid), "--to", b.addr)
	if r.code == 0 {
		t.Fatalf("migration with a failing restore exited 0: %s", r.stdout)
	}
	msg := strings.TrimSpace(r.stderr)
	if !strings.Contains(msg, "restore failed") || !strings.Contains(msg, "data") {
		t.Errorf("error = %q: want it to say the restore failed, and on what", msg)
	}
	t.Logf("phaulctl said: %s", msg)

	// The same process runs on the source again, not stopped, intact.
	info := waitRunning(t, w.pid)
	if info.StartTime != srcInfo.StartTime {
		t.Fatalf("pid %d is another process now", w.pid)
	}
	after := w.report(w.pid, w.status)
	checkIntact(t, "source after rollback", after, before, w.memMiB, w.seed)
	after2 := w.report(w.pid, w.status)
	if after2.Counter <= after.Counter {
		t.Errorf("counter stuck at %d: the source is not running", after.Counter)
	}
	kids, _ := proc.Children(w.pid)
	if len(kids) != 1 {
		t.Fatalf("source has %d children after rollback, want 1", len(kids))
	}
	waitRunning(t, kids[0])

	// Nothing of it on the destination: no workload process but those
	// that were there before.
	for pid := range workloadPIDs(t) {
		if !others[pid] {
			w.track(pid)
			t.Errorf("workload pid %d appeared during the failed migration", pid)
		}
	}
	// The failed session's images are kept for inspection.
	ents, _ := os.ReadDir(filepath.Join(b.state, "sessions"))
	if len(ents) != 1 {
		t.Errorf("destination kept %d session directories, want the failed one", len(ents))
	} else if _, err := os.Stat(filepath.Join(b.state, "sessions", ents[0].Name(), "restore.log")); err != nil {
		t.Errorf("failed session has no restore.log: %v", err)
	}
}
