//go:build linux

package migrate

import (
	"strings"
	"syscall"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/network"
	"github.com/phaul/phaul/pkg/proc"
)

// ResumeTree lets a stopped tree (its root first) run, wherever it was
// stopped: a source rolling back, a destination after its commit (or, lazy,
// before it), a daemon recovering. A tree that moves its own network
// namespace first gets its network back (its TCP sockets out of the repair
// mode CRIU left them in, the namespace's locks lifted: a no-op for a tree
// that holds none, or lives in the host's namespace), then SIGCONT (but
// for the tasks job control had stopped), then its addresses announced
// where it now runs. It blocks: call it off the loop.
func ResumeTree(log *zap.Logger, tree []*proc.Process, stopped map[int]bool) error {
	pids := make([]int, 0, len(tree))
	for _, p := range tree {
		pids = append(pids, p.PID)
	}
	if err := unlockNetwork(log, pids); err != nil {
		// Resumed all the same: a process left stopped is worse off
		// than one whose connections stall.
		log.Error("cannot give the tree its network back; resuming it all the same", zap.Error(err))
	}
	if err := proc.ResumeTree(tree, stopped); err != nil {
		return err
	}
	announce(log, pids)
	return nil
}

// ReclaimNetwork is what ResumeTree does for the network, for a tree that
// CRIU resumed itself (a dump that failed or was told no): CRIU lifts its
// lock then, but a lazy dump that fails while it serves pages leaves the
// connections stuck; and whatever the destination's restore sent meanwhile
// may have moved the segment's switches to it, so the addresses are
// announced here again.
func ReclaimNetwork(log *zap.Logger, pid int) error {
	pids, err := proc.Tree(pid)
	if err != nil {
		return err
	}
	if err := unlockNetwork(log, pids); err != nil {
		return err
	}
	announce(log, pids)
	return nil
}

func unlockNetwork(log *zap.Logger, pids []int) error {
	u, err := network.Unlock(pids)
	if err != nil {
		return err
	}
	if u.Repaired > 0 || len(u.Tables) > 0 {
		log.Info("network unlocked", zap.Int("tcp_repaired", u.Repaired), zap.Strings("lock_tables", u.Tables))
	}
	return nil
}

func announce(log *zap.Logger, pids []int) {
	if len(pids) == 0 {
		return
	}
	a, err := network.Announce(pids[0])
	if err != nil {
		// The segment learns of the move at the first frame the tree
		// sends instead: not a reason to stop it running.
		log.Warn("cannot announce the namespace's addresses", zap.Error(err))
	} else if a.ARP+a.NA > 0 || len(a.Skipped) > 0 {
		log.Info("addresses announced", zap.Int("arp", a.ARP), zap.Int("na", a.NA), zap.Strings("not_announced", a.Skipped))
	}
}

// KillHelpers kills the CRIU helpers (a lazy-pages daemon, a page server)
// still working in a session directory whose session is over: nobody is
// left for them to serve. They are meant to end with their session (told
// to, or by their parent-death signal), but a lazy-pages daemon was seen
// to outlive it, waiting for a restore that would never come, or stopped.
// Each one killed is logged with msg.
func KillHelpers(log *zap.Logger, dir, msg string) {
	for pid, cmdline := range proc.WorkingIn(dir) {
		if !strings.Contains(cmdline, "criu") || !(strings.Contains(cmdline, "lazy-pages") || strings.Contains(cmdline, "page-server")) {
			continue
		}
		// A stopped one too (state T: one was found so, its parent
		// phauld killed, its parent-death signal never seen): SIGKILL
		// ends it all the same. Only one already on its way out is left.
		if info, err := proc.Stat(pid); err != nil || info.Exiting() || info.State == 'Z' || info.State == 'X' {
			continue
		}
		if p, err := proc.Open(pid, 0); err == nil {
			log.Warn(msg, zap.Int("helper_pid", pid), zap.String("command", cmdline))
			p.Signal(syscall.SIGKILL)
			p.Close()
		}
	}
}
