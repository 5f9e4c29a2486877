//go:build linux

// Package store keeps what a daemon must remember across a crash: one
// record per session (where it is in the commit rule, written before each
// step a restarting daemon must know about) and the history of finished
// migrations.
package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// RecordName is the file in a session's directory that says where the
// session is in the commit rule, written before each step that a daemon
// restarting after a crash must know about.
const RecordName = "session.json"

// Roles in records.
const (
	RoleSource = "source"
	RoleDest   = "dest"
)

// Record states. A source goes dumping → commit-sent → committed, or to
// aborted; a destination goes receiving → restored → committed, or to
// aborted. Done marks a session both sides have finished with.
const (
	Dumping    = "dumping"
	CommitSent = "commit-sent"
	Receiving  = "receiving"
	Restored   = "restored"
	Committed  = "committed"
	Aborted    = "aborted"
)

// Record is what a daemon keeps on disk about one session.
type Record struct {
	ID    string `json:"id"`
	Role  string `json:"role"`
	State string `json:"state"`
	// Peer is the destination's address (source) or the source's
	// (destination).
	Peer string `json:"peer"`
	// PID and StartTime name the tree this side holds: the migrating tree
	// (source) or the restored tree (destination, once restored).
	PID       int    `json:"pid,omitempty"`
	StartTime uint64 `json:"start_time,omitempty"`
	// SourcePID is the process's pid on the source (destination records).
	SourcePID int `json:"source_pid,omitempty"`
	// Stopped are the tasks of the tree that job control had stopped,
	// by their pid in their own pid namespace: as the images say, on a
	// destination once restored; as /proc said just before the dump, on
	// a source (for a recovery that finds no readable images). Whoever
	// resumes the tree leaves them stopped.
	Stopped []int `json:"stopped,omitempty"`
	// Veths are the host ends of the veths a destination made for the
	// tree's namespace: a copy discarded after a restart takes them with
	// it.
	Veths []string `json:"veths,omitempty"`
	// Container is the id of the runc container the tree is (under the
	// daemon's runc root): a recovery resumes it with runc resume (a
	// source holds it paused), or deletes it with runc delete.
	Container string `json:"container,omitempty"`
	// Done: the session is over on both sides; the record only remains
	// for inspection until it ages out.
	Done    bool      `json:"done,omitempty"`
	Error   string    `json:"error,omitempty"`
	Created time.Time `json:"created"`
	Updated time.Time `json:"updated"`
}

// Terminal reports whether the record's session needs nothing more from
// this daemon.
func (r *Record) Terminal() bool {
	return r.Done || r.State == Aborted
}

// Save writes r to dir atomically and durably: a crash leaves either the
// old record or the new one, never a torn one, and the new one survives a
// power cut once save returns.
func (r *Record) Save(dir string) error {
	r.Updated = time.Now().UTC()
	if r.Created.IsZero() {
		r.Created = r.Updated
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, RecordName+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("write session record: %w", err)
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("write session record: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync session record: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write session record: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, RecordName)); err != nil {
		return fmt.Errorf("write session record: %w", err)
	}
	// From here the new record is what everyone reads (a guard, a query,
	// a recovery): a failure is one of durability, not of the change.
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("%w: %v", ErrNotDurable, err)
	}
	return nil
}

// ErrNotDurable is a Save whose record was written and is the one read
// from now on, but whose directory could not be synced: a crash of the
// host (not of the daemon) may bring the previous record back.
var ErrNotDurable = errors.New("session record written, but not synced to disk")

func syncDir(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// Load reads the record in dir.
func Load(dir string) (*Record, error) {
	b, err := os.ReadFile(filepath.Join(dir, RecordName))
	if err != nil {
		return nil, err
	}
	r := &Record{}
	if err := json.Unmarshal(b, r); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, RecordName), err)
	}
	return r, nil
}

// RemoveImages deletes a session's image files, keeping its record and
// logs: after a commit the images are no longer needed, but the record
// must stay until the source has heard the outcome.
func RemoveImages(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		n := e.Name()
		if n == RecordName || filepath.Ext(n) == ".log" {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, n)); err != nil {
			return err
		}
	}
	return nil
}
