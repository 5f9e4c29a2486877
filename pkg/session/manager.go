//go:build linux

package session

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/dumplock"
	"github.com/phaul/phaul/pkg/migrate"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/runc"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/version"
	"github.com/phaul/phaul/pkg/wire"
)

// Config configures a Manager.
type Config struct {
	Log  *zap.Logger
	CRIU migrate.CRIU
	// Info is what criu.Probe found at start-up.
	Info criu.Info
	// AsSource and AsDest are the migration modes this host can run as
	// either side (see HostCapabilities). Nil: copy only.
	AsSource, AsDest migrate.Capabilities
	// BridgeMap renames bridges for arriving veths (phauld --bridge-map).
	BridgeMap map[string]string
	// StateDir holds a directory per session (images, CRIU logs).
	StateDir string
	// HandshakeTimeout bounds reading a connection's Hello and writing
	// its reply.
	HandshakeTimeout time.Duration
	// PairTimeout is how long one connection of a pair waits for the
	// other before it is dropped.
	PairTimeout time.Duration
	// DialTimeout bounds connecting to a destination.
	DialTimeout time.Duration
	// KeepImages keeps a successful session's directory; failed ones are
	// always kept for inspection (until CleanOld).
	KeepImages bool
	// PeerTimeout is how long a session waits without hearing anything
	// from its peer before it treats the peer as lost.
	PeerTimeout time.Duration
	// PhaseTimeout is each phase's progress deadline (0: none; see
	// migrate.SourceConfig).
	PhaseTimeout time.Duration
	// PrecopyCap bounds what an arriving pre-copy migration sends ahead
	// (0: only Limits do).
	PrecopyCap int64
	// FetchAhead bounds what an arriving lazy migration fetches ahead of
	// CRIU's lazy-pages (0: nothing).
	FetchAhead int64
	// MaxIncoming and MaxOutgoing bound the migrations in flight at once
	// in each direction (0: no limit); Limits are the page servers' and
	// the disk's, shared by the destination sessions (nil: none).
	MaxIncoming, MaxOutgoing int
	Limits                   *migrate.Limits
	// RemoveFailedAtOnce: remove a failed session's directory as soon
	// as it ends (phauld --keep-failed 0).
	RemoveFailedAtOnce bool
	// InDoubtWait is how long Migrate waits for the outcome of a session
	// that lost its destination after asking the commit, before it
	// returns in_doubt and leaves the resolver working.
	InDoubtWait time.Duration
	// AfterSession, if set, runs after every session has ended (the
	// daemon sweeps leftovers of CRIU runs with it, and --one-shot stops).
	AfterSession func()
	// ServerTLS and ClientTLS make migrations run over mutual TLS: the
	// destination's configuration, and the source's for a destination
	// reached as serverName. Both nil means plain TCP, allowed only with
	// Insecure.
	ServerTLS *tls.Config
	ClientTLS func(serverName string) *tls.Config
	// Insecure allows plain TCP. It is logged on every session.
	Insecure bool
	// Disabled, if set, refuses every migration with this error (phauld
	// without certificates and without --insecure).
	Disabled error
	// Authorize, if set, decides whether caller may migrate the tree
	// rooted at root (its pids). It is asked with the identity the
	// migration records (pid and start time), after the tree's pids are
	// reserved, so a pid reused since an earlier check cannot slip by.
	Authorize func(caller api.Caller, root proc.Info, pids []int) error
	// AuthorizeFrozen, if set, decides again, on the frozen tree rooted
	// at root and before anything of it leaves, whether caller may
	// migrate it (see migrate.SourceConfig.CheckFrozen). It is not asked
	// for root.
	AuthorizeFrozen func(caller api.Caller, root proc.Info) error
	// DumpLockDir holds the lock files that keep dumps of processes in
	// one working directory apart (default dumplock.DefaultDir).
	DumpLockDir string
	// Place, if set, moves a restored tree (its pids) out of the daemon's
	// cgroup before it resumes: under systemd, into a scope of its own.
	// It must return by ctx's deadline.
	Place func(ctx context.Context, id string, pids []int) error
	// Guard, if set, starts a restored copy's dead man's switch (see
	// migrate.Guard); without one, a copy that phauld's death leaves
	// behind lives until phauld starts again and discards it.
	Guard func(dir string, pid int, start uint64) (migrate.Guard, error)
	// Runc, if set, runs containers here: migrate --container finds them
	// in its state root, and arriving ones are restored with it, their
	// bundles in ContainersDir. HookExe is phauld's binary (CRIU runs it
	// as a container restore's action script).
	Runc          *runc.Runc
	ContainersDir string
	HookExe       string
	// SharedPaths: an arriving container's rootfs under one of them is
	// on shared storage (phauld --shared-path).
	SharedPaths []string
	// PlaceRun, if set, puts a program phaulctl run started (pid, named
	// name or not) in a scope of its own and returns the scope's name.
	PlaceRun func(ctx context.Context, name string, pid int) (string, error)
	// Admission bounds the connections that are not a session yet (zero
	// values: the defaults), and says who may connect.
	Admission Admission
}

func (c *Config) setDefaults() {
	if c.Log == nil {
		c.Log = zap.NewNop()
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = 10 * time.Second
	}
	if c.PairTimeout == 0 {
		c.PairTimeout = 30 * time.Second
	}
	c.Admission.setDefaults()
	if c.DialTimeout == 0 {
		c.DialTimeout = 10 * time.Second
	}
	if c.PeerTimeout == 0 {
		c.PeerTimeout = 15 * time.Second
	}
	if c.InDoubtWait == 0 {
		c.InDoubtWait = time.Minute
	}
	if c.AsSource == nil {
		c.AsSource = migrate.Capabilities{api.ModeCopy: ""}
	}
	if c.AsDest == nil {
		c.AsDest = migrate.Capabilities{api.ModeCopy: ""}
	}
	if c.DumpLockDir == "" {
		c.DumpLockDir = dumplock.DefaultDir
	}
}

// Manager owns every session of a daemon: it pairs incoming connections
// into destination sessions, starts source sessions, and stops them all at
// shutdown. Sessions are independent: one failing never cancels another.
type Manager struct {
	cfg Config
	log *zap.Logger

	mu        sync.Mutex
	sessions  map[wire.SessionID]*running
	resolvers map[wire.SessionID]*resolver
	// held maps each pid of a tree this daemon is migrating away (or
	// holds stopped, in doubt, or is recovering) to what holds it: a pid
	// belongs to one migration at a time (see claim).
	held      map[int]holder
	halves    map[wire.SessionID]*half
	closing   bool
	listeners []net.Listener
	// stopping is closed by Shutdown: background work (recovery) gives
	// up its waits.
	stopping chan struct{}

	gate      *dumplock.Gate
	history   *store.History
	cpuChecks *migrate.CPUChecks
	// incoming are the connections accepted that are not a pair's yet
	// (see Admission), shut down at shutdown so that nobody waits for
	// their timeout.
	incoming map[*transport.Link]*incoming
	drops    dropLog
	// names are the processes known by a name (phaulctl run --name).
	names  map[string]named
	sessWG sync.WaitGroup
	connWG sync.WaitGroup
	// nIncoming and nOutgoing count the migrations admitted in each
	// direction (limits.go).
	nIncoming, nOutgoing int
}

// half is an incoming migration of which one connection (or both, before
// their replies are written) has arrived.
type half struct {
	conns [2]*transport.Link // by role: 0 rpc, 1 mem
	ready [2]bool
	timer *time.Timer
	// addr is the address of the first connection, since when it waits.
	addr  netip.Addr
	since time.Time
}

func roleIndex(r wire.Role) int {
	if r == wire.RoleMem {
		return 1
	}
	return 0
}

// NewManager returns a manager; call Serve for each migration listener.
func NewManager(cfg Config) (*Manager, error) {
	cfg.setDefaults()
	if err := os.MkdirAll(filepath.Join(cfg.StateDir, "sessions"), 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if cfg.Disabled == nil && cfg.ServerTLS == nil && !cfg.Insecure {
		return nil, errors.New("no TLS configuration: migrations need certificates, or Insecure")
	}
	hist, err := store.OpenHistory(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	m := &Manager{
		history:   hist,
		cpuChecks: migrate.NewCPUChecks(),
		cfg:       cfg,
		log:       cfg.Log,
		sessions:  map[wire.SessionID]*running{},
		resolvers: map[wire.SessionID]*resolver{},
		held:      map[int]holder{},
		stopping:  make(chan struct{}),
		halves:    map[wire.SessionID]*half{},
		incoming:  map[*transport.Link]*incoming{},
		gate:      dumplock.New(cfg.DumpLockDir),
	}
	m.loadNames()
	return m, nil
}

// Serve accepts migration connections on l until Shutdown. It returns nil
// after Shutdown, or the listener's error.
func (m *Manager) Serve(l net.Listener) error {
	m.mu.Lock()
	if m.closing {
		m.mu.Unlock()
		l.Close()
		return nil
	}
	m.listeners = append(m.listeners, l)
	m.mu.Unlock()

	var delay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			m.mu.Lock()
			closing := m.closing
			m.mu.Unlock()
			if closing {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded) || isTemporary(err) {
				// EMFILE and friends: back off rather than spin.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				m.log.Warn("accept failed; retrying", zap.Error(err), zap.Duration("delay", delay))
				time.Sleep(delay)
				continue
			}
			return fmt.Errorf("accept migration connection: %w", err)
		}
		delay = 0
		m.connWG.Add(1)
		go func() {
			defer m.connWG.Done()
			m.handshake(c)
		}()
	}
}

func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

// handshake authenticates a connection (mutual TLS, unless insecure),
// reads its Hello, answers it, and pairs the connection with its sibling by
// session id. Pairing is never by arrival order.
func (m *Manager) handshake(c net.Conn) {
	remote := c.RemoteAddr().String()
	addr := peerAddr(c.RemoteAddr())
	log := m.log.With(zap.String("peer", remote))
	if m.cfg.Disabled != nil {
		log.Warn("migration connection refused: migrations are disabled", zap.Error(m.cfg.Disabled))
		c.Close()
		return
	}
	lk, err := transport.NewLink(c)
	if err != nil {
		log.Warn("cannot take the connection", zap.Error(err))
		return
	}
	if !m.cfg.Admission.allowed(addr) {
		m.drops.add(m.log, "connections refused: their address is not in --allow-peer", addr)
		refuse(lk, wire.RefusedPeer, "this address is not in the destination's --allow-peer")
		lk.Close()
		return
	}
	m.mu.Lock()
	in := m.enter(lk, addr)
	m.mu.Unlock()
	if in == nil {
		lk.Close()
		return
	}
	keep := false
	defer func() {
		m.mu.Lock()
		m.leave(in)
		m.mu.Unlock()
		if !keep {
			lk.Close()
		}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.HandshakeTimeout)
	defer cancel()
	// A connection that says nothing is dropped soon, and meanwhile
	// holds no handshake place.
	if err := lk.WaitFirstBytes(ctx, m.cfg.Admission.FirstByte); err != nil {
		m.drops.add(m.log, "connections dropped: nothing received in time, or closed before a byte", addr)
		return
	}
	m.mu.Lock()
	room := m.startHandshake(in)
	m.mu.Unlock()
	if !room {
		m.drops.add(m.log, "connections refused: too many handshakes in progress (the destination is saturated)", addr)
		refuse(lk, wire.RefusedBusy, "too many connections in their handshake")
		return
	}
	deadline, _ := ctx.Deadline()
	if m.cfg.ServerTLS != nil {
		// Nothing of the protocol is read before the peer has proven
		// who it is.
		if err := lk.ServerTLS(ctx, m.cfg.ServerTLS); err != nil {
			if m.displaced(in) {
				return
			}
			if plainPeer(lk.Preface()) {
				log.Warn("connection refused: the peer runs with --insecure (it spoke phaul's plain protocol), and this daemon requires mutual TLS: run both daemons with certificates, or both with --insecure")
				refuse(lk, wire.RefusedNeedsTLS, "the destination requires mutual TLS")
				return
			}
			log.Warn("connection refused", zap.Error(transport.TLSError(err)))
			return
		}
		log = log.With(zap.String("peer_cert", lk.PeerName()))
	}
	lk.SetDeadline(deadline)
	msg, err := wire.ReadMessage(lk.Stream(), wire.Handshake)
	if err != nil {
		if m.displaced(in) {
			return
		}
		if m.cfg.ServerTLS == nil && tlsPeer(lk.Preface()) {
			log.Warn("connection refused: the peer speaks TLS (it runs with certificates), and this daemon runs with --insecure: run both daemons with certificates, or both with --insecure")
			refuse(lk, wire.RefusedInsecure, "the destination runs with --insecure")
			return
		}
		log.Warn("handshake failed: connection dropped", zap.Error(err))
		return
	}
	hello, ok := msg.(*wire.Hello)
	if !ok {
		log.Warn("handshake failed: connection dropped", zap.String("message", msg.Type().String()))
		return
	}
	log = log.With(zap.Stringer("session", hello.Session), zap.String("role", string(hello.Role)))
	if hello.Role == wire.RoleQuery {
		if err := wire.WriteMessage(lk.Stream(), &wire.HelloReply{OK: true, Daemon: version.Daemon()}); err != nil {
			return
		}
		m.answerQuery(lk, hello.Session, log)
		return
	}
	role := roleIndex(hello.Role)

	h, err := m.reserve(hello, lk, addr)
	reply := &wire.HelloReply{OK: err == nil, Daemon: version.Daemon(), Probe: err == nil}
	if err != nil {
		reply.Code, reply.Error = refusalCode(err), err.Error()
	}
	werr := wire.WriteMessage(lk.Stream(), reply)
	if err != nil || werr != nil {
		if err == nil {
			err = werr
			m.unreserve(hello.Session, h, role)
		}
		log.Warn("handshake refused", zap.Error(err))
		return
	}
	lk.SetDeadline(time.Time{})

	m.mu.Lock()
	if m.halves[hello.Session] != h || m.closing {
		// Dropped while its reply was written (the pair timed out, or
		// phauld is stopping): this goroutine owns the link, and closes
		// it.
		m.mu.Unlock()
		log.Warn("connection dropped: its pair timed out, or phauld is stopping")
		return
	}
	keep = true
	h.ready[role] = true
	complete := h.ready[0] && h.ready[1]
	if complete {
		delete(m.halves, hello.Session)
		h.timer.Stop()
	}
	m.mu.Unlock()
	log.Debug("connection accepted")
	if complete {
		m.startDest(hello.Session, h)
		return
	}
	m.connWG.Add(1)
	go func() {
		defer m.connWG.Done()
		m.watchLone(hello.Session, h, role, lk)
	}()
}

// Why reserve refuses a connection.
var (
	errStopping = errors.New("destination phauld is shutting down")
	errBusy     = errors.New("too many connections waiting for their pair")
)

// refusalCode is the HelloReply code for reserve's error.
func refusalCode(err error) string {
	switch {
	case errors.Is(err, errStopping):
		return wire.RefusedStopping
	case errors.Is(err, errBusy):
		return wire.RefusedBusy
	}
	return wire.RefusedSession
}

// reserve records c, from addr, as the connection of its role for its
// session.
func (m *Manager) reserve(hello *wire.Hello, c *transport.Link, addr netip.Addr) (*half, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closing {
		return nil, errStopping
	}
	if hello.Proto < wire.Version {
		return nil, fmt.Errorf("protocol version %d is not supported (this daemon speaks %d)", hello.Proto, wire.Version)
	}
	if _, ok := m.sessions[hello.Session]; ok {
		return nil, fmt.Errorf("session %s is already running", hello.Session)
	}
	h := m.halves[hello.Session]
	if h == nil {
		if !m.makeRoomForHalf(addr) {
			return nil, errBusy
		}
		h = &half{addr: addr, since: time.Now()}
		id := hello.Session
		h.timer = time.AfterFunc(m.cfg.PairTimeout, func() { m.expire(id, h) })
		m.halves[id] = h
	}
	role := roleIndex(hello.Role)
	if h.conns[role] != nil {
		return nil, fmt.Errorf("session %s already has its %s connection", hello.Session, hello.Role)
	}
	h.conns[role] = c
	return h, nil
}

func (m *Manager) unreserve(id wire.SessionID, h *half, role int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	h.conns[role], h.ready[role] = nil, false
	if h.conns[0] == nil && h.conns[1] == nil && m.halves[id] == h {
		delete(m.halves, id)
		h.timer.Stop()
	}
}

// expire drops a connection whose sibling did not arrive in time.
func (m *Manager) expire(id wire.SessionID, h *half) {
	m.mu.Lock()
	if m.halves[id] != h {
		m.mu.Unlock()
		return
	}
	delete(m.halves, id)
	conns := h.drop()
	m.mu.Unlock()
	for i, c := range conns {
		if c != nil {
			m.log.Warn("lone connection dropped: its pair never arrived",
				zap.Stringer("session", id), zap.String("role", []string{"rpc", "mem"}[i]),
				zap.Stringer("peer", c.RemoteAddr()), zap.Duration("waited", m.cfg.PairTimeout))
			c.Close()
		}
	}
}

// drop lets go of a half that is no longer in m.halves (m.mu held). A
// connection whose handshake goroutine is done with it (ready) is
// returned for the caller to close; one still being answered belongs to
// its goroutine, which is woken and closes it itself (it finds the half
// gone): closing it here could close a descriptor that goroutine is still
// writing to, or that already belongs to another socket.
func (h *half) drop() (closable [2]*transport.Link) {
	h.timer.Stop()
	for i, c := range h.conns {
		switch {
		case c == nil:
		case h.ready[i]:
			closable[i] = c
		default:
			c.Shutdown()
		}
	}
	return closable
}

func (m *Manager) sessionDir(id wire.SessionID) string {
	return filepath.Join(m.cfg.StateDir, "sessions", id.String())
}

// running is a session the manager supervises.
type running struct {
	s *migrate.Session
	// out is set for outgoing sessions; caller is then the uid that
	// asked for it.
	out    bool
	caller int
	// done is closed once the manager has finished with the session
	// (logged it, recorded it, handed it to a resolver if in doubt);
	// resolver is set before.
	done     chan struct{}
	resolver *resolver
	// release gives back the session's slot (limits.go) once it ended.
	release func()
}

// info describes the session; an outgoing one says who asked for it.
func (r *running) info() api.Session {
	s := r.s.Info()
	if r.out {
		uid := r.caller
		s.CallerUID = &uid
	}
	return s
}

// listenPort is the port of this daemon's first TCP migration listener (0:
// none).
func (m *Manager) listenPort() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, l := range m.listeners {
		if a, ok := l.Addr().(*net.TCPAddr); ok {
			return a.Port
		}
	}
	return 0
}

// startDest turns a complete pair into a destination session.
func (m *Manager) startDest(id wire.SessionID, h *half) {
	peer := h.conns[0].RemoteAddr().String()
	log := m.log.With(zap.Stringer("session", id), zap.String("peer", peer), zap.String("direction", api.DirectionIn))
	fail := func(err error) {
		log.Error("cannot start session", zap.Error(err))
		for _, c := range h.conns {
			c.Close()
		}
	}
	dir := m.sessionDir(id)
	if err := os.Mkdir(dir, 0o700); err != nil {
		fail(err)
		return
	}
	release, refuse := m.admitIn()
	cfg := migrate.DestConfig{ID: id, Peer: peer, Log: log, CRIU: m.cfg.CRIU, Info: m.cfg.Info, Dir: dir,
		PeerTimeout: m.cfg.PeerTimeout, PhaseTimeout: m.cfg.PhaseTimeout, PrecopyCap: m.cfg.PrecopyCap, FetchAhead: m.cfg.FetchAhead, Limits: m.cfg.Limits, Refuse: refuse, KeepImages: m.cfg.KeepImages, AsDest: m.cfg.AsDest, CPUChecks: m.cpuChecks, BridgeMap: m.cfg.BridgeMap,
		Guard: m.cfg.Guard, Hold: func(pids []int) error { return m.claim(id, pids, "arriving") },
		Runc: m.cfg.Runc, ContainersDir: m.cfg.ContainersDir, HookExe: m.cfg.HookExe, SharedPaths: m.cfg.SharedPaths,
		NameFree: m.nameFree}
	if m.cfg.Place != nil {
		cfg.Place = func(ctx context.Context, pids []int) error { return m.cfg.Place(ctx, id.String(), pids) }
	}
	s, err := migrate.NewDest(cfg, h.conns[0], h.conns[1])
	if err != nil {
		release()
		log.Error("cannot start session", zap.Error(err))
		return
	}
	log.Info("incoming migration")
	m.warnInsecure(log)
	if m.spawn(&running{s: s, release: release}, log, dir) == nil {
		release()
		s.Close()
	}
}

// warnInsecure says, on every session, that it runs over plain TCP.
func (m *Manager) warnInsecure(log *zap.Logger) {
	if m.cfg.ServerTLS == nil && m.cfg.Insecure {
		log.Warn("insecure: this migration runs over plain TCP; its memory crosses the network unencrypted")
	}
}

// spawn registers r and runs its session on a goroutine of its own. A
// session's failure or panic ends that session only. It returns nil if
// the manager is shutting down.
func (m *Manager) spawn(r *running, log *zap.Logger, dir string) *running {
	r.done = make(chan struct{})
	m.mu.Lock()
	if m.closing {
		m.mu.Unlock()
		return nil
	}
	m.sessions[r.s.ID] = r
	m.sessWG.Add(1)
	m.mu.Unlock()
	go func() {
		defer m.sessWG.Done()
		defer close(r.done)
		r.s.Run()
		if r.release != nil {
			r.release()
		}
		end := r.s.End()
		// Listed until finished hands it on: a session in doubt is
		// its resolver's before it leaves the list (Sessions shows
		// the resolver's entry then), so that phaulctl list never
		// misses it.
		m.finished(r, end, log, dir)
		m.mu.Lock()
		delete(m.sessions, r.s.ID)
		idle := len(m.sessions) == 0
		m.mu.Unlock()
		if idle {
			// A migration's buffers (relay, TLS records, image files)
			// are garbage now; give the memory back rather than keep a
			// daemon that is idle most of its life at its peak size.
			debug.FreeOSMemory()
		}
		if m.cfg.AfterSession != nil {
			m.cfg.AfterSession()
		}
	}()
	return r
}

// finished logs a session's end once, tidies its directory, and hands a
// session that ended in doubt to a resolver.
func (m *Manager) finished(r *running, end migrate.End, log *zap.Logger, dir string) {
	s := r.s
	if end.Crashed {
		return // as if the daemon had died: the next start recovers
	}
	// What stays of it (a failure's images and logs, kept a while) is
	// root's alone, whatever CRIU made it.
	private(log, dir)
	m.record(s, end, log)
	if end.Outcome == api.OutcomeInDoubt && s.Direction == api.DirectionOut {
		log.Error("migration in doubt", zap.Error(end.Err), zap.String("images", dir))
		rec := end.Record
		r.resolver = m.startResolver(s.ID, &rec, dir, log, api.HistoryEntry{Started: s.Started, Result: end.Result})
		return
	}
	m.unclaim(s.ID)
	// A name goes with its process.
	if end.Outcome == api.OutcomeCommitted && end.Result.Name != "" {
		if s.Direction == api.DirectionIn {
			m.setName(end.Result.Name, end.Result.DestPID)
		} else {
			m.setName(end.Result.Name, 0)
		}
	}
	if end.Err != nil {
		fields := []zap.Field{zap.Error(end.Err), zap.String("images", dir)}
		var pe *migrate.PanicError
		if errors.As(end.Err, &pe) {
			fields = append(fields, zap.ByteString("stack", pe.Stack))
		}
		if end.Outcome == api.OutcomeCommitted {
			log.Error("migration committed, then its session failed", fields...)
			return
		}
		log.Error("migration failed", fields...)
		if m.cfg.RemoveFailedAtOnce && end.Record.Terminal() {
			m.removeImages(dir) // --keep-failed 0
		}
		return
	}
	log.Info("migration succeeded", resultFields(s.Direction, end.Result)...)
	// A destination whose source did not confirm keeps its record for the
	// source's query.
	if s.Direction == api.DirectionIn && !end.Record.Done {
		return
	}
	if !m.cfg.KeepImages {
		removeAll(log, dir)
	}
}

// resultFields are a successful migration's figures for its last log line
// (in the journal, PHAUL_MODE, PHAUL_FROZEN_US, PHAUL_PAGES_WRITTEN, …).
func resultFields(direction string, r api.Result) []zap.Field {
	f := []zap.Field{zap.Int("dest_pid", r.DestPID), zap.String("mode", r.Mode), zap.Int64("total_ms", r.TotalMS),
		zap.Int64("bytes", r.Bytes), zap.Int64("page_bytes", r.PageBytes)}
	if direction == api.DirectionOut {
		f = append(f, zap.Int64("frozen_ms", r.FrozenMS))
	}
	if r.LazyMS > 0 {
		f = append(f, zap.Int64("lazy_ms", r.LazyMS))
	}
	if d := r.Dump; d != nil {
		f = append(f, zap.Uint32("freezing_us", d.FreezingUS), zap.Uint32("frozen_us", d.FrozenUS),
			zap.Uint32("memdump_us", d.MemdumpUS), zap.Uint32("memwrite_us", d.MemwriteUS),
			zap.Uint64("pages_scanned", d.PagesScanned), zap.Uint64("pages_written", d.PagesWritten),
			zap.Uint64("pages_lazy", d.PagesLazy))
	}
	if rs := r.Restore; rs != nil {
		f = append(f, zap.Uint32("restore_us", rs.RestoreUS), zap.Uint64("pages_restored", rs.PagesRestored))
	}
	return f
}

// record adds a finished session to the history.
func (m *Manager) record(s *migrate.Session, end migrate.End, log *zap.Logger) {
	e := api.HistoryEntry{
		ID: s.ID.String(), Direction: s.Direction, PID: end.Result.SourcePID, Peer: s.PeerName(),
		Started: s.Started, Ended: time.Now(), Outcome: end.Outcome, Result: end.Result,
	}
	if e.Outcome != api.OutcomeCommitted {
		e.Error = api.AsError(end.Err)
	}
	if herr := m.history.Add(e); herr != nil {
		log.Warn("cannot record the migration in the history", zap.Error(herr))
	}
}

// History returns the newest limit finished migrations (all kept, if
// limit <= 0), newest first.
func (m *Manager) History(limit int) ([]api.HistoryEntry, error) {
	return m.history.List(limit)
}

// Migrate moves the process tree rooted at req.PID to the daemon at
// req.To, and returns when the migration has ended. progress receives
// progress events; it is called from another goroutine than the session's
// and may block.
func (m *Manager) Migrate(ctx context.Context, caller api.Caller, req api.MigrateRequest, progress func(api.Event)) (api.Result, error) {
	if m.cfg.Disabled != nil {
		return api.Result{}, m.cfg.Disabled
	}
	addr, err := destAddr(req.To)
	if err != nil {
		return api.Result{}, err
	}
	if req.BWLimit < 0 || (req.BWLimit > 0 && req.BWLimit < transport.MinRate) {
		return api.Result{}, api.Errorf(api.CodeInvalid, "--bwlimit %d B/s: give at least 1M (1 MiB/s), or none for no limit", req.BWLimit)
	}
	switch req.Compress {
	case "", api.CompressNone, api.CompressZstd:
	default:
		return api.Result{}, api.Errorf(api.CodeInvalid, "--compress %q: want zstd or none", req.Compress)
	}
	if req.Name != "" {
		if req.PID != 0 || req.Container != "" {
			return api.Result{}, api.Errorf(api.CodeInvalid, "--name names the process: give no --pid or --container with it")
		}
		if req.PID, err = m.lookupName(req.Name); err != nil {
			return api.Result{}, err
		}
	}
	var ctr *migrate.Container
	if req.Container != "" {
		if ctr, req.PID, err = m.findContainer(ctx, req.Container); err != nil {
			return api.Result{}, err
		}
	}
	info, err := m.checkPID(req.PID)
	if err != nil {
		return api.Result{}, err
	}
	var id wire.SessionID
	if _, err := rand.Read(id[:]); err != nil {
		return api.Result{}, err
	}
	pids, err := proc.Tree(info.PID)
	if err != nil {
		return api.Result{}, api.Errorf(api.CodeNotFound, "no process with pid %d on this host", req.PID)
	}
	if err := m.claim(id, pids, "migrating"); err != nil {
		return api.Result{}, err
	}
	// From here on the tree is this migration's until it is settled; on
	// the way out before the session runs, it is let go.
	spawned := false
	defer func() {
		if !spawned {
			m.unclaim(id)
		}
	}()
	if m.cfg.Authorize != nil {
		if err := m.cfg.Authorize(caller, info, pids); err != nil {
			return api.Result{}, err
		}
	}
	if cur, err := proc.Stat(info.PID); err != nil || cur.StartTime != info.StartTime {
		return api.Result{}, api.Errorf(api.CodeNotFound, "pid %d exited while it was checked", req.PID)
	}
	if caller.UID < 0 || caller.GID < 0 || len(caller.Groups) > wire.MaxCallerGroups {
		// Its identity travels with the migration (wireCaller).
		return api.Result{}, api.Errorf(api.CodePermission, "uid %d (gid %d, %d groups) cannot be named to the destination (at most %d groups)", caller.UID, caller.GID, len(caller.Groups), wire.MaxCallerGroups)
	}
	mode := req.Mode
	if mode == "" {
		mode = api.ModeAuto
	}
	switch d := req.DetachTerminal; {
	case d == "", d == api.DetachJournal, d == api.DetachNull:
	case !wire.ValidDetachFile(d):
		return api.Result{}, api.Errorf(api.CodeInvalid, "--detach-terminal %q: want journal, null, or an absolute path of the file to append the output to on the destination", d)
	case caller.UID != 0:
		// The destination opens the file as root, and checks only the
		// tree's files against the caller's identity.
		return api.Result{}, api.Errorf(api.CodePermission, "--detach-terminal FILE is root's only (the destination opens the file as root): use journal or null")
	}
	// This side first, before anything is touched: a mode the source
	// cannot run is refused here, with the reason.
	if _, ok := m.cfg.AsSource[mode]; !ok && mode != api.ModeAuto {
		return api.Result{}, api.Errorf(api.CodeInvalid, "unknown mode %q: want copy, lazy, precopy or auto", mode)
	}
	if mode != api.ModeAuto && !m.cfg.AsSource.Can(mode) {
		return api.Result{}, api.Errorf(api.CodePrecondition, "%s migration impossible: on this host (the source), %s. Use --mode auto (or copy)", mode, m.cfg.AsSource[mode])
	}
	release, err := m.admitOut()
	if err != nil {
		return api.Result{}, err
	}
	defer release()
	log := m.log.With(zap.Stringer("session", id), zap.Int("pid", req.PID), zap.String("peer", addr), zap.String("direction", api.DirectionOut))
	log.Info("outgoing migration", zap.Int("caller_uid", caller.UID))

	m.warnInsecure(log)
	rpcLink, rpcProbe, err := m.dialProbe(ctx, addr, id, wire.RoleRPC)
	if err != nil {
		return api.Result{}, err
	}
	memLink, memProbe, err := m.dialProbe(ctx, addr, id, wire.RoleMem)
	if err != nil {
		rpcLink.Close()
		return api.Result{}, err
	}
	dir := m.sessionDir(id)
	if err := os.Mkdir(dir, 0o700); err != nil {
		rpcLink.Close()
		memLink.Close()
		return api.Result{}, err
	}

	// The loop must never block on a slow client: progress goes through a
	// buffer, and when the buffer is full an update is dropped (the next
	// one supersedes it).
	events := make(chan api.Event, 64)
	forwarded := make(chan struct{})
	go func() {
		defer close(forwarded)
		for ev := range events {
			if progress != nil {
				progress(ev)
			}
		}
	}()
	criuOf := m.cfg.CRIU
	var shared *wire.Container
	if ctr != nil {
		log = log.With(zap.String("container", ctr.ID))
		criuOf = migrate.ContainerCRIU(m.cfg.CRIU, ctr, log)
		if shared, err = m.describeContainer(ctx, ctr, id); err != nil {
			rpcLink.Close()
			memLink.Close()
			os.Remove(dir)
			return api.Result{}, err
		}
	}
	s, err := migrate.NewSource(migrate.SourceConfig{
		Container: ctr, Shared: shared,
		ID: id, ListenPort: m.listenPort(), Log: log, CRIU: criuOf, Info: m.cfg.Info, Dir: dir, Proc: info, Dest: addr,
		PeerTimeout: m.cfg.PeerTimeout, PhaseTimeout: m.cfg.PhaseTimeout, Gate: m.gate, Mode: mode, AsSource: m.cfg.AsSource, DetachTerminal: req.DetachTerminal,
		RunName: req.Name, Caller: wireCaller(caller), CheckFrozen: m.checkFrozen(caller), BWLimit: req.BWLimit, Compress: req.Compress,
		PeerProbes: rpcProbe && memProbe,
		Progress: func(ev api.Event) {
			select {
			case events <- ev:
			default:
			}
		},
	}, rpcLink, memLink)
	if err != nil {
		os.Remove(dir)
		close(events)
		return api.Result{}, err
	}
	r := m.spawn(&running{s: s, out: true, caller: caller.UID, release: release}, log, dir)
	spawned = r != nil
	if r == nil {
		s.Close()
		close(events)
		return api.Result{}, api.Errorf(api.CodeUnavailable, "phauld is shutting down")
	}
	<-r.done
	close(events)
	<-forwarded
	end := s.End()
	if res := r.resolver; res != nil {
		if progress != nil {
			progress(api.Event{Event: api.EventProgress, ID: id.String(), Phase: "in-doubt"})
		}
		return m.awaitResolver(res, end)
	}
	if end.Outcome == api.OutcomeCommitted {
		return end.Result, nil // what failed after is in the journal
	}
	return end.Result, end.Err
}

// wireCaller is the caller as the destination is told it.
func wireCaller(c api.Caller) *wire.Caller {
	w := &wire.Caller{UID: uint32(c.UID), GID: uint32(c.GID)}
	for _, g := range c.Groups {
		w.Groups = append(w.Groups, uint32(g))
	}
	return w
}

// checkFrozen is the check a source makes on the frozen tree for caller
// (nil for root, whom it does not concern).
func (m *Manager) checkFrozen(caller api.Caller) func(proc.Info) error {
	if m.cfg.AuthorizeFrozen == nil || caller.UID == 0 {
		return nil
	}
	return func(root proc.Info) error { return m.cfg.AuthorizeFrozen(caller, root) }
}

// awaitResolver waits a while for the outcome of a session in doubt: until
// the resolver settles it, the destination says it cannot (it has no
// record: an operator must), or InDoubtWait passes.
func (m *Manager) awaitResolver(r *resolver, end migrate.End) (api.Result, error) {
	select {
	case <-r.done:
	case <-r.unknown:
		return end.Result, api.Errorf(api.CodeInDoubt,
			"%v; the destination has no record of the migration, so it cannot say: the process is held stopped here (pid %d). "+
				"See whether it runs on %s; then 'phaulctl resolve %s --kill' if it does, '--resume' if it does not",
			end.Err, r.rec.PID, r.rec.Peer, r.id.String()[:8])
	case <-time.After(m.cfg.InDoubtWait):
		return end.Result, end.Err
	}
	res := end.Result
	switch r.outcome {
	case wire.OutcomeCommitted:
		res.DestPID = r.destPID
		return res, nil
	case wire.OutcomeAborted:
		if r.resumeErr != nil {
			return res, api.Errorf(api.CodeInDoubt,
				"migration failed; the destination did not commit, and the process (pid %d) was resumed here but not seen running afterwards: %v", r.rec.PID, r.resumeErr)
		}
		return res, api.Errorf(api.CodeAborted,
			"migration failed; the destination did not commit, and the process was resumed here (pid %d)", r.rec.PID)
	}
	return res, end.Err
}

// destAddr turns HOST or HOST:PORT into HOST:PORT.
func destAddr(to string) (string, error) {
	if to == "" {
		return "", api.Errorf(api.CodeInvalid, "no destination: give --to HOST[:PORT]")
	}
	if _, port, err := net.SplitHostPort(to); err == nil {
		if _, err := strconv.ParseUint(port, 10, 16); err != nil {
			return "", api.Errorf(api.CodeInvalid, "destination %q: bad port", to)
		}
		return to, nil
	}
	return net.JoinHostPort(trimBrackets(to), strconv.Itoa(api.DefaultPort)), nil
}

func trimBrackets(s string) string {
	if len(s) > 1 && s[0] == '[' && s[len(s)-1] == ']' {
		return s[1 : len(s)-1]
	}
	return s
}

// checkPID refuses what must not or cannot be migrated, before anything is
// touched.
func (m *Manager) checkPID(pid int) (proc.Info, error) {
	if pid <= 0 {
		return proc.Info{}, api.Errorf(api.CodeInvalid, "pid %d: give the pid of a running process", pid)
	}
	if pid == 1 {
		return proc.Info{}, api.Errorf(api.CodeInvalid, "pid 1 is this host's init: it cannot be migrated")
	}
	info, err := proc.Stat(pid)
	if errors.Is(err, proc.ErrNotFound) {
		return proc.Info{}, api.Errorf(api.CodeNotFound, "no process with pid %d on this host", pid)
	}
	if err != nil {
		return proc.Info{}, err
	}
	if info.KernelThread() {
		return proc.Info{}, api.Errorf(api.CodeInvalid, "pid %d (%s) is a kernel thread: it cannot be migrated", pid, info.Comm)
	}
	if info.State == 'Z' || info.State == 'X' {
		return proc.Info{}, api.Errorf(api.CodeInvalid, "pid %d (%s) has exited (zombie)", pid, info.Comm)
	}
	if tgid, err := proc.Tgid(pid); err == nil && tgid != pid {
		return proc.Info{}, api.Errorf(api.CodeInvalid,
			"pid %d is a thread of process %d (%s): give the process's pid (its threads and children move with it)", pid, tgid, info.Comm)
	}
	self := os.Getpid()
	if inside, err := proc.IsAncestor(pid, self); err == nil && inside {
		if pid == self {
			return proc.Info{}, api.Errorf(api.CodeInvalid, "pid %d is phauld itself", pid)
		}
		return proc.Info{}, api.Errorf(api.CodeInvalid,
			"pid %d (%s) is an ancestor of phauld: dumping its tree would freeze phauld itself", pid, info.Comm)
	}
	return info, nil
}

// holder is what holds a pid: a session, and what it is doing with it.
type holder struct {
	id   wire.SessionID
	what string // "migrating", "arriving", "in doubt", "recovering"
}

// claim makes pids (a tree) id's, under the manager's lock: each pid
// belongs to at most one migration at a time, from before anything is
// dialed until the migration is settled (in doubt included). A tree with
// a pid, or an ancestor, held by another is refused at once, naming the
// session that holds it.
func (m *Manager) claim(id wire.SessionID, pids []int, what string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, pid := range pids {
		if h, ok := m.held[pid]; ok && h.id != id {
			return m.heldErr(pid, h)
		}
	}
	// A process forked into a held tree after it was reserved is held
	// too: by its ancestor.
	if len(pids) > 0 {
		for p := pids[0]; p > 1; {
			info, err := proc.Stat(p)
			if err != nil {
				break
			}
			if h, ok := m.held[info.PPID]; ok && h.id != id {
				return m.heldErr(pids[0], h)
			}
			p = info.PPID
		}
	}
	for _, pid := range pids {
		m.held[pid] = holder{id: id, what: what}
	}
	return nil
}

func (m *Manager) heldErr(pid int, h holder) error {
	if h.what == "in doubt" {
		return api.Errorf(api.CodeConflict,
			"pid %d belongs to migration %s, which is in doubt: its process is held stopped here until the destination says whether it committed (see phaulctl list; an operator can settle it with phaulctl resolve)",
			pid, h.id)
	}
	switch h.what {
	case "recovering":
		return api.Errorf(api.CodeConflict,
			"pid %d belongs to migration %s: phauld is settling it from its record after a restart (see journalctl -u phauld); try again once it is done",
			pid, h.id)
	case "arriving":
		return api.Errorf(api.CodeConflict,
			"pid %d is the copy migration %s is bringing here: it belongs to that migration until it has ended (see phaulctl list)", pid, h.id)
	}
	return api.Errorf(api.CodeConflict, "pid %d belongs to migration %s (%s); wait for it to end (see phaulctl list)", pid, h.id, h.what)
}

// mark says what id does with the pids it holds.
func (m *Manager) mark(id wire.SessionID, what string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for pid, h := range m.held {
		if h.id == id {
			m.held[pid] = holder{id: id, what: what}
		}
	}
}

// unclaim lets go of every pid id holds.
func (m *Manager) unclaim(id wire.SessionID) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for pid, h := range m.held {
		if h.id == id {
			delete(m.held, pid)
		}
	}
}

// dial opens one connection of a migration (or a query), authenticates
// the destination (mutual TLS, unless insecure), and does the handshake.
func (m *Manager) dial(ctx context.Context, addr string, id wire.SessionID, role wire.Role) (*transport.Link, error) {
	lk, _, err := m.dialProbe(ctx, addr, id, role)
	return lk, err
}

// dialProbe is dial, and says whether the destination answers link
// probes (its HelloReply's Probe).
func (m *Manager) dialProbe(ctx context.Context, addr string, id wire.SessionID, role wire.Role) (*transport.Link, bool, error) {
	unreachable := func(err error) error {
		return api.Errorf(api.CodeUnavailable,
			"cannot reach the destination phauld at %s: %v (is phauld running there? try 'systemctl status phauld.socket' on that host)", addr, err)
	}
	d := net.Dialer{Timeout: m.cfg.DialTimeout}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, false, unreachable(err)
	}
	lk, err := transport.NewLink(c)
	if err != nil {
		return nil, false, err
	}
	ctx, cancel := context.WithTimeout(ctx, m.cfg.HandshakeTimeout)
	defer cancel()
	deadline, _ := ctx.Deadline()
	if m.cfg.ClientTLS != nil {
		host, _, _ := net.SplitHostPort(addr)
		if err := lk.ClientTLS(ctx, m.cfg.ClientTLS(host)); err != nil {
			lk.Close()
			if r := refusalOf(lk.Preface()); r != nil {
				return nil, false, refusedError(addr, role, r)
			}
			return nil, false, api.Errorf(api.CodeUnavailable,
				"cannot open a trusted connection to the destination at %s: %v (both daemons need certificates from the same CA, and the destination's must be valid for %q; see 'phaulctl pki --help')",
				addr, transport.TLSError(err), host)
		}
	}
	lk.SetDeadline(deadline)
	if err := wire.WriteMessage(lk.Stream(), &wire.Hello{Proto: wire.Version, Role: role, Session: id, Daemon: version.Daemon()}); err != nil {
		lk.Close()
		return nil, false, unreachable(err)
	}
	msg, err := wire.ReadMessage(lk.Stream(), wire.Handshake)
	if err != nil {
		lk.Close()
		if m.cfg.ClientTLS == nil && (errors.Is(err, wire.ErrMagic) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) {
			return nil, false, api.Errorf(api.CodeUnavailable,
				"the destination phauld at %s did not answer in plain TCP (%v): it probably requires TLS; run both daemons with certificates, or both with --insecure", addr, err)
		}
		return nil, false, unreachable(fmt.Errorf("handshake: %w", err))
	}
	reply, ok := msg.(*wire.HelloReply)
	if !ok {
		lk.Close()
		return nil, false, unreachable(fmt.Errorf("handshake: got %s", msg.Type()))
	}
	if !reply.OK {
		lk.Close()
		return nil, false, refusedError(addr, role, reply)
	}
	lk.SetDeadline(time.Time{})
	return lk, reply.Probe, nil
}

// Sessions lists the sessions in progress, and those waiting to learn
// their outcome.
func (m *Manager) Sessions() []api.Session {
	m.mu.Lock()
	defer m.mu.Unlock()
	list := make([]api.Session, 0, len(m.sessions)+len(m.resolvers))
	for id, r := range m.sessions {
		if _, handed := m.resolvers[id]; !handed {
			list = append(list, r.info())
		}
	}
	for _, r := range m.resolvers {
		list = append(list, r.info())
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Started.Before(list[j].Started) })
	return list
}

// closeIntake, with m.mu held, stops what brings sessions in: the
// listeners close, unpaired connections and handshakes in progress end.
// It reports whether it was the first call.
func (m *Manager) closeIntake() (first bool) {
	first = !m.closing
	if first {
		close(m.stopping)
	}
	m.closing = true
	for _, l := range m.listeners {
		l.Close()
	}
	for id, h := range m.halves {
		delete(m.halves, id)
		for _, c := range h.drop() {
			if c != nil {
				c.Close()
			}
		}
	}
	for lk := range m.incoming {
		// Wakes a handshake blocked on the socket; its goroutine closes it.
		lk.Shutdown()
	}
	return first
}

// Shutdown stops accepting connections, stops every session through its
// eventfd (each ends by its commit rule) and waits for them until ctx ends.
func (m *Manager) Shutdown(ctx context.Context) error {
	m.mu.Lock()
	first := m.closeIntake()
	for _, r := range m.sessions {
		r.s.Stop()
	}
	if first { // a second Shutdown (phauld's stop timeout) only waits
		for _, r := range m.resolvers {
			close(r.stop)
		}
	}
	m.mu.Unlock()

	done := make(chan struct{})
	go func() {
		m.sessWG.Wait()
		m.connWG.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("sessions still running at the stop deadline: %w", ctx.Err())
	}
}
