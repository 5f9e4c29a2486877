//go:build linux

package session

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/migrate"
	"github.com/phaul/phaul/pkg/runc"
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
