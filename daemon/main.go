//go:build linux

// Command phauld is phaul's daemon: it migrates processes to and from
// other hosts' phauld with CRIU, and serves phaulctl on a control socket.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/control"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/journal"
	"github.com/phaul/phaul/pkg/migrate"
	"github.com/phaul/phaul/pkg/netlock"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/pkg/session"
	"github.com/phaul/phaul/pkg/systemd"
	"github.com/phaul/phaul/pkg/version"
	"github.com/phaul/phaul/pkg/wire"
)

func main() {
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
}

func parseFlags(args []string, out io.Writer) (options, error) {
	o := options{logLevel: zapcore.InfoLevel}
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
	fs.DurationVar(&o.peerTimeout, "peer-timeout", 15*time.Second, "how long a migration waits without a word from the other daemon before treating it as lost")
	fs.DurationVar(&o.keepFailed, "keep-failed", 7*24*time.Hour, "how long to keep the directories of failed migrations for inspection")
	fs.BoolVar(&o.keepImages, "keep-images", false, "keep the images of successful migrations under --state-dir")
	fs.StringVar(&o.tlsDir, "tls-dir", "/etc/phauld/tls", "`DIR` with ca.pem, cert.pem and key.pem for mutual TLS between daemons")
	fs.BoolVar(&o.insecure, "insecure", false, "migrate over plain TCP, unauthenticated and unencrypted (trusted networks only; both daemons need it)")
	fs.StringVar(&o.group, "control-group", "phaul", "`GROUP` whose members may use the control socket (created if missing)")
	fs.BoolVar(&o.showVersion, "version", false, "print the version and exit")
	fs.BoolVar(&o.oneShot, "one-shot", false, "serve exactly one migration (in or out), then exit")
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

	// Lazy dumps keep pages in pipes larger than the kernel's default
	// limit allows.
	pipeBlock := ""
	if was, err := criu.EnsurePipeMaxSize(criu.LazyPipeSize); err != nil {
		pipeBlock = fmt.Sprintf("fs.pipe-max-size is below the %d bytes lazy dumps need, and phauld could not raise it (%v): run 'sysctl -w fs.pipe-max-size=%d'",
			criu.LazyPipeSize, err, criu.LazyPipeSize)
		log.Warn("lazy migrations from this host are off", zap.Error(err))
	} else if was < criu.LazyPipeSize {
		log.Info("raised fs.pipe-max-size for CRIU's lazy pages", zap.Int("was", was), zap.Int("now", criu.LazyPipeSize))
	}
	asSource, asDest := migrate.HostCapabilities(info.Features.MemTrack, info.Features.LazyPages, pipeBlock)
	log.Info("migration modes", zap.Stringer("as_source", asSource), zap.Stringer("as_destination", asDest))

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
	gid, err := ensureGroup(o.group)
	if err != nil {
		log.Error("control group unavailable: only root may use phauld", zap.String("group", o.group), zap.Error(err))
		gid = -1
	}
	if ctlL == nil {
		if ctlL, err = listenControl(o.control, gid); err != nil {
			closeAll(migLs)
			return err
		}
	}
	sec := loadSecurity(o, log)

	mgr, err := session.NewManager(session.Config{
		Log:         log.Named("session"),
		CRIU:        migrate.FromClient(cc),
		Info:        info,
		AsSource:    asSource,
		AsDest:      asDest,
		StateDir:    o.stateDir,
		PairTimeout: o.pairTimeout,
		PeerTimeout: o.peerTimeout,
		KeepImages:  o.keepImages,
		AfterSession: func() {
			tidy()
			if o.oneShot {
				log.Info("one migration served: stopping (--one-shot)")
				stopSignals()
			}
		},
		Place:     placer(log),
		ServerTLS: sec.server,
		ClientTLS: sec.client,
		Insecure:  o.insecure,
		Disabled:  sec.disabled,
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
	mgr.CleanOld(o.keepFailed)
	svc := &service{mgr: mgr, info: info, modes: modeSupport(asSource, asDest), criuPath: cc.Path(), stateDir: o.stateDir, control: ctlL.Addr().String(), sec: sec}
	for _, l := range migLs {
		svc.listen = append(svc.listen, l.Addr().String())
	}
	ctl := control.New(svc, control.Policy{GroupID: gid, Group: o.group}, log.Named("control"))

	// Daemon-level parts fail together: if a listener dies, phauld stops.
	serveErr := make(chan error, len(migLs)+1)
	for _, l := range migLs {
		go func() { serveErr <- mgr.Serve(l) }()
	}
	go func() { serveErr <- ctl.Serve(ctlL) }()
	janitorDone := make(chan struct{})
	go func() {
		defer close(janitorDone)
		t := time.NewTicker(time.Hour)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				mgr.CleanOld(o.keepFailed)
				tidy()
			}
		}
	}()

	systemd.Notify("READY=1\nSTATUS=" + statusLine(svc.listen, nil))
	// The service manager's view: STATUS kept current, WATCHDOG pinged
	// while the manager answers.
	go notifyLoop(ctx, mgr, svc.listen)
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

// listenControl opens the control socket at path, replacing a stale socket
// file left by a phauld that died, but never one in use. It is mode 0660,
// owned by root and the control group (gid; -1: root's group).
func listenControl(path string, gid int) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("control socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("control socket %s exists and is not a socket; remove it", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("another phauld is serving %s; stop it first, or pass --control", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale control socket: %w", err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if gid >= 0 {
		if err := os.Chown(path, 0, gid); err != nil {
			l.Close()
			return nil, fmt.Errorf("control socket: %w", err)
		}
	}
	return l, nil
}

// ensureGroup returns the gid of group name, creating it (a system group)
// if it does not exist.
func ensureGroup(name string) (int, error) {
	if g, err := user.LookupGroup(name); err == nil {
		return strconv.Atoi(g.Gid)
	}
	if out, err := exec.Command("groupadd", "--system", name).CombinedOutput(); err != nil {
		return -1, fmt.Errorf("groupadd --system %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return -1, err
	}
	return strconv.Atoi(g.Gid)
}

// placer moves a restored tree into a scope of its own when systemd
// manages this host, so that stopping phauld's service never stops it.
// Elsewhere the tree is not phauld's child anyway.
func placer(log *zap.Logger) func(wire.SessionID, []int) error {
	if !systemd.Booted() {
		return nil
	}
	return func(id wire.SessionID, pids []int) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		name := "phaul-" + id.String() + ".scope"
		if err := systemd.PlaceInScope(ctx, name, "process migrated by phaul, session "+id.String(), pids); err != nil {
			return err
		}
		log.Info("restored tree placed in its own scope", zap.String("scope", name), zap.String("slice", systemd.ScopeSlice))
		return nil
	}
}

// modeSupport says, per mode, whether this host can run it on either
// side: "" if it can, else why not.
func modeSupport(asSource, asDest migrate.Capabilities) map[string]string {
	out := map[string]string{}
	for _, m := range []string{api.ModeCopy, api.ModeLazy, api.ModePrecopy} {
		var why []string
		if !asSource.Can(m) {
			why = append(why, "as a source: "+asSource[m])
		}
		if !asDest.Can(m) {
			why = append(why, "as a destination: "+asDest[m])
		}
		out[m] = strings.Join(why, "; ")
	}
	return out
}

// statusLine is what STATUS= says.
func statusLine(listen []string, sessions []api.Session) string {
	s := "serving migrations on " + strings.Join(listen, ", ")
	if len(sessions) == 0 {
		return s + "; idle"
	}
	var ids []string
	for _, x := range sessions {
		ids = append(ids, fmt.Sprintf("%s %s pid %d %s", x.ID[:8], x.Direction, x.PID, x.Phase))
	}
	return fmt.Sprintf("%s; %d migration(s): %s", s, len(sessions), strings.Join(ids, ", "))
}

// notifyLoop keeps STATUS= current and pings the watchdog at half its
// interval, until ctx ends. STATUS= follows sessions and their phases
// within a quarter second and is sent only when it changes. A ping
// follows a call into the session manager, so a daemon whose manager hangs
// stops pinging and systemd restarts it.
func notifyLoop(ctx context.Context, mgr *session.Manager, listen []string) {
	wd := systemd.WatchdogInterval()
	tick := 250 * time.Millisecond
	if wd > 0 && wd/2 < tick {
		tick = wd / 2
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	// READY=1 came with the idle line.
	last, pinged := statusLine(listen, nil), time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var msg []string
		if line := statusLine(listen, mgr.Sessions()); line != last {
			msg = append(msg, "STATUS="+line)
			last = line
		}
		if wd > 0 && time.Since(pinged) >= wd/2-tick/2 {
			msg = append(msg, "WATCHDOG=1")
			pinged = time.Now()
		}
		if len(msg) > 0 {
			systemd.Notify(strings.Join(msg, "\n"))
		}
	}
}

// security is how this daemon protects migrations.
type security struct {
	mode     string
	server   *tls.Config
	client   func(serverName string) *tls.Config
	disabled error
	id       *pki.Loaded
}

// loadSecurity reads the TLS identity, or takes --insecure. Without
// either, migrations are disabled, and the error says what to run.
func loadSecurity(o options, log *zap.Logger) security {
	if o.insecure {
		log.Warn("--insecure: migrations run over plain TCP, unauthenticated and unencrypted; use it only on a network you trust")
		return security{mode: api.SecurityInsecure}
	}
	id, err := pki.Load(o.tlsDir)
	if err != nil {
		disabled := api.Errorf(api.CodePrecondition,
			"this phauld serves no migrations: it has no usable TLS certificates in %s (%v). "+
				"Make them: on one host run 'phaulctl pki init --dir %s'; for every other host run "+
				"'phaulctl pki issue --dir %s --name HOST --out DIR' there and copy DIR to that host's %s; then restart phauld. "+
				"Or run every phauld with --insecure, on a network you trust",
			o.tlsDir, err, o.tlsDir, o.tlsDir, o.tlsDir)
		log.Error("migrations disabled", zap.Error(disabled))
		return security{mode: api.SecurityDisabled, disabled: disabled}
	}
	log.Info("mutual TLS", zap.String("tls_dir", o.tlsDir), zap.Strings("names", id.Names()), zap.Time("expires", id.Leaf.NotAfter))
	if left := time.Until(id.Leaf.NotAfter); left < 30*24*time.Hour {
		log.Warn("this daemon's certificate expires soon; issue a new one", zap.Duration("left", left.Round(time.Hour)))
	}
	return security{mode: api.SecurityTLS, server: id.ServerConfig(), client: id.ClientConfig, id: id}
}

// service is the daemon as the control API sees it.
type service struct {
	sec      security
	mgr      *session.Manager
	info     criu.Info
	criuPath string
	stateDir string
	control  string
	listen   []string
	modes    map[string]string
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
		Security: s.sec.mode,
		Modes:    s.modes,
		Sessions: s.mgr.Sessions(),
	}
	if s.sec.id != nil {
		st.TLSNames = s.sec.id.Names()
		exp := s.sec.id.Leaf.NotAfter
		st.TLSExpires = &exp
	}
	if s.sec.disabled != nil {
		st.Disabled = s.sec.disabled.Error()
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

func (s *service) Cancel(_ context.Context, _ api.Caller, id string) (api.Session, error) {
	return s.mgr.Cancel(id)
}
