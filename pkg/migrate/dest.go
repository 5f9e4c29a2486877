//go:build linux

package migrate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/epoll"
	"github.com/phaul/phaul/pkg/journal"
	"github.com/phaul/phaul/pkg/network"
	"github.com/phaul/phaul/pkg/pagestream"
	"github.com/phaul/phaul/pkg/pidns"
	"github.com/phaul/phaul/pkg/precopy"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/pty"
	"github.com/phaul/phaul/pkg/runc"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// dstState is where the destination is in a migration.
type dstState int

const (
	// dstPrepare: waiting for Prepare.
	dstPrepare dstState = iota
	// dstChecks: CRIU's cpuinfo check is running.
	dstChecks
	// dstPageServer: the page server is starting.
	dstPageServer
	// dstReceive: pages and images are arriving; waiting for Restore.
	dstReceive
	// dstRestore: CRIU is restoring.
	dstRestore
	// dstRestored: the tree is restored, stopped; waiting for Commit
	// (or, lazy, Resume).
	dstRestored
	// dstResumed: a lazy migration's tree runs here while its memory
	// arrives; waiting for every page, then for Commit.
	dstResumed
	// dstCommitted: committed and resumed; waiting for Done.
	dstCommitted
	// dstEnd: finished.
	dstEnd
)

var dstStateNames = [...]string{"prepare", "checks", "page-server", "receive", "restore", "restored", "resumed", "committed", "end"}

func (s dstState) String() string { return dstStateNames[s] }

// DestConfig is what a destination session needs to know.
type DestConfig struct {
	ID wire.SessionID
	// Peer is the source's address.
	Peer string
	Log  *zap.Logger
	// CRIU runs the checks, page server, lazy-pages and restore; Info is
	// what probing it found.
	CRIU CRIU
	Info criu.Info
	// Dir is the session's directory: its record, images and CRIU logs.
	Dir         string
	PeerTimeout time.Duration
	// PrecopyCap bounds what a pre-copy migration sends ahead (0: only
	// the disk limits do).
	PrecopyCap int64
	// FetchAhead bounds what a lazy migration's relay fetches ahead of
	// CRIU's lazy-pages (0: it does not; see pagestream.Fetcher).
	FetchAhead int64
	// PhaseTimeout is each phase's progress deadline (0: none): a phase
	// that neither advances nor moves a byte for that long aborts the
	// migration by the commit rule.
	PhaseTimeout time.Duration
	// Limits are the daemon's limits its destination sessions share
	// (nil: none).
	Limits *Limits
	// Refuse, if set, refuses the migration at its Prepare with this
	// error (a daemon at its limit of sessions): the source hears it.
	Refuse error
	// KeepImages keeps the images after the commit.
	KeepImages bool
	// Place, if set, moves the restored tree (its pids) out of the
	// daemon's cgroup before it runs. It must return by ctx's deadline.
	Place func(ctx context.Context, pids []int) error
	// Guard, if set, starts the dead man's switch of a restored copy
	// (see Guard): from the restore until the commit, it kills the copy
	// if this daemon dies.
	Guard func(dir string, pid int, start uint64) (Guard, error)
	// Hold, if set, reserves the restored tree's pids for this session
	// until it ends, so that no migration takes the copy before it is
	// settled here.
	Hold func(pids []int) error
	// BridgeMap renames bridges: a veth whose host end was on bridge SRC
	// on the source is put on BridgeMap[SRC] here (else on SRC).
	BridgeMap map[string]string
	AsDest    Capabilities
	CPUChecks *CPUChecks
	// Runc runs arriving containers (nil: none are taken);
	// ContainersDir receives their bundles; HookExe is phauld's binary,
	// which CRIU runs as a container restore's action script.
	Runc          *runc.Runc
	ContainersDir string
	HookExe       string
	// SharedPaths are where the operator says storage is shared with
	// the sources (phauld --shared-path): a container's rootfs there is
	// not copied.
	SharedPaths []string
	// NameFree, if set, refuses a name (of a process phaulctl run
	// started) that a process here has.
	NameFree func(name string) error
}

// dest is the state machine of the daemon a process arrives at. It is the
// side that decides the commit: see docs/design.md.
type dest struct {
	s   *Session
	p   DestConfig
	log *zap.Logger
	rec *store.Record

	conns
	// store holds a pre-copy migration's pages sent ahead, seeded by
	// precopySeed, until its page server has written them.
	store       *precopy.Store
	precopySeed uint64
	// probeBytes counts a link probe before Prepare (see onProbe).
	probeBytes int64
	ph         *phaseTimer
	state      dstState
	// netw is the tree's network namespace as the source found it (nil:
	// it stays in its host's); veths are its veths as made here.
	netw      *wire.Network
	veths     []wire.Veth
	netLocked bool // phaul's lock is on the restored namespace
	// treeNS is the restored namespace, from CRIU's setup-namespaces on
	// (-1 before): a discard empties it of interfaces, processes or no.
	treeNS netns.NsHandle
	hb     *heartbeat
	// container is the runc container arriving (nil: a process tree);
	// bundleMade says its bundle directory is this session's to remove
	// on a discard.
	container  *Container
	bundleMade bool
	// syncDir is where the container's rootfs is synced to (empty: its
	// storage is shared); syncer the pass in progress.
	syncDir string
	syncer  *destSync

	srcPID   int
	cpuInfo  []byte // the source's cpuinfo image
	check    *criuWatch
	ps       *criuWatch
	psDone   bool
	recv     receiver
	want     int // files the source said it sent; -1 until Restore
	restoreW *criuWatch
	tRestore time.Time

	pid  int // root of the restored tree
	tree []*proc.Process
	// newPidNS: the tree's pids are taken here, and it is restored into
	// a new pid namespace of its own (pkg/pidns), whose init is nsInit
	// (a host pid); pid and tree are host pids all the same.
	newPidNS bool
	nsInit   int
	// stopped are the tasks job control had stopped when they were
	// dumped (by their pid in their namespace): they stay stopped.
	stopped map[int]bool
	// guard kills the restored copy if this daemon dies before the
	// commit; resuming is set while a lazy copy is being resumed.
	guard    Guard
	resuming bool
	// discarded are the handles of a killed copy, closed at the end.
	discarded []*proc.Process

	name    string // the root process's command name
	runName string // the name it is known by (phaulctl run --name)
	// unixPeers: its datagram sockets are connected to sockets outside
	// it, which CRIU connects them to again here (ext-unix-sk).
	unixPeers bool
	// shellJob: restored as a shell's job, in CRIU's session and group.
	shellJob bool
	journal  []uint64 // its journal stream sockets, to reconnect
	// ttys are the terminals it was on (CRIU keys), each given a new one
	// here; detach says where their output goes (api.Detach*).
	ttys   []string
	detach string

	mode string // the migration's mode, as chosen in prepare

	// caller is who asked for the migration on the source; taskIDs are
	// the tree's pids as its images record them.
	caller  *wire.Caller
	taskIDs []int
	// ttyDevs are the terminals given to the tree here, by device.
	ttyDevs map[uint64]bool

	// Lazy migrations: the lazy-pages daemon, and whether it brought
	// every page in (and how many).
	lazy      LazyPages
	pagesIn   bool
	lazyPages uint64
	// restoreStats are CRIU's, for the result; tResumed and tPagesIn time
	// a lazy migration's lazy phase.
	restoreStats       *api.RestoreStats
	tResumed, tPagesIn time.Time

	failure error
	// disk counts what the session writes under its directory; releasePS
	// gives back its page server's slot.
	disk      disk
	releasePS func()
}

// NewDest returns the session that receives a migration on the
// connections rpc and mem; Run starts it.
func NewDest(c DestConfig, rpc, mem *transport.Link) (*Session, error) {
	return start(c.ID, api.DirectionIn, c.Peer, rpc, mem, func(s *Session) (machine, error) {
		return newDest(s, c, rpc, mem)
	})
}

func newDest(s *Session, p DestConfig, rpcLink, memLink *transport.Link) (*dest, error) {
	m := &dest{s: s, p: p, log: p.Log, want: -1, treeNS: -1, releasePS: func() {}}
	m.disk = disk{l: p.Limits, dir: p.Dir}
	m.recv.dir = p.Dir
	m.ph = newPhaseTimer(s, p.Log)
	m.rec = &store.Record{ID: s.ID.String(), Role: store.RoleDest, Peer: s.Peer}
	if err := m.open(s.l, rpcLink, memLink, m.onRPC, m.abort, m.onConnClose); err != nil {
		return nil, err
	}
	// A copy migration's pages land in the session's directory: they
	// count against its disk limits as they arrive.
	toRelay := m.mem.OnMessage
	m.mem.OnMessage = func(msg wire.Message) error {
		if handled, err := m.onProbe(msg); handled {
			if err != nil {
				m.abort(err)
			}
			return nil
		}
		if pd, ok := msg.(*wire.PageData); ok && m.mode != api.ModeLazy {
			if err := m.disk.add(int64(len(pd.Data))); err != nil {
				m.abort(err)
				return nil
			}
		}
		return toRelay(msg)
	}
	return m, nil
}

func (m *dest) begin() error {
	m.ph.enter("prepare")
	m.rec.State = store.Receiving
	if err := m.rec.Save(m.p.Dir); err != nil {
		return err
	}
	m.hb = startHeartbeat(m.s.l, m.rpc, []*transport.Conn{m.rpc, m.mem}, m.p.PeerTimeout, m.onSilent)
	m.hb.deadline(m.ph, m.p.PhaseTimeout, m.onStalled)
	return nil
}

func (m *dest) finished() bool { return m.state == dstEnd }

func (m *dest) onRPC(msg wire.Message) error {
	switch msg := msg.(type) {
	case *wire.SyncOpen:
		return m.onSyncOpen(msg)
	case *wire.SyncData:
		if m.syncer != nil {
			m.syncer.in.write(msg.Data)
		}
		return nil
	case *wire.SyncEOF:
		if m.syncer != nil {
			m.syncer.in.closeWrite()
		}
		return nil
	case *wire.Ping:
		return m.rpc.Send(&wire.Pong{Seq: msg.Seq})
	case *wire.Pong:
		return nil
	case *wire.Fail:
		code := api.Code(msg.Code)
		if code == "" {
			code = api.CodeAborted
		}
		m.abort(api.Errorf(code, "source: %s", msg.Message))
		return nil
	case *wire.Prepare:
		if m.state != dstPrepare {
			break
		}
		m.namePeer(msg.SourcePort)
		return m.prepare(msg)
	case *wire.FileBegin:
		if m.state != dstReceive {
			break
		}
		if err := m.disk.add(msg.Size); err != nil {
			return err
		}
		return m.recv.begin(msg)
	case *wire.FileData, *wire.FileDataZ:
		if m.state != dstReceive {
			break
		}
		b, err := m.fileData(msg)
		if err != nil {
			return err
		}
		return m.recv.data(b)
	case *wire.FileEnd:
		if m.state != dstReceive {
			break
		}
		return m.recv.end(msg)
	case *wire.Restore:
		if m.state != dstReceive || m.want >= 0 {
			break
		}
		m.want = msg.Files
		return m.maybeRestore()
	case *wire.Resume:
		if m.state != dstRestored || m.mode != api.ModeLazy || m.resuming {
			break
		}
		return m.resumeLazy()
	case *wire.Commit:
		lazyReady := m.mode == api.ModeLazy && m.state == dstResumed && m.pagesIn
		if !lazyReady && (m.state != dstRestored || m.mode == api.ModeLazy) {
			break
		}
		return m.commit()
	case *wire.Done:
		if m.state != dstCommitted {
			break
		}
		m.finish(true)
		return nil
	}
	return protocolErr("unexpected %s in state %s", msg.Type(), m.state)
}

func (m *dest) prepare(p *wire.Prepare) error {
	if m.p.Refuse != nil {
		return m.p.Refuse
	}
	m.precopySeed = p.PrecopySeed
	if err := m.disk.checkFree(0); err != nil {
		return err
	}
	m.srcPID = p.PID
	m.s.pid.Store(int64(p.PID))
	// "pid" is the migrating process's pid on the source, as in the
	// source's log lines.
	m.log = m.log.With(zap.Int("pid", p.PID))
	m.ph.log = m.log
	m.rec.SourcePID = p.PID
	m.name, m.journal = p.Name, p.JournalStreams
	m.ttys, m.detach = p.Terminals, p.Detach
	m.runName = p.RunName
	if p.Caller == nil {
		return api.Errorf(api.CodePrecondition, "the source's phauld does not say who asked for the migration, which this destination needs to restore the process's files safely: upgrade phauld on the source")
	}
	m.caller, m.taskIDs = p.Caller, p.TaskIDs
	switch p.Compress {
	case "", api.CompressNone:
	case api.CompressZstd:
		codec, err := transport.NewCodec()
		if err != nil {
			return err
		}
		m.codec = codec
	default:
		return api.Errorf(api.CodeInvalid, "the source asks to compress with %q, which this phauld does not know (it knows zstd): use --compress zstd or none", p.Compress)
	}
	m.log = m.log.With(zap.Uint32("caller_uid", p.Caller.UID))
	m.ph.log = m.log
	if p.Container != nil && p.Caller.UID != 0 {
		// Its rootfs and bundle are made here as root, from what the
		// source sends (setuid files, devices).
		return api.Errorf(api.CodePermission, "a container's migration is root's only on the destination, and uid %d asked for it", p.Caller.UID)
	}
	if m.runName != "" && m.p.NameFree != nil {
		if err := m.p.NameFree(m.runName); err != nil {
			return api.Errorf(api.CodeConflict, "the process is named %q, and a process here has that name: %v", m.runName, err)
		}
	}
	if len(m.ttys) > 0 {
		if m.p.HookExe == "" {
			return api.Errorf(api.CodePrecondition, "the process is on a terminal, and the destination's phauld cannot find its own binary to drain the new one")
		}
		if m.detach == api.DetachJournal && !journal.HasStreams() {
			return api.Errorf(api.CodePrecondition, "the process's terminal output was to go to the journal, and the destination has no journald (%s is missing there): use --detach-terminal null, or run systemd-journald there", journal.StreamPath)
		}
		if strings.HasPrefix(m.detach, "/") {
			if err := detachFileOK(m.detach); err != nil {
				return err
			}
		}
	}
	if len(m.journal) > 0 && !journal.HasStreams() {
		return api.Errorf(api.CodePrecondition,
			"the process writes to the journal (systemd started it), and the destination has no journald to give it new streams (%s is missing there): run systemd-journald there, or migrate elsewhere",
			journal.StreamPath)
	}
	// The mode: the destination chooses (auto: the best both can run).
	src := Capabilities{}
	for _, x := range p.SourceModes {
		src[x] = ""
	}
	for _, x := range []string{api.ModeCopy, api.ModeLazy, api.ModePrecopy} {
		if _, ok := src[x]; !ok {
			src[x] = "its phauld says it cannot"
		}
	}
	requested := p.Mode
	if requested == "" {
		// A source from before modes: copy is all it does.
		requested, src = api.ModeCopy, Capabilities{api.ModeCopy: ""}
	}
	mode, why, err := chooseModeOn(requested, src, m.p.AsDest, p.LinkRate, p.MemBytes)
	if err != nil {
		return err
	}
	m.mode = mode
	m.log = m.log.With(zap.String("mode", mode))
	m.ph.log = m.log
	if requested == api.ModeAuto {
		m.log.Info("auto chose the mode", zap.String("why", why), zap.Int64("link_rate", p.LinkRate), zap.Int64("mem_bytes", p.MemBytes))
	}
	mine := m.p.Info.Version.Code()
	if p.CRIUVersion > mine {
		return api.Errorf(api.CodePrecondition,
			"destination CRIU %s is older than the source's %s: images may not restore; install CRIU >= %s on the destination",
			m.p.Info.Version, criu.VersionFromCode(p.CRIUVersion), criu.VersionFromCode(p.CRIUVersion))
	}
	m.ph.enter("checks")
	if p.Container == nil && !p.OwnPidNS {
		if taken := m.p.CRIU.Taken(p.TaskIDs); len(taken) > 0 {
			if m.p.HookExe == "" {
				return api.Errorf(api.CodePrecondition, "the process's pids (%s) are taken on the destination, and its phauld cannot find its own binary to restore the process into a new pid namespace", pidList(taken))
			}
			m.newPidNS = true
			m.log.Info("the tree's pids are taken here: it is restored into a new pid namespace, where it keeps them", zap.String("taken", pidList(taken)))
		}
	}
	if err := checkFiles(p.Files); err != nil {
		return err
	}
	if p.Container == nil {
		if err := checkPreparePaths(p.Files, p.Caller); err != nil {
			return err
		}
	}
	for _, path := range p.UnixPeers {
		if st, err := os.Stat(path); err != nil || st.Mode()&os.ModeSocket == 0 {
			return api.Errorf(api.CodePrecondition, "the process sends datagrams to the Unix socket %s, which CRIU connects it to again on the destination, and the destination has no socket there: run what listens there (a syslog daemon for /dev/log), or migrate elsewhere", path)
		}
	}
	m.unixPeers = len(p.UnixPeers) > 0
	m.shellJob = p.ShellJob
	if err := m.checkNetwork(p.Network); err != nil {
		return err
	}
	if p.Container != nil {
		if p.Mode == api.ModeAuto || p.Mode == "" {
			// Lazy only when asked: runc has CRIU serve a container's
			// pages from a port open on every address for a moment
			// (docs/security.md).
			m.mode = api.ModeCopy
			m.log = m.log.With(zap.String("mode", m.mode))
			m.ph.log = m.log
		}
		if m.mode != api.ModeCopy && m.mode != api.ModeLazy && m.mode != api.ModePrecopy {
			return api.Errorf(api.CodePrecondition, "%s migration of a container is not built: use --mode copy, lazy or precopy", m.mode)
		}
		if n := p.Network; n != nil {
			// Its namespace is made here from the links described.
			have := map[string]bool{}
			for _, l := range n.Links {
				have[l.Name] = true
			}
			for _, v := range n.Veths {
				if !have[v.Inner] {
					return api.Errorf(api.CodePrecondition, "the source did not describe the container's interface %s, which this host would have to make: upgrade phauld there", v.Inner)
				}
			}
		}
		if err := m.prepareContainer(p.Container); err != nil {
			return err
		}
	}
	if len(p.CPUInfo) == 0 {
		m.log.Warn("source sent no cpuinfo: CPU check skipped")
		return m.checked("skipped")
	}
	m.cpuInfo = p.CPUInfo
	if r, ok := m.p.CPUChecks.lookup(p.CPUInfo); ok {
		m.log.Debug("CPU check passed before for this source's cpuinfo", zap.String("cpu_check", r))
		return m.checked(r)
	}
	dir := filepath.Join(m.p.Dir, "cpuinfo")
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "cpuinfo.img"), p.CPUInfo, 0o600); err != nil {
		return err
	}
	op, err := m.p.CRIU.StartCPUInfoCheck(criu.Options{ImagesDir: dir, LogFile: "cpuinfo-check.log"})
	if err != nil {
		return err
	}
	m.state = dstChecks
	m.check, err = watchCRIU(m.s.l, op, m.p.Dir, m.log, 1, m.onCheck, m.abort)
	return err
}

// checkNetwork takes the tree's own network namespace, if it moves one:
// each veth's host end goes on the bridge of the same name here (or the
// one --bridge-map names), which must exist; it keeps its name unless an
// interface here has it.
func (m *dest) checkNetwork(n *wire.Network) error {
	if n == nil {
		return nil
	}
	m.netw = n
	for _, v := range n.Veths {
		bridge := v.Bridge
		if to, ok := m.p.BridgeMap[bridge]; ok {
			bridge = to
		}
		if err := network.CheckBridge(bridge); err != nil {
			return api.Errorf(api.CodePrecondition, "the process's network namespace has a veth (%s) on bridge %s on the source, and %v", v.Inner, v.Bridge, err)
		}
		m.veths = append(m.veths, wire.Veth{Inner: v.Inner, Outer: network.FreeName(v.Outer), Bridge: bridge})
		m.rec.Veths = append(m.rec.Veths, m.veths[len(m.veths)-1].Outer)
	}
	for _, v := range n.Macvlans {
		if err := network.CheckLower(v.Lower); err != nil {
			return api.Errorf(api.CodePrecondition, "the process's network namespace has a macvlan (%s) on interface %s on the source, and %v: give this host an interface %s on the same segment", v.Inner, v.Lower, err, v.Lower)
		}
	}
	m.log.Info("the tree's network namespace comes with it", zap.Any("veths", m.veths), zap.Any("macvlans", n.Macvlans),
		zap.Strings("addresses", n.Addresses), zap.Int("tcp_connections", n.Connections))
	return nil
}

func (m *dest) onCheck(ev criu.Event) error {
	var ce *criu.Error
	switch {
	case ev.Err == nil:
		m.p.CPUChecks.remember(m.cpuInfo, "ok")
		return m.checked("ok")
	case errors.As(ev.Err, &ce) && ce.Errno == unix.ENOTSUP:
		m.log.Warn("CRIU cannot compare CPUs here: CPU check skipped")
		m.p.CPUChecks.remember(m.cpuInfo, "skipped")
		return m.checked("skipped")
	default:
		return api.Errorf(api.CodePrecondition, "this CPU cannot run tasks dumped on the source: %v", ev.Err)
	}
}

// checked goes on after the checks, by mode: a copy migration's pages
// come first, through a page server; a lazy one's after the restore.
func (m *dest) checked(cpuCheck string) error {
	if m.mode != api.ModeLazy {
		return m.startPageServer(cpuCheck)
	}
	m.state = dstReceive
	m.ph.enter("receive")
	m.psDone = true // no page server before the restore
	return m.sendReady(cpuCheck)
}

// sendReady tells the source the checks passed and how the migration
// goes: mode, veths, rootfs sync, compression.
func (m *dest) sendReady(cpuCheck string) error {
	compress := ""
	if m.codec != nil {
		compress = api.CompressZstd
	}
	return m.rpc.Send(&wire.Ready{CRIUVersion: m.p.Info.Version.Code(), CPUCheck: cpuCheck, Mode: m.mode, Veths: m.veths, Sync: m.syncDir != "", Compress: compress, PrecopyCap: m.p.PrecopyCap, PrecopyCompress: m.codec != nil})
}

func (m *dest) startPageServer(cpuCheck string) error {
	release, err := m.p.Limits.takePageServer()
	if err != nil {
		return err
	}
	m.releasePS = release
	theirs, err := m.openRelay(m.s.l, false, m.abort)
	if err != nil {
		return err
	}
	defer theirs.Close()
	if m.mode == api.ModePrecopy {
		if err := m.openPrecopyStore(m.precopySeed); err != nil {
			return err
		}
	}
	op, err := m.p.CRIU.StartPageServer(criu.Options{ImagesDir: m.p.Dir, LogFile: "page-server.log", PageServer: theirs})
	if err != nil {
		return err
	}
	m.state = dstPageServer
	m.ph.enter("page-server")
	m.ps, err = watchCRIU(m.s.l, op, m.p.Dir, m.log, 2, func(ev criu.Event) error { return m.onPageServer(ev, cpuCheck) }, m.abort)
	return err
}

func (m *dest) onPageServer(ev criu.Event, cpuCheck string) error {
	if ev.Err != nil {
		return api.Errorf(api.CodeAborted, "page server: %v", ev.Err)
	}
	if ev.Notify != "" {
		return m.ps.op.Reply(true)
	}
	if m.state == dstPageServer {
		// Started: ask CRIU to tell us how it ends.
		if err := m.ps.op.WaitPID(ev.PID); err != nil {
			return err
		}
		m.state = dstReceive
		m.ph.enter("receive")
		return m.sendReady(cpuCheck)
	}
	// WAIT_PID answered: the page server has exited.
	m.releasePS()
	if !ev.Status.Exited() || ev.Status.ExitStatus() != 0 {
		return api.Errorf(api.CodeAborted, "page server ended with %s (log: %s)", waitStatus(ev.Status), m.ps.op.LogPath())
	}
	m.psDone = true
	m.dropPrecopyStore() // its pages are in the images now
	return m.maybeRestore()
}

func waitStatus(ws syscall.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		return fmt.Sprintf("signal %v", ws.Signal())
	}
	return fmt.Sprintf("wait status %#x", int(ws))
}

// maybeRestore restores once all pages and all images are in.
func (m *dest) maybeRestore() error {
	if m.state != dstReceive || !m.psDone || m.want < 0 {
		return nil
	}
	if m.recv.cur != nil || m.recv.files != m.want {
		return protocolErr("restore asked with %d of %d image files received", m.recv.files, m.want)
	}
	if m.container == nil {
		// What CRIU will open by path, as the images say: checked
		// before it runs (paths.go). A container's are in its rootfs.
		files, err := criu.PathFiles(m.p.Dir)
		if err != nil {
			return api.Errorf(api.CodeAborted, "read the images' file list: %v", err)
		}
		if err := checkImagePaths(files, m.caller, m.taskIDs); err != nil {
			return err
		}
	}
	m.ph.enter("restore")
	m.tRestore = time.Now()
	if m.mode == api.ModeLazy && m.lazy == nil {
		return m.startLazyPages()
	}
	return m.startRestore()
}

// startLazyPages starts the daemon that will fill the restored tree's
// memory from the source, over the mem connection; the restore starts
// once it listens.
func (m *dest) startLazyPages() error {
	release, err := m.p.Limits.takePageServer()
	if err != nil {
		return err
	}
	m.releasePS = release
	theirs, err := m.openRelay(m.s.l, false, m.abort)
	if err != nil {
		return err
	}
	defer theirs.Close()
	if m.p.FetchAhead > 0 {
		plan, err := criu.LazyRanges(m.p.Dir)
		var pages uint64
		for _, r := range plan {
			pages += r.Pages
		}
		switch {
		case err != nil:
			// lazy-pages reads the same images, and says what it finds.
			m.log.Warn("cannot read the dump's page map; lazy-pages fetches every page itself", zap.Error(err))
		case pages > hostPages():
			// The fetcher keeps 4 bytes a page: never for a map no
			// host could restore.
			m.log.Warn("the dump's page map names more memory than this host has; lazy-pages fetches every page itself",
				zap.Uint64("pages", pages))
		default:
			m.relay.FetchAhead(plan, uint64(m.p.FetchAhead))
			m.log.Debug("lazy pages to fetch ahead once the tree runs", zap.Int("ranges", len(plan)), zap.Uint64("pages", pages))
		}
	}
	lp, err := m.p.CRIU.StartLazyPages(m.p.Dir, theirs)
	if err != nil {
		return err
	}
	m.lazy = lp
	m.state = dstRestore
	if err := m.s.l.Watch(lp.StatusFd(), epoll.In|epoll.Hup, func(uint32) {
		m.s.l.Unwatch(lp.StatusFd())
		if m.state != dstRestore || m.restoreW != nil {
			return // aborted meanwhile
		}
		if !lp.Ready() {
			lp.Kill()
			m.abort(api.Errorf(api.CodeAborted, "CRIU's lazy-pages daemon did not start (%v); see %s, or use --mode copy",
				lp.Result(), filepath.Join(m.p.Dir, criu.LazyPagesLog)))
			return
		}
		if err := m.startRestore(); err != nil {
			m.abort(err)
		}
	}); err != nil {
		return err
	}
	return m.s.l.Watch(lp.ExitFd(), epoll.In, func(uint32) {
		m.s.l.Unwatch(lp.ExitFd())
		m.onLazyPagesExit()
	})
}

// unwatchLazy stops listening to the lazy-pages daemon (an aborted
// session).
func (m *dest) unwatchLazy() {
	if m.lazy != nil {
		m.s.l.Unwatch(m.lazy.StatusFd())
		m.s.l.Unwatch(m.lazy.ExitFd())
	}
}

// onLazyPagesExit takes the lazy-pages daemon's end: every page is in, or
// the tree's memory is incomplete and the copy must go.
func (m *dest) onLazyPagesExit() {
	if m.state == dstEnd {
		return
	}
	m.releasePS()
	if err := m.lazy.Result(); err != nil {
		m.abort(api.Errorf(api.CodeAborted, "lazy pages: %v", err))
		return
	}
	if m.restoreW == nil {
		// Exited before the restore had started.
		m.abort(api.Errorf(api.CodeAborted, "CRIU's lazy-pages daemon exited before the restore; see %s",
			filepath.Join(m.p.Dir, criu.LazyPagesLog)))
		return
	}
	// lazy-pages also ends well when the processes it serves exit (its
	// counts then fall short, as they do by a few pages even in a good
	// run, so they decide nothing): the copy must be alive, or there is
	// no copy to commit.
	copied, total, _ := m.lazy.Transferred()
	if err := m.treeAlive(); err != nil {
		m.abort(err)
		return
	}
	m.pagesIn, m.lazyPages, m.tPagesIn = true, copied, time.Now()
	fields := []zap.Field{zap.Uint64("lazy_pages", copied), zap.Uint64("of", total)}
	if m.relay != nil && m.relay.Fetch != nil {
		f := m.relay.Fetch
		fields = append(fields, zap.Uint64("fetched_ahead", f.Fetched), zap.Uint64("served_ahead", f.Served), zap.Uint64("passed_on", f.Passed))
	}
	m.log.Info("every page is in", fields...)
	if m.state == dstResumed {
		// Else resumeLazy says it, after Resumed: the source counts on
		// that order.
		if err := m.rpc.Send(&wire.PagesIn{Pages: copied, FetchedAhead: m.fetchedAhead()}); err != nil {
			m.abort(err)
		}
	}
}

// hostPages is how many pages of memory and swap this host has.
func hostPages() uint64 {
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) != nil {
		return 0
	}
	return (uint64(si.Totalram) + uint64(si.Totalswap)) * uint64(si.Unit) / pagestream.PageSize
}

// fetchedAhead is how many pages the relay fetched ahead of lazy-pages.
func (m *dest) fetchedAhead() uint64 {
	if m.relay == nil || m.relay.Fetch == nil {
		return 0
	}
	return m.relay.Fetch.Fetched
}

// treeAlive fails if the root of the restored tree has exited: a lazy copy
// that died before its commit (killed, crashed, out of memory) must not be
// committed in place of the source's. (A child may end on its own.)
func (m *dest) treeAlive() error {
	if len(m.tree) > 0 && m.tree[0].Exited() {
		return api.Errorf(api.CodeAborted, "the restored process (pid %d) exited before the commit", m.pid)
	}
	return nil
}

// resumeLazy lets a lazy migration's tree run before all its memory is
// here. It is not the commit: a failure before Commit kills it and the
// source resumes its own. Placing the tree in its scope and seeing it
// resumed wait, so they happen off the loop.
func (m *dest) resumeLazy() error {
	m.resuming = true
	tree := m.tree
	var err error
	m.s.work(func() {
		m.place(tree)
		err = ResumeTree(m.log, tree, m.stopped)
	}, func() {
		m.resuming = false
		if m.state != dstRestored {
			return // aborted meanwhile; the copy is discarded
		}
		if err != nil {
			m.abort(api.Errorf(api.CodeAborted, "resume the restored tree: %v", err))
			return
		}
		m.state = dstResumed
		m.tResumed = time.Now()
		m.ph.enter("lazy")
		// The tree runs: its memory may come ahead of what lazy-pages
		// asks (not before, when it would slow the restore).
		m.relay.StartFetching()
		m.log.Info("the restored tree runs; its memory follows", zap.Int("dest_pid", m.pid))
		m.rpc.Send(&wire.Resumed{PID: m.pid})
		if m.pagesIn {
			// Every page came in before the tree ran.
			m.rpc.Send(&wire.PagesIn{Pages: m.lazyPages, FetchedAhead: m.fetchedAhead()})
		}
	})
	return nil
}

// placeTimeout bounds moving a restored tree into its scope: systemd
// answers in milliseconds; a tree that cannot be placed runs where it is.
const placeTimeout = 2 * time.Second

// place moves the restored tree out of the daemon's cgroup (under
// systemd, into a scope of its own), before it runs: it must not share
// the daemon's fate (a stop of phauld's service). It may take up to
// placeTimeout: it runs off the loop.
func (m *dest) place(tree []*proc.Process) {
	if m.p.Place == nil || m.container != nil {
		return // a container stays in the cgroup runc made for it
	}
	pids := make([]int, len(tree))
	for i, p := range tree {
		pids[i] = p.PID
	}
	if m.nsInit > 0 {
		// The init of its pid namespace goes with it: were it killed
		// with phauld's service, the namespace would die with it.
		pids = append(pids, m.nsInit)
	}
	ctx, cancel := context.WithTimeout(context.Background(), placeTimeout)
	defer cancel()
	if err := m.p.Place(ctx, pids); err != nil {
		m.log.Warn("cannot move the restored tree to its own scope; it stays in phauld's cgroup", zap.Error(err))
	}
}

// startRestore runs CRIU's restore of the received images.
func (m *dest) startRestore() error {
	opts := criu.Options{
		ImagesDir:    m.p.Dir,
		LogFile:      "restore.log",
		LeaveStopped: true,
		Notify:       true,
		LazyPages:    m.mode == api.ModeLazy,
		Network:      m.netw != nil,
		FileLocks:    true, // what the dump carried, if any
		ExtUnixSk:    m.unixPeers,
		ShellJob:     m.shellJob,
	}
	if m.newPidNS {
		opts.PidNSInit = m.p.HookExe
	}
	if m.container == nil { // a container's are made by buildNetwork
		for _, v := range m.veths {
			opts.External = append(opts.External, fmt.Sprintf("veth[%s]:%s@%s", v.Inner, v.Outer, v.Bridge))
		}
	}
	if m.netw != nil {
		for _, v := range m.netw.Macvlans {
			opts.External = append(opts.External, fmt.Sprintf("macvlan[%s]:%s", v.Inner, v.Lower))
		}
	}
	// The tree's terminals: new ones, drained to the journal or nowhere.
	for _, key := range m.ttys {
		slave, err := m.newTerminal()
		if err != nil {
			for _, in := range opts.InheritFds {
				in.File.Close()
			}
			return api.Errorf(api.CodeAborted, "give the process a new terminal: %v", err)
		}
		opts.InheritFds = append(opts.InheritFds, criu.InheritFd{Key: key, File: slave})
		if fi, err := slave.Stat(); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				if m.ttyDevs == nil {
					m.ttyDevs = map[uint64]bool{}
				}
				m.ttyDevs[st.Rdev] = true
			}
		}
	}
	// The tree's journal streams: new ones, to this host's journald.
	for _, ino := range m.journal {
		f, err := journal.NewStream(m.name, 6)
		if err != nil {
			for _, in := range opts.InheritFds {
				in.File.Close()
			}
			return api.Errorf(api.CodeAborted, "reconnect the process to the journal: %v", err)
		}
		opts.ExtUnixSk = true
		opts.InheritFds = append(opts.InheritFds, criu.InheritFd{Key: fmt.Sprintf("socket:[%d]", ino), File: f})
	}
	restorer := m.p.CRIU
	if m.container != nil {
		restorer = ContainerCRIU(m.p.CRIU, m.container, m.log)
	}
	op, err := restorer.StartRestore(opts)
	for _, in := range opts.InheritFds {
		in.File.Close() // CRIU has its own copies
	}
	if err != nil {
		return err
	}
	m.state = dstRestore
	m.restoreW, err = watchCRIU(m.s.l, op, m.p.Dir, m.log, 1, m.onRestore, m.abort)
	return err
}

// newTerminal opens a pseudo-terminal for the restored tree and starts
// its drain (the master's reader, to the journal or /dev/null); it returns
// the slave, for CRIU.
func (m *dest) newTerminal() (*os.File, error) {
	master, slave, err := pty.Open()
	if err != nil {
		return nil, err
	}
	defer master.Close() // the drain has its own
	var out *os.File
	switch {
	case m.detach == api.DetachJournal:
		out, err = journal.NewStream(m.name, 6)
	case strings.HasPrefix(m.detach, "/"):
		out, err = os.OpenFile(m.detach, os.O_WRONLY|os.O_APPEND|os.O_CREATE|unix.O_NOFOLLOW|unix.O_NOCTTY, 0o640)
	default:
		out, err = os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	}
	if err != nil {
		slave.Close()
		return nil, err
	}
	defer out.Close()
	if err := pty.StartDrain(m.p.HookExe, master, out); err != nil {
		slave.Close()
		return nil, err
	}
	return slave, nil
}

// detachFileOK checks, before the freeze, that the file a detached
// terminal's output is to go to can be: its directory exists, and the
// file, if there, is a regular file (not a link).
func detachFileOK(path string) error {
	if st, err := os.Stat(filepath.Dir(path)); err != nil || !st.IsDir() {
		return api.Errorf(api.CodePrecondition, "the terminal's output was to go to %s, and the destination has no directory %s", path, filepath.Dir(path))
	}
	if st, err := os.Lstat(path); err == nil && !st.Mode().IsRegular() {
		return api.Errorf(api.CodePrecondition, "the terminal's output was to go to %s, which is not a regular file on the destination", path)
	}
	return nil
}

// namePeer names the source by its host and the port its daemon listens
// on (the connection's own port is an ephemeral one): the host as the
// connection shows it, only the port as the source says.
func (m *dest) namePeer(port int) {
	host, _, err := net.SplitHostPort(m.s.Peer)
	if err != nil {
		return
	}
	name := host
	if port > 0 && port < 1<<16 {
		name = net.JoinHostPort(host, strconv.Itoa(port))
	}
	m.s.peer.Store(name)
	m.rec.Peer = name
}

// buildNetwork makes the set-up of a container's namespace, which runc
// has CRIU restore empty (pid is in it): its veths, addresses and
// routes, as the source described them, before CRIU restores its
// sockets.
func (m *dest) buildNetwork(pid int) error {
	h, err := netns.GetFromPid(pid)
	if err != nil {
		return api.Errorf(api.CodeAborted, "the restored container's network namespace: %v", err)
	}
	defer h.Close()
	if err := network.Build(h, m.netw.Links, m.netw.Routes, m.veths); err != nil {
		return api.Errorf(api.CodeAborted, "make the container's network namespace again: %v", err)
	}
	m.log.Info("the container's network namespace made again", zap.Any("links", m.netw.Links), zap.Any("routes", m.netw.Routes))
	return nil
}

func (m *dest) onRestore(ev criu.Event) error {
	if ev.Notify != "" {
		if ev.PID > 0 {
			pid, err := m.hostPID(ev.PID)
			if err != nil {
				m.restoreW.op.Reply(false)
				return api.Errorf(api.CodeAborted, "the restored tree's root: %v", err)
			}
			ev.PID = pid
		}
		if ev.Notify == "post-restore" && m.state == dstRestore {
			return m.restored(ev.PID)
		}
		if ev.Notify == "setup-namespaces" && m.state == dstRestore && m.netw != nil && ev.PID > 0 {
			// The namespace exists, nothing is in it yet: locked now, it
			// sends nothing and answers nothing (no reset to a client
			// whose packets a switch sent here) until the tree runs.
			if err := network.Lock(ev.PID); err != nil {
				m.restoreW.op.Reply(false)
				return api.Errorf(api.CodeAborted, "cannot lock the restored namespace's network: %v", err)
			}
			m.netLocked = true
			if h, err := netns.GetFromPid(ev.PID); err == nil && m.treeNS < 0 {
				m.treeNS = h
			} else if err == nil {
				h.Close()
			}
			m.log.Debug("restored namespace's network locked")
			if m.container != nil {
				if err := m.buildNetwork(ev.PID); err != nil {
					m.restoreW.op.Reply(false)
					return err
				}
			}
		}
		return m.restoreW.op.Reply(m.state == dstRestore)
	}
	if ev.Err != nil {
		m.pid = 0 // CRIU killed what it had restored
		return api.Errorf(api.CodeAborted, "restore failed: %v", ev.Err)
	}
	if ev.PID != 0 {
		// CRIU may be gone by now: its tree passed to the namespace's
		// init. Checked by the pid it has in its namespace.
		pid, err := ev.PID, error(nil)
		if m.newPidNS {
			pid, err = proc.NSPid(m.pid)
		}
		if err != nil || pid != ev.PID {
			return fmt.Errorf("criu restored pid %d, but announced %d (%d, %v)", ev.PID, m.pid, pid, err)
		}
	}
	m.s.pid.Store(int64(m.pid))
	tree, err := proc.OpenTree(m.pid, m.rec.StartTime)
	if err != nil {
		return api.Errorf(api.CodeAborted, "restored tree: %v", err)
	}
	m.tree = tree
	if err := m.startGuard(); err != nil {
		return err
	}
	msg := &wire.Restored{PID: m.pid, RestoreMS: time.Since(m.tRestore).Milliseconds(), NewPidNS: m.newPidNS}
	if st, err := criu.ReadRestoreStats(m.p.Dir); err == nil {
		msg.Stats, m.restoreStats = &st, &st
	}
	m.state = dstRestored
	m.ph.enter("wait-commit")
	return m.rpc.Send(msg)
}

// startGuard starts the restored copy's dead man's switch, and watches it:
// a guard that ends before the commit leaves the copy unguarded, and the
// migration is given up (the source resumes its own).
func (m *dest) startGuard() error {
	if m.p.Guard == nil {
		return nil
	}
	g, err := m.p.Guard(m.p.Dir, m.pid, m.rec.StartTime)
	if err != nil {
		return api.Errorf(api.CodeAborted, "cannot start the guard of the restored copy: %v", err)
	}
	m.guard = g
	return m.s.l.Watch(g.Fd(), epoll.In|epoll.Hup, func(uint32) {
		m.s.l.Unwatch(g.Fd())
		if m.state < dstCommitted {
			m.abort(api.Errorf(api.CodeAborted, "the guard of the restored copy ended before the commit"))
		}
	})
}

// endGuard ends the guard: released, it leaves the copy (committed);
// otherwise it kills it unless the record says committed.
func (m *dest) endGuard(release bool) {
	if m.guard == nil {
		return
	}
	m.s.l.Unwatch(m.guard.Fd())
	if release {
		m.guard.Release()
	} else {
		m.guard.Close()
	}
	m.guard = nil
}

// hostPID is the pid here of the restored task CRIU names pid: the same,
// unless the tree is in a new pid namespace, where CRIU sees its pids.
func (m *dest) hostPID(pid int) (int, error) {
	if !m.newPidNS {
		return pid, nil
	}
	m.nsInit = m.restoreW.op.Pid()
	return pidns.HostPID(m.nsInit, pid)
}

// pidList shows a few pids of a list, for a message.
func pidList(pids []int) string {
	var b strings.Builder
	for i, p := range pids {
		if i == 5 {
			fmt.Fprintf(&b, " and %d more", len(pids)-i)
			break
		}
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Itoa(p))
	}
	return b.String()
}

// restored records the restored tree before CRIU lets it exist past the
// restore: a crash before the record makes CRIU kill the tree (its socket
// closes), a crash after it leaves a record that names the tree to kill.
func (m *dest) restored(pid int) error {
	info, err := proc.Stat(pid)
	if err != nil {
		m.restoreW.op.Reply(false)
		return api.Errorf(api.CodeAborted, "restored root pid %d: %v", pid, err)
	}
	m.pid = pid
	if m.p.Hold != nil {
		pids, err := proc.Tree(pid)
		if err == nil {
			err = m.p.Hold(pids)
		}
		if err != nil {
			m.restoreW.op.Reply(false)
			return api.Errorf(api.CodeAborted, "cannot hold the restored tree: %v", err)
		}
	}
	if credOf(m.caller) != nil && m.container == nil {
		// What CRIU opened, by the inodes: the paths were checked
		// before it ran (paths.go).
		pids, err := proc.Tree(pid)
		if err == nil {
			err = checkHeld(pids, m.caller, m.ttyDevs)
		}
		if err != nil {
			m.restoreW.op.Reply(false)
			return err
		}
	}
	stopped, err := m.p.CRIU.Stopped(m.p.Dir)
	if err != nil {
		m.log.Warn("cannot tell which tasks job control had stopped; all will be resumed", zap.Error(err))
	}
	m.stopped = stopped
	m.rec.State, m.rec.PID, m.rec.StartTime, m.rec.Stopped = store.Restored, pid, info.StartTime, sortedKeys(stopped)
	if err := m.rec.Save(m.p.Dir); err != nil {
		m.restoreW.op.Reply(false)
		return err
	}
	if m.netw != nil && !m.netLocked {
		// No setup-namespaces notification came: lock it now. CRIU lifts
		// its own lock when its restore ends, and the copy must take no
		// traffic until it runs (a rollback would lose what it took).
		if err := network.Lock(pid); err != nil {
			m.restoreW.op.Reply(false)
			return api.Errorf(api.CodeAborted, "cannot hold the restored namespace's network until the commit: %v", err)
		}
	}
	if m.newPidNS {
		m.log.Info("tree restored, in a new pid namespace", zap.Int("dest_pid", pid), zap.Int("pid_ns_init", m.nsInit))
	} else {
		m.log.Info("tree restored", zap.Int("dest_pid", pid))
	}
	return m.restoreW.op.Reply(true)
}

// commit is the commit point: once the record says committed, the
// migration is final and the restored tree runs. Placing and resuming a
// copy that was kept stopped (copy mode) wait, so they happen off the
// loop; Committed follows.
func (m *dest) commit() error {
	if m.state == dstResumed {
		if err := m.treeAlive(); err != nil {
			return err
		}
	}
	m.rec.State = store.Committed
	if err := m.rec.Save(m.p.Dir); errors.Is(err, store.ErrNotDurable) {
		// Written, and what everyone reads from now on: committed.
		m.log.Warn("the commit is recorded, but not synced to disk", zap.Error(err))
	} else if err != nil {
		// Not recorded, not committed: refuse, and the source resumes.
		m.rec.State = store.Restored
		return api.Errorf(api.CodeAborted, "cannot record the commit: %v", err)
	}
	lazy := m.state == dstResumed // already placed and running
	m.state = dstCommitted
	// The record says committed: the guard would leave the copy anyway.
	m.endGuard(true)
	m.ph.enter("committed")
	if lazy {
		m.committed(nil)
		return nil
	}
	tree := m.tree
	var err error
	pid, start, stopped := m.pid, m.rec.StartTime, m.stopped
	m.s.work(func() {
		m.place(tree)
		if err = ResumeTree(m.log, tree, stopped); err == nil {
			err = proc.VerifyRunning(pid, start, stopped)
		}
	}, func() { m.committed(err) })
	return nil
}

// committed tells the source, once the copy was seen running, or why it
// was not: committed either way (the record says so), but nothing says it
// runs unless it was seen to.
func (m *dest) committed(resumeErr error) {
	msg := &wire.Committed{PID: m.pid}
	if resumeErr != nil {
		msg.NotRunning = resumeErr.Error()
		m.log.Error("migration committed, but the process was not seen running here; see to it (kill -CONT if it is stopped)",
			zap.Int("dest_pid", m.pid), zap.Error(resumeErr))
	} else {
		m.log.Info("migration committed: process runs here", zap.Int("dest_pid", m.pid))
	}
	if m.container != nil {
		if err := QuietCRIUConfig(m.container.Bundle); err != nil {
			m.log.Warn("cannot empty the container's CRIU configuration; its next checkpoint may fail", zap.Error(err))
		}
	}
	// Tell the source first: removing the images of a big process takes
	// tens of milliseconds, and the source's copy waits, stopped.
	if !m.rpc.Closed() {
		m.rpc.Send(msg)
		m.rpc.Flush()
	}
	if !m.p.KeepImages {
		if err := store.RemoveImages(m.p.Dir); err != nil {
			m.log.Warn("cannot remove images", zap.Error(err))
		}
	}
}

// finish ends a committed session; acked says the source confirmed.
func (m *dest) finish(acked bool) {
	if acked {
		m.rec.Done = true
		if err := m.rec.Save(m.p.Dir); err != nil {
			m.log.Warn("cannot record the end", zap.Error(err))
		}
	} else {
		m.log.Warn("source gone after the commit: keeping the record for its query")
	}
	m.ph.enter("done")
	m.state = dstEnd
}

func (m *dest) onConnClose(err error) {
	// What the source said last (a Fail, a Done) may wait on rpc while
	// the mem connection's end is seen first: read it before.
	if m.state != dstEnd && !m.rpc.Closed() {
		m.rpc.Read()
	}
	if m.state == dstEnd {
		return
	}
	if m.state == dstCommitted {
		// Committed: the source only had Done left to say.
		m.finish(false)
		return
	}
	if errors.Is(err, io.EOF) {
		err = errors.New("source closed the connection")
	}
	m.abort(api.Errorf(api.CodeAborted, "connection to source lost: %v", err))
}

func (m *dest) onSilent(quiet time.Duration) {
	if m.state == dstCommitted {
		m.finish(false)
		return
	}
	m.abort(api.Errorf(api.CodeAborted, "the source stopped answering: no answer to its pings and no data for %v", quiet.Round(time.Second)))
}

// onStalled takes a phase that made no progress within its deadline:
// before the commit this copy is discarded; after it, the session ends.
func (m *dest) onStalled(phase string, waited time.Duration) {
	m.log.Warn("phase made no progress within its deadline", zap.String("phase", phase), zap.Duration("waited", waited))
	m.abort(stalledError(phase, waited, "source"))
}

// abort discards this side's copy: before the commit the process belongs
// to the source.
func (m *dest) abort(err error) {
	if m.state == dstEnd {
		return
	}
	if m.state == dstCommitted {
		m.log.Warn("error after commit", zap.Error(err))
		m.finish(false)
		return
	}
	m.failure = err
	// A lazy copy being resumed may run (and fork) already.
	running := m.state == dstResumed || m.resuming
	// Ended before anything else: sending Fail may fail and call abort
	// again, which must then return.
	m.state = dstEnd
	m.log.Warn("aborted before the commit: discarding this copy")
	if !m.rpc.Closed() {
		e := api.AsError(err)
		m.rpc.Send(&wire.Fail{Code: string(e.Code), Message: e.Message})
	}
	m.s.work(m.discard(running), func() {
		m.rec.State, m.rec.Error = store.Aborted, errString(err)
		if err := m.rec.Save(m.p.Dir); err != nil {
			m.log.Error("cannot record the abort", zap.Error(err))
		}
	})
}

// discard kills the restored tree, if any, at once, and returns what must
// wait (off the loop): a restore still running is told no (its socket
// closes) and CRIU kills what it restored, and one that has not exited
// within abandonGrace is killed with what it forked; the killed tree's
// exit. running says the copy ran (lazy), and may have forked since the
// restore.
func (m *dest) discard(running bool) (wait func()) {
	if m.lazy != nil {
		m.unwatchLazy()
		m.lazy.Kill()
	}
	var restore Op
	if w := m.restoreW; w != nil {
		if !w.done {
			w.done = true
			m.s.l.Unwatch(w.op.Fd())
		}
		restore = w.op
	}
	if m.tree != nil && running {
		// Stop what we know, then look for the rest.
		proc.SignalAll(m.tree, syscall.SIGSTOP)
		if fresh, err := proc.OpenTree(m.pid, m.rec.StartTime); err == nil {
			m.tree = mergeTree(m.tree, fresh)
		}
	}
	if m.tree == nil && m.pid != 0 {
		if tree, err := proc.OpenTree(m.pid, m.rec.StartTime); err == nil {
			m.tree = tree
		}
	}
	tree := m.tree
	m.tree = nil
	// Its handles close with the session (cleanup), not here: work
	// still running off the loop (a resume) may hold them.
	m.discarded = append(m.discarded, tree...)
	// Its namespace, to empty once the tree is dead: the closure owns
	// the handle.
	treeNS := m.treeNS
	m.treeNS = -1
	if treeNS < 0 && m.netw != nil && m.pid != 0 {
		if h, err := netns.GetFromPid(m.pid); err == nil {
			treeNS = h
		}
	}
	proc.SignalAll(tree, syscall.SIGKILL)
	// Two killers: should this daemon die now, the guard goes on.
	m.endGuard(false)
	log, dir := m.log, m.p.Dir
	c, bundleMade := m.container, m.bundleMade
	var veths []network.Veth
	for _, v := range m.veths {
		veths = append(veths, network.Veth(v))
	}
	return func() {
		if restore != nil && restore.Abandon(abandonGrace) {
			log.Warn("CRIU's restore did not end when told to: killed it and what it had restored", zap.Int("criu_pid", restore.Pid()))
		}
		KillHelpers(log, dir, "a CRIU helper was still working for the discarded copy: killed")
		if err := proc.WaitExited(tree, proc.KillWithin); err != nil {
			log.Error("restored tree did not exit", zap.Error(err))
		}
		// The kernel tears the dead copy's namespace down later: its
		// interfaces (a macvlan would answer for the address meanwhile)
		// and its veths' host ends go now.
		if treeNS >= 0 {
			if _, err := network.RemoveLinksIn(treeNS); err != nil {
				log.Warn("cannot remove the discarded copy's interfaces", zap.Error(err))
			}
			treeNS.Close()
		}
		if _, err := network.RemoveHostEnds(veths); err != nil {
			log.Warn("cannot remove the discarded copy's veths", zap.Error(err))
		}
		if c != nil {
			forgetContainer(log, c, bundleMade)
		}
	}
}

// resolve answers a source that lost the session's connections and asks
// how it ended. Before the commit, the question itself means the source
// will never send Commit: the destination aborts and says so.
// mergeTree adds to tree the processes of fresh it lacks, and closes the
// rest of fresh.
func mergeTree(tree, fresh []*proc.Process) []*proc.Process {
	have := map[int]bool{}
	for _, p := range tree {
		have[p.PID] = true
	}
	for _, p := range fresh {
		if have[p.PID] {
			p.Close()
			continue
		}
		tree = append(tree, p)
	}
	return tree
}

func (m *dest) resolve() (string, int) {
	// What the source sent before it gave up and asked is read first: a
	// Commit waiting in the rpc socket decides. (A session loop woken by
	// the question, as after SIGSTOP and SIGCONT, may not have read it
	// yet.)
	if m.rpc != nil && !m.rpc.Closed() && (m.state == dstRestored || m.state == dstResumed) {
		m.rpc.Read()
	}
	switch m.state {
	case dstCommitted, dstEnd:
		if m.rec.State == store.Committed {
			return wire.OutcomeCommitted, m.pid
		}
		return wire.OutcomeAborted, 0
	}
	m.abort(api.Errorf(api.CodeAborted, "the source lost the session and asked its outcome"))
	return wire.OutcomeAborted, 0
}

func (m *dest) stop() {
	m.abort(api.Errorf(api.CodeAborted, "destination phauld is shutting down"))
}

func (m *dest) cancel() error {
	switch {
	case m.state == dstEnd && m.rec.State != store.Committed:
		return api.Errorf(api.CodeConflict, "session %s is already ending", m.s.ID)
	case m.state >= dstCommitted:
		return api.Errorf(api.CodeConflict, "session %s is committed here: too late to cancel", m.s.ID)
	}
	m.log.Info("canceled by the operator")
	m.abort(api.Errorf(api.CodeCanceled, "canceled on the destination"))
	return nil
}

func (m *dest) cleanup() {
	m.hb.stop()
	if m.syncer != nil {
		m.syncer.stop()
	}
	if m.state != dstEnd && m.state != dstCommitted {
		// A panic mid-way: make the outcome safe, here and now.
		m.discard(m.state == dstResumed || m.resuming)()
	}
	m.endGuard(m.rec.State == store.Committed)
	m.recv.close()
	for _, w := range []*criuWatch{m.check, m.ps, m.restoreW} {
		if w != nil {
			w.stop()
		}
	}
	if m.lazy != nil {
		// A committed migration's daemon has exited; any other was
		// killed by discard.
		m.lazy.Kill()
		m.lazy.Result()
		m.s.l.Unwatch(m.lazy.StatusFd())
		m.s.l.Unwatch(m.lazy.ExitFd())
		m.lazy.Close()
	}
	m.releasePS()
	m.dropPrecopyStore()
	m.disk.release()
	m.close()
	proc.CloseAll(m.tree)
	proc.CloseAll(m.discarded)
	if m.treeNS >= 0 {
		m.treeNS.Close()
		m.treeNS = -1
	}
}

func (m *dest) outcome() End {
	var pages int64
	if m.relay != nil {
		pages = m.relay.Received()
	}
	var lazyMS int64
	if !m.tResumed.IsZero() && m.tPagesIn.After(m.tResumed) {
		lazyMS = m.tPagesIn.Sub(m.tResumed).Milliseconds()
	}
	e := End{Record: *m.rec, Result: api.Result{
		Container: m.s.containerID(),
		ID:        m.s.ID.String(),
		SourcePID: m.srcPID,
		DestPID:   m.pid,
		NewPidNS:  m.newPidNS,
		Name:      m.runName,
		TotalMS:   time.Since(m.s.Started).Milliseconds(),
		Bytes:     m.bytes(),
		PageBytes: pages,
		PhasesMS:  m.ph.took,
		Mode:      m.mode,
		LazyMS:    lazyMS,
		Restore:   m.restoreStats,
	}}
	// The record decides: committed there is committed, whatever went
	// wrong after.
	if m.rec.State == store.Committed {
		e.Outcome = api.OutcomeCommitted
		return e
	}
	e.Outcome, e.Err = api.OutcomeRolledBack, m.failure
	if e.Err == nil {
		e.Err = api.Errorf(api.CodeAborted, "the migration ended before the commit")
	}
	return e
}

func (m *dest) crash() {
	if m.lazy != nil {
		m.unwatchLazy()
		m.lazy.Kill() // its parent-death signal
		m.lazy.Close()
		m.lazy = nil
	}
	m.endGuard(false) // its end of the guard's socket closes
	m.recv.close()
	m.releasePS() // a daemon's counts die with it
	m.disk.release()
	for _, w := range []*criuWatch{m.check, m.ps, m.restoreW} {
		if w != nil {
			w.stop()
		}
	}
	if m.relay != nil {
		m.relay.Close()
	}
	m.rpc.Close()
	m.mem.Close()
	if m.s.pending == 0 { // else work off the loop still holds them
		proc.CloseAll(m.tree)
		proc.CloseAll(m.discarded)
	}
	m.tree, m.discarded = nil, nil
}

func sortedKeys(set map[int]bool) []int {
	keys := make([]int, 0, len(set))
	for k := range set {
		keys = append(keys, k)
	}
	sort.Ints(keys)
	return keys
}
