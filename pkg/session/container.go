//go:build linux

package session

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/migrate"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/runc"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/wire"
)

// findContainer finds the runc container id and its init's pid, refusing
// one that cannot move as it is.
func (m *Manager) findContainer(ctx context.Context, id string) (*migrate.Container, int, error) {
	r := m.cfg.Runc
	if r == nil {
		return nil, 0, api.Errorf(api.CodePrecondition, "this phauld runs no containers: runc is not installed here (Debian: apt install runc), or phauld started before it was")
	}
	if !runc.ValidID(id) {
		return nil, 0, api.Errorf(api.CodeInvalid, "%q is not a container id", id)
	}
	st, err := r.State(ctx, id)
	if errors.Is(err, runc.ErrNotExist) {
		return nil, 0, api.Errorf(api.CodeNotFound, "runc knows no container %s in %s (runc --root %s list)", id, rootName(r), rootName(r))
	}
	if err != nil {
		return nil, 0, api.Errorf(api.CodePrecondition, "%v", err)
	}
	switch st.Status {
	case "running":
	case "paused":
		return nil, 0, api.Errorf(api.CodePrecondition, "container %s is paused: resume it (runc resume %s), then migrate it", id, id)
	default:
		return nil, 0, api.Errorf(api.CodePrecondition, "container %s is %s, not running: only a running container migrates", id, st.Status)
	}
	c := &migrate.Container{ID: id, Runc: r, Bundle: st.Bundle, HookExe: m.cfg.HookExe}
	if m.cfg.ContainersDir != "" && strings.HasPrefix(st.Bundle, filepath.Clean(m.cfg.ContainersDir)+"/") {
		c.OwnBundle = true
	}
	return c, st.PID, nil
}

func rootName(r *runc.Runc) string {
	if r.Root == "" {
		return runc.DefaultRoot
	}
	return r.Root
}

// describeContainer is what the destination is told of c: its config.json
// and rootfs, and a marker file next to the rootfs, for this session, by
// which it sees whether it shares the storage.
func (m *Manager) describeContainer(ctx context.Context, c *migrate.Container, sid wire.SessionID) (*wire.Container, error) {
	b, err := os.ReadFile(filepath.Join(c.Bundle, "config.json"))
	if err != nil {
		return nil, api.Errorf(api.CodePrecondition, "container %s: %v", c.ID, err)
	}
	if len(b) > wire.MaxContainerConfig {
		return nil, api.Errorf(api.CodePrecondition, "container %s: its config.json has %d bytes, more than phaul carries (%d)", c.ID, len(b), wire.MaxContainerConfig)
	}
	cfg, err := runc.ParseConfig(b)
	if err != nil {
		return nil, api.Errorf(api.CodePrecondition, "container %s: %v", c.ID, err)
	}
	rootfs := filepath.Clean(cfg.Rootfs(c.Bundle))
	var tok [16]byte
	if _, err := rand.Read(tok[:]); err != nil {
		return nil, err
	}
	w := &wire.Container{ID: c.ID, Config: b, Rootfs: rootfs, Token: hex.EncodeToString(tok[:]),
		Marker: filepath.Join(filepath.Dir(rootfs), ".phaul-shared-"+sid.String())}
	if err := os.WriteFile(w.Marker, []byte(w.Token), 0o600); err != nil {
		return nil, api.Errorf(api.CodePrecondition, "container %s: cannot write the shared-storage marker next to its rootfs: %v", c.ID, err)
	}
	if v, err := c.Runc.Version(ctx); err == nil {
		w.RuncVersion = v
	} else {
		os.Remove(w.Marker)
		return nil, api.Errorf(api.CodePrecondition, "runc does not run here: %v", err)
	}
	return w, nil
}

// resumeRec resumes the tree rec holds (resumeSource), a container that
// runc holds paused thawed first.
func (m *Manager) resumeRec(log *zap.Logger, rec *store.Record, stopped map[int]bool, traced time.Duration) error {
	if rec.Container != "" && m.cfg.Runc != nil {
		// A checkpoint the restart interrupted may still run: while
		// CRIU holds the tasks runc says running (CRIU thaws the cgroup
		// to seize them), and CRIU freezes it again when it lets go.
		// Thawed only once runc's checkpoint is over.
		if err := waitCheckpointGone(m.cfg.Runc, rec.Container, max(traced, 10*time.Second)); err != nil {
			return err
		}
		if err := m.untraced(rec.PID, rec.StartTime, traced); err != nil {
			return err
		}
		if err := m.cfg.Runc.ResumeIfPaused(context.Background(), rec.Container); err != nil {
			log.Error("cannot resume the container", zap.String("container", rec.Container), zap.Error(err))
		}
	}
	return m.resumeSource(rec.PID, rec.StartTime, stopped, traced)
}

// killRec removes the tree rec holds (killTree); a container through
// runc, which then forgets it, and on a destination with the bundle
// made for it.
func (m *Manager) killRec(log *zap.Logger, rec *store.Record) {
	if rec.Container == "" || m.cfg.Runc == nil {
		killTree(log, rec.PID, rec.StartTime)
		return
	}
	if info, err := proc.Stat(rec.PID); err == nil && info.StartTime == rec.StartTime {
		removeLinks(log, rec.PID)
	}
	if err := m.cfg.Runc.Delete(context.Background(), rec.Container, true); err != nil && !errors.Is(err, runc.ErrNotExist) {
		log.Error("cannot delete the container", zap.String("container", rec.Container), zap.Error(err))
	}
	if rec.Role == store.RoleDest && m.cfg.ContainersDir != "" && runc.ValidID(rec.Container) {
		os.RemoveAll(filepath.Join(m.cfg.ContainersDir, rec.Container))
	}
}

// waitCheckpointGone waits, up to limit, until no `runc checkpoint` of
// container id under r's root runs on this host.
func waitCheckpointGone(r *runc.Runc, id string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		busy := false
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			if e.Name()[0] < '0' || e.Name()[0] > '9' {
				continue
			}
			b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
			if err != nil {
				continue
			}
			args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
			if len(args) > 2 && filepath.Base(args[0]) == "runc" && slices.Contains(args, "checkpoint") &&
				args[len(args)-1] == id && (r.Root == "" || slices.Contains(args, r.Root)) {
				busy = true
				break
			}
		}
		if !busy {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("runc's checkpoint of container %s still runs after %v; left as it is", id, limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
