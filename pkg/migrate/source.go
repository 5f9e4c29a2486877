//go:build linux

package migrate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/dumplock"
	"github.com/phaul/phaul/pkg/journal"
	"github.com/phaul/phaul/pkg/loop"
	"github.com/phaul/phaul/pkg/network"
	"github.com/phaul/phaul/pkg/pidns"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// srcState is where the source is in its migration. The order matters:
// from srcCommit on, the source has asked the commit and the outcome is
// the destination's.
type srcState int

const (
	// srcPrepare: Prepare sent, waiting for Ready.
	srcPrepare srcState = iota
	// srcDump: CRIU is dumping; pages stream through the relay.
	srcDump
	// srcImages: the tree is frozen, held by CRIU at post-dump; the
	// images are streaming to the destination.
	srcImages
	// srcRestore: the tree is frozen, held by CRIU at post-dump; images
	// sent; waiting for Restored.
	srcRestore
	// srcRelease: post-dump answered "go on": CRIU leaves the tree
	// stopped; waiting for its final response.
	srcRelease
	// srcLazy: a lazy migration's tree runs on the destination while
	// CRIU serves its pages from here; waiting for CRIU to finish (the
	// tree then stays stopped here) and for the destination's PagesIn.
	srcLazy
	// srcCommit: commit-sent recorded, Commit sent; waiting for
	// Committed. The tree stays stopped until the destination answers.
	srcCommit
	// srcAbort: rolling back; waiting for CRIU to resume the tree.
	srcAbort
	// srcResume: rolling back; the tree is being resumed (if CRIU left
	// it stopped) and seen running, off the loop.
	srcResume
	// srcKill: committed; the stopped copy here is being killed, off the
	// loop.
	srcKill
	// srcEnd: finished: committed, rolled back, or in doubt.
	srcEnd
)

var srcStateNames = [...]string{"prepare", "dump", "images", "restore", "release", "lazy", "commit", "abort", "resume", "kill", "end"}

func (s srcState) String() string { return srcStateNames[s] }

// SourceConfig is what a source session needs to know.
type SourceConfig struct {
	ID wire.SessionID
	// ListenPort is the port this daemon takes migrations on (0: none),
	// which the destination is told to name it by.
	ListenPort int
	Log        *zap.Logger
	// CRIU runs the dump; Info is what probing it found.
	CRIU CRIU
	Info criu.Info
	// Dir is the session's directory: its record, images and CRIU logs.
	Dir string
	// Proc is the root of the tree to migrate, as checked.
	Proc proc.Info
	// Dest is the destination's address.
	Dest        string
	PeerTimeout time.Duration
	// PhaseTimeout is each phase's progress deadline (0: none): a phase
	// that neither advances nor moves a byte for that long aborts the
	// migration by the commit rule.
	PhaseTimeout time.Duration
	Gate         *dumplock.Gate
	// Progress receives progress events; it is called on the session's
	// loop and must not block.
	Progress func(api.Event)
	// DetachTerminal: a tree on a terminal gets a new one on the
	// destination, its output to the journal or nowhere (api.Detach*);
	// "" refuses such a tree.
	DetachTerminal string
	// RunName is the name the process is known by here (phaulctl run
	// --name): it keeps it on the destination.
	RunName string
	// Mode is what the user asked for; AsSource what this host can do.
	Mode     string
	AsSource Capabilities
	// Container, if set, is the runc container whose init is Proc: CRIU
	// is then ContainerCRIU, and the commit deletes the container (runc
	// delete), a rollback resumes it (runc resume).
	Container *Container
	// Shared is the container's storage check: the marker file and its
	// token (see wire.Container); the source removes it when done.
	Shared *wire.Container
	// Caller is who asked for the migration: the destination gives the
	// restored tree no access that this user does not have there.
	Caller *wire.Caller
	// CheckFrozen, if set, is the caller's permission asked again on the
	// frozen tree rooted at Proc, before any page or image of it leaves
	// (see FrozenNotify): an error aborts the migration, and CRIU
	// resumes the tree. The check at request time cannot see what the
	// tree does after it (exec a setuid program).
	CheckFrozen func(root proc.Info) error
	// BWLimit, if set, is the most this side sends, in bytes a second,
	// over both connections together (see transport.Pacer).
	BWLimit int64
	// Compress is how the page stream and images are compressed:
	// api.CompressZstd, or "" / CompressNone.
	Compress string
	// PeerProbes: the destination answers link probes (its HelloReply
	// said so): with --mode auto the source measures the link first.
	PeerProbes bool
}

// compress is the compression asked for, "" for none.
func (m *source) compress() string {
	if m.p.Compress == api.CompressNone {
		return ""
	}
	return m.p.Compress
}

// FrozenNotify is CRIU's notification, during a dump, that comes once the
// whole tree is frozen (seized) and before any page is written (CRIU
// 3.19 and later send it when notifications are on; it asks for more
// external resources, and a "no" fails the dump, which resumes the
// tree). The source checks the frozen tree there; a container's dump
// sends it too (see ContainerCRIU).
const FrozenNotify = "query-ext-files"

// source is the state machine of the daemon a process leaves.
type source struct {
	s   *Session
	p   SourceConfig
	log *zap.Logger
	rec *store.Record

	conns
	ph    *phaseTimer
	state srcState
	hb    *heartbeat

	dump      *criuWatch
	gateLocks dumplock.Locks // dump gate locks held
	waiting   *loop.Timer    // retries the dump gate
	released  bool           // post-dump answered "go on": CRIU leaves the tree stopped
	// A container's rootfs synced (not shared): the pass in progress,
	// and each pass's figures.
	needSync  bool
	sync      *sourceSync
	syncStats [2]SyncStats
	images    *sender // streams the images while the tree is frozen
	// stopped are the tasks stopped by job control when CRIU froze them
	// (by their pid in their namespace): a resume leaves them stopped.
	stopped map[int]bool
	// net is the tree's network, as found before the freeze.
	net network.Namespace
	// ttys are the terminals the tree is attached to, as CRIU's keys
	// (--detach-terminal): external in the dump.
	ttys []string
	// destVeths are its veths as the destination makes them.
	destVeths []wire.Veth
	// postDumpAnswered: CRIU's post-dump notification has its answer.
	postDumpAnswered bool
	// frozenChecked: CheckFrozen passed on the frozen tree.
	frozenChecked bool
	tree          []*proc.Process

	destPID int
	// enterNS, if set, is the init of the pid namespace an earlier
	// restore made for the tree (pkg/pidns), in which CRIU dumps it by
	// nsPID, its root's pid there.
	enterNS, nsPID int
	// shellJob: the tree's root is in a session or group whose leader is
	// outside it (a shell's job): CRIU dumps and restores it as such.
	shellJob bool
	// unixPeers are the paths of the sockets outside the tree its Unix
	// datagram sockets are connected to: CRIU connects them again there.
	unixPeers []string
	// destNewPidNS: the destination restored the tree into a new pid
	// namespace (destPID is its host pid there).
	destNewPidNS bool
	// destNotRunning is why the destination did not see its copy run
	// after the commit ("": it did).
	destNotRunning string
	restore        *api.RestoreStats
	dumpStats      *api.DumpStats
	fileBytes      int64
	fileWire       int64 // what fileBytes came to on the wire

	t0, tDump, tCommitted time.Time
	progressTimer         *loop.Timer

	failure error
	// inDoubt: the commit was asked and its answer lost; the manager
	// hands the session to a resolver.
	inDoubt bool
	// journal are the tree's journal stream sockets (see
	// wire.Prepare.JournalStreams).
	journal []uint64
	// memBytes is the tree's resident memory when the migration began:
	// about what the pages come to.
	memBytes int64

	// mode is the migration's mode, as the destination chose it.
	mode string
	// Lazy migrations: served is set when CRIU finished serving pages
	// (the tree is then stopped here, by CRIU); pagesIn when the
	// destination said every page is in, lazyPages how many came so and
	// fetchedAhead how many of those its relay fetched ahead.
	served, pagesIn    bool
	lazyPages          uint64
	fetchedAhead       uint64
	tResumed, tPagesIn time.Time

	// Pre-copy: the page-hash seed, the most the destination holds,
	// whether the pages sent ahead go compressed (PrecopyPagesZ), and the
	// rounds once they started.
	seed       uint64
	precopyCap int64
	precopyZ   bool
	rounds     *rounds
	// auto: the Prepare held back while the link is probed, when the
	// probe began, and the rate it measured (bytes a second).
	prepare  *wire.Prepare
	tProbe   time.Time
	linkRate int64
}

// pageSize is the unit of CRIU's page transfers; pages moved are counted
// as page-server bytes over it (its headers are a fraction of a percent).
const pageSize = 4096

// NewSource returns the session that migrates c.Proc's tree over the
// connections rpc and mem to the destination; Run starts it.
func NewSource(c SourceConfig, rpc, mem *transport.Link) (*Session, error) {
	s, err := start(c.ID, api.DirectionOut, c.Dest, rpc, mem, func(s *Session) (machine, error) {
		return newSource(s, c, rpc, mem)
	})
	if s != nil {
		s.pid.Store(int64(c.Proc.PID))
	}
	return s, err
}

func newSource(s *Session, p SourceConfig, rpcLink, memLink *transport.Link) (*source, error) {
	m := &source{s: s, p: p, log: p.Log, t0: s.Started, seed: newSeed()}
	m.ph = newPhaseTimer(s, p.Log)
	m.rec = &store.Record{ID: s.ID.String(), Role: store.RoleSource, Peer: p.Dest, PID: p.Proc.PID, StartTime: p.Proc.StartTime}
	if err := m.open(s.l, rpcLink, memLink, m.onRPC, m.abort, m.onConnClose); err != nil {
		return nil, err
	}
	if p.BWLimit > 0 {
		pacer, err := transport.NewPacer(p.BWLimit)
		if err != nil {
			m.conns.close()
			return nil, err
		}
		m.rpc.SetPacer(pacer)
		m.mem.SetPacer(pacer)
	}
	return m, nil
}

func (m *source) begin() error {
	if m.p.Container != nil {
		m.s.container.Store(m.p.Container.ID)
		m.rec.Container = m.p.Container.ID
	}
	m.ph.enter("prepare")
	m.emit()
	m.hb = startHeartbeat(m.s.l, m.rpc, []*transport.Conn{m.rpc, m.mem}, m.p.PeerTimeout, m.onSilent)
	m.hb.deadline(m.ph, m.p.PhaseTimeout, m.onStalled)
	m.journal = journalStreams(m.p.Proc.PID, m.log)
	pids, err := proc.Tree(m.p.Proc.PID)
	if err != nil {
		return api.Errorf(api.CodeNotFound, "pid %d: %v", m.p.Proc.PID, err)
	}
	m.memBytes = proc.Resident(pids)
	// What cannot move is refused here, before anything is frozen.
	if nested, init, inner, phaul := pidns.Enclosing(m.p.Proc.PID); nested && m.p.Container == nil {
		switch {
		case phaul:
			// Restored here into a pid namespace of its own: CRIU dumps
			// it from inside, where it has the pids it had before.
			m.enterNS, m.nsPID = init, inner
			m.log.Info("the tree runs in a pid namespace phauld made when it restored it: CRIU dumps it from inside", zap.Int("pid_ns_init", init), zap.Int("ns_pid", inner))
		case init != 0:
			return api.Errorf(api.CodePrecondition, "pid %d (%s) is pid %d in a pid namespace whose init is pid %d, and CRIU dumps a pid namespace whole: migrate pid %d, the init of that namespace",
				m.p.Proc.PID, printable(m.p.Proc.Comm), inner, init, init)
		default:
			return api.Errorf(api.CodePrecondition, "pid %d (%s) is pid %d in a pid namespace it joined from outside (nsenter?), which CRIU cannot dump: migrate the init of that namespace",
				m.p.Proc.PID, printable(m.p.Proc.Comm), inner)
		}
	}
	if nested, inner := proc.NestedPidNS(pids); nested != 0 && m.p.Container == nil {
		if inner == 1 {
			return api.Errorf(api.CodePrecondition, "pid %d (%s) is the parent of a pid namespace's init, pid %d, which CRIU cannot dump with it: migrate pid %d, the init of that namespace",
				m.p.Proc.PID, printable(m.p.Proc.Comm), nested, nested)
		}
		return api.Errorf(api.CodePrecondition, "the tree of pid %d reaches into another pid namespace (pid %d is pid %d there), which CRIU cannot dump: migrate the init of that namespace, or a tree within one namespace",
			m.p.Proc.PID, nested, inner)
	}
	ttys, err := proc.Terminals(pids)
	if err != nil {
		return api.Errorf(api.CodePrecondition, "%v", err)
	}
	if len(ttys) > 0 {
		tty := ttys[0]
		if m.p.Container != nil {
			return api.Errorf(api.CodePrecondition, "the container's pid %d has a terminal, %s, on its descriptor %d (runc's console?): phaul moves containers on no terminal (process.terminal false in config.json)", tty.PID, tty.Path, tty.FD)
		}
		if m.p.DetachTerminal == "" {
			return api.Errorf(api.CodePrecondition, "pid %d has a terminal, %s, on its descriptor %d, and a terminal stays on this host: migrate it with --detach-terminal journal (or null), which gives it a new terminal on the destination whose output goes to the journal (or nowhere), or start it detached (setsid CMD </dev/null >LOG 2>&1)",
				tty.PID, tty.Path, tty.FD)
		}
		for _, t := range ttys {
			if !slices.Contains(m.ttys, t.Key) {
				m.ttys = append(m.ttys, t.Key)
			}
		}
		m.log.Info("the tree's terminal stays here; it gets a new one there", zap.String("terminal", tty.Path), zap.String("output", m.p.DetachTerminal))
	}
	if !proc.HasCap(proc.CapSysResource) {
		if pid, uid := proc.OtherUser(pids); pid != 0 {
			return api.Errorf(api.CodePrecondition, "pid %d of the tree runs as uid %d, and root here lacks CAP_SYS_RESOURCE, without which CRIU cannot dump another user's process (it raises the process's limits): run phauld where root has it (not in a container that drops it), or run the process as root",
				pid, uid)
		}
	}
	if m.p.Container == nil {
		if err := m.checkPlain(pids); err != nil {
			return err
		}
	}
	if m.net, err = network.Inspect(pids); err != nil {
		return api.Errorf(api.CodePrecondition, "%v", err)
	}
	var netw *wire.Network
	if m.net.Own {
		m.log.Info("the tree's network namespace moves with it", zap.String("network", m.net.Summary()))
		netw = &wire.Network{Interfaces: m.net.Interfaces, Addresses: m.net.Addresses,
			Connections: m.net.Connected, InFlight: m.net.InFlight}
		for _, v := range m.net.Veths {
			netw.Veths = append(netw.Veths, wire.Veth(v))
		}
		for _, v := range m.net.Macvlans {
			netw.Macvlans = append(netw.Macvlans, wire.Macvlan(v))
		}
		if m.p.Container != nil {
			// runc has CRIU dump it empty: its set-up goes apart.
			if err := m.net.CheckConfigurable(); err != nil {
				return api.Errorf(api.CodePrecondition, "%v", err)
			}
			if netw.Links, netw.Routes, err = network.ReadConfig(m.p.Proc.PID); err != nil {
				return api.Errorf(api.CodePrecondition, "the container's network namespace: %v", err)
			}
		}
	}
	var modes []string
	for _, x := range []string{api.ModeCopy, api.ModeLazy, api.ModePrecopy} {
		if m.p.AsSource.Can(x) {
			modes = append(modes, x)
		}
	}
	detach := ""
	if len(m.ttys) > 0 {
		detach = m.p.DetachTerminal
	}
	var tasks []int
	if m.p.Container == nil { // runc restores a container's own pid namespace
		if tasks, err = proc.TaskIDs(pids); err != nil {
			return api.Errorf(api.CodeNotFound, "pid %d: %v", m.p.Proc.PID, err)
		}
	}
	if len(tasks) > wire.MaxTaskIDs {
		return api.Errorf(api.CodePrecondition, "the tree of pid %d has %d tasks, more than phaul moves (%d)", m.p.Proc.PID, len(tasks), wire.MaxTaskIDs)
	}
	rootNS, _ := proc.NSPid(m.p.Proc.PID)
	var files []wire.FileCheck
	if m.p.Container == nil { // runc's restore has the container's rootfs
		paths := 0
		for _, f := range proc.Files(pids) {
			if paths += len(f.Path); len(files) == wire.MaxFileChecks || paths > wire.MaxFileCheckBytes {
				m.log.Warn("the tree uses more files than the destination is asked to check", zap.Int("checked", len(files)))
				break
			}
			files = append(files, wire.FileCheck(f))
		}
	}
	prep := &wire.Prepare{
		PrecopySeed:    m.seed,
		MemBytes:       m.memBytes,
		RunName:        m.p.RunName,
		UnixPeers:      m.unixPeers,
		ShellJob:       m.shellJob,
		Caller:         m.p.Caller,
		Files:          files,
		TaskIDs:        tasks,
		OwnPidNS:       rootNS == 1,
		Terminals:      m.ttys,
		Detach:         detach,
		SourcePort:     m.p.ListenPort,
		PID:            m.p.Proc.PID,
		Container:      m.p.Shared,
		CRIUVersion:    m.p.Info.Version.Code(),
		CPUInfo:        m.p.Info.CPUInfo,
		Name:           printable(m.p.Proc.Comm),
		JournalStreams: m.journal,
		Mode:           m.p.Mode,
		SourceModes:    modes,
		Network:        netw,
		Compress:       m.compress(),
	}
	if m.probeFirst() {
		// auto: the link's rate first, for the destination's choice.
		m.prepare = prep
		return m.startProbe()
	}
	return m.rpc.Send(prep)
}

// checkPlain refuses, before the freeze, a process tree (not a container)
// that CRIU would refuse once frozen: one whose session or process group
// leader is outside it (started in the background from a shell), one with
// a mount namespace of its own, one with a descriptor CRIU cannot dump,
// one with a Unix socket connected outside but for those carried (journal
// streams; datagram sockets connected to a path, kept in unixPeers).
func (m *source) checkPlain(pids []int) error {
	in := map[int]bool{}
	for _, p := range pids {
		in[p] = true
	}
	// A job a shell started: its session (and maybe its group) is the
	// shell's. CRIU carries the root so as a shell job, into a session
	// of the destination's; any other task must be in the tree's.
	if root, err := proc.Stat(pids[0]); err == nil && (!in[root.Session] || !in[root.PGID]) {
		if ns, _ := proc.NSPid(pids[0]); ns == 1 {
			// CRIU refuses it even as a shell job.
			return api.Errorf(api.CodePrecondition, "pid %d (%s) is the init of a pid namespace of its own, and the leader of its session is outside that namespace (it was started without setsid), which CRIU cannot dump: start it with unshare --pid --fork -- setsid CMD, or phaulctl run -- CMD",
				pids[0], printable(root.Comm))
		}
		m.shellJob = true
		if !in[root.Session] {
			in[root.Session] = true
		}
		if !in[root.PGID] {
			in[root.PGID] = true
		}
		m.log.Info("the tree's session leader is outside it (a shell's job): it moves as a shell job, into a session of the destination's",
			zap.Int("session", root.Session), zap.Int("pgid", root.PGID))
	}
	for _, p := range pids {
		info, err := proc.Stat(p)
		if err != nil {
			continue // gone: CRIU will not see it either
		}
		if !in[info.Session] || !in[info.PGID] {
			what, leader := "session", info.Session
			if in[info.Session] {
				what, leader = "process group", info.PGID
			}
			return api.Errorf(api.CodePrecondition, "pid %d (%s) is in the %s of pid %d, which is not part of the tree (a shell that started it?), and CRIU restores a tree with its sessions and groups: start it in a session of its own (setsid CMD </dev/null >LOG 2>&1, or phaulctl run -- CMD)",
				p, printable(info.Comm), what, leader)
		}
	}
	mnt := "/proc/self/ns/mnt"
	if m.enterNS > 0 {
		mnt = "/proc/" + strconv.Itoa(m.enterNS) + "/ns/mnt" // CRIU dumps from in there
	}
	mine, err1 := os.Readlink(mnt)
	theirs, err2 := os.Readlink("/proc/" + strconv.Itoa(pids[0]) + "/ns/mnt")
	if err1 == nil && err2 == nil && mine != theirs {
		return api.Errorf(api.CodePrecondition, "pid %d has a mount namespace of its own (unshare --mount?), which phaul does not move (its mounts would have to be made again on the destination): start it in the host's mount namespace, or run it as a runc container, which phaul moves with its root filesystem",
			pids[0])
	}
	if pid, fd, what := proc.Unsupported(pids); pid != 0 {
		return api.Errorf(api.CodePrecondition, "pid %d has %s (its descriptor %d), which CRIU cannot dump: have the program not use it while it moves (most that use io_uring can be told to use epoll), or it cannot move",
			pid, what, fd)
	}
	carried := map[uint64]bool{}
	for _, ino := range m.journal {
		carried[ino] = true
	}
	peers, err := network.UnixOutside(pids, carried)
	if err != nil {
		return api.Errorf(api.CodePrecondition, "%v", err)
	}
	if len(peers) > wire.MaxUnixPeers {
		return api.Errorf(api.CodePrecondition, "the tree sends datagrams to %d Unix sockets outside it, more than phaul carries (%d)", len(peers), wire.MaxUnixPeers)
	}
	m.unixPeers = peers
	return nil
}

// printable is a command name with control characters (prctl may set
// any) replaced, as the protocol wants it.
func printable(comm string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return '_'
		}
		return r
	}, comm)
}

// journalStreams finds the sockets of the tree rooted at pid that are
// connected to journald's stdout socket: its stdout and stderr when systemd
// started it. CRIU cannot dump one end of a Unix stream connection, so
// they are dumped as external and the destination gives the restored
// tree new streams to its own journald.
func journalStreams(pid int, log *zap.Logger) []uint64 {
	pids, err := proc.Tree(pid)
	if err != nil {
		return nil
	}
	peers, err := proc.UnixStreamPeers(pids)
	if err != nil {
		log.Warn("cannot inspect the tree's sockets", zap.Error(err))
		return nil
	}
	var inos []uint64
	for ino, peer := range peers {
		if peer == journal.StreamPath {
			inos = append(inos, ino)
		}
	}
	sort.Slice(inos, func(i, j int) bool { return inos[i] < inos[j] })
	if len(inos) > 0 {
		log.Info("the tree writes to the journal: its streams will be reconnected on the destination", zap.Int("streams", len(inos)))
	}
	return inos
}

func (m *source) finished() bool { return m.state == srcEnd }

func (m *source) emit() {
	if m.p.Progress == nil {
		return
	}
	var pages int64
	if m.relay != nil {
		pages = m.relay.Sent()
	}
	files := m.fileBytes
	if m.images != nil {
		files = m.images.sent
	}
	b := pages + files
	if m.rounds != nil {
		b += m.rounds.bytes // sent ahead while it ran
	}
	m.s.bytes.Store(b)
	var locked int64
	if !m.tDump.IsZero() {
		until := time.Now()
		if !m.tResumed.IsZero() {
			until = m.tResumed
		}
		locked = until.Sub(m.tDump).Milliseconds()
	}
	m.p.Progress(api.Event{Event: api.EventProgress, ID: m.s.ID.String(), Phase: m.ph.name, Bytes: b,
		Pages: pages / pageSize, MemBytes: m.memBytes, ElapsedMS: time.Since(m.t0).Milliseconds(),
		Network: m.network(locked)})
}

func (m *source) onRPC(msg wire.Message) error {
	if m.onSync(msg) {
		return nil
	}
	switch msg := msg.(type) {
	case *wire.Ping:
		return m.rpc.Send(&wire.Pong{Seq: msg.Seq})
	case *wire.Pong:
		return nil
	case *wire.Fail:
		code := api.Code(msg.Code)
		if code == "" {
			code = api.CodeAborted
		}
		err := api.Errorf(code, "destination: %s", msg.Message)
		if m.state == srcCommit {
			// The destination answered the commit with a refusal: it
			// decided, and it will not commit. The tree is ours again.
			m.rollbackStopped(err)
			return nil
		}
		m.abort(err)
		return nil
	case *wire.ProbeAck:
		if m.state != srcPrepare || m.prepare == nil {
			break
		}
		return m.probed(msg.Bytes)
	case *wire.Ready:
		if m.state != srcPrepare || m.prepare != nil {
			break
		}
		m.mode = msg.Mode
		if m.mode == "" {
			m.mode = api.ModeCopy // a destination from before modes
		}
		if (m.p.Mode != api.ModeAuto && m.p.Mode != "" && m.mode != m.p.Mode) || !m.p.AsSource.Can(m.mode) {
			m.abort(api.Errorf(api.CodePrecondition, "the destination chose mode %q, which is not what was asked (%s) or this host cannot run it; upgrade phauld there, or use --mode copy", m.mode, m.p.Mode))
			return nil
		}
		if len(msg.Veths) != len(m.net.Veths) {
			m.abort(api.Errorf(api.CodePrecondition, "the process's network namespace has %d veths to this host, and the destination would make %d: its phauld does not move network namespaces; upgrade it", len(m.net.Veths), len(msg.Veths)))
			return nil
		}
		m.destVeths = msg.Veths
		if want := m.compress(); want != "" {
			if msg.Compress != want {
				m.abort(api.Errorf(api.CodePrecondition, "the destination's phauld cannot decompress %s (it predates --compress): upgrade it, or migrate with --compress none", want))
				return nil
			}
			codec, err := transport.NewCodec()
			if err != nil {
				return err
			}
			m.codec = codec
		}
		m.log = m.log.With(zap.String("mode", m.mode))
		m.ph.log = m.log
		m.precopyCap = msg.PrecopyCap
		m.precopyZ = m.codec != nil && msg.PrecopyCompress
		m.log.Info("destination ready", zap.Int("dest_criu", msg.CRIUVersion), zap.String("cpu_check", msg.CPUCheck), zap.Bool("rootfs_sync", msg.Sync))
		if msg.Sync && m.p.Container != nil {
			// Its storage is not shared: the rootfs goes first, while
			// the container runs.
			m.needSync = true
			m.ph.enter("sync")
			return m.startSync(1, func(st SyncStats, err error) {
				m.syncStats[0] = st
				if err != nil {
					m.abort(api.Errorf(api.CodePrecondition, "sync the root filesystem (while it runs): %v", err))
					return
				}
				m.log.Info("root filesystem synced while it runs", zap.Int64("bytes", st.Bytes), zap.Duration("took", st.Took))
				if m.state != srcPrepare {
					return
				}
				// Then its memory, in pre-copy mode, while it still runs.
				start := m.startDumpWhenFree
				if m.mode == api.ModePrecopy {
					start = m.startPrecopy
				}
				if err := start(); err != nil {
					m.abort(err)
				}
			})
		}
		if m.mode == api.ModePrecopy {
			return m.startPrecopy()
		}
		return m.startDumpWhenFree()
	case *wire.Restored:
		if m.state != srcRestore {
			break
		}
		m.destPID, m.destNewPidNS = msg.PID, msg.NewPidNS
		m.restore = msg.Stats
		m.log.Info("destination restored the tree, stopped", zap.Int("dest_pid", msg.PID))
		if m.mode == api.ModeLazy {
			// Let it run there; its memory follows. Not the commit: until
			// every page is in and Commit is sent, a failure discards that
			// copy and this one resumes.
			m.state = srcLazy
			m.ph.enter("lazy")
			return m.rpc.Send(&wire.Resume{})
		}
		// Release the tree from CRIU: it stays stopped, and from now on
		// its fate is phauld's to decide, after the destination's commit.
		m.state = srcRelease
		m.released = true
		m.ph.enter("commit")
		return m.answerPostDump(true)
	case *wire.Resumed:
		if m.state != srcLazy {
			break
		}
		m.tResumed = time.Now()
		m.log.Info("the tree runs on the destination; its memory follows", zap.Int("dest_pid", msg.PID))
		return nil
	case *wire.PagesIn:
		if m.state != srcLazy || m.pagesIn {
			break
		}
		m.pagesIn, m.lazyPages, m.fetchedAhead, m.tPagesIn = true, msg.Pages, msg.FetchedAhead, time.Now()
		m.log.Info("every page is in at the destination", zap.Uint64("lazy_pages", msg.Pages), zap.Uint64("fetched_ahead", msg.FetchedAhead))
		return m.askLazyCommit()
	case *wire.Committed:
		if m.state != srcCommit {
			break
		}
		m.tCommitted = time.Now()
		m.destPID, m.destNotRunning = msg.PID, msg.NotRunning
		if msg.NotRunning != "" {
			m.log.Error("committed, but the destination did not see the process running there", zap.String("why", msg.NotRunning))
		}
		m.finishCommitted()
		return nil
	}
	return protocolErr("unexpected %s in state %s", msg.Type(), m.state)
}

// startDumpWhenFree starts the dump once no other dump works in the
// tree's directories (see dumpGate).
func (m *source) startDumpWhenFree() error {
	if m.state != srcPrepare {
		return nil
	}
	locks, ok, err := m.p.Gate.TryAcquire(dumplock.Keys(m.p.Proc.PID))
	if err != nil {
		return err
	}
	if !ok {
		if m.ph.name != "waiting" {
			m.log.Info("waiting for another dump in the same directory")
			m.ph.enter("waiting")
		}
		m.waiting = m.s.l.After(20*time.Millisecond, func() {
			if err := m.startDumpWhenFree(); err != nil {
				m.abort(err)
			}
		})
		return nil
	}
	m.gateLocks = locks
	return m.startDump()
}

// openGate lets other dumps in the tree's directories go on: once CRIU is
// past the tasks' parasites.
func (m *source) openGate() {
	m.gateLocks.Release()
	m.gateLocks = nil
}

func (m *source) startDump() error {
	// The record goes first: a daemon restarting after a crash must know
	// a tree may be frozen, and which of its tasks job control stopped
	// (should the images not say).
	m.rec.State, m.rec.Stopped = store.Dumping, proc.JobStopped(m.p.Proc.PID)
	m.stopped = map[int]bool{} // until the images say
	for _, p := range m.rec.Stopped {
		m.stopped[p] = true
	}
	if err := m.rec.Save(m.p.Dir); err != nil {
		return err
	}
	lazy := m.mode == api.ModeLazy
	// A lazy dump's socket is TCP, so that a failure can reset it.
	theirs, err := m.openRelay(m.s.l, lazy, m.abort)
	if err != nil {
		return err
	}
	// CRIU gets its own copy of the socket at exec; ours closes now.
	defer theirs.Close()
	// A container's lazy dump listens itself (runc gives CRIU a port,
	// not a socket), and then waits, after lazy-pages' close command,
	// for the end of the stream: it must get it. (A stream cut short
	// still fails there: the close command never came.)
	m.relay.HoldEOF = lazy && m.p.Container == nil
	if m.rounds != nil {
		// Only what changed since it was sent ahead crosses now.
		m.relay.DiffAgainst(m.rounds.sent)
	}
	m.ph.enter("dump")
	m.tDump = time.Now()
	opts := criu.Options{
		ImagesDir:    m.p.Dir,
		LogFile:      "dump.log",
		PID:          m.p.Proc.PID,
		EnterPidNS:   m.enterNS,
		LeaveStopped: true,
		Notify:       true,
		PageServer:   theirs,
		LazyPages:    lazy,
		// Files the tree holds open that were deleted travel in the
		// images, as large as CRIU allows (it counts allocated size).
		GhostLimit: math.MaxUint32,
		Network:    m.net.Own,
		FileLocks:  true,
	}
	if m.enterNS > 0 {
		opts.PID = m.nsPID
	}
	for _, ino := range m.journal {
		opts.ExtUnixSk = true
		opts.External = append(opts.External, fmt.Sprintf("unix[%d]", ino))
	}
	if len(m.unixPeers) > 0 {
		opts.ExtUnixSk = true // datagram peers: connected again by path
	}
	opts.ShellJob = m.shellJob
	// Its terminals stay here: the destination gives it new ones.
	opts.External = append(opts.External, m.ttys...)
	op, err := m.p.CRIU.StartDump(opts)
	if err != nil {
		return api.Errorf(api.CodeAborted, "start criu dump: %v", err)
	}
	m.state = srcDump
	m.dump, err = watchCRIU(m.s.l, op, m.p.Dir, m.log, 1, m.onDump, m.abort)
	if err != nil {
		op.Close()
		return err
	}
	m.tickProgress()
	return nil
}

func (m *source) tickProgress() {
	m.emit()
	if m.state == srcDump || m.state == srcImages || m.state == srcRestore || m.state == srcLazy ||
		(m.state == srcPrepare && m.rounds != nil && !m.rounds.done) {
		m.progressTimer = m.s.l.After(250*time.Millisecond, m.tickProgress)
	}
}

func (m *source) onDump(ev criu.Event) error {
	if ev.Notify == "post-dump" || ev.Notify == "" {
		m.openGate()
	}
	if ev.Notify != "" {
		switch {
		case m.state == srcAbort && ev.Notify == "post-dump":
			// Say no at the first chance: CRIU resumes the tree.
			return m.answerPostDump(false)
		case m.state == srcAbort:
			return m.dump.op.Reply(false)
		case ev.Notify == FrozenNotify && m.state == srcDump:
			// Frozen, nothing written to the page stream yet.
			if err := m.checkFrozen(); err != nil {
				m.abort(err)
				return m.dump.op.Reply(false)
			}
			return m.dump.op.Reply(true)
		case ev.Notify == "post-dump" && m.state == srcDump:
			// Frozen and dumped (but for the lazy memory, in lazy mode);
			// CRIU now waits for our word. The images go first.
			if err := m.checkFrozen(); err != nil {
				// No FrozenNotify came (a CRIU older than 3.19): in
				// copy mode pages went already, but no image has.
				m.abort(err)
				return m.answerPostDump(false)
			}
			if err := m.frozen(); err != nil {
				return err
			}
			return m.shipImages()
		default:
			return m.dump.op.Reply(true)
		}
	}
	// CRIU's final response.
	if m.mode == api.ModeLazy && (m.state == srcRestore || m.state == srcLazy) {
		return m.onLazyServed(ev.Err)
	}
	switch m.state {
	case srcRelease:
		if ev.Err != nil {
			// CRIU failed after post-dump and resumed the tree itself.
			m.released = false
			m.abort(api.Errorf(api.CodeAborted, "dump: %v", ev.Err))
			return nil
		}
		m.readDumpStats()
		tree, err := proc.OpenTree(m.p.Proc.PID, m.p.Proc.StartTime)
		if err != nil {
			m.abort(api.Errorf(api.CodeAborted, "source tree after dump: %v", err))
			return nil
		}
		m.tree = tree
		// Recorded before it is sent: after a crash, a daemon that finds
		// commit-sent must ask the destination; one that does not may
		// resume the tree, since the destination can only commit on a
		// Commit it received.
		m.rec.State = store.CommitSent
		if err := m.rec.Save(m.p.Dir); err != nil {
			m.abort(err)
			return nil
		}
		m.state = srcCommit
		return m.rpc.Send(&wire.Commit{})
	case srcAbort:
		if m.mode == api.ModeLazy && ev.Err == nil {
			// The page server finished before the reset reached it: CRIU
			// left the tree stopped, and it is ours to resume.
			m.released = true
		}
		m.end()
		return nil
	default:
		// A response before post-dump: the dump failed and CRIU resumed
		// the tree.
		err := ev.Err
		if err == nil {
			err = errors.New("criu ended the dump without a post-dump notification")
		}
		m.state = srcAbort
		m.failure = api.Errorf(api.CodeAborted, "dump: %v", err)
		m.tellPeer(m.failure)
		m.end()
		return nil
	}
}

// checkFrozen asks CheckFrozen, once, about the frozen tree.
func (m *source) checkFrozen() error {
	if m.frozenChecked || m.p.CheckFrozen == nil {
		return nil
	}
	if err := m.p.CheckFrozen(m.p.Proc); err != nil {
		e := api.AsError(err)
		m.log.Warn("the frozen tree is refused", zap.Error(err))
		return api.Errorf(e.Code, "%s; nothing of the tree was sent to the destination", e.Message)
	}
	m.frozenChecked = true
	m.log.Info("the frozen tree is still the caller's")
	return nil
}

// frozen takes what the frozen, dumped tree tells: that it is still the
// process that was checked (a pid that was reused since is refused here,
// before anything of it leaves), and which of its tasks job control had
// stopped, which stay so wherever the tree ends up.
func (m *source) frozen() error {
	info, err := proc.Stat(m.p.Proc.PID)
	if err != nil || info.StartTime != m.p.Proc.StartTime {
		return api.Errorf(api.CodeAborted, "pid %d is not the process that was checked any more: it exited, and its pid was reused", m.p.Proc.PID)
	}
	stopped, err := m.p.CRIU.Stopped(m.p.Dir)
	if err != nil {
		m.log.Warn("cannot tell from the images which tasks job control had stopped; going by what /proc said before the dump", zap.Error(err))
	}
	if err == nil && stopped != nil {
		m.stopped = stopped
	}
	if len(m.stopped) > 0 {
		m.log.Info("tasks stopped by job control stay stopped", zap.Int("tasks", len(m.stopped)))
	}
	if m.net.Own {
		m.countConnections()
	}
	return nil
}

// countConnections counts again, off the loop, the frozen tree's TCP
// connections and those not yet accepted: the figures the result gives
// are then those of the freeze (what CRIU carried and what it left
// behind), not of the checks before it.
func (m *source) countConnections() {
	pid := m.p.Proc.PID
	var connected, inFlight int
	var err error
	m.s.work(func() {
		var pids []int
		if pids, err = proc.Tree(pid); err == nil {
			connected, inFlight, err = network.CountTCP(pids)
		}
	}, func() {
		if err != nil {
			m.log.Warn("cannot count the frozen tree's connections; the result gives those of the checks", zap.Error(err))
			return
		}
		if connected != m.net.Connected || inFlight != m.net.InFlight {
			m.log.Info("connections at the freeze", zap.Int("tcp_connections", connected), zap.Int("tcp_in_flight", inFlight),
				zap.Int("at_the_checks", m.net.Connected), zap.Int("in_flight_at_the_checks", m.net.InFlight))
		}
		m.net.Connected, m.net.InFlight = connected, inFlight
	})
}

// onLazyServed takes the end of a lazy dump: CRIU has served the pages
// (the tree is left stopped here) or failed (it resumed the tree itself).
func (m *source) onLazyServed(err error) error {
	if err != nil {
		m.abort(api.Errorf(api.CodeAborted, "serving pages to the destination: %v", err))
		return nil
	}
	tree, terr := proc.OpenTree(m.p.Proc.PID, m.p.Proc.StartTime)
	if terr != nil {
		m.abort(api.Errorf(api.CodeAborted, "source tree after the lazy dump: %v", terr))
		return nil
	}
	proc.CloseAll(m.tree) // holdStopped's handles, if it took any
	m.served, m.released, m.tree = true, true, tree
	m.log.Info("every page served; the tree is stopped here")
	return m.askLazyCommit()
}

// askLazyCommit asks the commit of a lazy migration once both sides are
// through: CRIU served every page (the tree is stopped here, and stays so)
// and the destination has them all.
func (m *source) askLazyCommit() error {
	if !m.served || !m.pagesIn || m.state != srcLazy {
		return nil
	}
	m.rec.State = store.CommitSent
	if err := m.rec.Save(m.p.Dir); err != nil {
		return err
	}
	m.state = srcCommit
	m.ph.enter("commit")
	return m.rpc.Send(&wire.Commit{})
}

func (m *source) readDumpStats() {
	st, err := criu.ReadDumpStats(m.p.Dir)
	if err != nil {
		m.log.Warn("no dump statistics", zap.Error(err))
		return
	}
	m.dumpStats = &st
}

// shipImages streams the non-page images to the destination, while the
// tree stays frozen, and then asks it to restore. A lazy dump is told to
// go on once they are sent: saying yes then commits nothing (a lazy dump
// resumes the tree if serving its pages fails), and lets CRIU serve the
// rest.
func (m *source) shipImages() error {
	m.ph.enter("images")
	names, err := imageFiles(m.p.Dir)
	if err != nil {
		return fmt.Errorf("list images: %w", err)
	}
	m.state = srcImages
	m.images = newSender(m.rpc, m.p.Dir, names, func(err error) {
		m.fileBytes, m.fileWire = m.images.sent, m.images.wire
		if err != nil {
			m.abort(api.Errorf(api.CodeAborted, "send images: %v", err))
			return
		}
		if m.state != srcImages {
			return // aborted meanwhile
		}
		restore := func() {
			m.state = srcRestore
			m.ph.enter("restore")
			if err := m.rpc.Send(&wire.Restore{Files: len(names)}); err != nil {
				m.abort(err)
				return
			}
			if m.mode == api.ModeLazy {
				m.holdStopped()
				if err := m.answerPostDump(true); err != nil {
					m.abort(err)
				}
			}
		}
		if !m.needSync {
			restore()
			return
		}
		// The rootfs's last changes, while the container is frozen.
		m.ph.enter("sync-frozen")
		if err := m.startSync(2, func(st SyncStats, err error) {
			m.syncStats[1] = st
			if err != nil {
				m.abort(api.Errorf(api.CodeAborted, "sync the root filesystem (frozen): %v", err))
				return
			}
			m.log.Info("root filesystem synced while frozen", zap.Int64("bytes", st.Bytes), zap.Duration("took", st.Took))
			if m.state == srcImages {
				restore()
			}
		}); err != nil {
			m.abort(api.Errorf(api.CodeAborted, "sync the root filesystem (frozen): %v", err))
		}
	})
	m.images.codec = m.codec
	m.images.start()
	return nil
}

// holdStopped queues a SIGSTOP for every task of a frozen tree that moves
// its network namespace, before a lazy dump is told to serve its pages. A
// lazy dump that fails then (a reset, a lost destination, this daemon's
// death) lets the tree run at once with its TCP sockets still in repair
// mode and its namespace locked (seen with CRIU 4.2.1), where a server
// reads EPERM from a client's socket and closes it. With the SIGSTOP
// waiting, the tree stops as soon as CRIU lets go; whoever resumes it
// (this session's rollback, or a restarted phauld's recovery) gives its
// network back first (ResumeTree). A dump that succeeds leaves it stopped
// anyway.
func (m *source) holdStopped() {
	if !m.net.Own {
		return
	}
	tree, err := proc.OpenTree(m.p.Proc.PID, m.p.Proc.StartTime)
	if err != nil {
		m.log.Warn("cannot hold the frozen tree stopped for a rollback", zap.Error(err))
		return
	}
	proc.SignalAll(tree, syscall.SIGSTOP)
	m.tree, m.released = tree, true
}

func (m *source) onConnClose(err error) {
	if m.state == srcEnd {
		return
	}
	// A destination that aborts sends Fail on rpc, then closes both
	// connections; closing mem with pages unread resets it, which may be
	// seen first. Its Fail says why: read it before taking the loss.
	m.readRPC()
	if m.state == srcEnd {
		return
	}
	if errors.Is(err, io.EOF) {
		err = errors.New("destination closed the connection")
	}
	m.abort(api.Errorf(api.CodeAborted, "connection to destination lost: %v", err))
}

// readRPC reads what has arrived on the rpc connection, if it is open.
func (m *source) readRPC() {
	if !m.rpc.Closed() {
		m.rpc.Read()
	}
}

func (m *source) onSilent(quiet time.Duration) {
	m.abort(api.Errorf(api.CodeAborted, "the destination stopped answering: no answer to its pings and no data for %v", quiet.Round(time.Second)))
}

// onStalled takes a phase that made no progress within its deadline:
// the migration is aborted by the commit rule (a frozen tree resumes;
// after the commit was asked, it stays stopped until the destination
// says).
func (m *source) onStalled(phase string, waited time.Duration) {
	m.log.Warn("phase made no progress within its deadline", zap.String("phase", phase), zap.Duration("waited", waited))
	m.abort(stalledError(phase, waited, "destination"))
}

// abort rolls the migration back as the commit rule says for the current
// state. Before the commit is asked the tree is resumed on this host; once
// it is asked the outcome is the destination's, and the tree stays stopped
// until it is known. Telling the destination may fail and call abort
// again: the state is srcAbort before that, so the inner call returns and
// CRIU is answered once.
func (m *source) abort(err error) {
	if m.failure == nil {
		m.failure = err
	}
	m.stopSync()
	if m.rounds != nil {
		m.rounds.stop()
	}
	switch m.state {
	case srcEnd, srcAbort, srcResume, srcKill:
		return
	case srcPrepare:
		m.state = srcAbort
		m.waiting.Cancel()
		m.tellPeer(err)
		m.end()
	case srcDump:
		m.log.Warn("rolling back: aborting the dump")
		m.state = srcAbort
		m.tellPeer(err)
		// CRIU fails writing pages, or answers "no" at post-dump.
		if m.relay != nil {
			m.relay.Close()
		}
		m.waitCRIU()
	case srcImages:
		// Frozen at post-dump, images on their way: CRIU waits for our
		// word, and "no" resumes the tree.
		m.log.Warn("rolling back: telling CRIU to resume the tree")
		m.images.stop()
		m.state = srcAbort
		m.tellPeer(err)
		if rerr := m.answerPostDump(false); rerr != nil {
			// The swrk socket is gone: CRIU resumes on its own.
			m.end()
			return
		}
		m.waitCRIU()
	case srcRestore, srcLazy:
		if m.mode == api.ModeLazy {
			m.state = srcAbort
			m.tellPeer(err)
			if m.served || m.dump.done {
				m.log.Warn("rolling back: resuming the stopped tree")
				m.end()
				return
			}
			// CRIU is serving pages: a reset makes it stop, fail, and
			// resume the tree; its response then ends the rollback.
			m.log.Warn("rolling back: stopping CRIU's page server, which resumes the tree")
			m.relay.Close()
			return
		}
		m.log.Warn("rolling back: telling CRIU to resume the tree")
		m.state = srcAbort
		m.tellPeer(err)
		if m.dump.done {
			m.end()
			return
		}
		if rerr := m.answerPostDump(false); rerr != nil {
			// The swrk socket is gone: CRIU resumes on its own.
			m.end()
			return
		}
		m.waitCRIU()
	case srcRelease:
		m.log.Warn("rolling back: resuming the stopped tree")
		m.state = srcAbort
		m.tellPeer(err)
		m.waitCRIU()
	case srcCommit:
		m.inDoubt = true
		m.failure = api.Errorf(api.CodeInDoubt,
			"%v, after the commit was asked: the process is held stopped here (pid %d) until the destination says whether it committed",
			err, m.p.Proc.PID)
		m.log.Error("migration in doubt: the source tree stays stopped until the destination answers")
		m.state = srcEnd
	}
}

// answerPostDump answers CRIU's post-dump notification, once: true leaves
// the tree stopped when the dump ends (lazy: serves the pages first);
// false makes CRIU resume it. A second answer would be read by CRIU as
// something else, so later calls do nothing.
func (m *source) answerPostDump(ok bool) error {
	if m.postDumpAnswered {
		return nil
	}
	m.postDumpAnswered = true
	return m.dump.op.Reply(ok)
}

// waitCRIU ends the abort once CRIU has answered, or right away if it
// already has.
func (m *source) waitCRIU() {
	if m.dump == nil || m.dump.done {
		m.end()
	}
}

// tellPeer sends Fail to the destination if the rpc connection is up.
func (m *source) tellPeer(err error) {
	if m.rpc.Closed() {
		return
	}
	e := api.AsError(err)
	m.rpc.Send(&wire.Fail{Code: string(e.Code), Message: e.Message})
}

// rollbackStopped resumes a tree CRIU left stopped, after the destination
// refused the commit.
func (m *source) rollbackStopped(err error) {
	if m.failure == nil {
		m.failure = err
	}
	m.log.Warn("destination refused the commit: resuming the stopped tree")
	m.end()
}

// end finishes an aborted migration: the tree must run here again. If
// CRIU left it stopped, it is resumed; either way it is seen running
// before anything says so. That waits, so it happens off the loop.
func (m *source) end() {
	switch m.state {
	case srcResume, srcKill, srcEnd:
		return
	}
	if m.tDump.IsZero() {
		// Nothing was touched: the process runs as it did (stopped
		// tasks included), and nothing here says otherwise.
		m.ended(nil)
		return
	}
	m.state = srcResume
	tree, released := m.tree, m.released
	var err error
	m.s.work(func() { err = m.resume(tree, released) }, func() { m.ended(err) })
}

// resume resumes the tree if CRIU left it stopped (released), and sees it
// run. It may block: it runs off the loop, or at the very end.
func (m *source) resume(tree []*proc.Process, released bool) error {
	pid, start := m.p.Proc.PID, m.p.Proc.StartTime
	if released && m.p.Container != nil {
		// Left paused by the dump: thawed first, then resumed as any
		// tree (its network given back). A lazy dump that failed has
		// thawed it already.
		if err := m.p.Container.Runc.ResumeIfPaused(context.Background(), m.p.Container.ID); err != nil {
			return fmt.Errorf("runc resume %s: %w", m.p.Container.ID, err)
		}
	}
	if released {
		if tree == nil {
			t, err := proc.OpenTree(pid, start)
			if err != nil {
				return fmt.Errorf("cannot find the tree to resume it: %w", err)
			}
			defer proc.CloseAll(t)
			tree = t
		}
		if err := ResumeTree(m.log, tree, m.stopped); err != nil {
			return err
		}
	} else if m.net.Own {
		if err := ReclaimNetwork(m.log, pid); err != nil {
			m.log.Error("cannot give the resumed tree its network back", zap.Error(err))
		}
	}
	return proc.VerifyRunning(pid, start, m.stopped)
}

// ended records the rollback and says what it left: the process running
// here (seen so), or, if it could not be seen running, what to do.
func (m *source) ended(resumeErr error) {
	m.state = srcEnd
	if m.rec.State != "" {
		m.rec.State, m.rec.Error = store.Aborted, errString(m.failure)
		if err := m.rec.Save(m.p.Dir); err != nil {
			m.log.Error("cannot record the rollback", zap.Error(err))
		}
	}
	e := api.AsError(m.failure)
	if resumeErr != nil {
		m.log.Error("rolled back, but the process was not seen running here", zap.Error(resumeErr))
		m.failure = api.Errorf(api.CodeInDoubt,
			"migration failed, and the process was not seen running here afterwards (pid %d: %v); if it is stopped, resume it with kill -CONT on it and its children: %s",
			m.p.Proc.PID, resumeErr, e.Message)
		m.failure.(*api.Error).Cause = e.Message
		return
	}
	if !m.tDump.IsZero() {
		// Touched and resumed: a rollback (phaulctl's exit 3), whatever
		// the reason's own code (a limit the destination found in the
		// images, an internal error).
		code := api.CodeAborted
		if e.Code == api.CodeCanceled {
			code = e.Code
		}
		f := api.Errorf(code, "migration failed; the process was resumed here (pid %d): %s", m.p.Proc.PID, e.Message)
		f.Cause = e.Message
		m.failure = f
		m.log.Info("rolled back: the process runs on the source")
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// finishCommitted ends a committed migration: the destination recorded the
// commit and its copy runs, so the stopped copy here must go.
func (m *source) finishCommitted() {
	m.rec.State = store.Committed
	if err := m.rec.Save(m.p.Dir); err != nil {
		// Not fatal: after a crash the record says commit-sent, and the
		// destination will say it committed.
		m.log.Error("cannot record the commit", zap.Error(err))
	}
	m.state = srcKill
	tree := m.tree
	var err error
	var gone []string
	var goneErr error
	pid, own, veths := m.p.Proc.PID, m.net.Own, m.net.Veths
	m.s.work(func() {
		// Its interfaces first: the namespace outlives the tree for a
		// while, and must not answer for the address meanwhile.
		if own {
			gone, goneErr = network.RemoveLinks(pid)
		}
		if c := m.p.Container; c != nil {
			// runc kills a paused container's processes (thawing them)
			// and forgets it; a bundle phaul made for it goes too.
			if err = c.Runc.Delete(context.Background(), c.ID, true); err == nil && c.OwnBundle {
				os.RemoveAll(c.Bundle)
			}
		} else {
			err = proc.KillTree(tree)
		}
		ends, endsErr := network.RemoveHostEnds(veths)
		gone, goneErr = append(gone, ends...), errors.Join(goneErr, endsErr)
	}, func() {
		if err != nil {
			m.log.Error("cannot kill the source tree", zap.Error(err))
		}
		if goneErr != nil {
			m.log.Error("cannot remove what is left of the namespace here", zap.Error(goneErr))
		} else if len(gone) > 0 {
			m.log.Info("removed the namespace's interfaces here", zap.Strings("interfaces", gone))
		}
		m.rpc.Send(&wire.Done{})
		m.rec.Done = true
		if err := m.rec.Save(m.p.Dir); err != nil {
			m.log.Error("cannot record the end", zap.Error(err))
		}
		m.ph.enter("done")
		m.state = srcEnd
		m.emit()
	})
}

func (m *source) stop() {
	m.abort(api.Errorf(api.CodeAborted, "phauld is shutting down"))
}

func (m *source) cancel() error {
	switch {
	case m.state == srcEnd || m.state == srcAbort || m.state == srcResume:
		return api.Errorf(api.CodeConflict, "session %s is already ending", m.s.ID)
	case m.state >= srcCommit:
		return api.Errorf(api.CodeConflict,
			"session %s has asked the destination to commit: too late to cancel; it ends as the destination decides", m.s.ID)
	}
	m.log.Info("canceled by the operator")
	m.abort(api.Errorf(api.CodeCanceled, "canceled"))
	return nil
}

func (m *source) cleanup() {
	if m.images != nil {
		m.images.stop()
	}
	m.stopSync()
	if m.rounds != nil {
		m.rounds.stop()
	}
	if m.p.Shared != nil {
		os.Remove(m.p.Shared.Marker)
	}
	m.progressTimer.Cancel()
	m.waiting.Cancel()
	m.hb.stop()
	m.openGate()
	if m.state != srcEnd {
		// A panic mid-way: make the outcome safe. Closing the dump's
		// socket makes CRIU resume a tree it still holds; a tree it left
		// stopped is resumed here; either way it is seen running before
		// the rollback says so.
		if m.dump != nil && !m.released {
			m.dump.stop()
		}
		if m.tCommitted.IsZero() && (m.state < srcCommit || m.state == srcAbort || m.state == srcResume) {
			if m.tDump.IsZero() {
				m.ended(nil)
			} else {
				m.ended(m.resume(m.tree, m.released))
			}
		}
		if !m.tCommitted.IsZero() {
			// Committed: the copy there is the process; the one here
			// must not outlive the session (the kill may not have run).
			if err := proc.KillTree(m.tree); err != nil {
				m.log.Error("cannot kill the source tree", zap.Error(err))
			}
		}
	}
	if m.dump != nil {
		m.dump.stop()
	}
	m.close()
	proc.CloseAll(m.tree)
}

// partial is what the source knows when the outcome is left to a resolver.
func (m *source) result() api.Result {
	r := api.Result{
		ID:         m.s.ID.String(),
		Container:  m.containerID(),
		SourcePID:  m.p.Proc.PID,
		DestPID:    m.destPID,
		NewPidNS:   m.destNewPidNS,
		Name:       m.p.RunName,
		Dest:       m.p.Dest,
		TotalMS:    time.Since(m.t0).Milliseconds(),
		Bytes:      m.bytes(),
		PhasesMS:   m.ph.took,
		Mode:       m.mode,
		NotRunning: m.destNotRunning,
		BWLimit:    m.p.BWLimit,
		Compress:   m.compress(),
		LinkRate:   m.linkRate,
	}
	if !m.tCommitted.IsZero() {
		r.FrozenMS = m.tCommitted.Sub(m.tDump).Milliseconds()
	}
	if m.mode == api.ModeLazy && !m.tResumed.IsZero() {
		// Frozen until it ran again on the destination, not until the
		// last page arrived.
		r.FrozenMS = m.tResumed.Sub(m.tDump).Milliseconds()
		if !m.tPagesIn.IsZero() {
			r.LazyMS = max(0, m.tPagesIn.Sub(m.tResumed).Milliseconds())
			r.FetchedAhead = m.fetchedAhead
		}
		// CRIU 4.2's stats-dump of a lazy dump is zeroed when its page
		// server starts: the pages are counted from what is known, and
		// CRIU's dump times are not reported.
		r.Dump = &api.DumpStats{FrozenUS: uint32(min(r.FrozenMS*1000, 1<<32-1)), PagesLazy: m.lazyPages}
		if m.restore != nil {
			r.Dump.PagesWritten = m.restore.PagesRestored
		}
	}
	if m.relay != nil {
		r.PageBytes = m.relay.Sent()
		if m.codec != nil || m.relay.Diff != nil {
			r.PageWireBytes = m.relay.SentWire()
		}
	}
	if m.codec != nil {
		r.FileBytes, r.FileWireBytes = m.fileBytes, m.fileWire
	}
	if m.dumpStats != nil {
		r.Dump = m.dumpStats
	}
	r.Restore = m.restore
	r.Precopy = m.precopyResult()
	r.Network = m.network(r.FrozenMS)
	if m.needSync {
		r.Rootfs = &api.RootfsSync{Bytes: m.syncStats[0].Bytes, MS: m.syncStats[0].Took.Milliseconds(),
			FrozenBytes: m.syncStats[1].Bytes, FrozenMS: m.syncStats[1].Took.Milliseconds()}
	}
	return r
}

// network says what moves of the tree's network namespace (nil: it runs
// in its host's), locked lockedMS so far; the veths once the destination
// made them.
func (m *source) network(lockedMS int64) *api.Network {
	if !m.net.Own {
		return nil
	}
	n := &api.Network{Interfaces: m.net.Interfaces, Addresses: m.net.Addresses,
		TCPConnections: m.net.Connected, TCPInFlight: m.net.InFlight, LockedMS: lockedMS}
	for _, v := range m.destVeths {
		n.Veths = append(n.Veths, api.Veth(v))
	}
	for _, v := range m.net.Macvlans {
		n.Macvlans = append(n.Macvlans, api.Macvlan(v))
	}
	return n
}

func (m *source) outcome() End {
	e := End{Result: m.result(), Record: *m.rec}
	switch {
	case !m.tCommitted.IsZero():
		e.Outcome = api.OutcomeCommitted
	case m.inDoubt || m.state == srcCommit:
		// Asked, and not answered: only the destination can say.
		e.Outcome, e.Err = api.OutcomeInDoubt, m.failure
	default:
		e.Outcome, e.Err = api.OutcomeRolledBack, m.failure
	}
	return e
}

func (m *source) crash() {
	if m.images != nil {
		m.images.stop()
	}
	m.gateLocks.Release()
	m.gateLocks = nil
	if m.dump != nil {
		m.dump.stop()
	}
	if m.relay != nil {
		m.relay.Close() // a reset, as the kernel's close of it is
	}
	m.rpc.Close()
	m.mem.Close()
	if m.s.pending == 0 { // else work off the loop still holds them
		proc.CloseAll(m.tree)
	}
	m.tree = nil
}

func (m *source) containerID() string {
	if m.p.Container == nil {
		return ""
	}
	return m.p.Container.ID
}
