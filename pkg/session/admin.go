//go:build linux

package session

import (
	"context"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/wire"
)

// Cancel cancels the session whose id starts with prefix (at least 4
// hex digits, unambiguous).
func (m *Manager) Cancel(prefix string) (api.Session, error) {
	found, res, err := m.find(prefix)
	switch {
	case err != nil:
		return api.Session{}, err
	case res != nil:
		return res.info(), api.Errorf(api.CodeConflict,
			"session %s has asked the destination to commit and is waiting for its answer: too late to cancel", res.id)
	}
	err = found.s.Cancel()
	return found.info(), err
}

// find is the session, or the resolver, whose id starts with prefix (at
// least 4 hex digits, unambiguous).
func (m *Manager) find(prefix string) (*running, *resolver, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
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
	switch {
	case n == 0:
		return nil, nil, api.Errorf(api.CodeNotFound, "no migration in progress has an id starting with %q (see phaulctl list)", prefix)
	case n > 1:
		return nil, nil, api.Errorf(api.CodeInvalid, "%q matches %d migrations: give more of the id", prefix, n)
	}
	return found, res, nil
}

func hasPrefix(id wire.SessionID, prefix string) bool {
	s := id.String()
	return len(prefix) <= len(s) && s[:len(prefix)] == prefix
}

// RecordKeep is the least time a finished session's record is kept, even
// with a shorter keep: a source in doubt may still ask the destination
// how the migration ended, and the record (a few KiB) answers it. Only
// the images and logs go sooner.
const RecordKeep = time.Hour

// CleanOld removes what finished sessions left more than age ago: their
// images and logs, and, once RecordKeep has passed too, the whole
// directory. Sessions still in flight, and records the commit rule still
// needs, are kept; a destination's committed record whose source never
// confirmed goes after age too (a source still in doubt then hears "no
// record", and an operator settles it).
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
		rec, rerr := store.Load(dir)
		if rerr == nil {
			if !rec.Terminal() && !(rec.Role == store.RoleDest && rec.State == store.Committed) {
				continue // the commit rule still needs it
			}
			when = rec.Updated
		}
		since := time.Since(when)
		switch {
		case since > max(age, RecordKeep) || (rerr != nil && since > age):
			m.log.Info("removing an old session directory", zap.String("dir", dir), zap.Time("last_update", when))
			removeAll(m.log, dir)
		case since > age:
			m.removeImages(dir)
		}
	}
}

// removeImages removes everything in a finished session's directory but
// its record: the images and CRIU's logs, which may take gigabytes.
func (m *Manager) removeImages(dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	removed := 0
	for _, e := range ents {
		if e.Name() == store.RecordName {
			continue
		}
		removeAll(m.log, filepath.Join(dir, e.Name()))
		removed++
	}
	if removed > 0 {
		m.log.Info("removed the images of a failed session; its record stays a while", zap.String("dir", dir), zap.Duration("record_kept", RecordKeep))
	}
}

// JanitorEvery is how often the janitor looks for directories to remove
// when they are kept for keep: often enough that nothing stays much
// longer than keep, and no more than once a minute.
func JanitorEvery(keep time.Duration) time.Duration {
	return min(time.Hour, max(time.Minute, keep/10))
}

// Janitor removes, at once and then every interval until ctx ends, the
// directories of sessions finished more than keep ago (CleanOld), and runs
// tidy. It runs beside the daemon: removing gigabytes of old images must
// not hold up its start.
func (m *Manager) Janitor(ctx context.Context, every, keep time.Duration, tidy func()) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		m.CleanOld(keep)
		if tidy != nil {
			tidy()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
