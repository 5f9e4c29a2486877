//go:build linux

package session

import (
	"context"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// resolver settles a source session whose commit was asked and whose
// answer was lost: it asks the destination on a query connection until it
// gets an answer, then kills or resumes the stopped tree accordingly. A
// destination that has no record of the session cannot answer: the
// resolver then waits for an operator (Manager.Resolve), asking again now
// and then, and the tree stays held and stopped.
type resolver struct {
	id      wire.SessionID
	rec     *store.Record
	dir     string
	started time.Time
	log     *zap.Logger
	stop    chan struct{}
	done    chan struct{}
	// orders are an operator's decisions, for when the destination
	// cannot say.
	orders chan order
	// unknown is closed once the destination said it has no record.
	unknown     chan struct{}
	unknownOnce sync.Once
	// entry is the history entry the outcome completes.
	entry api.HistoryEntry
	// Set before done is closed: the outcome (wire.Outcome*, or
	// api.OutcomeKilled when an operator killed the tree), the pid on
	// the destination, and, when the tree was to be resumed, whether it
	// was seen running (resumeErr nil).
	outcome   string
	destPID   int
	resumeErr error
}

// order is an operator's decision for a session in doubt: "resume" or
// "kill" the stopped source tree. reply gets nil once it is done, or why
// it was refused.
type order struct {
	action string
	reply  chan error
}

// Actions an operator may take on a session in doubt.
const (
	ResolveResume = "resume"
	ResolveKill   = "kill"
)

// retryUnknown is how often a destination that has no record is asked
// again, in case its state comes back.
const retryUnknown = time.Minute

func (m *Manager) startResolver(id wire.SessionID, rec *store.Record, dir string, log *zap.Logger, entry api.HistoryEntry) *resolver {
	r := &resolver{id: id, rec: rec, dir: dir, started: time.Now(), log: log, stop: make(chan struct{}), done: make(chan struct{}),
		orders: make(chan order), unknown: make(chan struct{}), entry: entry}
	m.mark(id, "in doubt")
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
		settled := m.resolve(r)
		m.mu.Lock()
		delete(m.resolvers, id)
		m.mu.Unlock()
		if settled {
			m.unclaim(id)
		}
	}()
	return r
}

// resolve asks until the destination answers, an operator decides, or the
// manager stops. It reports whether the session was settled.
func (m *Manager) resolve(r *resolver) bool {
	delay := time.Second
	for attempt := 1; ; attempt++ {
		outcome, pid, err := m.query(r.rec.Peer, r.id)
		if err == nil && outcome != wire.OutcomeUnknown {
			r.outcome, r.destPID = outcome, pid
			m.settle(r)
			return true
		}
		wait := delay
		if err == nil {
			r.unknownOnce.Do(func() {
				r.log.Error("the destination has no record of this session: it cannot say whether it committed. "+
					"See whether the process runs there; then settle it with 'phaulctl resolve ID --kill' if it does, '--resume' if it does not",
					zap.Int("pid", r.rec.PID))
				close(r.unknown)
			})
			wait = retryUnknown
		} else if attempt == 1 || attempt%10 == 0 {
			r.log.Warn("cannot ask the destination yet; retrying", zap.Error(err), zap.Int("attempt", attempt))
		}
		select {
		case <-r.stop:
			r.log.Info("stopping with the outcome unknown; the record keeps the tree stopped until the next start")
			return false
		case o := <-r.orders:
			if m.decide(r, o) {
				return true
			}
		case <-time.After(wait):
			delay = min(2*delay, 30*time.Second)
		}
	}
}

// decide carries out an operator's order, unless the destination can be
// reached and answers: then its answer settles the session, and the order
// is refused, saying so. It reports whether the session was settled.
func (m *Manager) decide(r *resolver, o order) bool {
	outcome, pid, err := m.query(r.rec.Peer, r.id)
	if err == nil && outcome != wire.OutcomeUnknown {
		r.outcome, r.destPID = outcome, pid
		m.settle(r)
		o.reply <- api.Errorf(api.CodeConflict, "refused: %s", r.settledAs())
		return true
	}
	reason := "the destination has no record of the session"
	if err != nil {
		// A destination that lost its source decides within the peer
		// timeout (it commits a Commit it has, or gives up): until then
		// its answer may still change, and nobody should guess it.
		if wait := m.cfg.PeerTimeout - time.Since(r.started); wait > 0 {
			o.reply <- api.Errorf(api.CodeUnavailable,
				"refused: the destination %s cannot be reached (%v), and it may still be deciding for another %v; ask again then",
				r.rec.Peer, err, wait.Round(time.Second))
			return false
		}
		reason = fmt.Sprintf("the destination cannot be reached (%v)", err)
	}
	r.log.Warn("settled by an operator", zap.String("action", o.action), zap.String("because", reason))
	switch o.action {
	case ResolveKill:
		r.outcome = api.OutcomeKilled
	default:
		r.outcome = wire.OutcomeAborted
	}
	m.settle(r)
	if r.outcome == wire.OutcomeAborted && r.resumeErr != nil {
		o.reply <- api.Errorf(api.CodeInDoubt, "resumed the source tree (pid %d), but it was not seen running afterwards: %v", r.rec.PID, r.resumeErr)
		return true
	}
	o.reply <- nil
	return true
}

// settle acts on the outcome and tells the destination we did.
func (m *Manager) settle(r *resolver) {
	log := r.log
	switch r.outcome {
	case wire.OutcomeCommitted:
		log.Info("resolved: the destination committed; removing the source tree", zap.Int("dest_pid", r.destPID))
		m.killRec(log, r.rec)
		r.rec.State, r.rec.Done = store.Committed, true
	case api.OutcomeKilled:
		log.Info("resolved by an operator: removing the source tree", zap.Int("pid", r.rec.PID))
		m.killRec(log, r.rec)
		r.rec.State, r.rec.Done, r.rec.Error = store.Committed, true, "settled by an operator: the source tree was killed"
	case wire.OutcomeAborted:
		log.Info("resolved: the destination did not commit; resuming the source tree", zap.Int("pid", r.rec.PID))
		stopped := m.stoppedOf(log, r.dir, r.rec)
		if r.resumeErr = m.resumeRec(log, r.rec, stopped, time.Minute); r.resumeErr != nil {
			log.Error("the source tree was not seen running", zap.Error(r.resumeErr))
		}
		r.rec.State = store.Aborted
	}
	if err := r.rec.Save(r.dir); err != nil {
		log.Error("cannot record the outcome", zap.Error(err))
		return
	}
	e := r.entry
	e.ID, e.Direction, e.PID, e.Peer, e.Ended = r.id.String(), api.DirectionOut, r.rec.PID, r.rec.Peer, time.Now()
	switch r.outcome {
	case wire.OutcomeCommitted:
		e.Outcome, e.Error, e.Result.DestPID = api.OutcomeCommitted, nil, r.destPID
	case api.OutcomeKilled:
		e.Outcome = api.OutcomeKilled
		e.Error = api.Errorf(api.CodeAborted, "the destination could not say whether it committed; an operator killed the source tree")
	default:
		e.Outcome = api.OutcomeRolledBack
		e.Error = api.Errorf(api.CodeAborted, "the commit was asked and its answer lost; then the destination said it had not committed, or an operator resumed the process")
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
	if r.outcome != wire.OutcomeAborted && !m.cfg.KeepImages {
		removeAll(log, r.dir)
	}
}

// Resolve settles the session in doubt whose id starts with prefix as an
// operator says: action ResolveResume resumes the stopped source tree,
// ResolveKill kills it. It is refused while the destination can be
// reached and answers (its answer then settles the session): an operator
// decides only what nobody else can.
func (m *Manager) Resolve(ctx context.Context, prefix, action string) (api.Session, error) {
	if action != ResolveResume && action != ResolveKill {
		return api.Session{}, api.Errorf(api.CodeInvalid, "resolve: want %s or %s, not %q", ResolveResume, ResolveKill, action)
	}
	_, found, err := m.find(prefix)
	switch {
	case err != nil:
		return api.Session{}, err
	case found == nil:
		return api.Session{}, api.Errorf(api.CodeConflict, "migration %s is not in doubt: it is still running, and ends by the commit rule", prefix)
	}
	info := found.info()
	o := order{action: action, reply: make(chan error, 1)}
	select {
	case found.orders <- o:
	case <-found.done:
		if found.outcome == "" {
			return info, api.Errorf(api.CodeUnavailable, "phauld is shutting down: migration %s stays in doubt until it runs again", found.id)
		}
		return info, api.Errorf(api.CodeConflict, "refused: migration %s has just been settled: %s (see phaulctl history)", found.id, found.settledAs())
	case <-ctx.Done():
		return info, ctx.Err()
	}
	return info, <-o.reply
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

// settledAs says how the destination's answer settled r.
func (r *resolver) settledAs() string {
	switch r.outcome {
	case wire.OutcomeCommitted:
		return fmt.Sprintf("the destination %s answered that it committed (the process runs there as pid %d): the source tree was killed", r.rec.Peer, r.destPID)
	case wire.OutcomeAborted:
		return fmt.Sprintf("the destination %s answered that it did not commit: the source tree was resumed here", r.rec.Peer)
	}
	return "by an operator"
}

func (r *resolver) info() api.Session {
	s := api.Session{
		ID:        r.id.String(),
		Direction: api.DirectionOut,
		PID:       r.rec.PID,
		Peer:      r.rec.Peer,
		Phase:     "in-doubt",
		Started:   r.started,
		AgeMS:     time.Since(r.started).Milliseconds(),
		Note:      "asking the destination whether it committed; the process is held stopped here",
	}
	select {
	case <-r.unknown:
		s.Note = "the destination has no record of it: see whether the process runs there, then 'phaulctl resolve " + r.id.String()[:8] + " --kill' if it does, '--resume' if not"
	default:
	}
	return s
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
