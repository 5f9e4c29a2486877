//go:build linux

// Command soak migrates test workloads back and forth between two phauld
// daemons for a long time and checks, after every hop, that each workload
// still exists exactly once, on the side the outcome says, with its memory
// intact. It is what `make soak` runs (as root, with bin/phauld,
// bin/phaulctl and build/workload built); it is not part of `make test`.
//
//	go run ./test/soak -bin bin -workload build/workload -workloads 8 -trips 100 -mode both -chaos
//
// Two daemons, A on 127.0.0.1:PORT and B on 127.0.0.2:PORT+1, speak mutual
// TLS with certificates from a CA made for the run. Each of N workloads
// (test/workload: the init of its own pid namespace with one child, both
// holding pseudo-random memory) has a goroutine that migrates it 2×M times
// (M round trips), each hop from wherever it runs to the other daemon, with
// `phaulctl migrate --json`. A hop that fails is not retried: the next hop
// starts from wherever the process is. -mode both runs the whole soak in
// copy mode, then again, with fresh workloads, in lazy mode (each with its
// own figures), rather than alternating per hop: that way each mode's
// figures say something of that mode alone.
//
// After every hop it waits until neither daemon has a session of that
// workload in flight (a daemon that does not answer counts as one in
// flight), then looks at every copy of the tree (test/harness
// Workload.Processes, pkg/proc Running) and asks the one running copy of
// the root and of its child for a report, which must be intact against the
// one before the hop (test/report Intact). Each hop is classified by
// phaulctl's exit code:
//
//   - committed (0): the copy must be the destination's, the pid the result
//     names;
//   - refused (1): nothing happened, the copy must be the source's
//     untouched process (same pid, same start time);
//   - rolled back (3): the copy must be the source's;
//   - in doubt (4): it is waited for, then counted by where the copy is;
//   - interrupted: exit 4 (or 1) because the source daemon was SIGKILLed
//     under the call (phaulctl lost its stream, it was not refused):
//     counted by where the copy is.
//
// Violations, each counted, logged with the session ids and the lines of
// both daemons' logs that name them, and making the exit status non-zero:
// lost (no running copy), duplicated (two or more), corrupt (a report not
// intact, or none), wrong side (not where exits 0, 1 and 3 say), hung (no
// answer from phaulctl within -hop-timeout), unsettled (sessions still in
// flight, or stopped copies left, after -settle-timeout), cli (an exit code
// or output phaulctl should not give), leftover (a process still working in
// a daemon's state directory, or a workload process left after the end) and
// restart (a daemon chaos could not start again). After a lost workload its
// goroutine ends; after a duplicated one the copies the outcome does not
// name are killed and the soak goes on with the one it does.
//
// With -chaos, a goroutine SIGKILLs A or B (chosen at random) every 5–30 s
// (-chaos-every), and restarts it 0.5–2 s later (-chaos-down), while the migrations run;
// it records the phases of the sessions the killed daemon had. It stops
// before each mode's final checks. -seed fixes its intervals and choices
// (not what they hit: that depends on the migrations' own timing).
//
// Each workload runs in a directory of its own (phauld serialises the
// dumps of tasks sharing a working directory), so the migrations run in
// parallel; soak itself works in a directory of the run, so that a dump
// killed mid-way leaves nothing in the directory it was started in.
//
// At the end it prints, per mode, the counts, the kills per daemon, the
// median and 99th percentile of phauld's total and frozen times of the
// committed hops, and the wall time, and writes the same as JSON to -json.
// It stops the daemons and kills the workloads (only processes it
// started, by pid) also on failure and on SIGINT or SIGTERM, and removes
// its directory, the daemons' logs with it: -logs DIR keeps them, and the
// CRIU logs of the sessions a violation names.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/client"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/test/harness"
	"github.com/phaul/phaul/test/report"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// children is how many children each workload's root has.
const children = 1

// Daemon flags: a lost peer is noticed within seconds, a SIGTERMed daemon
// ends its sessions within 20 s.
var daemonFlags = []string{"--peer-timeout", "3s", "--stop-timeout", "20s"}

// config is what the flags say.
type config struct {
	bin, workload      string
	workloads, trips   int
	memMiB, port       int
	mode               string
	chaos              bool
	chaosMin, chaosMax time.Duration
	downMin, downMax   time.Duration
	seed               uint64
	jsonPath, logsDir  string
	duration           time.Duration
	hopTimeout         time.Duration
	settleTimeout      time.Duration
}

// hidden flags are for test runs of the soak itself; the usage leaves them
// out.
var hidden = map[string]bool{"chaos-every": true, "chaos-down": true, "hop-timeout": true, "settle-timeout": true}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("soak", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.bin, "bin", "bin", "`DIR` with phauld and phaulctl")
	fs.StringVar(&c.workload, "workload", "build/workload", "the test workload binary (`PATH`, go build ./test/workload)")
	fs.IntVar(&c.workloads, "workloads", 8, "workloads migrated at once (`N`)")
	fs.IntVar(&c.trips, "trips", 100, "round trips A→B→A per workload (`M`)")
	fs.IntVar(&c.memMiB, "mem", 16, "`MiB` of memory of each process (the root and its child)")
	fs.IntVar(&c.port, "port", 24301, "A listens on 127.0.0.1:`PORT`, B on 127.0.0.2:PORT+1")
	fs.StringVar(&c.mode, "mode", "both", "copy, lazy, or both (the copy soak, then the lazy soak)")
	fs.BoolVar(&c.chaos, "chaos", false, "SIGKILL and restart A or B at random moments while migrations run")
	fs.Uint64Var(&c.seed, "seed", 0, "seed of the chaos timing (0: from the clock; it is logged)")
	fs.StringVar(&c.jsonPath, "json", "", "also write the summary as JSON to `FILE`")
	fs.StringVar(&c.logsDir, "logs", "", "copy the daemons' logs to `DIR` at the end")
	fs.DurationVar(&c.duration, "duration", 0, "stop starting new hops after this long, per mode (0: no limit)")
	every := fs.String("chaos-every", "5s,30s", "MIN,MAX: the chaos interval")
	down := fs.String("chaos-down", "500ms,2s", "MIN,MAX: how long a killed daemon stays down")
	fs.DurationVar(&c.hopTimeout, "hop-timeout", 5*time.Minute, "a migration not over after this long is hung")
	fs.DurationVar(&c.settleTimeout, "settle-timeout", 3*time.Minute, "how long a hop may take to settle to one copy")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: soak [flags] (as root)\n\nMigrates workloads back and forth between two phauld and checks every hop.\n\nFlags:\n")
		fs.VisitAll(func(f *flag.Flag) {
			if hidden[f.Name] {
				return
			}
			name, usage := flag.UnquoteUsage(f)
			fmt.Fprintf(stderr, "  -%s %s\n    \t%s (default %q)\n", f.Name, name, usage, f.DefValue)
		})
	}
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var err error
	if c.chaosMin, c.chaosMax, err = durationRange(*every); err != nil || c.chaosMin <= 0 {
		return c, fmt.Errorf("-chaos-every %q: want MIN,MAX, e.g. 5s,30s", *every)
	}
	if c.downMin, c.downMax, err = durationRange(*down); err != nil {
		return c, fmt.Errorf("-chaos-down %q: want MIN,MAX, e.g. 500ms,2s", *down)
	}
	switch c.mode {
	case api.ModeCopy, api.ModeLazy, "both":
	default:
		return c, fmt.Errorf("-mode %q: want copy, lazy or both", c.mode)
	}
	if c.workloads < 1 || c.trips < 1 || c.memMiB < 1 {
		return c, fmt.Errorf("-workloads, -trips and -mem must be at least 1")
	}
	if c.seed == 0 {
		c.seed = uint64(time.Now().UnixNano())
	}
	return c, nil
}

// durationRange parses MIN,MAX.
func durationRange(s string) (lo, hi time.Duration, err error) {
	a, b, ok := strings.Cut(s, ",")
	if !ok {
		return 0, 0, errors.New("no comma")
	}
	if lo, err = time.ParseDuration(a); err == nil {
		hi, err = time.ParseDuration(b)
	}
	if err == nil && (lo < 0 || hi < lo) {
		err = errors.New("want 0 <= MIN <= MAX")
	}
	return lo, hi, err
}

// run is the whole soak; it returns the exit status.
func run(args []string, stdout, stderr io.Writer) int {
	c, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "soak:", err)
		return 2
	}
	// Signals first: a SIGINT during set-up still gets everything cleaned
	// up. They stop new hops; the ones in flight finish.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	s := &soak{cfg: c, log: log.New(stderr, "soak: ", log.Ltime|log.Lmicroseconds)}
	sum, err := s.run(ctx)
	if sum != nil {
		sum.print(stdout)
		if c.jsonPath != "" {
			if werr := sum.write(c.jsonPath); werr != nil && err == nil {
				err = werr
			}
		}
	}
	switch {
	case err != nil:
		fmt.Fprintln(stderr, "soak:", err)
		return 1
	case ctx.Err() != nil:
		fmt.Fprintln(stderr, "soak: interrupted")
		return 1
	case sum.violations() > 0:
		fmt.Fprintf(stderr, "soak: %d invariant violations\n", sum.violations())
		return 1
	}
	return 0
}

// soak is one run: its directory, its two daemons, the chaos.
type soak struct {
	cfg config
	log *log.Logger
	dir string
	ds  [2]*harness.Daemon
	// chaos is the current mode's chaos, or nil.
	chaos *chaos
	// calls are the phaulctl runs still going: a hung one ends only when
	// its daemon stops.
	calls sync.WaitGroup
}

func (s *soak) run(ctx context.Context) (sum *summary, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("needs root (CRIU dumps and restores processes)")
	}
	c := &s.cfg
	// Absolute, symlinks resolved: the soak changes directory, and the
	// harness finds a workload's copies by /proc/PID/exe.
	for _, p := range []*string{&c.bin, &c.workload} {
		if *p, err = filepath.Abs(*p); err == nil {
			*p, err = filepath.EvalSymlinks(*p)
		}
		if err != nil {
			return nil, err
		}
	}
	for _, p := range []*string{&c.jsonPath, &c.logsDir} {
		if *p != "" {
			if *p, err = filepath.Abs(*p); err != nil {
				return nil, err
			}
		}
	}
	for _, b := range []string{filepath.Join(c.bin, "phauld"), filepath.Join(c.bin, "phaulctl"), c.workload} {
		if _, err := os.Stat(b); err != nil {
			return nil, fmt.Errorf("%w (make build; go build -o build/workload ./test/workload)", err)
		}
	}
	if s.dir, err = os.MkdirTemp("", "phaul-soak-"); err != nil {
		return nil, err
	}
	start := time.Now()
	sum = &summary{Seed: c.seed, Workloads: c.workloads, Trips: c.trips, MemMiB: c.memMiB, Chaos: c.chaos}
	if c.chaos {
		sum.ChaosEvery = []string{c.chaosMin.String(), c.chaosMax.String()}
		sum.ChaosDown = []string{c.downMin.String(), c.downMax.String()}
	}
	s.log.Printf("run in %s, chaos seed %d", s.dir, c.seed)
	wd, _ := os.Getwd()
	defer func() {
		s.stopDaemons()
		if c.logsDir != "" {
			s.keepLogs(sum)
		}
		os.Chdir(wd)
		if rerr := os.RemoveAll(s.dir); rerr != nil {
			s.log.Printf("remove %s: %v", s.dir, rerr)
			if err == nil {
				err = rerr
			}
		}
		sum.WallS = time.Since(start).Seconds()
	}()
	// soak's own working directory (see the package doc).
	cwd := filepath.Join(s.dir, "cwd")
	if err := os.Mkdir(cwd, 0o755); err != nil {
		return sum, err
	}
	if err := os.Chdir(cwd); err != nil {
		return sum, err
	}
	if err := s.startDaemons(); err != nil {
		return sum, err
	}
	modes := []string{c.mode}
	if c.mode == "both" {
		modes = []string{api.ModeCopy, api.ModeLazy}
	}
	for _, mode := range modes {
		if ctx.Err() != nil {
			break
		}
		if why := s.modeUnsupported(mode); why != "" {
			return sum, fmt.Errorf("this host cannot run %s migrations: %s", mode, why)
		}
		t := newTally(mode)
		sum.Modes = append(sum.Modes, t)
		if err := s.runMode(ctx, t); err != nil {
			return sum, fmt.Errorf("%s: %w", mode, err)
		}
	}
	if ctx.Err() != nil {
		sum.Interrupted = true
	}
	return sum, nil
}

// startDaemons starts A and B with certificates from a CA of the run.
func (s *soak) startDaemons() error {
	ca := filepath.Join(s.dir, "ca")
	if err := pki.Init(ca, []string{"127.0.0.1"}); err != nil {
		return fmt.Errorf("make the CA: %w", err)
	}
	for i, host := range []string{"127.0.0.1", "127.0.0.2"} {
		name := string(rune('A' + i))
		d, err := harness.StartDaemon(harness.DaemonConfig{
			Name: name, Addr: host + ":" + strconv.Itoa(s.cfg.port+i), Dir: filepath.Join(s.dir, name),
			Phauld: filepath.Join(s.cfg.bin, "phauld"), Phaulctl: filepath.Join(s.cfg.bin, "phaulctl"),
			CA: ca, Flags: daemonFlags,
		})
		if d != nil {
			s.ds[i] = d
		}
		if err != nil {
			return err
		}
		s.log.Printf("phauld %s on %s, log %s", name, d.Addr, d.LogPath)
	}
	return nil
}

// stopDaemons stops both daemons, then waits (a little) for the phaulctl
// runs they leave.
func (s *soak) stopDaemons() {
	for _, d := range s.ds {
		if d == nil {
			continue
		}
		if err := d.Stop(40 * time.Second); err != nil {
			s.log.Print(err)
		}
	}
	done := make(chan struct{})
	go func() {
		s.calls.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		s.log.Print("phaulctl runs still going 30s after the daemons stopped")
	}
}

// keepLogs copies the daemons' logs to -logs, and the CRIU logs of the
// sessions named in violations.
func (s *soak) keepLogs(sum *summary) {
	if err := os.MkdirAll(s.cfg.logsDir, 0o755); err != nil {
		s.log.Print(err)
		return
	}
	ids := map[string]bool{}
	for _, t := range sum.Modes {
		for _, v := range t.Violations {
			for _, id := range v.Sessions {
				ids[id] = true
			}
		}
	}
	for _, d := range s.ds {
		if d == nil {
			continue
		}
		to := filepath.Join(s.cfg.logsDir, "phauld-"+d.Name+".log")
		if err := os.WriteFile(to, []byte(d.Log()), 0o644); err != nil {
			s.log.Print(err)
			continue
		}
		s.log.Printf("phauld %s's log kept in %s", d.Name, to)
		for id := range ids {
			logs, _ := filepath.Glob(filepath.Join(d.State, "sessions", id, "*.log"))
			for _, l := range logs {
				b, err := os.ReadFile(l)
				if err == nil {
					err = os.WriteFile(filepath.Join(s.cfg.logsDir, d.Name+"-"+id+"-"+filepath.Base(l)), b, 0o644)
				}
				if err != nil {
					s.log.Print(err)
				}
			}
		}
	}
}

// modeUnsupported says why the daemons cannot run mode, or "".
func (s *soak) modeUnsupported(mode string) string {
	for _, d := range s.ds {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		st, err := client.New(d.Socket).Status(ctx)
		cancel()
		if err != nil {
			return fmt.Sprintf("phauld %s: %v", d.Name, err)
		}
		if why := st.Modes[mode]; why != "" {
			return fmt.Sprintf("phauld %s: %s", d.Name, why)
		}
	}
	return ""
}

// tree is one workload as the soak follows it.
type tree struct {
	n int
	w *harness.Workload
	// pid is its root's current pid, side the daemon (0: A, 1: B) it
	// runs on.
	pid, side int
	// root and child are their last reports, asked when.
	root, child report.Report
	asked       time.Time
	// alive: the soak still follows it (not lost, not hung).
	alive bool
	// tracked are the pids handed to the harness's Track.
	tracked map[int]bool
}

func (tr *tree) track(pids ...int) {
	for _, p := range pids {
		if !tr.tracked[p] {
			tr.tracked[p] = true
			tr.w.Track(p)
		}
	}
}

// runMode is one mode's soak: fresh workloads, hops, the final checks.
func (s *soak) runMode(ctx context.Context, t *tally) error {
	start := time.Now()
	defer func() { t.WallS = time.Since(start).Seconds() }()
	var trees []*tree
	defer func() {
		for _, tr := range trees {
			s.killTree(t, tr)
		}
	}()
	for i := 0; i < s.cfg.workloads; i++ {
		dir := filepath.Join(s.dir, t.Mode, "w"+strconv.Itoa(i))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		w, err := harness.StartWorkload(harness.WorkloadConfig{Bin: s.cfg.workload, Dir: dir, MemMiB: s.cfg.memMiB, Children: children, OwnCwd: true})
		if err != nil {
			return fmt.Errorf("workload %d: %w", i, err)
		}
		tr := &tree{n: i, w: w, pid: w.PID, alive: true, tracked: map[int]bool{}}
		tr.track(w.PID)
		trees = append(trees, tr)
		if err := s.firstReports(tr); err != nil {
			return fmt.Errorf("workload %d: %w", i, err)
		}
	}
	s.log.Printf("%s: %d workloads of 2 × %d MiB, %d round trips each", t.Mode, len(trees), s.cfg.memMiB, s.cfg.trips)

	stopChaos := func() {}
	if s.cfg.chaos {
		// Each mode its own sequence, the same for the same -seed.
		seed := s.cfg.seed
		for _, ch := range t.Mode {
			seed = seed*31 + uint64(ch)
		}
		s.chaos = newChaos(s, seed)
		cctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			s.chaos.run(cctx)
		}()
		stopChaos = func() {
			cancel()
			<-done
			t.Kills = map[string]int64{"A": s.chaos.kills[0].Load(), "B": s.chaos.kills[1].Load()}
			t.KillPhases = s.chaos.phaseHits()
			if n := s.chaos.restartFailed.Load(); n > 0 {
				t.violate(violation{Kind: kindRestart, Detail: fmt.Sprintf("%d restarts of a killed daemon failed", n)})
			}
			s.chaos = nil
		}
	}
	var deadline time.Time
	if s.cfg.duration > 0 {
		deadline = start.Add(s.cfg.duration)
	}
	var wg sync.WaitGroup
	for _, tr := range trees {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 1; n <= 2*s.cfg.trips && tr.alive; n++ {
				if ctx.Err() != nil || (!deadline.IsZero() && time.Now().After(deadline)) {
					return
				}
				s.hop(ctx, t, tr, n)
			}
		}()
	}
	wg.Wait()
	stopChaos()
	if ctx.Err() != nil {
		return nil
	}
	s.finalChecks(t, trees)
	return nil
}

// firstReports asks a fresh workload's root and child for their reports.
func (s *soak) firstReports(tr *tree) error {
	var err error
	if tr.root, err = tr.w.Report(tr.pid); err != nil {
		return err
	}
	kids, err := proc.Children(tr.pid)
	if err != nil || len(kids) != children {
		return fmt.Errorf("root %d has children %v (%v), want %d", tr.pid, kids, err, children)
	}
	tr.track(kids...)
	if tr.child, err = report.AskPID(tr.w.ChildStatus(0), kids[0], 10*time.Second); err != nil {
		return err
	}
	tr.asked = time.Now()
	return nil
}

// attempt is one run of phaulctl migrate.
type attempt struct {
	code           int
	stdout, stderr string
	err            error
	wall           time.Duration
	hung           bool
}

// Outcomes of a hop.
const (
	outCommitted   = "committed"
	outRolledBack  = "rolled back"
	outRefused     = "refused"
	outInDoubt     = "in doubt"
	outInterrupted = "interrupted"
	outHung        = "hung"
	outOdd         = "odd exit"
)

// hop migrates tr to the other daemon and checks what it left.
func (s *soak) hop(ctx context.Context, t *tally, tr *tree, n int) {
	src, dst := tr.side, 1-tr.side
	sd, dd := s.ds[src], s.ds[dst]
	srcPID := tr.pid
	srcInfo, _ := proc.Stat(srcPID)
	where := fmt.Sprintf("w%d hop %d/%d %s→%s", tr.n, n, 2*s.cfg.trips, sd.Name, dd.Name)
	ids := &idSet{}
	started := time.Now()
	kills := s.killsOf(src)
	at := s.migrate(sd, dd, srcPID, t.Mode, ids)
	srcKilled := s.killsOf(src) != kills
	if ctx.Err() != nil && !at.hung {
		// Interrupted: the terminal's SIGINT may have reached phaulctl and
		// the daemons too. Nothing is checked any more.
		return
	}
	t.attempt()

	// What the exit code says, and where it says the copy must be.
	outcome, want := outOdd, -1
	var res api.Result
	v := violation{Workload: tr.n, Hop: n, Exit: at.code, Stderr: strings.TrimSpace(at.stderr)}
	switch {
	case at.hung:
		outcome = outHung
	case at.err != nil:
		v.Kind, v.Detail = kindCLI, at.err.Error()
	case at.code == 0:
		outcome, want = outCommitted, dst
		if err := json.Unmarshal([]byte(at.stdout), &res); err != nil || res.DestPID <= 0 {
			v.Kind, v.Detail = kindCLI, fmt.Sprintf("exit 0 with output %q", at.stdout)
		}
		ids.add(res.ID)
	case at.code == 4 && strings.Contains(at.stderr, "lost phauld during"):
		// phaulctl lost its phauld mid-migration: it cannot know how it
		// ends, and says so (in doubt).
		outcome = outInterrupted
		if !srcKilled {
			v.Kind, v.Detail = kindCLI, "phaulctl lost phauld, though nothing killed it"
		}
	case at.code == 1 && srcKilled && !strings.Contains(at.stderr, "Is phauld running?"):
		// The request itself broke with the daemon, before any answer.
		outcome = outInterrupted
	case at.code == 1:
		outcome, want = outRefused, src
	case at.code == 3:
		outcome, want = outRolledBack, src
	case at.code == 4:
		outcome = outInDoubt
	default:
		v.Kind, v.Detail = kindCLI, fmt.Sprintf("phaulctl migrate exited %d", at.code)
	}
	if v.Kind != "" {
		s.report(t, v, ids)
		v.Kind, v.Detail = "", ""
	}
	if at.hung {
		// phaulctl still runs; it ends when its daemon stops. The tree
		// may be anywhere: the soak stops following it.
		tr.alive = false
		v.Kind, v.Detail = kindHung, fmt.Sprintf("phaulctl migrate not over after %v", s.cfg.hopTimeout)
		s.report(t, v, ids)
		return
	}

	l := s.settle(tr, srcPID, started, ids)
	if outcome == outInDoubt || outcome == outInterrupted {
		// phaulctl could not say; the destination's history can: the
		// copy must be where its commit (or none) puts it.
		want = s.ruledSide(dd, ids, src, dst)
	}
	keep, side, ok := s.judge(t, tr, l, v, ids, srcPID, srcInfo, want, &res)
	msg := fmt.Sprintf("%s: %s %s (exit %d, %v)", t.Mode, where, outcome, at.code, at.wall.Round(time.Millisecond))
	if id := ids.first(); id != "" {
		msg += " session " + id
	}
	if !ok {
		s.log.Print(msg + ": the tree is lost, no longer followed")
		tr.alive = false
		return
	}
	got := "source"
	if side == dst {
		got = "destination"
	}
	switch outcome {
	case outCommitted:
		t.committed(res)
	case outRolledBack:
		t.count(&t.RolledBack)
	case outRefused:
		t.count(&t.Refused)
		msg += ": " + errMessage(at)
	case outInDoubt:
		t.count(&t.InDoubt)
		if side == dst {
			t.count(&t.InDoubtDest)
		} else {
			t.count(&t.InDoubtSource)
		}
		msg += ", settled on the " + got
	case outInterrupted:
		t.count(&t.Interrupted)
		if side == dst {
			t.count(&t.InterruptedDest)
		} else {
			t.count(&t.InterruptedSource)
		}
		msg += ", the source daemon was killed; settled on the " + got
	}
	if outcome != outCommitted && outcome != outRefused && outcome != outOdd {
		msg += ": " + errMessage(at)
	}
	s.log.Print(msg)
	if want >= 0 && side != want {
		v.Kind = kindWrongSide
		v.Detail = fmt.Sprintf("%s, yet the copy runs on the %s (pid %d)", outcome, got, keep)
		s.report(t, v, ids)
	}
	if outcome == outCommitted && res.DestPID > 0 && keep != res.DestPID && side == dst {
		v.Kind = kindWrongSide
		v.Detail = fmt.Sprintf("the result says pid %d, the copy is pid %d", res.DestPID, keep)
		s.report(t, v, ids)
	}
	tr.pid, tr.side = keep, side
	s.checkReports(t, tr, v, ids)
}

// ruledSide is where the commit rule puts the process of the sessions ids
// once they are over, as the destination dd's history says: dst if one of
// them committed there, else src; -1 if dd cannot be asked.
func (s *soak) ruledSide(dd *harness.Daemon, ids *idSet, src, dst int) int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hist, err := client.New(dd.Socket).History(ctx, 0)
	if err != nil {
		return -1
	}
	mine := map[string]bool{}
	for _, id := range ids.list() {
		mine[id] = true
	}
	for _, h := range hist {
		if mine[h.ID] && h.Direction == api.DirectionIn && h.Outcome == api.OutcomeCommitted {
			return dst
		}
	}
	return src
}

// migrate runs phaulctl migrate of pid from sd to dd, noting the ids of the
// sessions it sees on sd meanwhile.
func (s *soak) migrate(sd, dd *harness.Daemon, pid int, mode string, ids *idSet) attempt {
	done := make(chan attempt, 1)
	start := time.Now()
	s.calls.Add(1)
	go func() {
		defer s.calls.Done()
		r, err := sd.Ctl("migrate", "--pid", strconv.Itoa(pid), "--to", dd.Addr, "--mode", mode, "--json")
		done <- attempt{code: r.Code, stdout: r.Stdout, stderr: r.Stderr, err: err, wall: time.Since(start)}
	}()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	timeout := time.After(s.cfg.hopTimeout)
	for {
		select {
		case at := <-done:
			return at
		case <-timeout:
			return attempt{hung: true, wall: time.Since(start)}
		case <-tick.C:
			if list, err := sd.Sessions(); err == nil {
				for _, ss := range list {
					if ss.PID == pid {
						ids.add(ss.ID)
					}
				}
			}
		}
	}
}

// look is what one look at a tree and both daemons found.
type look struct {
	// inflight says what is still going: sessions of the tree, daemons
	// not answering.
	inflight []string
	// roots are the copies of the root (not zombies), running those that
	// run; procs and runningProcs the same for the whole tree.
	roots, running, procs, runningProcs []int
}

func (l look) settled() bool {
	return len(l.inflight) == 0 && len(l.roots) == 1 && len(l.running) == 1 &&
		len(l.procs) == 1+children && len(l.runningProcs) == 1+children
}

// observe looks at tr's copies and at both daemons' sessions of it (the
// source pid or a pid of a copy); sessions seen and history entries of
// srcPID since started give ids.
func (s *soak) observe(tr *tree, srcPID int, started time.Time, ids *idSet) look {
	var l look
	l.roots = tr.w.Roots()
	l.procs = tr.w.Processes()
	tr.track(l.procs...)
	mine := map[int]bool{srcPID: true}
	for _, p := range l.roots {
		mine[p] = true
		if proc.Running(p) {
			l.running = append(l.running, p)
		}
	}
	for _, p := range l.procs {
		if proc.Running(p) {
			l.runningProcs = append(l.runningProcs, p)
		}
	}
	for _, d := range s.ds {
		list, err := d.Sessions()
		if err != nil {
			l.inflight = append(l.inflight, fmt.Sprintf("phauld %s not answering (%v)", d.Name, err))
			continue
		}
		for _, ss := range list {
			if mine[ss.PID] {
				ids.add(ss.ID)
				l.inflight = append(l.inflight, fmt.Sprintf("session %s on %s (%s, %s)", short(ss.ID), d.Name, ss.Direction, ss.Phase))
			}
		}
		if ids.empty() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			hist, err := client.New(d.Socket).History(ctx, 100)
			cancel()
			if err == nil {
				for _, h := range hist {
					if h.PID == srcPID && !h.Started.Before(started.Add(-100*time.Millisecond)) {
						ids.add(h.ID)
					}
				}
			}
		}
	}
	return l
}

// settle waits until the hop is over: no session of tr in flight and one
// running copy of the tree, twice in a row; at most -settle-timeout.
func (s *soak) settle(tr *tree, srcPID int, started time.Time, ids *idSet) look {
	deadline := time.Now().Add(s.cfg.settleTimeout)
	var l look
	for stable := 0; ; {
		l = s.observe(tr, srcPID, started, ids)
		if l.settled() {
			if stable++; stable == 2 {
				return l
			}
		} else {
			stable = 0
		}
		if time.Now().After(deadline) {
			return l
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// judge counts what l shows against the invariants, kills the copies that
// break them, and returns the copy to go on with and its side; !ok if
// there is none.
func (s *soak) judge(t *tally, tr *tree, l look, v violation, ids *idSet, srcPID int, srcInfo proc.Info, want int, res *api.Result) (keep, side int, ok bool) {
	if l.settled() {
		keep = l.running[0]
		return keep, s.sideOf(tr, keep, srcPID, srcInfo), true
	}
	if len(l.inflight) > 0 {
		v.Kind, v.Detail = kindUnsettled, fmt.Sprintf("after %v: %s", s.cfg.settleTimeout, strings.Join(l.inflight, "; "))
		s.report(t, v, ids)
	}
	switch {
	case len(l.running) == 0:
		v.Kind = kindLost
		v.Detail = fmt.Sprintf("no running copy of the root (copies %s)", describe(l.roots))
		s.report(t, v, ids)
		return 0, 0, false
	case len(l.running) > 1:
		v.Kind = kindDuplicated
		v.Detail = fmt.Sprintf("%d running copies of the root: %s", len(l.running), describe(l.running))
		s.report(t, v, ids)
	}
	// Go on with the copy the outcome names (the source's untouched
	// process, or the result's pid), else the first.
	keep = l.running[0]
	for _, p := range l.running {
		sd := s.sideOf(tr, p, srcPID, srcInfo)
		if (want == tr.side && sd == tr.side) || (res.DestPID > 0 && p == res.DestPID) {
			keep = p
		}
	}
	kids, _ := proc.Children(keep)
	keepSet := map[int]bool{keep: true}
	for _, k := range kids {
		keepSet[k] = true
	}
	var runningKids, extra []int
	for _, p := range l.runningProcs {
		if keepSet[p] && p != keep {
			runningKids = append(runningKids, p)
		}
	}
	for _, p := range l.procs {
		if !keepSet[p] {
			extra = append(extra, p)
		}
	}
	switch {
	case len(runningKids) < children:
		v.Kind = kindLost
		v.Detail = fmt.Sprintf("the root %d runs, but %d of its %d children (children %v)", keep, len(runningKids), children, kids)
		s.report(t, v, ids)
	case len(l.runningProcs) > 1+children && len(l.running) == 1:
		v.Kind = kindDuplicated
		v.Detail = fmt.Sprintf("the root runs once, but %d processes of the tree run: %s", len(l.runningProcs), describe(l.runningProcs))
		s.report(t, v, ids)
	case len(l.running) == 1 && len(extra) > 0:
		v.Kind = kindUnsettled
		v.Detail = fmt.Sprintf("one copy runs, but stopped copies are left: %s", describe(extra))
		s.report(t, v, ids)
	}
	for _, p := range extra {
		if err := killWorkloadTree(p); err != nil {
			s.log.Printf("kill the extra copy %d: %v", p, err)
		}
	}
	if len(runningKids) < children {
		return 0, 0, false
	}
	return keep, s.sideOf(tr, keep, srcPID, srcInfo), true
}

// sideOf says on which daemon pid runs: the source's if it is the source's
// own process (its pid and start time), else the other.
func (s *soak) sideOf(tr *tree, pid, srcPID int, srcInfo proc.Info) int {
	if pid == srcPID {
		if info, err := proc.Stat(pid); err == nil && info.StartTime == srcInfo.StartTime {
			return tr.side
		}
	}
	return 1 - tr.side
}

// checkReports asks tr's root and child for reports and checks them against
// the last ones.
func (s *soak) checkReports(t *tally, tr *tree, v violation, ids *idSet) {
	// The counter ticks every 10 ms: a report asked sooner after the one
	// before could show it not gone on.
	if d := 50*time.Millisecond - time.Since(tr.asked); d > 0 {
		time.Sleep(d)
	}
	var bad []string
	if r, err := tr.w.Report(tr.pid); err != nil {
		bad = append(bad, "root: "+err.Error())
	} else {
		if why := tr.w.Intact(r, tr.root); why != "" {
			bad = append(bad, "root: "+why)
		}
		tr.root = r
	}
	kids, err := proc.Children(tr.pid)
	switch {
	case err != nil || len(kids) != children:
		bad = append(bad, fmt.Sprintf("root %d has children %v (%v), want %d", tr.pid, kids, err, children))
	default:
		tr.track(kids...)
		r, err := report.AskPID(tr.w.ChildStatus(0), kids[0], 10*time.Second)
		if err != nil {
			bad = append(bad, "child: "+err.Error())
			break
		}
		// Child i's memory is seeded with the root's seed + i + 1.
		if why := report.Intact(r, tr.child, tr.w.MemMiB, tr.w.Seed+1); why != "" {
			bad = append(bad, "child: "+why)
		}
		tr.child = r
	}
	tr.asked = time.Now()
	if len(bad) > 0 {
		v.Kind, v.Detail = kindCorrupt, strings.Join(bad, "; ")
		s.report(t, v, ids)
	}
}

// finalChecks runs once the mode's hops are over and the chaos stopped:
// both daemons idle, every tree once, intact, where the soak thinks it is,
// nothing left in the daemons' state directories.
func (s *soak) finalChecks(t *tally, trees []*tree) {
	for _, d := range s.ds {
		if !d.Running() {
			v := violation{Kind: kindRestart, Detail: fmt.Sprintf("phauld %s is not running at the end (exit %d)", d.Name, d.ExitCode())}
			s.report(t, v, &idSet{})
			if err := d.Start(); err != nil {
				s.log.Print(err)
			}
		}
	}
	deadline := time.Now().Add(s.cfg.settleTimeout)
	for _, d := range s.ds {
		for {
			list, err := d.Sessions()
			if err == nil && len(list) == 0 {
				break
			}
			if time.Now().After(deadline) {
				ids := &idSet{}
				var what []string
				for _, ss := range list {
					ids.add(ss.ID)
					what = append(what, fmt.Sprintf("%s (%s, pid %d, %s)", short(ss.ID), ss.Direction, ss.PID, ss.Phase))
				}
				v := violation{Kind: kindUnsettled, Hop: -1, Workload: -1,
					Detail: fmt.Sprintf("at the end, phauld %s still has sessions %s (%v)", d.Name, strings.Join(what, ", "), err)}
				s.report(t, v, ids)
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
	for _, tr := range trees {
		if !tr.alive {
			continue
		}
		ids := &idSet{}
		l := s.settle(tr, tr.pid, time.Now(), ids)
		info, _ := proc.Stat(tr.pid)
		v := violation{Workload: tr.n, Hop: -1}
		keep, _, ok := s.judge(t, tr, l, v, ids, tr.pid, info, tr.side, &api.Result{})
		if !ok {
			tr.alive = false
			continue
		}
		if keep != tr.pid {
			v.Kind, v.Detail = kindWrongSide, fmt.Sprintf("at the end the copy is pid %d, not %d", keep, tr.pid)
			s.report(t, v, ids)
			tr.pid = keep
		}
		s.checkReports(t, tr, v, ids)
	}
	s.noLeftovers(t)
}

// noLeftovers waits until no process works in a daemon's state directory
// (CRIU, lazy-pages), and counts and kills those still there after 30 s.
func (s *soak) noLeftovers(t *tally) {
	dirs := []string{s.ds[0].State, s.ds[1].State}
	deadline := time.Now().Add(30 * time.Second)
	for {
		left := harness.ProcessesIn(dirs...)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			for pid, cwd := range left {
				cmd, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
				// Its state and where it sleeps, and whether a SIGKILL
				// waits: what is needed to tell why it did not end.
				state := "?"
				if info, err := proc.Stat(pid); err == nil {
					state = fmt.Sprintf("%c, parent %d", info.State, info.PPID)
				}
				wchan, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "wchan"))
				status, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
				pending := ""
				for _, line := range strings.Split(string(status), "\n") {
					if strings.HasPrefix(line, "SigPnd:") || strings.HasPrefix(line, "ShdPnd:") {
						pending += strings.Join(strings.Fields(line), " ") + " "
					}
				}
				v := violation{Kind: kindLeftover, Workload: -1, Hop: -1,
					Detail: fmt.Sprintf("pid %d (%s; state %s, wchan %s, %s) still works in %s", pid,
						strings.ReplaceAll(strings.TrimSpace(string(cmd)), "\x00", " "), state, wchan, strings.TrimSpace(pending), cwd)}
				s.report(t, v, &idSet{})
				syscall.Kill(pid, syscall.SIGKILL)
			}
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// killTree kills every process of a workload, wherever it went, and checks
// that none is left.
func (s *soak) killTree(t *tally, tr *tree) {
	tr.track(tr.w.Processes()...)
	tr.w.Kill()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var left []int
		for _, p := range tr.w.Processes() {
			if info, err := proc.Stat(p); err == nil && info.State != 'Z' {
				left = append(left, p)
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			v := violation{Kind: kindLeftover, Workload: tr.n, Hop: -1, Detail: fmt.Sprintf("processes %v of the workload survive its kill", left)}
			s.report(t, v, &idSet{})
			return
		}
		tr.track(left...)
		tr.w.Kill()
		time.Sleep(50 * time.Millisecond)
	}
}

// killWorkloadTree SIGKILLs the tree rooted at pid, if pid runs the
// workload.
func killWorkloadTree(pid int) error {
	tree, err := proc.OpenTree(pid, 0)
	if err != nil {
		return err
	}
	defer proc.CloseAll(tree)
	if info, err := proc.Stat(pid); err != nil || !strings.HasPrefix(info.Comm, "workload") {
		return fmt.Errorf("pid %d does not run the workload", pid)
	}
	return proc.SignalAll(tree, syscall.SIGKILL)
}

// report counts v and logs it with the lines of both daemons' logs that
// name its sessions.
func (s *soak) report(t *tally, v violation, ids *idSet) {
	v.Sessions = ids.list()
	for _, d := range s.ds {
		v.Logs = append(v.Logs, d.LogPath)
	}
	t.violate(v)
	var b strings.Builder
	fmt.Fprintf(&b, "VIOLATION %s: %s: workload %d, hop %d: %s", v.Kind, t.Mode, v.Workload, v.Hop, v.Detail)
	if v.Exit != 0 || v.Stderr != "" {
		fmt.Fprintf(&b, "\n  phaulctl exit %d: %s", v.Exit, v.Stderr)
	}
	fmt.Fprintf(&b, "\n  sessions %v; logs %s", v.Sessions, strings.Join(v.Logs, ", "))
	for _, d := range s.ds {
		lines := logLines(d.Log(), v.Sessions, 60)
		if len(lines) > 0 {
			fmt.Fprintf(&b, "\n  --- phauld %s ---\n  %s", d.Name, strings.Join(lines, "\n  "))
		}
	}
	s.log.Print(b.String())
}

// logLines are the last max lines of log naming one of ids (the last
// lines at all if there are no ids).
func logLines(log string, ids []string, max int) []string {
	lines := strings.Split(strings.TrimRight(log, "\n"), "\n")
	var out []string
	for _, l := range lines {
		if len(ids) == 0 {
			out = append(out, l)
			continue
		}
		for _, id := range ids {
			if strings.Contains(l, id) {
				out = append(out, l)
				break
			}
		}
	}
	if len(ids) == 0 {
		max = 20
	}
	if len(out) > max {
		out = out[len(out)-max:]
	}
	return out
}

// killsOf is how often chaos has killed daemon i in this mode.
func (s *soak) killsOf(i int) int64 {
	if c := s.chaos; c != nil {
		return c.kills[i].Load()
	}
	return 0
}

// chaos kills and restarts the daemons at random moments.
type chaos struct {
	s        *soak
	min, max time.Duration
	rng      *rand.Rand
	// kills count the kills of A and B; each is counted before the
	// signal, so that a hop that ended because of it sees it.
	kills         [2]atomic.Int64
	restartFailed atomic.Int64
	mu            sync.Mutex
	// phases are the phases of the sessions the killed daemons had.
	phases map[string]int
}

func newChaos(s *soak, seed uint64) *chaos {
	return &chaos{s: s, min: s.cfg.chaosMin, max: s.cfg.chaosMax, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), phases: map[string]int{}}
}

func (c *chaos) between(lo, hi time.Duration) time.Duration {
	return lo + time.Duration(c.rng.Int64N(int64(hi-lo)+1))
}

// run kills a daemon every min–max, restarting it 0.5–2 s later, until ctx
// ends; a daemon it killed is always started again.
func (c *chaos) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(c.between(c.min, c.max)):
		}
		i := c.rng.IntN(2)
		d := c.s.ds[i]
		var hit []string
		if list, err := d.Sessions(); err == nil {
			c.mu.Lock()
			for _, ss := range list {
				key := ss.Direction + ":" + ss.Phase
				c.phases[key]++
				hit = append(hit, short(ss.ID)+" "+key)
			}
			c.mu.Unlock()
		}
		c.kills[i].Add(1)
		d.Kill()
		down := c.between(c.s.cfg.downMin, c.s.cfg.downMax)
		c.s.log.Printf("chaos: SIGKILLed phauld %s (kill %d), sessions %v; restart in %v", d.Name, c.kills[i].Load(), hit, down.Round(time.Millisecond))
		time.Sleep(down)
		c.restart(d)
	}
}

// restart starts d again, trying a few times.
func (c *chaos) restart(d *harness.Daemon) {
	for try := 1; ; try++ {
		err := d.Start()
		if err == nil {
			return
		}
		if d.Running() {
			d.Kill()
		}
		c.s.log.Printf("chaos: restart phauld %s (try %d): %v", d.Name, try, err)
		if try == 5 {
			c.restartFailed.Add(1)
			return
		}
		time.Sleep(time.Second)
	}
}

func (c *chaos) phaseHits() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := make(map[string]int, len(c.phases))
	for k, v := range c.phases {
		m[k] = v
	}
	return m
}

// idSet collects session ids, in the order seen.
type idSet struct {
	mu  sync.Mutex
	ids []string
}

func (s *idSet) add(id string) {
	if id == "" {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, x := range s.ids {
		if x == id {
			return
		}
	}
	s.ids = append(s.ids, id)
}

func (s *idSet) list() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.ids...)
}

func (s *idSet) empty() bool { return len(s.list()) == 0 }

func (s *idSet) first() string {
	if l := s.list(); len(l) > 0 {
		return short(l[0])
	}
	return ""
}

func short(id string) string { return id[:min(8, len(id))] }

// describe lists pids with their states.
func describe(pids []int) string {
	var parts []string
	for _, p := range pids {
		st := "gone"
		if info, err := proc.Stat(p); err == nil {
			st = string(info.State)
		}
		parts = append(parts, fmt.Sprintf("%d (%s)", p, st))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// errMessage is the error phaulctl printed, in one line.
func errMessage(at attempt) string {
	var out struct {
		Error *api.Error `json:"error"`
	}
	if json.Unmarshal([]byte(at.stdout), &out) == nil && out.Error != nil {
		return string(out.Error.Code) + ": " + out.Error.Message
	}
	first, _, _ := strings.Cut(strings.TrimSpace(at.stderr), "\n")
	return first
}

// Kinds of violation.
const (
	kindLost       = "lost"
	kindDuplicated = "duplicated"
	kindCorrupt    = "corrupt"
	kindWrongSide  = "wrong side"
	kindHung       = "hung"
	kindUnsettled  = "unsettled"
	kindCLI        = "cli"
	kindLeftover   = "leftover"
	kindRestart    = "restart"
)

// violation is one broken invariant.
type violation struct {
	Kind     string   `json:"kind"`
	Workload int      `json:"workload"`
	Hop      int      `json:"hop"`
	Detail   string   `json:"detail"`
	Exit     int      `json:"exit,omitempty"`
	Stderr   string   `json:"stderr,omitempty"`
	Sessions []string `json:"sessions,omitempty"`
	Logs     []string `json:"logs,omitempty"`
}

// tally is one mode's figures.
type tally struct {
	mu         sync.Mutex
	Mode       string `json:"mode"`
	Attempts   int    `json:"attempts"`
	Committed  int    `json:"committed"`
	RolledBack int    `json:"rolled_back"`
	Refused    int    `json:"refused"`
	// InDoubt are the hops phaulctl left in doubt, settled later: on the
	// source or on the destination.
	InDoubt       int `json:"in_doubt_settled"`
	InDoubtSource int `json:"in_doubt_on_source"`
	InDoubtDest   int `json:"in_doubt_on_dest"`
	// Interrupted are the hops whose source daemon was killed under
	// phaulctl.
	Interrupted       int `json:"interrupted"`
	InterruptedSource int `json:"interrupted_on_source"`
	InterruptedDest   int `json:"interrupted_on_dest"`
	// Violations by kind.
	Lost       int `json:"lost"`
	Duplicated int `json:"duplicated"`
	Corrupt    int `json:"corrupt"`
	WrongSide  int `json:"wrong_side"`
	Hung       int `json:"hung"`
	Unsettled  int `json:"unsettled"`
	CLI        int `json:"cli"`
	Leftover   int `json:"leftover"`
	Restart    int `json:"restart_failed"`
	// Kills per daemon, and the sessions' phases they hit.
	Kills      map[string]int64 `json:"kills"`
	KillPhases map[string]int   `json:"kill_phases,omitempty"`
	// Figures of the committed hops (phauld's total and frozen times).
	TotalMedianMS  int64       `json:"total_ms_median"`
	TotalP99MS     int64       `json:"total_ms_p99"`
	FrozenMedianMS int64       `json:"frozen_ms_median"`
	FrozenP99MS    int64       `json:"frozen_ms_p99"`
	WallS          float64     `json:"wall_s"`
	Violations     []violation `json:"violations"`
	total, frozen  []int64
}

func newTally(mode string) *tally {
	return &tally{Mode: mode, Kills: map[string]int64{"A": 0, "B": 0}, Violations: []violation{}}
}

func (t *tally) attempt() { t.count(&t.Attempts) }

func (t *tally) count(n *int) {
	t.mu.Lock()
	*n++
	t.mu.Unlock()
}

func (t *tally) committed(r api.Result) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.Committed++
	t.total = append(t.total, r.TotalMS)
	t.frozen = append(t.frozen, r.FrozenMS)
	t.TotalMedianMS, t.TotalP99MS = quantile(t.total, 0.5), quantile(t.total, 0.99)
	t.FrozenMedianMS, t.FrozenP99MS = quantile(t.frozen, 0.5), quantile(t.frozen, 0.99)
}

func (t *tally) violate(v violation) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.Violations = append(t.Violations, v)
	counter := map[string]*int{kindLost: &t.Lost, kindDuplicated: &t.Duplicated, kindCorrupt: &t.Corrupt,
		kindWrongSide: &t.WrongSide, kindHung: &t.Hung, kindUnsettled: &t.Unsettled, kindCLI: &t.CLI,
		kindLeftover: &t.Leftover, kindRestart: &t.Restart}[v.Kind]
	*counter++
}

// quantile is the q-quantile of xs (nearest rank), 0 for none.
func quantile(xs []int64, q float64) int64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]int64(nil), xs...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(float64(len(s))*q+0.999999) - 1
	return s[max(0, min(i, len(s)-1))]
}

// summary is the whole run's figures.
type summary struct {
	Seed        uint64   `json:"seed"`
	Workloads   int      `json:"workloads"`
	Trips       int      `json:"trips"`
	MemMiB      int      `json:"mem_mib"`
	Chaos       bool     `json:"chaos"`
	ChaosEvery  []string `json:"chaos_every,omitempty"`
	ChaosDown   []string `json:"chaos_down,omitempty"`
	Interrupted bool     `json:"interrupted,omitempty"`
	Modes       []*tally `json:"modes"`
	WallS       float64  `json:"wall_s"`
	OK          bool     `json:"ok"`
}

func (s *summary) violations() int {
	n := 0
	for _, t := range s.Modes {
		t.mu.Lock()
		n += len(t.Violations)
		t.mu.Unlock()
	}
	return n
}

func (s *summary) print(w io.Writer) {
	fmt.Fprintf(w, "\nphaul soak: %d workloads × %d round trips, 2 × %d MiB each, chaos %v, seed %d, wall %.0fs\n",
		s.Workloads, s.Trips, s.MemMiB, s.Chaos, s.Seed, s.WallS)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "mode\tattempts\tcommitted\trolled back\trefused\tin doubt (src/dst)\tinterrupted (src/dst)\tlost\tduplicated\tcorrupt\twrong side\thung\tother\tkills A/B\ttotal ms p50/p99\tfrozen ms p50/p99\twall s\t")
	for _, t := range s.Modes {
		t.mu.Lock()
		other := t.Unsettled + t.CLI + t.Leftover + t.Restart
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d (%d/%d)\t%d (%d/%d)\t%d\t%d\t%d\t%d\t%d\t%d\t%d/%d\t%d/%d\t%d/%d\t%.0f\t\n",
			t.Mode, t.Attempts, t.Committed, t.RolledBack, t.Refused, t.InDoubt, t.InDoubtSource, t.InDoubtDest,
			t.Interrupted, t.InterruptedSource, t.InterruptedDest, t.Lost, t.Duplicated, t.Corrupt, t.WrongSide, t.Hung,
			other, t.Kills["A"], t.Kills["B"], t.TotalMedianMS, t.TotalP99MS, t.FrozenMedianMS, t.FrozenP99MS, t.WallS)
		t.mu.Unlock()
	}
	tw.Flush()
	for _, t := range s.Modes {
		t.mu.Lock()
		if len(t.KillPhases) > 0 {
			keys := make([]string, 0, len(t.KillPhases))
			for k := range t.KillPhases {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			var parts []string
			for _, k := range keys {
				parts = append(parts, fmt.Sprintf("%s %d", k, t.KillPhases[k]))
			}
			fmt.Fprintf(w, "%s: kills hit sessions in %s\n", t.Mode, strings.Join(parts, ", "))
		}
		if other := t.Unsettled + t.CLI + t.Leftover + t.Restart; other > 0 {
			fmt.Fprintf(w, "%s: other violations: unsettled %d, cli %d, leftover %d, restart failed %d\n", t.Mode, t.Unsettled, t.CLI, t.Leftover, t.Restart)
		}
		for _, v := range t.Violations {
			fmt.Fprintf(w, "%s: violation %s: workload %d, hop %d: %s (sessions %v)\n", t.Mode, v.Kind, v.Workload, v.Hop, v.Detail, v.Sessions)
		}
		t.mu.Unlock()
	}
	if s.Interrupted {
		fmt.Fprintln(w, "interrupted: the figures are partial")
	}
}

func (s *summary) write(path string) error {
	s.OK = s.violations() == 0 && !s.Interrupted
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
