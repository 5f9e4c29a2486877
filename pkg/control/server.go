//go:build linux

// Package control serves phauld's control API: HTTP/JSON under /v1/ on a
// Unix socket. Each request carries the caller's uid, gid and pid from
// SO_PEERCRED. Long operations stream their progress as one JSON object
// per line. docs/protocol.md lists the endpoints.
package control

import (
	"unsafe"

	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/api"
)

// Service is what the control API exposes of the daemon.
type Service interface {
	Status(ctx context.Context) api.Status
	Sessions(ctx context.Context) []api.Session
	Migrate(ctx context.Context, caller api.Caller, req api.MigrateRequest, progress func(api.Event)) (api.Result, error)
	Cancel(ctx context.Context, caller api.Caller, id string) (api.Session, error)
	// Resolve settles a migration in doubt as an operator decides
	// (api.ResolveRequest).
	Resolve(ctx context.Context, caller api.Caller, id, action string) (api.Session, error)
	// History returns the newest limit finished migrations (all kept if
	// limit <= 0), newest first.
	History(ctx context.Context, limit int) ([]api.HistoryEntry, error)
	// Run starts a program so that it can migrate (phaulctl run); Names
	// lists the processes known by a name.
	Run(ctx context.Context, caller api.Caller, req api.RunRequest) (api.RunResult, error)
	Names(ctx context.Context) []api.Named
}

// Server is the control API server.
type Server struct {
	svc    Service
	policy Policy
	log    *zap.Logger
	http   *http.Server
}

type callerKey struct{}

// New returns a server for svc, letting callers do what policy allows.
func New(svc Service, policy Policy, log *zap.Logger) *Server {
	s := &Server{svc: svc, policy: policy, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", s.status)
	mux.HandleFunc("POST /v1/migrate", s.migrate)
	mux.HandleFunc("GET /v1/sessions", s.sessions)
	mux.HandleFunc("POST /v1/sessions/{id}/cancel", s.cancel)
	mux.HandleFunc("POST /v1/sessions/{id}/resolve", s.resolve)
	mux.HandleFunc("GET /v1/history", s.history)
	mux.HandleFunc("POST /v1/run", s.run)
	mux.HandleFunc("GET /v1/names", s.names)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, api.Errorf(api.CodeNotFound, "no endpoint %s %s", r.Method, r.URL.Path))
	})
	s.http = &http.Server{
		Handler:           canonical(mux),
		ReadHeaderTimeout: 10 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, callerKey{}, peerCred(c))
		},
		ErrorLog: zap.NewStdLog(log),
	}
	return s
}

// canonical answers a request for a path that is not in its clean form
// (an empty session id: /v1/sessions//cancel) with a JSON 404, where the
// mux would redirect to the clean one, with no JSON, to another endpoint.
func canonical(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p := r.URL.Path; p == "" || path.Clean(p) != p {
			writeError(w, http.StatusNotFound, api.Errorf(api.CodeNotFound, "no endpoint %s %q", r.Method, p))
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// peerCred reads the caller's credentials from the socket. A caller whose
// credentials cannot be read is treated as uid -1: nobody.
func peerCred(c net.Conn) api.Caller {
	caller := api.Caller{UID: -1, GID: -1}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return caller
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return caller
	}
	raw.Control(func(fd uintptr) {
		cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if err == nil {
			caller = api.Caller{UID: int(cred.Uid), GID: int(cred.Gid), PID: int(cred.Pid), Groups: peerGroups(int(fd))}
		}
	})
	return caller
}

// peerGroups are the supplementary groups the peer of the Unix socket fd
// had when it connected (SO_PEERGROUPS), or none if they cannot be read:
// unlike the caller's /proc, they cannot belong to a process that reused
// its pid.
func peerGroups(fd int) []int {
	buf := make([]uint32, 64)
	for {
		n := uint32(len(buf) * 4)
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		switch {
		case errno == unix.ERANGE && int(n/4) > len(buf) && n/4 <= 1<<16:
			buf = make([]uint32, n/4)
			continue
		case errno != 0:
			return nil
		}
		out := make([]int, n/4)
		for i := range out {
			out[i] = int(buf[i])
		}
		return out
	}
}

// CallerFrom returns the caller of a request.
func CallerFrom(ctx context.Context) api.Caller {
	if c, ok := ctx.Value(callerKey{}).(api.Caller); ok {
		return c
	}
	return api.Caller{UID: -1, GID: -1}
}

// Serve serves the API on l until Shutdown.
func (s *Server) Serve(l net.Listener) error {
	err := s.http.Serve(l)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Shutdown stops accepting requests and waits for those in progress until
// ctx ends.
func (s *Server) Shutdown(ctx context.Context) error { return s.http.Shutdown(ctx) }

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	if err := s.policy.CanUse(CallerFrom(r.Context())); err != nil {
		s.refuse(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.svc.Status(r.Context()))
}

// refuse answers a request the policy does not allow, and logs it.
func (s *Server) refuse(w http.ResponseWriter, r *http.Request, err error) {
	c := CallerFrom(r.Context())
	s.log.Warn("control request refused", zap.String("path", r.URL.Path), zap.Int("uid", c.UID), zap.Int("pid", c.PID), zap.Error(err))
	writeError(w, httpStatus(err), err)
}

// run starts a program for a member or root; it runs as the caller.
func (s *Server) run(w http.ResponseWriter, r *http.Request) {
	caller := CallerFrom(r.Context())
	if err := s.policy.CanUse(caller); err != nil {
		s.refuse(w, r, err)
		return
	}
	var req api.RunRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	res, err := s.svc.Run(r.Context(), caller, req)
	if err != nil {
		writeError(w, httpStatus(err), err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (s *Server) names(w http.ResponseWriter, r *http.Request) {
	if err := s.policy.CanUse(CallerFrom(r.Context())); err != nil {
		s.refuse(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.svc.Names(r.Context()))
}

func (s *Server) sessions(w http.ResponseWriter, r *http.Request) {
	if err := s.policy.CanUse(CallerFrom(r.Context())); err != nil {
		s.refuse(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.svc.Sessions(r.Context()))
}

func (s *Server) history(w http.ResponseWriter, r *http.Request) {
	if err := s.policy.CanUse(CallerFrom(r.Context())); err != nil {
		s.refuse(w, r, err)
		return
	}
	limit := 0
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			writeError(w, http.StatusBadRequest, api.Errorf(api.CodeInvalid, "limit %q: want a number >= 0", v))
			return
		}
		limit = n
	}
	list, err := s.svc.History(r.Context(), limit)
	if err != nil {
		writeError(w, httpStatus(err), err)
		return
	}
	if list == nil {
		list = []api.HistoryEntry{}
	}
	writeJSON(w, http.StatusOK, list)
}

func (s *Server) cancel(w http.ResponseWriter, r *http.Request) {
	caller := CallerFrom(r.Context())
	id := r.PathValue("id")
	if err := s.canCancel(r.Context(), caller, id); err != nil {
		s.refuse(w, r, err)
		return
	}
	sess, err := s.svc.Cancel(r.Context(), caller, id)
	if err != nil {
		writeError(w, httpStatus(err), err)
		return
	}
	writeJSON(w, http.StatusOK, sess)
}

// resolve is root's only: it decides the fate of a process the daemons
// could not settle, without them.
func (s *Server) resolve(w http.ResponseWriter, r *http.Request) {
	caller := CallerFrom(r.Context())
	if caller.UID != 0 {
		s.refuse(w, r, api.Errorf(api.CodePermission, "only root may settle a migration in doubt"))
		return
	}
	var req api.ResolveRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	sess, err := s.svc.Resolve(r.Context(), caller, r.PathValue("id"), req.Action)
	if err != nil {
		writeError(w, httpStatus(err), err)
		return
	}
	writeJSON(w, http.StatusOK, sess)
}

// canCancel lets root cancel anything, and a member of the control group
// cancel the outgoing migrations it asked for: by who asked, not by who
// owns the tree now, so that a migration stays its asker's to cancel
// whatever its tree became (frozen, or running a setuid program), and
// never becomes another member's.
func (s *Server) canCancel(ctx context.Context, c api.Caller, id string) error {
	if err := s.policy.CanUse(c); err != nil || c.UID == 0 {
		return err
	}
	for _, sess := range s.svc.Sessions(ctx) {
		if len(id) == 0 || !strings.HasPrefix(sess.ID, id) {
			continue
		}
		if sess.Direction != api.DirectionOut {
			return api.Errorf(api.CodePermission, "only root may cancel an incoming migration")
		}
		switch {
		case sess.CallerUID == nil:
			return api.Errorf(api.CodePermission, "session %s does not say who asked for it (a migration in doubt): only root may act on it", sess.ID)
		case *sess.CallerUID != c.UID:
			return api.Errorf(api.CodePermission, "uid %d may cancel only the migrations it asked for, and %s was asked for by uid %d", c.UID, sess.ID, *sess.CallerUID)
		}
	}
	return nil
}

// httpStatus maps an error's code to an HTTP status.
func httpStatus(err error) int {
	switch api.CodeOf(err) {
	case api.CodeInvalid:
		return http.StatusBadRequest
	case api.CodeNotFound:
		return http.StatusNotFound
	case api.CodePermission:
		return http.StatusForbidden
	case api.CodeConflict, api.CodePrecondition:
		return http.StatusConflict
	case api.CodeUnavailable:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

func (s *Server) migrate(w http.ResponseWriter, r *http.Request) {
	var req api.MigrateRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	if req.Mode != "" && !slices.Contains(api.Modes, req.Mode) {
		writeError(w, http.StatusBadRequest, api.Errorf(api.CodeInvalid, "mode %q: want one of %s", req.Mode, strings.Join(api.Modes, ", ")))
		return
	}
	caller := CallerFrom(r.Context())
	if err := s.policy.CanMigrate(caller, req.PID); err != nil {
		s.refuse(w, r, err)
		return
	}
	st := newStream(w)
	res, err := s.svc.Migrate(r.Context(), caller, req, st.send)
	if err != nil {
		st.send(api.Event{Event: api.EventError, Error: api.AsError(err)})
		return
	}
	st.send(api.Event{Event: api.EventResult, ID: res.ID, Result: &res})
}

// stream writes events as JSON lines, flushing each.
type stream struct {
	mu  sync.Mutex
	w   http.ResponseWriter
	enc *json.Encoder
}

func newStream(w http.ResponseWriter) *stream {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	return &stream{w: w, enc: json.NewEncoder(w)}
}

func (s *stream) send(ev api.Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	// A client that went away does not stop the migration.
	if s.enc.Encode(ev) == nil {
		if f, ok := s.w.(http.Flusher); ok {
			f.Flush()
		}
	}
}

// maxBody bounds a request body.
const maxBody = 1 << 20

func decodeBody(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return api.Errorf(api.CodeInvalid, "bad request body: %v", err)
	}
	return nil
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, struct {
		Error *api.Error `json:"error"`
	}{api.AsError(err)})
}
