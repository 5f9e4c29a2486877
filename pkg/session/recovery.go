//go:build linux

package session

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/migrate"
	"github.com/phaul/phaul/pkg/network"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/wire"
)

// Recover finishes or undoes what a previous run of this daemon left in
// flight, from the records in the state directory, as the commit rule
// says. Call it once, before serving. It only reads records and decides:
// what takes time (waiting for a CRIU of the previous run to let go of a
// tree, for a killed tree to exit, for a destination to answer) goes on
// in the background, with the tree's pids held (see claim) so that no new
// migration can take them meanwhile. So it is bounded by the number of
// records, not by any process: phauld says READY=1 right after.
func (m *Manager) Recover() error {
	root := filepath.Join(m.cfg.StateDir, "sessions")
	ents, err := os.ReadDir(root)
	if err != nil {
		return err
	}
	// A daemon that died mid-session left CRIU's files as CRIU made them.
	private(m.log, root)
	known, _ := m.history.List(0)
	recorded := map[string]bool{}
	for _, e := range known {
		recorded[e.ID+"/"+e.Direction] = true
	}
	// note adds a session the previous run did not finish to the history.
	note := func(id wire.SessionID, rec *store.Record, outcome, why string) {
		dir := api.DirectionIn
		if rec.Role == store.RoleSource {
			dir = api.DirectionOut
		}
		if recorded[id.String()+"/"+dir] {
			return
		}
		e := api.HistoryEntry{ID: id.String(), Direction: dir, PID: rec.PID, Peer: rec.Peer, Started: rec.Created,
			Ended: time.Now(), Outcome: outcome, Result: api.Result{ID: id.String(), SourcePID: rec.PID}}
		if rec.Role == store.RoleDest {
			e.PID, e.Result.SourcePID, e.Result.DestPID = rec.SourcePID, rec.SourcePID, rec.PID
		}
		if outcome != api.OutcomeCommitted {
			e.Error = api.Errorf(api.CodeAborted, "%s", why)
		}
		if err := m.history.Add(e); err != nil {
			m.log.Warn("cannot record the migration in the history", zap.Error(err))
		}
	}
	for _, e := range ents {
		id, err := wire.ParseSessionID(e.Name())
		if err != nil || !e.IsDir() {
			continue
		}
		dir := filepath.Join(root, e.Name())
		// Pages a pre-copy sent ahead are of no use to a session that
		// did not end before the restart (it is settled without them),
		// and as large as the process: they go now, not with the
		// failed session's images days later.
		if err := os.Remove(filepath.Join(dir, migrate.PrecopyStore)); err == nil {
			m.log.Info("recovering: removed the pages a pre-copy had sent ahead", zap.String("dir", dir))
		}
		rec, err := store.Load(dir)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				m.log.Warn("unreadable session record", zap.String("dir", dir), zap.Error(err))
			}
			continue
		}
		if rec.Terminal() {
			continue
		}
		log := m.log.With(zap.Stringer("session", id), zap.String("peer", rec.Peer), zap.String("state", rec.State))
		if rec.Role == store.RoleDest && rec.State != store.Committed {
			migrate.KillHelpers(log, dir, "recovering: killed a CRIU helper the previous run left behind")
		}
		switch {
		case rec.Role == store.RoleSource && rec.State == store.Dumping:
			// The commit was never asked: the tree is ours. CRIU resumed
			// it if it still held it; if it had already left it stopped,
			// resume it.
			log.Warn("recovering: migration interrupted before the commit; resuming the source tree", zap.Int("pid", rec.PID))
			stopped := m.stoppedOf(log, dir, rec)
			m.background(id, rec, func() {
				why := "interrupted: phauld restarted"
				if err := m.resumeRec(log, rec, stopped, time.Minute); err != nil {
					log.Error("recovered, but the source tree was not seen running", zap.Error(err))
					why += "; the process was not seen running here afterwards: " + err.Error()
				}
				rec.State, rec.Error = store.Aborted, why
				m.saveRecovered(log, rec, dir)
				note(id, rec, api.OutcomeRolledBack, why)
			})
		case rec.Role == store.RoleSource && rec.State == store.CommitSent:
			log.Warn("recovering: the commit was asked before the restart; asking the destination", zap.Int("pid", rec.PID))
			if err := m.claimTree(id, rec, "in doubt"); err != nil {
				log.Error("cannot hold the source tree", zap.Error(err))
			}
			m.startResolver(id, rec, dir, log, api.HistoryEntry{Started: rec.Created, Result: api.Result{ID: id.String(), SourcePID: rec.PID, Dest: rec.Peer}})
		case rec.Role == store.RoleSource && rec.State == store.Committed:
			log.Info("recovering: committed; removing the source tree", zap.Int("pid", rec.PID))
			m.background(id, rec, func() {
				m.killRec(log, rec)
				rec.Done = true
				m.saveRecovered(log, rec, dir)
				note(id, rec, api.OutcomeCommitted, "")
			})
		case rec.Role == store.RoleDest && rec.State == store.Restored:
			log.Warn("recovering: restored but not committed; discarding this copy", zap.Int("dest_pid", rec.PID))
			m.background(id, rec, func() {
				m.killRec(log, rec)
				// Its namespace goes later (the kernel's teardown, and a
				// closing connection that the lock holds); its veths'
				// host ends go now.
				var veths []network.Veth
				for _, v := range rec.Veths {
					veths = append(veths, network.Veth{Outer: v})
				}
				if gone, err := network.RemoveHostEnds(veths); err != nil {
					log.Warn("cannot remove the discarded copy's veths", zap.Error(err))
				} else if len(gone) > 0 {
					log.Info("removed the discarded copy's veths", zap.Strings("veths", gone))
				}
				rec.State, rec.Error = store.Aborted, "interrupted before the commit: phauld restarted"
				m.saveRecovered(log, rec, dir)
				note(id, rec, api.OutcomeRolledBack, rec.Error)
			})
		case rec.Role == store.RoleDest && rec.State == store.Committed:
			// Committed: make sure the tree runs (the resume may not have
			// happened), but for the tasks job control had stopped, and
			// keep the record for the source's query.
			log.Info("recovering: committed here; making sure the process runs", zap.Int("dest_pid", rec.PID))
			m.background(id, rec, func() {
				if err := m.resumeRec(log, rec, stoppedSet(rec.Stopped), 0); err != nil {
					log.Error("the committed copy was not seen running", zap.Error(err))
				}
				note(id, rec, api.OutcomeCommitted, "")
			})
		case rec.Role == store.RoleDest:
			log.Warn("recovering: interrupted before anything was restored")
			if rec.Container != "" {
				m.killRec(log, rec) // runc forgets a half-restored one; its bundle goes
			}
			rec.State, rec.Error = store.Aborted, "interrupted: phauld restarted"
			m.saveRecovered(log, rec, dir)
			note(id, rec, api.OutcomeRolledBack, rec.Error)
		}
	}
	return nil
}

func stoppedSet(pids []int) map[int]bool {
	set := map[int]bool{}
	for _, p := range pids {
		set[p] = true
	}
	return set
}

// claimTree holds the tree a record names for id.
func (m *Manager) claimTree(id wire.SessionID, rec *store.Record, what string) error {
	info, err := proc.Stat(rec.PID)
	if err != nil || info.StartTime != rec.StartTime {
		return nil // gone: nothing to hold
	}
	pids, err := proc.Tree(rec.PID)
	if err != nil {
		return nil
	}
	return m.claim(id, pids, what)
}

// background runs fn, the recovery of the session id whose record is
// rec, on a goroutine of its own, with the record's tree held meanwhile.
// Shutdown waits for it.
func (m *Manager) background(id wire.SessionID, rec *store.Record, fn func()) {
	if err := m.claimTree(id, rec, "recovering"); err != nil {
		m.log.Error("cannot hold the tree of a session being recovered", zap.Stringer("session", id), zap.Error(err))
	}
	m.sessWG.Add(1)
	go func() {
		defer m.sessWG.Done()
		defer m.unclaim(id)
		fn()
	}()
}

func (m *Manager) saveRecovered(log *zap.Logger, rec *store.Record, dir string) {
	if err := rec.Save(dir); err != nil {
		log.Error("cannot record the recovery", zap.Error(err))
	}
}

// stoppedOf is the set of a source tree's tasks that job control had
// stopped: as the dump's images say, or, when they say nothing readable
// (the dump had not written them), as the record says /proc did just
// before the dump.
func (m *Manager) stoppedOf(log *zap.Logger, dir string, rec *store.Record) map[int]bool {
	stopped, err := m.cfg.CRIU.Stopped(dir)
	if err != nil {
		log.Warn("cannot read which tasks job control had stopped from the images; using the record's", zap.Error(err))
	}
	if err != nil || stopped == nil {
		return stoppedSet(rec.Stopped)
	}
	return stopped
}

// resumeSource makes a tree stopped by an interrupted migration run again,
// but for the tasks job control had stopped (stopped, by their pid in
// their namespace), and sees it running. A CRIU that still traces it
// finishes first (it resumes the tree itself): resumeSource waits up to
// traced for that, or until the manager stops. A tree that is gone is an
// error: it cannot be seen running.
func (m *Manager) resumeSource(pid int, start uint64, stopped map[int]bool, traced time.Duration) error {
	if err := m.untraced(pid, start, traced); err != nil {
		return err
	}
	tree, err := proc.OpenTree(pid, start)
	if err != nil {
		return fmt.Errorf("the tree (pid %d) is gone: %w", pid, err)
	}
	defer proc.CloseAll(tree)
	if err := migrate.ResumeTree(m.log, tree, stopped); err != nil {
		return err
	}
	return proc.VerifyRunning(pid, start, stopped)
}

// killTree kills the tree rooted at pid if it is still the process that
// started at start, and waits for it to exit; the interfaces of a network
// namespace of its own go first.
func killTree(log *zap.Logger, pid int, start uint64) {
	tree, err := proc.OpenTree(pid, start)
	if err != nil {
		return
	}
	defer proc.CloseAll(tree)
	removeLinks(log, pid)
	if err := proc.KillTree(tree); err != nil {
		log.Error("tree did not exit", zap.Error(err))
	}
}

// untraced waits, up to traced, until the tree rooted at pid (started at
// start) is no longer traced: CRIU has let go of it.
func (m *Manager) untraced(pid int, start uint64, traced time.Duration) error {
	deadline := time.Now().Add(traced)
	for {
		info, err := proc.Stat(pid)
		if err != nil || info.StartTime != start {
			return fmt.Errorf("the tree (pid %d) is gone", pid)
		}
		if info.State != 't' {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the tree (pid %d) is still traced after %v; left as it is", pid, traced)
		}
		select {
		case <-m.stopping:
			return fmt.Errorf("phauld is stopping; the tree (pid %d) is still traced, left as it is", pid)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// removeLinks empties the network namespace of pid, a tree that goes, of
// its interfaces (its veths' host ends with them): the namespace outlives
// the tree for a while, and must answer for no address meanwhile.
func removeLinks(log *zap.Logger, pid int) {
	if gone, err := network.RemoveLinks(pid); err != nil {
		log.Warn("cannot remove the interfaces of the tree's namespace", zap.Error(err))
	} else if len(gone) > 0 {
		log.Info("removed the interfaces of the tree's namespace", zap.Strings("interfaces", gone))
	}
}
