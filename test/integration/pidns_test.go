//go:build linux

package integration

import (
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/pidns"
	"github.com/phaul/phaul/pkg/proc"
)

// A process tree as a user starts it in the background (setsid, in the
// host's pid namespace, with a child) migrates. Its pids are taken on B
// (on one machine, by the frozen source itself): B restores it into a new
// pid namespace where it keeps them, and the result names its pid on B's
// host. Its memory and counter are intact, the source copy is gone, and
// the namespace ends with the tree.
func TestPlainProcessMigrates(t *testing.T) {
	integration(t)
	for i, mode := range []string{"copy", "lazy"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			plainProcessMigrates(t, mode, 17631+2*i)
		})
	}
}

func plainProcessMigrates(t *testing.T, mode string, port int) {
	a := startDaemon(t, "A", "127.0.0.1:"+strconv.Itoa(port), daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:"+strconv.Itoa(port+1), daemonOpts{})
	w := startWorkload(t, workloadOpts{memMiB: 32, children: 1, hostPidNS: true})
	if ns, err := proc.NSPid(w.pid); err != nil || ns != w.pid {
		t.Fatalf("the workload's pid in its namespace: %d, %v; want %d (the host's namespace)", ns, err, w.pid)
	}
	srcInfo, _ := proc.Stat(w.pid)
	srcTree, err := proc.Tree(w.pid)
	if err != nil || len(srcTree) != 2 {
		t.Fatalf("source tree = %v, %v; want the process and its child", srcTree, err)
	}
	before := w.report(w.pid, w.status)
	childBefore := w.report(srcTree[1], w.childStatus(0))

	res := a.migrateTo(t, w.pid, b.addr, "--mode", mode)
	w.track(res.DestPID)
	t.Logf("migrated: pid %d now pid %d on B, new pid namespace %v, frozen %d ms", res.SourcePID, res.DestPID, res.NewPidNS, res.FrozenMS)
	if !res.NewPidNS || res.DestPID == w.pid || res.DestPID <= 0 {
		t.Fatalf("result = %+v: want a new pid namespace on B, and the copy's pid on B's host", res)
	}
	waitRunning(t, res.DestPID)
	after := w.report(res.DestPID, w.status)
	// The process sees its own pid, as before: its /proc is its
	// namespace's, where it is the first and innermost pid alike.
	if after.HostPID != w.pid || after.NSPID != w.pid {
		t.Errorf("the copy sees itself as pid %d (innermost %d); want %d, its pid on A", after.HostPID, after.NSPID, w.pid)
	}
	if ns, err := proc.NSPid(res.DestPID); err != nil || ns != w.pid {
		t.Errorf("B's pid %d is pid %d (%v) in its namespace; want %d", res.DestPID, ns, err, w.pid)
	}
	checkIntact(t, "the process", after, before, w.memMiB, w.seed)
	kids, err := proc.Children(res.DestPID)
	if err != nil || len(kids) != 1 {
		t.Fatalf("the copy's children = %v, %v; want 1", kids, err)
	}
	w.track(kids[0])
	childAfter := w.report(kids[0], w.childStatus(0))
	if childAfter.NSPID != srcTree[1] {
		t.Errorf("the child is pid %d in its namespace; want %d, its pid on A", childAfter.NSPID, srcTree[1])
	}
	checkIntact(t, "the child", childAfter, childBefore, w.memMiB, w.seed+1)

	// Its parent is the namespace's init, phauld pidns-init, which left
	// B's daemon: it is nobody's child but the host's.
	info, _ := proc.Stat(res.DestPID)
	cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(info.PPID) + "/cmdline")
	if ns, _ := proc.NSPid(info.PPID); ns != 1 || !strings.Contains(string(cmdline), pidns.Command) {
		t.Errorf("the copy's parent, pid %d (%q), is pid %d in its namespace; want phauld %s, its init", info.PPID, cmdline, ns, pidns.Command)
	}
	if !gone(w.pid, srcInfo.StartTime) {
		t.Errorf("the source copy, pid %d, still runs", w.pid)
	}

	// And back: B's phauld dumps it from inside its namespace, by the
	// pids it has there; A restores it with them (in A's own pid
	// namespace if they are free, in a new one if not).
	initPID := info.PPID
	initInfo, _ := proc.Stat(initPID)
	onB, _ := proc.Stat(res.DestPID)
	back := b.migrateTo(t, res.DestPID, a.addr, "--mode", mode)
	w.track(back.DestPID)
	t.Logf("migrated back: pid %d on B now pid %d on A, new pid namespace %v", back.SourcePID, back.DestPID, back.NewPidNS)
	waitRunning(t, back.DestPID)
	if ns, err := proc.NSPid(back.DestPID); err != nil || ns != w.pid {
		t.Errorf("back on A, pid %d is pid %d (%v) in its namespace; want %d", back.DestPID, ns, err, w.pid)
	}
	again := w.report(back.DestPID, w.status)
	checkIntact(t, "the process, back on A", again, after, w.memMiB, w.seed)
	if !gone(res.DestPID, onB.StartTime) {
		t.Errorf("B's copy, pid %d, still runs", res.DestPID)
	}
	// The namespace B made ends with the tree: its init does not linger.
	waitFor(t, "B's pid namespace init to end with the tree", 10*time.Second, func() bool { return gone(initPID, initInfo.StartTime) })
}
