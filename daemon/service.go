//go:build linux

package main

import (
	"context"
	"os"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/pkg/session"
	"github.com/phaul/phaul/pkg/version"
)

// service is the daemon as the control API sees it.
type service struct {
	sec      pki.Security
	mgr      *session.Manager
	info     criu.Info
	criuPath string
	stateDir string
	control  string
	listen   []string
	modes    map[string]string
	ctrs     api.Containers
}

func (s *service) Status(context.Context) api.Status {
	st := api.Status{
		Version:  version.Version,
		PID:      os.Getpid(),
		Listen:   s.listen,
		Control:  s.control,
		StateDir: s.stateDir,
		CRIU: api.CRIU{
			Path:    s.criuPath,
			Version: s.info.Version.String(),
			Features: map[string]bool{
				"mem_track":   s.info.Features.MemTrack,
				"lazy_pages":  s.info.Features.LazyPages,
				"pidfd_store": s.info.Features.PidfdStore,
				"cpuinfo":     s.info.CPUInfo != nil,
			},
		},
		Security: s.sec.Mode,
		Modes:    s.modes,
		Sessions: s.mgr.Sessions(),
	}
	ctrs := s.ctrs
	st.Containers = &ctrs
	if s.sec.ID != nil {
		st.TLSNames = s.sec.ID.Names()
		exp := s.sec.ID.Leaf.NotAfter
		st.TLSExpires = &exp
	}
	if s.sec.Disabled != nil {
		st.Disabled = s.sec.Disabled.Error()
	}
	return st
}

func (s *service) Sessions(context.Context) []api.Session { return s.mgr.Sessions() }

func (s *service) History(_ context.Context, limit int) ([]api.HistoryEntry, error) {
	return s.mgr.History(limit)
}

func (s *service) Migrate(ctx context.Context, caller api.Caller, req api.MigrateRequest, progress func(api.Event)) (api.Result, error) {
	return s.mgr.Migrate(ctx, caller, req, progress)
}

func (s *service) Run(ctx context.Context, caller api.Caller, req api.RunRequest) (api.RunResult, error) {
	return s.mgr.Run(ctx, caller, req)
}

func (s *service) Names(ctx context.Context) []api.Named { return s.mgr.Names(ctx) }

func (s *service) Cancel(_ context.Context, _ api.Caller, id string) (api.Session, error) {
	return s.mgr.Cancel(id)
}

func (s *service) Resolve(ctx context.Context, _ api.Caller, id, action string) (api.Session, error) {
	return s.mgr.Resolve(ctx, id, action)
}
