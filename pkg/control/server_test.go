//go:build linux

package control

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/client"
	"github.com/phaul/phaul/pkg/proc"
)

type fakeService struct {
	caller api.Caller
	req    api.MigrateRequest
	err    error
	// sessions, if set, is what Sessions lists.
	sessions []api.Session
	canceled string
}

func (f *fakeService) Run(_ context.Context, caller api.Caller, req api.RunRequest) (api.RunResult, error) {
	return api.RunResult{PID: 1, Name: req.Name}, nil
}

func (f *fakeService) Names(context.Context) []api.Named { return nil }

func (f *fakeService) Status(context.Context) api.Status {
	return api.Status{Version: "test", Sessions: []api.Session{{ID: "s1", Direction: "out", PID: 42}}}
}

func (f *fakeService) Sessions(context.Context) []api.Session {
	if f.sessions != nil {
		return f.sessions
	}
	return []api.Session{{ID: "abcd1234", Direction: "in", PID: 7}}
}

func (f *fakeService) Cancel(_ context.Context, _ api.Caller, id string) (api.Session, error) {
	f.canceled = id
	if f.sessions != nil {
		return api.Session{ID: id}, nil
	}
	if id != "abcd" {
		return api.Session{}, api.Errorf(api.CodeConflict, "too late to cancel")
	}
	return api.Session{ID: "abcd1234"}, nil
}

func (f *fakeService) Resolve(_ context.Context, caller api.Caller, id, action string) (api.Session, error) {
	f.caller = caller
	return api.Session{ID: id, Phase: action}, nil
}

func (f *fakeService) History(_ context.Context, limit int) ([]api.HistoryEntry, error) {
	all := []api.HistoryEntry{{ID: "s2", Outcome: api.OutcomeCommitted}, {ID: "s1", Outcome: api.OutcomeRolledBack}}
	if limit > 0 && limit < len(all) {
		all = all[:limit]
	}
	return all, nil
}

func (f *fakeService) Migrate(_ context.Context, caller api.Caller, req api.MigrateRequest, progress func(api.Event)) (api.Result, error) {
	f.caller, f.req = caller, req
	progress(api.Event{Event: api.EventProgress, Phase: "dump", Bytes: 10})
	progress(api.Event{Event: api.EventProgress, Phase: "restore", Bytes: 20})
	if f.err != nil {
		return api.Result{}, f.err
	}
	return api.Result{ID: "s1", SourcePID: req.PID, DestPID: 77, Dest: req.To}, nil
}

func serve(t *testing.T, svc Service) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ctl.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := New(svc, Policy{GroupID: os.Getgid(), Group: "test"}, zaptest.NewLogger(t))
	go s.Serve(l)
	t.Cleanup(func() { s.Shutdown(context.Background()) })
	return path
}

func TestStatusAndMigrate(t *testing.T) {
	svc := &fakeService{}
	c := client.New(serve(t, svc))
	ctx := context.Background()

	st, err := c.Status(ctx)
	if err != nil || st.Version != "test" || len(st.Sessions) != 1 {
		t.Fatalf("Status = %+v, %v", st, err)
	}

	var phases []string
	res, err := c.Migrate(ctx, api.MigrateRequest{PID: 42, To: "hostB"}, func(ev api.Event) { phases = append(phases, ev.Phase) })
	if err != nil {
		t.Fatal(err)
	}
	if res.DestPID != 77 || res.SourcePID != 42 || res.Dest != "hostB" {
		t.Fatalf("result = %+v", res)
	}
	if strings.Join(phases, ",") != "dump,restore" {
		t.Fatalf("progress phases = %v", phases)
	}
	if svc.caller.UID != os.Getuid() || svc.caller.PID != os.Getpid() {
		t.Fatalf("caller = %+v, want this process (uid %d, pid %d)", svc.caller, os.Getuid(), os.Getpid())
	}
}

func TestMigrateErrorKeepsCode(t *testing.T) {
	svc := &fakeService{err: api.Errorf(api.CodeNotFound, "no process with pid 42 on this host")}
	c := client.New(serve(t, svc))
	_, err := c.Migrate(context.Background(), api.MigrateRequest{PID: 42, To: "hostB"}, nil)
	var e *api.Error
	if !errors.As(err, &e) || e.Code != api.CodeNotFound || !strings.Contains(e.Message, "no process") {
		t.Fatalf("Migrate error = %#v", err)
	}
}

func TestBadRequests(t *testing.T) {
	path := serve(t, &fakeService{})
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return net.Dial("unix", path)
	}}}
	for _, body := range []string{"{", `{"pid": "x"}`, `{"pid": 1, "to": "b", "evil": true}`, `{"pid": 1, "to": "b", "mode": "turbo"}`} {
		resp, err := hc.Post("http://phauld/v1/migrate", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("body %q: status %d, want 400", body, resp.StatusCode)
		}
	}
	resp, err := hc.Get("http://phauld/v1/nothing")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("unknown endpoint: status %d, want 404", resp.StatusCode)
	}
}

func TestUnreachable(t *testing.T) {
	c := client.New(filepath.Join(t.TempDir(), "missing.sock"))
	_, err := c.Status(context.Background())
	var un *client.UnreachableError
	if !errors.As(err, &un) {
		t.Fatalf("Status on a missing socket = %v, want UnreachableError", err)
	}
}

func TestListAndCancel(t *testing.T) {
	c := client.New(serve(t, &fakeService{}))
	ctx := context.Background()
	list, err := c.Sessions(ctx)
	if err != nil || len(list) != 1 || list[0].ID != "abcd1234" {
		t.Fatalf("Sessions = %+v, %v", list, err)
	}
	hist, err := c.History(ctx, 1)
	if err != nil || len(hist) != 1 || hist[0].ID != "s2" {
		t.Fatalf("History(1) = %+v, %v", hist, err)
	}
	if hist, err := c.History(ctx, 0); err != nil || len(hist) != 2 {
		t.Fatalf("History(0) = %+v, %v", hist, err)
	}
	s, err := c.Cancel(ctx, "abcd")
	if err != nil || s.ID != "abcd1234" {
		t.Fatalf("Cancel = %+v, %v", s, err)
	}
	_, err = c.Cancel(ctx, "ffff")
	var e *api.Error
	if !errors.As(err, &e) || e.Code != api.CodeConflict || !strings.Contains(e.Message, "too late") {
		t.Fatalf("refused Cancel = %#v", err)
	}
}

func TestPolicy(t *testing.T) {
	self := api.Caller{UID: os.Getuid(), GID: os.Getgid(), PID: os.Getpid()}
	p := Policy{GroupID: 4242, Group: "phaul"}
	if self.UID != 0 {
		if err := p.CanUse(self); api.CodeOf(err) != api.CodePermission || !strings.Contains(err.Error(), "usermod -aG phaul") {
			t.Errorf("outsider CanUse = %v", err)
		}
	}
	if err := p.CanUse(api.Caller{UID: 0, GID: 0, PID: os.Getpid()}); err != nil {
		t.Errorf("root refused: %v", err)
	}
	member := api.Caller{UID: 12345, GID: 4242, PID: os.Getpid()}
	if err := p.CanUse(member); err != nil {
		t.Errorf("member by primary group refused: %v", err)
	}
	// A member may not migrate a process of another uid (this one's).
	if os.Getuid() != member.UID {
		err := p.CanMigrate(member, os.Getpid())
		if api.CodeOf(err) != api.CodePermission || !strings.Contains(err.Error(), "only its own processes") {
			t.Errorf("member migrating another uid's process: %v", err)
		}
	}
	// Its own: this process, seen as its owner.
	owner := api.Caller{UID: os.Getuid(), GID: 4242, PID: os.Getpid()}
	if err := p.CanMigrate(owner, os.Getpid()); err != nil {
		t.Errorf("member migrating its own process: %v", err)
	}
	// Supplementary groups count: this process's own groups.
	groups, err := proc.Groups(os.Getpid())
	if err != nil || len(groups) == 0 {
		t.Fatalf("proc.Groups(self) = %v, %v", groups, err)
	}
	sup := Policy{GroupID: groups[len(groups)-1], Group: "x"}
	if err := sup.CanUse(api.Caller{UID: 12345, GID: -2, PID: os.Getpid()}); err != nil {
		t.Errorf("member by a group of its process refused: %v", err)
	}
}

// TestResolveIsRootOnly: settling a migration in doubt decides a
// process's fate without the daemons; only root may, and root's order
// reaches the service as given.
func TestResolveIsRootOnly(t *testing.T) {
	svc := &fakeService{}
	s := New(svc, Policy{GroupID: os.Getgid(), Group: "test"}, zaptest.NewLogger(t))
	for _, c := range []struct {
		caller api.Caller
		status int
	}{
		{api.Caller{UID: 1000, GID: os.Getgid(), PID: os.Getpid()}, http.StatusForbidden},
		{api.Caller{UID: 0, GID: 0, PID: os.Getpid()}, http.StatusOK},
	} {
		svc.caller = api.Caller{UID: -1}
		r := httptest.NewRequest(http.MethodPost, "/v1/sessions/3f25b14c/resolve", strings.NewReader(`{"action":"kill"}`))
		r = r.WithContext(context.WithValue(r.Context(), callerKey{}, c.caller))
		r.SetPathValue("id", "3f25b14c")
		w := httptest.NewRecorder()
		s.resolve(w, r)
		if w.Code != c.status {
			t.Errorf("uid %d: status %d (%s), want %d", c.caller.UID, w.Code, w.Body, c.status)
		}
		asked := svc.caller.UID != -1
		if asked != (c.status == http.StatusOK) {
			t.Errorf("uid %d: the service was asked: %v", c.caller.UID, asked)
		}
	}
}

// The caller's supplementary groups come from the socket
// (SO_PEERGROUPS): here, this process's own.
func TestPeerGroups(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	want, err := unix.Getgroups()
	if err != nil {
		t.Fatal(err)
	}
	got := peerGroups(fds[0])
	if fmt.Sprint(got) != fmt.Sprint(want) && !(len(got) == 0 && len(want) == 0) {
		t.Errorf("peer groups %v, want this process's %v", got, want)
	}
}
