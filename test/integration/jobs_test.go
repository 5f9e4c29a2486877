//go:build linux

package integration

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/proc"
)

// childByIndex finds the child of root started as --child i.
func childByIndex(t *testing.T, root, i int) int {
	t.Helper()
	kids, err := proc.Children(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range kids {
		b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(k), "cmdline"))
		if strings.Contains(string(b), "\x00--child\x00"+strconv.Itoa(i)+"\x00") {
			return k
		}
	}
	t.Fatalf("pid %d has no child %d (children %v)", root, i, kids)
	return 0
}

// waitState waits until pid is in state (a /proc state letter), or fails.
func waitState(t *testing.T, pid int, state byte, what string) {
	t.Helper()
	var info proc.Info
	deadline := time.Now().Add(10 * time.Second)
	for {
		var err error
		info, err = proc.Stat(pid)
		if err == nil && info.State == state {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: pid %d is in state %c, want %c", what, pid, info.State, state)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestJobControlSurvives: tasks a user stopped before the migration are
// stopped after it, on the destination, in copy and in lazy mode, and
// after a rollback on the source; the others run. Resumed by hand, they
// are intact. (SIGSTOP stops them: the workload's process group is
// orphaned, and the kernel discards SIGTSTP sent to one. CRIU records
// either the same way, and phaul handles both alike.)
func TestJobControlSurvives(t *testing.T) {
	integration(t)
	for i, mode := range []string{"copy", "lazy"} {
		t.Run(mode, func(t *testing.T) {
			a := startDaemon(t, "A", "127.0.0.1:"+strconv.Itoa(17501+10*i), daemonOpts{})
			b := startDaemon(t, "B", "127.0.0.2:"+strconv.Itoa(17502+10*i), daemonOpts{})
			w := startWorkload(t, workloadOpts{memMiB: 32, children: 3})
			stopped := map[int]syscall.Signal{0: syscall.SIGSTOP, 1: syscall.SIGSTOP}
			for i, sig := range stopped {
				k := childByIndex(t, w.pid, i)
				syscall.Kill(k, sig)
				waitState(t, k, 'T', "before the migration")
			}
			before := w.report(w.pid, w.status)
			res := a.migrate(t, w.pid, b)
			w.track(res.DestPID)
			for i := 0; i < 3; i++ {
				k := childByIndex(t, res.DestPID, i)
				w.track(k)
				if _, ok := stopped[i]; ok {
					waitState(t, k, 'T', "a child stopped before the migration, on the destination")
					syscall.Kill(k, syscall.SIGCONT)
				}
				waitRunning(t, k)
				first := w.report(k, w.childStatus(i))
				time.Sleep(50 * time.Millisecond)
				checkIntact(t, "child "+strconv.Itoa(i), w.report(k, w.childStatus(i)), first, w.memMiB, w.seed+uint64(i)+1)
			}
			waitRunning(t, res.DestPID)
			checkIntact(t, "root", w.report(res.DestPID, w.status), before, w.memMiB, w.seed)
		})
	}
	// A rollback: in copy mode phauld resumes the tree CRIU left
	// stopped; in lazy mode CRIU's page server resumes it itself when
	// phauld resets its socket.
	for i, mode := range []string{"copy", "lazy"} {
		t.Run("rollback/"+mode, func(t *testing.T) { jobControlRollback(t, mode, 17521+10*i) })
	}
}

// jobControlRollback: a migration in mode whose restore fails; the task
// stopped before it stays stopped after the rollback, the others run.
func jobControlRollback(t *testing.T, mode string, port int) {
	held := t.TempDir()
	a := startDaemon(t, "A", "127.0.0.1:"+strconv.Itoa(port), daemonOpts{})
	// In B's mount namespace, the held file's directory is read-only:
	// the restore fails for real, after the dump.
	b := startDaemon(t, "B", "127.0.0.2:"+strconv.Itoa(port+1), daemonOpts{wrap: readOnlyWrap(held)})
	w := startWorkload(t, workloadOpts{memMiB: 32, children: 2, extra: []string{"--hold", filepath.Join(held, "data")}})
	k0, k1 := childByIndex(t, w.pid, 0), childByIndex(t, w.pid, 1)
	syscall.Kill(k0, syscall.SIGSTOP)
	waitState(t, k0, 'T', "before the migration")
	before := w.report(w.pid, w.status)
	r := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(w.pid), "--to", b.addr, "--mode", mode)
	if r.code != 3 {
		t.Fatalf("migrate with a failing restore exited %d, want 3 (rolled back): %s", r.code, r.stderr)
	}
	waitRunning(t, w.pid)
	waitRunning(t, k1)
	time.Sleep(200 * time.Millisecond) // long enough for a wrong SIGCONT to land
	waitState(t, k0, 'T', "a child stopped before the migration, after the rollback")
	checkIntact(t, "root after the rollback", w.report(w.pid, w.status), before, w.memMiB, w.seed)
	syscall.Kill(k0, syscall.SIGCONT)
	waitRunning(t, k0)
}
