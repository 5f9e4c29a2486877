//go:build linux

// Command phauld is phaul's daemon: it migrates processes to and from
// other hosts' phauld with CRIU, and serves phaulctl on a control socket.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/control"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/guard"
	"github.com/phaul/phaul/pkg/journal"
	"github.com/phaul/phaul/pkg/launch"
	"github.com/phaul/phaul/pkg/migrate"
	"github.com/phaul/phaul/pkg/netlock"
	"github.com/phaul/phaul/pkg/pidns"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/pkg/pty"
	"github.com/phaul/phaul/pkg/rootfs"
	"github.com/phaul/phaul/pkg/runc"
	"github.com/phaul/phaul/pkg/session"
	"github.com/phaul/phaul/pkg/systemd"
	"github.com/phaul/phaul/pkg/version"
	"github.com/phaul/phaul/pkg/wire"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == guard.Command {
		// phauld re-executed as a restored copy's guard (pkg/guard).
		os.Exit(guard.Main(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == rootfs.PipeCommand {
		// phauld run by rsync as its remote shell (pkg/rootfs).
		os.Exit(rootfs.PipeMain(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == pty.Command {
		// phauld draining a restored process's new terminal (pkg/pty).
		os.Exit(pty.Main(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == launch.InitCommand {
		// phauld as the first process of a program phaulctl run starts.
		os.Exit(launch.Main(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == pidns.Command {
		// phauld as the init of a restored tree's new pid namespace.
		os.Exit(pidns.Main(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == runc.HookCommand {
		// phauld run by CRIU as a container restore's action script.
		os.Exit(runc.HookMain(os.Args[2:]))
	}
	if err := run(context.Background(), os.Args[1:], os.Stderr); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "phauld:", err)
		}
		os.Exit(1)
	}
}

// options are phauld's command-line settings.
type options struct {
	listen      string
	control     string
	stateDir    string
	criuPath    string
	logLevel    zapcore.Level
	stopTimeout time.Duration
	pairTimeout time.Duration
	peerTimeout time.Duration
	keepFailed  time.Duration
	keepImages  bool
	tlsDir      string
	insecure    bool
	group       string
	showVersion bool
	oneShot     bool
	logTarget   string
	bridgeMap   bridgeMap
	runcPath    string
	runcRoot    string
	containers  string
	sharedPaths sharedPaths
	allowPeers  allowPeers

	// Liveness and limits (docs/operations.md).
	phaseTimeout   time.Duration
	maxIncoming    int
	maxOutgoing    int
	maxPageServers int
	maxSessionDisk size
	maxDisk        size
	precopyCap     size
	fetchAhead     size
	minFreeDisk    freeSpace
}

// allowPeers is --allow-peer CIDR, repeatable.
type allowPeers []netip.Prefix

func (a *allowPeers) String() string {
	var parts []string
	for _, p := range *a {
		parts = append(parts, p.String())
	}
	return strings.Join(parts, ",")
}

func (a *allowPeers) Set(v string) error {
	p, err := netip.ParsePrefix(v)
	if err != nil {
		addr, aerr := netip.ParseAddr(v)
		if aerr != nil {
			return fmt.Errorf("%q: want an address or a CIDR prefix (10.1.2.0/24, fd00::/64, 10.1.2.3)", v)
		}
		p = netip.PrefixFrom(addr, addr.BitLen())
	}
	if p.Addr().Is4In6() {
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	*a = append(*a, p.Masked())
	return nil
}

// size is a flag's amount of bytes: a number with an optional unit (K, M,
// G, T, with or without iB: powers of 1024); 0 is no limit.
type size int64

func (s *size) String() string {
	if *s == 0 {
		return "0"
	}
	return migrate.FormatSize(int64(*s))
}

func (s *size) Set(v string) error {
	n, err := parseSize(v)
	if err != nil {
		return err
	}
	*s = size(n)
	return nil
}

func parseSize(v string) (int64, error) {
	t := strings.TrimSpace(v)
	num := strings.TrimRightFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	unit := strings.ToUpper(strings.TrimSpace(t[len(num):]))
	unit = strings.TrimSuffix(strings.TrimSuffix(unit, "B"), "I")
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("%q: want a size such as 512M, 20G or 1T", v)
	}
	mult := map[string]float64{"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
	if mult == 0 {
		return 0, fmt.Errorf("%q: unknown unit %q (want K, M, G or T)", v, unit)
	}
	return int64(f * mult), nil
}

// freeSpace is --min-free-disk: a percentage of the filesystem (5%) or a
// size (20G).
type freeSpace migrate.FreeSpace

func (f *freeSpace) String() string { return migrate.FreeSpace(*f).String() }

func (f *freeSpace) Set(v string) error {
	if p, ok := strings.CutSuffix(strings.TrimSpace(v), "%"); ok {
		n, err := strconv.ParseFloat(p, 64)
		if err != nil || n < 0 || n >= 100 {
			return fmt.Errorf("%q: want a percentage from 0 to 99", v)
		}
		*f = freeSpace{Percent: n}
		return nil
	}
	n, err := parseSize(v)
	if err != nil {
		return fmt.Errorf("%w, or a percentage such as 5%%", err)
	}
	*f = freeSpace{Bytes: n}
	return nil
}

// Defaults of the liveness and limit flags; docs/operations.md says why.
const (
	defaultPhaseTimeout   = time.Minute
	defaultMaxPageServers = 8
	// Root writes past the filesystem's reserve: phauld keeps its own.
	defaultMinFreePercent = 5
	// A pre-copy destination holds at most this of the pages sent ahead.
	defaultPrecopyCap = 8 << 30
	// A lazy destination fetches at most this ahead of lazy-pages.
	defaultFetchAhead = 64 << 20
	minFetchAhead     = 1 << 20
)

// sharedPaths is --shared-path DIR, repeatable.
type sharedPaths []string

func (s *sharedPaths) String() string { return strings.Join(*s, ",") }

func (s *sharedPaths) Set(v string) error {
	if !filepath.IsAbs(v) {
		return fmt.Errorf("%q: want an absolute path", v)
	}
	*s = append(*s, filepath.Clean(v))
	return nil
}

// bridgeMap is --bridge-map SRC=DST, repeatable.
type bridgeMap map[string]string

func (b *bridgeMap) String() string {
	var parts []string
	for src, dst := range *b {
		parts = append(parts, src+"="+dst)
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

func (b *bridgeMap) Set(v string) error {
	src, dst, ok := strings.Cut(v, "=")
	if !ok || !wire.ValidIfName(src) || !wire.ValidIfName(dst) {
		return fmt.Errorf("%q: want SRC=DST, two bridge names", v)
	}
	if *b == nil {
		*b = bridgeMap{}
	}
	if old, dup := (*b)[src]; dup && old != dst {
		return fmt.Errorf("%s is mapped twice (to %s and %s)", src, old, dst)
	}
	(*b)[src] = dst
	return nil
}

func parseFlags(args []string, out io.Writer) (options, error) {
	o := options{logLevel: zapcore.InfoLevel, minFreeDisk: freeSpace{Percent: defaultMinFreePercent}, precopyCap: defaultPrecopyCap, fetchAhead: defaultFetchAhead}
	fs := newFlagSet(&o, out)
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q (see phauld --help)", fs.Arg(0))
	}
	switch o.logTarget {
	case "auto", "journal", "console":
	default:
		return o, fmt.Errorf("--log-target %q: want journal, console or auto", o.logTarget)
	}
	if o.peerTimeout < time.Second {
		return o, fmt.Errorf("--peer-timeout %v is too short (at least 1s)", o.peerTimeout)
	}
	if o.phaseTimeout != 0 && o.phaseTimeout < time.Second {
		return o, fmt.Errorf("--phase-timeout %v is too short (at least 1s, or 0 for none)", o.phaseTimeout)
	}
	if o.keepFailed < 0 {
		return o, fmt.Errorf("--keep-failed %v: want 0 (remove at once) or more", o.keepFailed)
	}
	if o.fetchAhead != 0 && o.fetchAhead < minFetchAhead {
		return o, fmt.Errorf("--fetch-ahead %d: want 0 (off) or at least 1M, a request's worth", int64(o.fetchAhead))
	}
	for name, n := range map[string]int{"max-incoming": o.maxIncoming, "max-outgoing": o.maxOutgoing, "max-page-servers": o.maxPageServers} {
		if n < 0 {
			return o, fmt.Errorf("--%s %d: want 0 (no limit) or more", name, n)
		}
	}
	return o, nil
}

// newFlagSet defines phauld's flags on o. packaging/man/phauld.8 documents
// every one (a test keeps them in step).
func newFlagSet(o *options, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("phauld", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() {
		fmt.Fprintf(out, `Usage: phauld [flags]

phauld migrates running processes between hosts with CRIU. Run it on every
host (systemctl enable --now phauld.socket); use phaulctl to drive it.

When systemd passes sockets (LISTEN_FDS), phauld serves migrations on the
TCP ones and the control API on the Unix one, and ignores --listen and
--control for the kinds it was given.

Flags:
`)
		fs.PrintDefaults()
	}
	fs.StringVar(&o.listen, "listen", ":"+strconv.Itoa(api.DefaultPort), "`ADDR:PORT` to accept migrations on")
	fs.StringVar(&o.control, "control", api.DefaultSocket, "`PATH` of the control socket")
	fs.StringVar(&o.stateDir, "state-dir", "/var/lib/phauld", "`DIR` for session images and logs")
	fs.StringVar(&o.criuPath, "criu", "criu", "CRIU binary (`PATH`, or a name looked up in PATH)")
	fs.Var(&o.logLevel, "log-level", "log `LEVEL`: debug, info, warn, error")
	fs.DurationVar(&o.stopTimeout, "stop-timeout", 60*time.Second, "on SIGTERM, how long to wait for migrations to end")
	fs.DurationVar(&o.pairTimeout, "pair-timeout", 30*time.Second, "how long one connection of a migration waits for its pair")
	fs.DurationVar(&o.peerTimeout, "peer-timeout", 15*time.Second, "how long a migration waits without a word from the other daemon (an answer to its pings, or data) before treating it as lost")
	fs.DurationVar(&o.keepFailed, "keep-failed", 7*24*time.Hour, "how long to keep the images and logs of failed migrations for inspection (0: remove them as soon as the migration ends; their small records stay an hour)")
	fs.DurationVar(&o.phaseTimeout, "phase-timeout", defaultPhaseTimeout, "abort a migration whose phase neither advances nor moves a byte for this long, though the other daemon answers pings (0: never)")
	fs.IntVar(&o.maxIncoming, "max-incoming", session.DefaultMaxIncoming, "migrations arriving at once; more are refused, saying so (0: no limit)")
	fs.IntVar(&o.maxOutgoing, "max-outgoing", session.DefaultMaxOutgoing, "migrations leaving at once; more are refused, saying so (0: no limit)")
	fs.IntVar(&o.maxPageServers, "max-page-servers", defaultMaxPageServers, "CRIU page servers (and lazy-pages daemons) running at once for arriving migrations (0: no limit)")
	fs.Var(&o.maxSessionDisk, "max-session-disk", "the most one arriving migration may write under --state-dir, its images and pages (`SIZE`, e.g. 20G; 0: no limit)")
	fs.Var(&o.precopyCap, "precopy-cap", "the most an arriving pre-copy migration may send ahead while the process runs, kept under --state-dir until the freeze (`SIZE`; 0: only the disk limits; what does not fit moves at the freeze)")
	fs.Var(&o.fetchAhead, "fetch-ahead", "the most an arriving lazy migration fetches ahead of CRIU's lazy-pages once the process runs, held in phauld's memory (`SIZE`; 0: lazy-pages fetches every page itself)")
	fs.Var(&o.maxDisk, "max-disk", "the most the arriving migrations in flight may write under --state-dir together (`SIZE`; 0: no limit)")
	fs.Var(&o.minFreeDisk, "min-free-disk", "refuse or abort an arriving migration that would leave less than this free on --state-dir's filesystem (`SIZE` or PERCENT%)")
	fs.BoolVar(&o.keepImages, "keep-images", false, "keep the images of successful migrations under --state-dir")
	fs.StringVar(&o.tlsDir, "tls-dir", "/etc/phauld/tls", "`DIR` with ca.pem, cert.pem and key.pem for mutual TLS between daemons")
	fs.BoolVar(&o.insecure, "insecure", false, "migrate over plain TCP, unauthenticated and unencrypted: anyone who can connect to the listen address can run programs as root on this host (both daemons need it; only where nobody else can reach the port)")
	fs.StringVar(&o.group, "control-group", "phaul", "`GROUP` whose members may use the control socket (created if missing)")
	fs.BoolVar(&o.showVersion, "version", false, "print the version and exit")
	fs.BoolVar(&o.oneShot, "one-shot", false, "serve exactly one migration (in or out), then exit")
	fs.Var(&o.bridgeMap, "bridge-map", "as a destination, put the veths that were on bridge SRC on the source on bridge DST here (`SRC=DST`, repeatable; unmapped: the bridge of the same name)")
	fs.StringVar(&o.runcPath, "runc", "runc", "runc binary for containers (`PATH`, or a name looked up in PATH; containers are refused where it is missing)")
	fs.StringVar(&o.runcRoot, "runc-root", "/run/runc", "runc's state root (`DIR`): where migrate --container finds containers, and where arriving ones are kept")
	fs.StringVar(&o.containers, "containers-dir", "", "`DIR` for the bundles of arriving containers (default: containers under --state-dir)")
	fs.Var(&o.allowPeers, "allow-peer", "accept migration connections only from `CIDR` (an address or a prefix: 10.1.2.0/24; repeatable; default: from anywhere); others are refused before any byte is read, with or without --insecure")
	fs.Var(&o.sharedPaths, "shared-path", "as a destination, take an arriving container's root filesystem under `DIR` as on storage shared with the source, at the same path: nothing is copied (repeatable; else phaul sees for itself, by a marker file the source writes)")
	fs.StringVar(&o.logTarget, "log-target", "auto", "`TARGET` of the logs: journal (native entries with PHAUL_* fields), console, or auto (journal when stderr is the journal)")
	return fs
}

func newLogger(level zapcore.Level, target string, w io.Writer) *zap.Logger {
	if target == "journal" || (target == "auto" && journal.StderrIsJournal() && journal.Enabled()) {
		return zap.New(journal.NewCore(level, "phauld")).Named("phauld")
	}
	enc := zap.NewDevelopmentEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	core := zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.Lock(zapcore.AddSync(w)), level)
	return zap.New(core).Named("phauld")
}

// run is phauld's whole life. The order of its steps is deliberate:
//
//  1. signals are caught first, so a SIGTERM during start-up is not lost;
//  2. CRIU is checked before any listener opens, so a host that cannot
//     migrate never looks ready, and leftovers of earlier CRIU runs
//     (network-lock tables) are swept;
//  3. listeners come from systemd when it passed them, else are opened;
//  4. READY=1 only once the listeners serve and CRIU was checked;
//  5. on SIGTERM: STOPPING=1, stop accepting, stop every session through
//     its eventfd (each ends by its commit rule), wait up to
//     --stop-timeout, flush the logs.
func run(ctx context.Context, args []string, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	if o.showVersion {
		fmt.Fprintln(os.Stdout, version.Daemon())
		return nil
	}
	ctx, stopSignals := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stopSignals()

	if o.logTarget == "journal" && !journal.Enabled() {
		return fmt.Errorf("--log-target journal: no journald here (%s is missing); use --log-target console", "/run/systemd/journal/socket")
	}
	log := newLogger(o.logLevel, o.logTarget, stderr)
	defer log.Sync()

	if err := os.MkdirAll(o.stateDir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	cc := criu.New(o.criuPath)
	probeDir, err := os.MkdirTemp(o.stateDir, "probe-")
	if err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	probeCtx, cancel := context.WithTimeout(ctx, time.Minute)
	info, err := cc.Probe(probeCtx, probeDir)
	cancel()
	os.RemoveAll(probeDir)
	if err != nil {
		return fmt.Errorf("CRIU check: %w", err)
	}
	log.Info("CRIU checked", zap.String("path", cc.Path()), zap.Stringer("version", info.Version),
		zap.Bool("mem_track", info.Features.MemTrack), zap.Bool("lazy_pages", info.Features.LazyPages),
		zap.Bool("cpuinfo", info.CPUInfo != nil))

	asSource, asDest := migrate.DetectModes(info, log)
	tidy := func() {
		removed, err := netlock.Clean(-1)
		switch {
		case err != nil:
			log.Warn("cannot sweep CRIU's leftover network locks", zap.Error(err))
		case len(removed) > 0:
			log.Warn("removed CRIU's leftover network-lock tables", zap.Strings("tables", removed))
		}
	}
	tidy()

	activated, err := systemd.Activated()
	if err != nil {
		return fmt.Errorf("socket activation: %w", err)
	}
	migLs, ctlL, err := systemd.Split(activated)
	if err != nil {
		return err
	}
	if len(migLs) > 0 || ctlL != nil {
		log.Info("socket-activated", zap.Int("migration_sockets", len(migLs)), zap.Bool("control_socket", ctlL != nil))
	}
	if len(migLs) == 0 {
		l, err := net.Listen("tcp", o.listen)
		if err != nil {
			return fmt.Errorf("listen for migrations: %w", err)
		}
		migLs = []net.Listener{l}
	}
	gid, err := control.EnsureGroup(o.group)
	if err != nil {
		log.Error("control group unavailable: only root may use phauld", zap.String("group", o.group), zap.Error(err))
		gid = -1
	}
	if ctlL == nil {
		if ctlL, err = control.Listen(o.control, gid); err != nil {
			closeAll(migLs)
			return err
		}
	}
	sec := pki.LoadSecurity(o.tlsDir, o.insecure, log)
	placer := systemd.NewPlacer()
	defer placer.Close()

	policy := control.Policy{GroupID: gid, Group: o.group}
	rc, containersDir, self, ctrs := containerRuntime(o, log)
	mgr, err := session.NewManager(session.Config{
		Log:         log.Named("session"),
		CRIU:        migrate.FromClient(cc),
		Info:        info,
		AsSource:    asSource,
		AsDest:      asDest,
		BridgeMap:   o.bridgeMap,
		StateDir:    o.stateDir,
		PairTimeout: o.pairTimeout,
		PeerTimeout: o.peerTimeout,
		KeepImages:  o.keepImages,
		// Liveness and limits.
		PhaseTimeout: o.phaseTimeout,
		PrecopyCap:   int64(o.precopyCap),
		FetchAhead:   int64(o.fetchAhead),
		MaxIncoming:  o.maxIncoming,
		MaxOutgoing:  o.maxOutgoing,
		Limits: &migrate.Limits{PageServers: o.maxPageServers, SessionDisk: int64(o.maxSessionDisk),
			TotalDisk: int64(o.maxDisk), MinFree: migrate.FreeSpace(o.minFreeDisk)},
		RemoveFailedAtOnce: o.keepFailed == 0,
		AfterSession: func() {
			tidy()
			if o.oneShot {
				log.Info("one migration served: stopping (--one-shot)")
				stopSignals()
			}
		},
		Place:           scopes(placer, log),
		PlaceRun:        runScopes(placer),
		Guard:           guards(log),
		Runc:            rc,
		ContainersDir:   containersDir,
		SharedPaths:     o.sharedPaths,
		HookExe:         self,
		Authorize:       policy.CanMigrateTree,
		AuthorizeFrozen: policy.CanMigrateFrozen,
		ServerTLS:       sec.Server,
		ClientTLS:       sec.Client,
		Insecure:        o.insecure,
		Disabled:        sec.Disabled,
		Admission:       session.Admission{AllowPeers: o.allowPeers},
	})
	if err != nil {
		closeAll(migLs)
		ctlL.Close()
		return err
	}
	// What a previous run left in flight is finished or undone before
	// anything new is accepted.
	if err := mgr.Recover(); err != nil {
		closeAll(migLs)
		ctlL.Close()
		return fmt.Errorf("recover sessions: %w", err)
	}
	svc := &service{mgr: mgr, info: info, modes: migrate.ModeSupport(asSource, asDest), criuPath: cc.Path(), stateDir: o.stateDir, control: ctlL.Addr().String(), sec: sec, ctrs: ctrs}
	for _, l := range migLs {
		svc.listen = append(svc.listen, l.Addr().String())
	}
	ctl := control.New(svc, policy, log.Named("control"))

	// Daemon-level parts fail together: if a listener dies, phauld stops.
	serveErr := make(chan error, len(migLs)+1)
	for _, l := range migLs {
		go func() { serveErr <- mgr.Serve(l) }()
	}
	go func() { serveErr <- ctl.Serve(ctlL) }()
	janitorDone := make(chan struct{})
	go func() {
		defer close(janitorDone)
		mgr.Janitor(ctx, session.JanitorEvery(o.keepFailed), o.keepFailed, tidy)
	}()

	systemd.Notify("READY=1\nSTATUS=" + systemd.StatusLine(svc.listen, nil))
	// The service manager's view: STATUS kept current, WATCHDOG pinged
	// while the manager answers.
	go systemd.KeepStatus(ctx, svc.listen, mgr.Sessions)
	if o.insecure {
		log.Warn(insecureWarning(svc.listen, o.allowPeers), zap.Strings("listen", svc.listen))
	}
	if len(o.allowPeers) > 0 {
		log.Info("migration connections accepted only from --allow-peer", zap.String("allow_peer", o.allowPeers.String()))
	}
	log.Info("phauld ready", zap.String("version", version.Version), zap.Strings("listen", svc.listen),
		zap.String("control", svc.control), zap.String("state_dir", o.stateDir))

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("stopping", zap.Duration("deadline", o.stopTimeout))
	case runErr = <-serveErr:
		log.Error("a listener failed; stopping", zap.Error(runErr))
	}
	systemd.Notify("STOPPING=1\nSTATUS=stopping")
	stopCtx, cancelStop := context.WithTimeout(context.Background(), o.stopTimeout)
	defer cancelStop()
	if err := mgr.Shutdown(stopCtx); err != nil {
		log.Error("stop deadline passed", zap.Error(err))
		runErr = errors.Join(runErr, err)
	}
	if err := ctl.Shutdown(stopCtx); err != nil {
		log.Warn("control API did not stop cleanly", zap.Error(err))
	}
	stopSignals()
	<-janitorDone
	log.Info("phauld stopped")
	return runErr
}

func closeAll(ls []net.Listener) {
	for _, l := range ls {
		l.Close()
	}
}

// scopes moves a restored tree into a scope of its own when systemd
// manages this host, so that stopping phauld's service never stops it.
// Elsewhere the tree is not phauld's child anyway.
func scopes(p *systemd.Placer, log *zap.Logger) func(ctx context.Context, id string, pids []int) error {
	if !systemd.Booted() {
		return nil
	}
	return func(ctx context.Context, id string, pids []int) error {
		name := "phaul-" + id + ".scope"
		if err := p.Place(ctx, name, "process migrated by phaul, session "+id, pids); err != nil {
			return err
		}
		log.Info("restored tree placed in its own scope", zap.String("scope", name), zap.String("slice", systemd.ScopeSlice))
		return nil
	}
}

// insecureWarning says what --insecure gives away, in words: a migration
// restores, as root, whatever the peer sends.
func insecureWarning(listen []string, allow allowPeers) string {
	from := ""
	if len(allow) > 0 {
		from = " from " + allow.String()
	}
	return "--insecure: anyone who can connect to " + strings.Join(listen, ", ") + from +
		" can run programs as root on this host (a migration restores, as root, whatever it is sent), and migrations cross the network unencrypted: use it only where nobody else can reach that port (--allow-peer limits who may connect)"
}

// runScopes puts a program phaulctl run started in a scope of its own,
// under phaul.slice, when systemd manages this host.
func runScopes(p *systemd.Placer) func(ctx context.Context, name string, pid int) (string, error) {
	if !systemd.Booted() {
		return nil
	}
	return func(ctx context.Context, name string, pid int) (string, error) {
		unit := "phaul-run-" + strconv.Itoa(pid) + ".scope"
		desc := "program started by phaulctl run"
		if name != "" {
			unit = "phaul-run-" + name + ".scope"
			desc += ", named " + name
		}
		return unit, p.Place(ctx, unit, desc, []int{pid})
	}
}

// guards starts restored copies' guards: phauld's own binary, re-executed.
func guards(log *zap.Logger) func(dir string, pid int, start uint64) (migrate.Guard, error) {
	exe, err := os.Executable()
	if err != nil {
		log.Warn("cannot find phauld's own binary: restored copies go unguarded until the commit", zap.Error(err))
		return nil
	}
	return func(dir string, pid int, start uint64) (migrate.Guard, error) {
		return guard.Start(exe, dir, pid, start)
	}
}

// containerRuntime is the runc phauld moves containers with (nil if it is
// not installed), the directory arriving bundles go to, and phauld's own
// binary (CRIU runs it during a container's restore).
func containerRuntime(o options, log *zap.Logger) (*runc.Runc, string, string, api.Containers) {
	dir := o.containers
	if dir == "" {
		dir = filepath.Join(o.stateDir, "containers")
	}
	st := api.Containers{Root: o.runcRoot, Dir: dir, SharedPaths: o.sharedPaths}
	if _, err := exec.LookPath("podman"); err == nil {
		st.Podman = true
	}
	self, err := os.Executable()
	if err != nil {
		log.Warn("cannot find phauld's own binary: containers cannot arrive here", zap.Error(err))
		st.Refused = fmt.Sprintf("phauld cannot find its own binary (%v)", err)
		return nil, dir, "", st
	}
	path, err := exec.LookPath(o.runcPath)
	if err != nil {
		log.Info("no runc here: containers are refused", zap.String("runc", o.runcPath))
		st.Refused = fmt.Sprintf("no runc (%s) here: install Debian's runc, then restart phauld", o.runcPath)
		return nil, dir, self, st
	}
	criuPath := o.criuPath
	if p, err := exec.LookPath(criuPath); err == nil {
		criuPath = p
	}
	r := &runc.Runc{Path: path, Root: o.runcRoot, CRIU: criuPath}
	v, err := r.Version(context.Background())
	if err != nil {
		log.Warn("runc does not run: containers are refused", zap.Error(err))
		st.Refused = fmt.Sprintf("runc does not run: %v", err)
		return nil, dir, self, st
	}
	log.Info("runc found", zap.String("path", path), zap.String("version", v), zap.String("root", o.runcRoot), zap.String("containers_dir", dir))
	st.Runc, st.RuncVersion = path, v
	return r, dir, self, st
}
