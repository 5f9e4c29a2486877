//go:build linux

package store

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/phaul/phaul/pkg/api"
)

// historyKeep is how many migrations the history keeps; the file is cut
// back to that many when it holds twice as many lines.
const historyKeep = 1000

// History is the log of finished migrations, STATE/history.jsonl: one
// JSON object per line, appended as each migration ends. A later line for
// the same session (an in-doubt one settled) supersedes the earlier. It
// survives restarts; a host crash may lose the newest lines, which only
// the log is about.
type History struct {
	path string

	mu    sync.Mutex
	lines int
}

// OpenHistory opens STATEDIR/history.jsonl, creating it at the first Add.
func OpenHistory(stateDir string) (*History, error) {
	h := &History{path: filepath.Join(stateDir, "history.jsonl")}
	entries, err := h.read()
	if err != nil {
		return nil, err
	}
	h.lines = len(entries)
	if h.lines > 2*historyKeep {
		if err := h.rewrite(entries[len(entries)-historyKeep:]); err != nil {
			return nil, err
		}
	}
	return h, nil
}

// Add appends e.
func (h *History) Add(e api.HistoryEntry) error {
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	f, err := os.OpenFile(h.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("history: %w", err)
	}
	_, err = f.Write(append(b, '\n'))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("history: %w", err)
	}
	h.lines++
	if h.lines > 2*historyKeep {
		if entries, err := h.read(); err == nil && len(entries) > historyKeep {
			return h.rewrite(entries[len(entries)-historyKeep:])
		}
	}
	return nil
}

// List returns the newest limit migrations (all it keeps, the newest
// historyKeep, if limit <= 0 or more), newest first, one per session.
func (h *History) List(limit int) ([]api.HistoryEntry, error) {
	if limit <= 0 || limit > historyKeep {
		limit = historyKeep
	}
	h.mu.Lock()
	entries, err := h.read()
	h.mu.Unlock()
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []api.HistoryEntry
	for i := len(entries) - 1; i >= 0 && len(out) < limit; i-- {
		e := entries[i]
		key := e.ID + "/" + e.Direction // both ends on one host are two entries
		if seen[key] {
			continue
		}
		seen[key] = true
		out = append(out, e)
	}
	return out, nil
}

// read returns every entry in the file, oldest first. Lines that do not
// parse (a torn last line after a crash) are skipped.
func (h *History) read() ([]api.HistoryEntry, error) {
	f, err := os.Open(h.path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	defer f.Close()
	var entries []api.HistoryEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		var e api.HistoryEntry
		if json.Unmarshal(sc.Bytes(), &e) == nil && e.ID != "" {
			entries = append(entries, e)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	return entries, nil
}

// rewrite replaces the file with entries, atomically. Called with mu held
// (or before h is shared).
func (h *History) rewrite(entries []api.HistoryEntry) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	for _, e := range entries {
		if err := enc.Encode(e); err != nil {
			return err
		}
	}
	tmp := h.path + ".tmp"
	if err := os.WriteFile(tmp, buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("history: %w", err)
	}
	if err := os.Rename(tmp, h.path); err != nil {
		return fmt.Errorf("history: %w", err)
	}
	h.lines = len(entries)
	return nil
}
