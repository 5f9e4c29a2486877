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
		if full, ok := runc.PodmanContainer(ctx, id); ok {
			return nil, 0, podmanRefusal(id, full)
		}
		return nil, 0, api.Errorf(api.CodeNotFound, "runc knows no container %s in %s (runc --root %s list)", id, rootName(r), rootName(r))
	}
	if err != nil {
		return nil, 0, api.Errorf(api.CodePrecondition, "%v", err)
	}
	if manager := st.Annotations[runc.ManagerAnnotation]; manager == "libpod" {
		return nil, 0, podmanRefusal(id, id)
	} else if manager != "" {
		return nil, 0, api.Errorf(api.CodePrecondition, "container %s is managed by %s (annotation %s): moving it with runc behind its manager's back would leave %s on both hosts wrong about it; phaul moves containers that runc runs for you", id, manager, runc.ManagerAnnotation, manager)
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

// podmanRefusal is why a podman container does not move (docs/operations.md,
// "Podman", says it at length).
func podmanRefusal(name, id string) error {
	return api.Errorf(api.CodePrecondition, "container %s is podman's (id %s), and phaul does not move podman's containers: podman "+
		"cannot keep a container frozen here until the destination has restored it and committed (it checkpoints only a running "+
		"container, not a paused one, and has no page server or lazy mode), so a failure could leave it running nowhere or twice. "+
		"Use podman's own 'container checkpoint --export' and 'container restore --import' (the container is stopped here first), "+
		"or run the service with runc to move it with phaul; see docs/operations.md, \"Podman\"", name, id)
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
		Marker: filepath.Join(filepath.Dir(rootfs), migrate.MarkerPrefix+sid.String())}
	if err := os.WriteFile(w.Marker, []byte(w.Token), 0o600); err != nil {
		// Read-only storage, say: the destination then shares it only
		// if its --shared-path says so, and syncs it otherwise.
		m.cfg.Log.Warn("cannot write the shared-storage marker next to the container's rootfs; the destination will not see for itself that it shares the storage",
			zap.String("container", c.ID), zap.Error(err))
		w.Marker, w.Token = "", ""
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
