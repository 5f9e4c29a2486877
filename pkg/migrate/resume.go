//go:build linux

package migrate

import (
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
	u, err := network.Unlock(pids)
	if err != nil {
		return err
	}
	if u.Repaired > 0 || len(u.Tables) > 0 {
		log.Info("network unlocked", zap.Int("tcp_repaired", u.Repaired), zap.Strings("lock_tables", u.Tables))
	}
	if err := proc.ResumeTree(tree, stopped); err != nil {
		return err
	}
	if len(pids) == 0 {
		return nil
	}
	a, err := network.Announce(pids[0])
	if err != nil {
		// The segment learns of the move at the first frame the tree
		// sends instead: not a reason to stop it running.
		log.Warn("cannot announce the namespace's addresses", zap.Error(err))
	} else if a.ARP+a.NA > 0 || len(a.Skipped) > 0 {
		log.Info("addresses announced", zap.Int("arp", a.ARP), zap.Int("na", a.NA), zap.Strings("not_announced", a.Skipped))
	}
	return nil
}
