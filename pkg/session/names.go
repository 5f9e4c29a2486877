//go:build linux

package session

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/launch"
	"github.com/phaul/phaul/pkg/proc"
)

// namesFile keeps the names of programs `phaulctl run` started (and of
// those that arrived with a name), across restarts of phauld.
const namesFile = "names.json"

// named is the process a name stands for: its pid and start time, so that
// a name never passes to a process that reused the pid.
type named struct {
	PID   int    `json:"pid"`
	Start uint64 `json:"start"`
}

// alive reports whether the process the name stands for still runs.
func (n named) alive() bool {
	info, err := proc.Stat(n.PID)
	return err == nil && info.StartTime == n.Start && info.State != 'Z'
}

// loadNames reads the names file; names of processes gone are dropped.
func (m *Manager) loadNames() {
	m.names = map[string]named{}
	b, err := os.ReadFile(filepath.Join(m.cfg.StateDir, namesFile))
	if err != nil {
		return
	}
	var all map[string]named
	if err := json.Unmarshal(b, &all); err != nil {
		m.log.Warn("names of launched processes unreadable: forgotten", zap.Error(err))
		return
	}
	for name, n := range all {
		if n.alive() {
			m.names[name] = n
		}
	}
}

// saveNames writes the names file; m.mu is held.
func (m *Manager) saveNames() {
	b, _ := json.Marshal(m.names)
	path := filepath.Join(m.cfg.StateDir, namesFile)
	tmp := path + ".tmp"
	err := os.WriteFile(tmp, b, 0o600)
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		m.log.Warn("cannot save the names of launched processes: a restart forgets them", zap.Error(err))
	}
}

// lookupName is the pid a name stands for.
func (m *Manager) lookupName(name string) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.names[name]
	if !ok || !n.alive() {
		return 0, api.Errorf(api.CodeNotFound, "no process named %q runs on this host (phaulctl run --name gives one a name; phaulctl names lists them)", name)
	}
	return n.PID, nil
}

// nameFree refuses a name a live process has here.
func (m *Manager) nameFree(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if n, ok := m.names[name]; ok && n.alive() {
		return api.Errorf(api.CodeConflict, "the name %q is taken here: pid %d has it", name, n.PID)
	}
	return nil
}

// setName gives pid the name (empty pid: the name goes).
func (m *Manager) setName(name string, pid int) {
	if name == "" {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if pid == 0 {
		delete(m.names, name)
	} else if info, err := proc.Stat(pid); err == nil {
		m.names[name] = named{PID: pid, Start: info.StartTime}
	}
	m.saveNames()
}

// Names lists the names of live processes here, by name.
func (m *Manager) Names(ctx context.Context) []api.Named {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []api.Named
	for name, n := range m.names {
		if n.alive() {
			out = append(out, api.Named{Name: name, PID: n.PID})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// placeTimeout bounds placing a launched program in its scope.
const placeTimeout = 2 * time.Second

// Run starts a program so that it can migrate (phaulctl run): see
// pkg/launch. It runs with the caller's credentials; a network of its
// own is root's only (its address goes on a bridge of this host).
func (m *Manager) Run(ctx context.Context, caller api.Caller, req api.RunRequest) (api.RunResult, error) {
	if m.cfg.HookExe == "" {
		return api.RunResult{}, api.Errorf(api.CodeUnavailable, "phauld cannot find its own binary, which runs the program's first steps")
	}
	if req.Name != "" {
		if err := launch.CheckName(req.Name); err != nil {
			return api.RunResult{}, err
		}
		if err := m.nameFree(req.Name); err != nil {
			return api.RunResult{}, err
		}
	}
	if req.Log != "" && req.Journal {
		return api.RunResult{}, api.Errorf(api.CodeInvalid, "--log and --journal: choose one")
	}
	spec := launch.Spec{Argv: req.Argv, Env: req.Env, Dir: req.Dir, Name: req.Name, Log: req.Log, Journal: req.Journal}
	if req.Net != "" {
		if caller.UID != 0 {
			return api.RunResult{}, api.Errorf(api.CodePermission, "--net is root's only: it puts an address on a bridge of this host")
		}
		n, err := launch.ParseNet(req.Net)
		if err != nil {
			return api.RunResult{}, err
		}
		spec.Net = n
	}
	if caller.UID != 0 {
		groups, _ := procGroupsOf(caller.PID)
		spec.Cred = &syscall.Credential{Uid: uint32(caller.UID), Gid: uint32(caller.GID), Groups: groups}
	}
	p, err := launch.Start(m.cfg.HookExe, spec)
	if err != nil {
		return api.RunResult{}, err
	}
	res := api.RunResult{PID: p.PID, Name: req.Name}
	if m.cfg.PlaceRun != nil {
		pctx, cancel := context.WithTimeout(ctx, placeTimeout)
		scope, err := m.cfg.PlaceRun(pctx, req.Name, p.PID)
		cancel()
		if err != nil {
			p.Kill()
			return api.RunResult{}, api.Errorf(api.CodeAborted, "place it in a scope of its own: %v", err)
		}
		res.Scope = scope
	}
	if err := p.Release(); err != nil {
		return api.RunResult{}, err
	}
	m.setName(req.Name, p.PID)
	m.log.Info("program started for migration", zap.Int("pid", p.PID), zap.String("name", req.Name), zap.Strings("argv", req.Argv),
		zap.Int("caller_uid", caller.UID), zap.String("net", req.Net), zap.String("scope", res.Scope))
	return res, nil
}

// procGroupsOf are the supplementary groups of process pid.
func procGroupsOf(pid int) ([]uint32, error) {
	ids, err := proc.Groups(pid)
	if err != nil {
		return nil, err
	}
	out := make([]uint32, len(ids))
	for i, g := range ids {
		out[i] = uint32(g)
	}
	return out, nil
}
