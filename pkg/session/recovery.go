//go:build linux

package session

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// Recover finishes or undoes what a previous run of this daemon left in
// flight, from the records in the state directory, as the commit rule
// says. Sources that had asked the commit get a resolver that asks the
// destination. Call it once, before serving.
func (m *Manager) Recover() error {
	root := filepath.Join(m.cfg.StateDir, "sessions")
	ents, err := os.ReadDir(root)
	if err != nil {
		return err
	}
	known, _ := m.history.List(0)
	recorded := map[string]bool{}
	for _, e := range known {
		recorded[e.ID+"/"+e.Direction] = true
	}
	// note adds a session the previous run did not finish to the history.
	note := func(id wire.SessionID, rec *store.Record, outcome string) {
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
			e.Error = api.Errorf(api.CodeAborted, "%s", rec.Error)
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
		switch {
		case rec.Role == store.RoleSource && rec.State == store.Dumping:
			// The commit was never asked: the tree is ours. CRIU resumed
			// it if it still held it; if it had already left it stopped,
			// resume it.
			log.Warn("recovering: migration interrupted before the commit; resuming the source tree", zap.Int("pid", rec.PID))
			resumeSource(log, rec.PID, rec.StartTime)
			rec.State, rec.Error = store.Aborted, "interrupted: phauld restarted"
			m.saveRecovered(log, rec, dir)
			note(id, rec, api.OutcomeRolledBack)
		case rec.Role == store.RoleSource && rec.State == store.CommitSent:
			log.Warn("recovering: the commit was asked before the restart; asking the destination", zap.Int("pid", rec.PID))
			m.startResolver(id, rec, dir, log, api.HistoryEntry{Started: rec.Created, Result: api.Result{ID: id.String(), SourcePID: rec.PID, Dest: rec.Peer}})
		case rec.Role == store.RoleSource && rec.State == store.Committed:
			log.Info("recovering: committed; removing the source tree", zap.Int("pid", rec.PID))
			killTree(log, rec.PID, rec.StartTime)
			rec.Done = true
			m.saveRecovered(log, rec, dir)
			note(id, rec, api.OutcomeCommitted)
		case rec.Role == store.RoleDest && rec.State == store.Restored:
			log.Warn("recovering: restored but not committed; discarding this copy", zap.Int("dest_pid", rec.PID))
			killTree(log, rec.PID, rec.StartTime)
			rec.State, rec.Error = store.Aborted, "interrupted before the commit: phauld restarted"
			m.saveRecovered(log, rec, dir)
			note(id, rec, api.OutcomeRolledBack)
		case rec.Role == store.RoleDest && rec.State == store.Committed:
			// Committed: make sure the tree runs (the resume may not have
			// happened), and keep the record for the source's query.
			log.Info("recovering: committed here; making sure the process runs", zap.Int("dest_pid", rec.PID))
			if tree, err := proc.OpenTree(rec.PID, rec.StartTime); err == nil {
				proc.SignalAll(tree, syscall.SIGCONT)
				proc.CloseAll(tree)
			}
			note(id, rec, api.OutcomeCommitted)
		case rec.Role == store.RoleDest:
			log.Warn("recovering: interrupted before anything was restored")
			rec.State, rec.Error = store.Aborted, "interrupted: phauld restarted"
			m.saveRecovered(log, rec, dir)
			note(id, rec, api.OutcomeRolledBack)
		}
	}
	return nil
}

func (m *Manager) saveRecovered(log *zap.Logger, rec *store.Record, dir string) {
	if err := rec.Save(dir); err != nil {
		log.Error("cannot record the recovery", zap.Error(err))
	}
}

// resumeSource makes a source tree run again after an interrupted
// migration. A CRIU that still traces it finishes first (it resumes the
// tree itself); a tree left stopped is sent SIGCONT.
func resumeSource(log *zap.Logger, pid int, start uint64) {
	deadline := time.Now().Add(time.Minute)
	for {
		info, err := proc.Stat(pid)
		if err != nil || info.StartTime != start {
			log.Warn("the source tree is gone", zap.Int("pid", pid))
			return
		}
		if info.State != 't' {
			break
		}
		if time.Now().After(deadline) {
			log.Error("the source tree is still traced after a minute; leaving it", zap.Int("pid", pid))
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	tree, err := proc.OpenTree(pid, start)
	if err != nil {
		return
	}
	defer proc.CloseAll(tree)
	if err := proc.SignalAll(tree, syscall.SIGCONT); err != nil {
		log.Error("cannot resume the source tree", zap.Error(err))
	}
}

// killTree kills the tree rooted at pid if it is still the process that
// started at start.
func killTree(log *zap.Logger, pid int, start uint64) {
	tree, err := proc.OpenTree(pid, start)
	if err != nil {
		return
	}
	defer proc.CloseAll(tree)
	proc.SignalAll(tree, syscall.SIGKILL)
	if err := proc.WaitExited(tree, 5*time.Second); err != nil {
		log.Error("tree did not exit", zap.Error(err))
	}
}

// resolver settles a source session whose commit was asked and whose
// answer was lost: it asks the destination on a query connection until it
// gets an answer, then kills or resumes the stopped tree accordingly.
type resolver struct {
	id      wire.SessionID
	rec     *store.Record
	dir     string
	started time.Time
	stop    chan struct{}
	done    chan struct{}
	// entry is the history entry the outcome completes.
	entry api.HistoryEntry
	// Set before done is closed.
	outcome string
	destPID int
}

func (m *Manager) startResolver(id wire.SessionID, rec *store.Record, dir string, log *zap.Logger, entry api.HistoryEntry) *resolver {
	r := &resolver{id: id, rec: rec, dir: dir, started: time.Now(), stop: make(chan struct{}), done: make(chan struct{}), entry: entry}
	m.mu.Lock()
	if m.closing {
		m.mu.Unlock()
		close(r.done)
		return r
	}
	m.resolvers[id] = r
	m.sessWG.Add(1)
	m.mu.Unlock()
	go func() {
		defer m.sessWG.Done()
		defer close(r.done)
		m.resolve(r, log)
		m.mu.Lock()
		delete(m.resolvers, id)
		m.mu.Unlock()
	}()
	return r
}

func (m *Manager) resolve(r *resolver, log *zap.Logger) {
	delay := time.Second
	for attempt := 1; ; attempt++ {
		outcome, pid, err := m.query(r.rec.Peer, r.id)
		if err == nil && outcome != wire.OutcomeUnknown {
			r.outcome, r.destPID = outcome, pid
			m.settle(r, log)
			return
		}
		if err == nil {
			log.Error("the destination has no record of this session: it cannot say whether it committed. "+
				"See whether the process runs there; if it does, kill the stopped source tree, else resume it (kill -CONT)",
				zap.Int("pid", r.rec.PID))
			r.outcome = wire.OutcomeUnknown
			return
		}
		if attempt == 1 || attempt%10 == 0 {
			log.Warn("cannot ask the destination yet; retrying", zap.Error(err), zap.Int("attempt", attempt))
		}
		select {
		case <-r.stop:
			log.Info("stopping with the outcome unknown; the record keeps the tree stopped until the next start")
			return
		case <-time.After(delay):
		}
		delay = min(2*delay, 30*time.Second)
	}
}

// settle acts on the destination's answer and tells it we did.
func (m *Manager) settle(r *resolver, log *zap.Logger) {
	switch r.outcome {
	case wire.OutcomeCommitted:
		log.Info("resolved: the destination committed; removing the source tree", zap.Int("dest_pid", r.destPID))
		killTree(log, r.rec.PID, r.rec.StartTime)
		r.rec.State, r.rec.Done = store.Committed, true
	case wire.OutcomeAborted:
		log.Info("resolved: the destination did not commit; resuming the source tree", zap.Int("pid", r.rec.PID))
		resumeSource(log, r.rec.PID, r.rec.StartTime)
		r.rec.State = store.Aborted
	}
	if err := r.rec.Save(r.dir); err != nil {
		log.Error("cannot record the outcome", zap.Error(err))
		return
	}
	e := r.entry
	e.ID, e.Direction, e.PID, e.Peer, e.Ended = r.id.String(), api.DirectionOut, r.rec.PID, r.rec.Peer, time.Now()
	if r.outcome == wire.OutcomeCommitted {
		e.Outcome, e.Error, e.Result.DestPID = api.OutcomeCommitted, nil, r.destPID
	} else {
		e.Outcome = api.OutcomeRolledBack
		e.Error = api.Errorf(api.CodeAborted, "the commit was asked and its answer lost; the destination then said it had not committed")
	}
	if err := m.history.Add(e); err != nil {
		log.Warn("cannot record the migration in the history", zap.Error(err))
	}
	// The destination may forget the session now.
	if lk, err := m.dialQuery(r.rec.Peer, r.id); err == nil {
		lk.SetDeadline(time.Now().Add(m.cfg.HandshakeTimeout))
		wire.WriteMessage(lk.Stream(), &wire.Done{})
		lk.Close()
	}
	if r.outcome == wire.OutcomeCommitted && !m.cfg.KeepImages {
		removeAll(log, r.dir)
	}
}

// dialQuery opens a query connection for session id to addr.
func (m *Manager) dialQuery(addr string, id wire.SessionID) (*transport.Link, error) {
	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.DialTimeout)
	defer cancel()
	return m.dial(ctx, addr, id, wire.RoleQuery)
}

// query asks the destination at addr how session id ended.
func (m *Manager) query(addr string, id wire.SessionID) (string, int, error) {
	lk, err := m.dialQuery(addr, id)
	if err != nil {
		return "", 0, err
	}
	defer lk.Close()
	lk.SetDeadline(time.Now().Add(m.cfg.HandshakeTimeout + 10*time.Second))
	if err := wire.WriteMessage(lk.Stream(), &wire.Resolve{}); err != nil {
		return "", 0, err
	}
	msg, err := wire.ReadMessage(lk.Stream(), wire.Query)
	if err != nil {
		return "", 0, fmt.Errorf("read outcome: %w", err)
	}
	o, ok := msg.(*wire.Outcome)
	if !ok {
		return "", 0, fmt.Errorf("got %s instead of an outcome", msg.Type())
	}
	return o.Outcome, o.PID, nil
}

// answerQuery serves a query connection: the source asks how session id
// ended (Resolve) or says it acted on the answer (Done).
func (m *Manager) answerQuery(lk *transport.Link, id wire.SessionID, log *zap.Logger) {
	lk.SetDeadline(time.Now().Add(m.cfg.HandshakeTimeout + 10*time.Second))
	msg, err := wire.ReadMessage(lk.Stream(), wire.Query)
	if err != nil {
		log.Warn("query connection dropped", zap.Error(err))
		return
	}
	dir := m.sessionDir(id)
	switch msg.(type) {
	case *wire.Resolve:
		outcome, pid := m.outcomeOf(id, dir)
		log.Info("source asked the outcome", zap.String("outcome", outcome))
		if err := wire.WriteMessage(lk.Stream(), &wire.Outcome{Outcome: outcome, PID: pid}); err != nil {
			log.Warn("cannot send the outcome", zap.Error(err))
		}
	case *wire.Done:
		rec, err := store.Load(dir)
		if err != nil || rec.Role != store.RoleDest {
			return
		}
		rec.Done = true
		if err := rec.Save(dir); err != nil {
			log.Warn("cannot record the end", zap.Error(err))
		}
		if rec.State == store.Committed && !m.cfg.KeepImages {
			removeAll(log, dir)
		}
	default:
		log.Warn("unexpected message on a query connection", zap.Stringer("type", msg.Type()))
	}
}

// outcomeOf is the destination's answer for session id: asked of the live
// session if there is one (so it is ordered with everything else it
// does), else read from its record.
func (m *Manager) outcomeOf(id wire.SessionID, dir string) (string, int) {
	m.mu.Lock()
	r := m.sessions[id]
	m.mu.Unlock()
	if r != nil {
		if outcome, pid, ok := r.s.Resolve(); ok {
			return outcome, pid
		}
		<-r.done
	}
	rec, err := store.Load(dir)
	if err != nil || rec.Role != store.RoleDest {
		return wire.OutcomeUnknown, 0
	}
	if rec.State == store.Committed {
		return wire.OutcomeCommitted, rec.PID
	}
	return wire.OutcomeAborted, 0
}

// Cancel cancels the session whose id starts with prefix (at least 4
// hex digits, unambiguous).
func (m *Manager) Cancel(prefix string) (api.Session, error) {
	m.mu.Lock()
	var found *running
	var res *resolver
	n := 0
	if len(prefix) >= 4 {
		for id, s := range m.sessions {
			if hasPrefix(id, prefix) {
				found, n = s, n+1
			}
		}
		for id, r := range m.resolvers {
			if hasPrefix(id, prefix) {
				res, n = r, n+1
			}
		}
	}
	m.mu.Unlock()
	switch {
	case n == 0:
		return api.Session{}, api.Errorf(api.CodeNotFound, "no migration in progress has an id starting with %q (see phaulctl list)", prefix)
	case n > 1:
		return api.Session{}, api.Errorf(api.CodeInvalid, "%q matches %d migrations: give more of the id", prefix, n)
	case res != nil:
		return res.info(), api.Errorf(api.CodeConflict,
			"session %s has asked the destination to commit and is waiting for its answer: too late to cancel", res.id)
	}
	err := found.s.Cancel()
	return found.s.Info(), err
}

func hasPrefix(id wire.SessionID, prefix string) bool {
	s := id.String()
	return len(prefix) <= len(s) && s[:len(prefix)] == prefix
}

func (r *resolver) info() api.Session {
	return api.Session{
		ID:        r.id.String(),
		Direction: api.DirectionOut,
		PID:       r.rec.PID,
		Peer:      r.rec.Peer,
		Phase:     "in-doubt",
		Started:   r.started,
		AgeMS:     time.Since(r.started).Milliseconds(),
	}
}

// CleanOld removes the directories of finished sessions last touched more
// than age ago. Sessions still in flight, and records a peer may still ask
// about, are kept.
func (m *Manager) CleanOld(age time.Duration) {
	root := filepath.Join(m.cfg.StateDir, "sessions")
	ents, err := os.ReadDir(root)
	if err != nil {
		return
	}
	for _, e := range ents {
		id, err := wire.ParseSessionID(e.Name())
		if err != nil {
			continue
		}
		m.mu.Lock()
		_, live := m.sessions[id]
		_, resolving := m.resolvers[id]
		m.mu.Unlock()
		if live || resolving {
			continue
		}
		dir := filepath.Join(root, e.Name())
		info, err := os.Stat(dir)
		if err != nil {
			continue
		}
		when := info.ModTime()
		if rec, err := store.Load(dir); err == nil {
			if !rec.Terminal() && !(rec.Role == store.RoleDest && rec.State == store.Committed) {
				continue // the commit rule still needs it
			}
			when = rec.Updated
		}
		if time.Since(when) > age {
			m.log.Info("removing an old session directory", zap.String("dir", dir), zap.Time("last_update", when))
			removeAll(m.log, dir)
		}
	}
}
