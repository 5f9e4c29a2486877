//go:build linux

// Package integration runs phaul for real: real phauld daemons, real CRIU,
// real processes, on loopback addresses. It needs root and CRIU >= 4.2.
// It runs only with PHAUL_INTEGRATION=1 (`make integration`, part of
// `make test`), and then a missing prerequisite is a failure, never a skip;
// a plain `go test ./...` is the unit tier and skips these tests (it runs
// the few here that need neither, such as the check of docs/reliability.md).
package integration

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/test/faultproxy"
	"github.com/phaul/phaul/test/harness"
	"github.com/phaul/phaul/test/report"
)

// bins holds the binaries under test, built once by TestMain.
var bins struct {
	dir    string
	phauld string
	// phauldPlain is phauld built without the race detector.
	phauldPlain string
	phaulctl    string
	workload    string
	// ca is the test run's CA: every daemon gets a certificate from it,
	// for its own address, unless it runs --insecure.
	ca string
}

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

// enabled is whether the integration tier runs (PHAUL_INTEGRATION=1).
var enabled = os.Getenv("PHAUL_INTEGRATION") == "1"

// integration skips t unless the integration tier runs.
func integration(t *testing.T) {
	t.Helper()
	if !enabled {
		t.Skip("integration test: run it with 'make integration' (PHAUL_INTEGRATION=1, as root, with CRIU >= 4.2)")
	}
}

func testMain(m *testing.M) int {
	if !enabled {
		return m.Run()
	}
	if reason := missing(); reason != "" {
		fmt.Fprintln(os.Stderr, "integration tests cannot run:", reason)
		return 1
	}
	dir, err := os.MkdirTemp("", "phaul-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// Other users run phaulctl and the workload in the permission tests.
	os.Chmod(dir, 0o755)
	bins.dir = dir
	bins.ca = filepath.Join(dir, "ca")
	if err := pki.Init(bins.ca, []string{"127.0.0.1"}); err != nil {
		fmt.Fprintln(os.Stderr, "make the test CA:", err)
		return 1
	}
	bins.phauld = filepath.Join(dir, "phauld")
	bins.phauldPlain = filepath.Join(dir, "phauld-plain")
	bins.phaulctl = filepath.Join(dir, "phaulctl")
	bins.workload = filepath.Join(dir, "workload")
	// The daemons are built with the race detector: the tests then check
	// the real daemon for data races too. A plain build is for measuring
	// memory (the race detector's shadow memory would swamp it).
	for _, b := range []struct {
		out, pkg string
		race     bool
	}{
		{bins.phauld, "./daemon", true}, {bins.phauldPlain, "./daemon", false}, {bins.phaulctl, "./ctl", true}, {bins.workload, "./test/workload", false},
	} {
		args := []string{"build", "-o", b.out}
		if os.Getenv("PHAUL_RACE") != "0" && b.race {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, b.pkg)...)
		cmd.Dir = repoRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n%s", b.pkg, err, out)
			return 1
		}
	}
	return m.Run()
}

// missing says why the integration tests cannot run here, or "".
func missing() string {
	if os.Geteuid() != 0 {
		return "they need root (CRIU dumps and restores processes)"
	}
	out, err := exec.Command("criu", "--version").Output()
	if err != nil {
		return "no criu on PATH (run 'make criu')"
	}
	if !bytes.Contains(out, []byte("Version: 4.")) && !bytes.Contains(out, []byte("Version: 5.")) {
		return fmt.Sprintf("criu is too old (%s); run 'make criu'", bytes.TrimSpace(out))
	}
	for _, tool := range []string{"unshare", "setsid"} {
		if _, err := exec.LookPath(tool); err != nil {
			return tool + " not found (package util-linux)"
		}
	}
	return ""
}

func repoRoot() string {
	wd, _ := os.Getwd()
	return filepath.Clean(filepath.Join(wd, "..", ".."))
}

// daemon is one phauld under test.
type daemon struct {
	*harness.Daemon
	t     *testing.T
	name  string
	addr  string
	state string
	o     daemonOpts
	notes *notifySink
}

type daemonOpts struct {
	// wrap runs phauld under another command (e.g. unshare).
	wrap []string
	// extra flags.
	flags []string
	// activated starts phauld through systemd-socket-activate (see
	// harness.DaemonConfig.Activated).
	activated bool
	// insecure runs the daemon with --insecure (plain TCP: the fault
	// proxy reads frames); otherwise it gets a certificate from the
	// test CA for its address, unless tlsDir names another directory.
	insecure bool
	tlsDir   string
	// journal connects the daemon's stdout and stderr to journald as
	// systemd does (JOURNAL_STREAM set): it then logs natively to the
	// journal.
	journal bool
	// notify gives the daemon a NOTIFY_SOCKET, as systemd does for a
	// Type=notify service, and a watchdog of that interval if watchdog
	// is set; d.notes collects what it sends.
	notify   bool
	watchdog time.Duration
	// phauld is the daemon binary (default: the race-detector build).
	phauld string
}

// startDaemon starts a phauld listening on addr (an address on loopback)
// with its own state directory and control socket, and waits until it
// answers. It is stopped at the end of the test; its log is shown if the
// test failed.
func startDaemon(t *testing.T, name, addr string, o daemonOpts) *daemon {
	t.Helper()
	c := harness.DaemonConfig{Name: name, Addr: addr, Dir: t.TempDir(), Phauld: bins.phauld, Phaulctl: bins.phaulctl,
		Wrap: o.wrap, Flags: o.flags, Activated: o.activated, Insecure: o.insecure, CA: bins.ca, TLSDir: o.tlsDir}
	if o.phauld != "" {
		c.Phauld = o.phauld
	}
	hd, err := harness.NewDaemon(c)
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{Daemon: hd, t: t, name: name, addr: addr, state: hd.State, o: o}
	if o.journal {
		stream, env := journalStderr(t, "phauld-"+name)
		d.Output = stream
		d.Env = append(os.Environ(), "JOURNAL_STREAM="+env)
	}
	if o.notify {
		d.notes = listenNotify(t, d)
		env := d.Env
		if env == nil {
			env = os.Environ()
		}
		env = append(env, "NOTIFY_SOCKET="+d.notes.path)
		if o.watchdog > 0 {
			env = append(env, fmt.Sprintf("WATCHDOG_USEC=%d", o.watchdog.Microseconds()))
		}
		d.Env = env
	}
	t.Cleanup(func() {
		d.stop(t)
		if t.Failed() {
			t.Logf("--- log of phauld %s (%s) ---\n%s", name, addr, d.log())
			d.logCRIUErrors(t)
		}
	})
	d.start()
	return d
}

// start runs the daemon (again, after a kill) and waits until it answers.
func (d *daemon) start() {
	d.t.Helper()
	if err := d.Start(); err != nil {
		d.t.Fatal(err)
	}
}

// kill kills the daemon with SIGKILL and waits for it to be gone.
func (d *daemon) kill() { d.Kill() }

// terminate stops the daemon with SIGTERM and fails the test unless it
// exits within limit (its --stop-timeout) and a little slack.
func (d *daemon) terminate(t *testing.T, limit time.Duration) {
	if err := d.Terminate(limit); err != nil {
		t.Error(err)
	}
}

// pause stops the daemon with SIGSTOP: it stops answering, its sockets
// stay open. resume undoes it.
func (d *daemon) pause()  { d.Pause() }
func (d *daemon) resume() { d.Resume() }

// sessions lists the daemon's sessions.
func (d *daemon) sessions(t *testing.T) []api.Session {
	t.Helper()
	list, err := d.Sessions()
	if err != nil {
		t.Fatalf("phauld %s: list: %v", d.name, err)
	}
	return list
}

// stop sends SIGTERM and waits; SIGKILL if it does not exit in time.
func (d *daemon) stop(t *testing.T) {
	if err := d.Stop(90 * time.Second); err != nil {
		t.Error(err)
	}
}

// logCRIUErrors shows the lines of the daemon's CRIU logs around each
// error, for a failed test.
func (d *daemon) logCRIUErrors(t *testing.T) {
	logs, _ := filepath.Glob(filepath.Join(d.state, "sessions", "*", "*.log"))
	for _, path := range logs {
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		lines := strings.Split(string(b), "\n")
		var out []string
		for i, l := range lines {
			if strings.Contains(l, "Error") {
				out = append(out, lines[max(0, i-10):i+1]...)
				out = append(out, "...")
			}
		}
		if len(out) > 0 {
			t.Logf("--- CRIU errors in %s ---\n%s", path, strings.Join(out[:min(len(out), 200)], "\n"))
		}
	}
}

func (d *daemon) log() string { return d.Log() }

// ctlResult is what one phaulctl run did.
type ctlResult struct {
	code   int
	stdout string
	stderr string
}

// phaulctl runs phaulctl against d.
func (d *daemon) phaulctl(t *testing.T, args ...string) ctlResult {
	t.Helper()
	r, err := d.Ctl(args...)
	if err != nil {
		t.Fatal(err)
	}
	return ctlResult{code: r.Code, stdout: r.Stdout, stderr: r.Stderr}
}

// migrate runs `phaulctl migrate --json` and decodes the result; it fails
// the test if the migration fails.
func (d *daemon) migrate(t *testing.T, pid int, to *daemon) api.Result {
	t.Helper()
	return d.migrateTo(t, pid, to.addr)
}

// migrateTo is migrate to an address (a proxy's), with extra phaulctl
// flags.
func (d *daemon) migrateTo(t *testing.T, pid int, addr string, extra ...string) api.Result {
	t.Helper()
	res, r, err := d.Migrate(pid, addr, extra...)
	if err != nil || r.Code != 0 {
		t.Fatalf("phaulctl migrate exited %d (%v)\nstdout: %s\nstderr: %s", r.Code, err, r.Stdout, r.Stderr)
	}
	return res
}

// status is what the workload reports.
type status = report.Report

// workload is a test process tree (see harness.Workload).
type workload struct {
	*harness.Workload
	t        *testing.T
	pid      int
	status   string
	seed     uint64
	memMiB   int
	children int
}

type workloadOpts struct {
	memMiB   int
	children int
	seed     uint64
	extra    []string
	// stdout, if set, is the workload's stdout and stderr.
	stdout *os.File
	// hostPidNS: in this host's pid namespace (setsid workload ...).
	hostPidNS bool
	// netns, if set, is the named network namespace it runs in.
	netns string
}

// readOnlyWrap runs a destination phauld where dir is what the source
// has, but read-only (a read-only bind of it, in a mount namespace of its
// own): the checks before the freeze pass (the files are the same), and
// CRIU's restore fails for real when it reopens one there for writing.
func readOnlyWrap(dir string) []string {
	return []string{"unshare", "--mount", "--propagation", "private", "--",
		"sh", "-c", `mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"`, dir}
}

// startWorkload starts `unshare -p -f -- setsid workload ...` and waits
// until it has written its first report. It is killed at the end of the
// test, wherever it went.
func startWorkload(t *testing.T, o workloadOpts) *workload {
	t.Helper()
	hw, err := harness.StartWorkload(harness.WorkloadConfig{Bin: bins.workload, Dir: t.TempDir(),
		MemMiB: o.memMiB, Children: o.children, Seed: o.seed, Extra: o.extra, Output: o.stdout, HostPidNS: o.hostPidNS, NetNS: o.netns})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hw.Kill)
	return &workload{Workload: hw, t: t, pid: hw.PID, status: hw.Status, seed: hw.Seed, memMiB: hw.MemMiB, children: hw.Children}
}

func (w *workload) childStatus(i int) string { return w.ChildStatus(i) }

func (w *workload) track(pid int) { w.Track(pid) }

func (w *workload) readFile(path string) (status, error) { return report.Read(path) }

// report asks the process pid to write its state to path (SIGUSR1) and
// returns the new report.
func (w *workload) report(pid int, path string) status {
	w.t.Helper()
	st, err := report.AskPID(path, pid, 10*time.Second)
	if err != nil {
		w.t.Fatal(err)
	}
	return st
}

// expectedSum is the checksum the workload's memory must have.
func expectedSum(memMiB int, seed uint64) string { return report.ExpectedSum(memMiB, seed) }

// checkIntact checks a report against the memory the process was started
// with and against an earlier report of the same process.
func checkIntact(t *testing.T, what string, st, before status, memMiB int, seed uint64) {
	t.Helper()
	if why := report.Intact(st, before, memMiB, seed); why != "" {
		t.Errorf("%s: %s", what, why)
	}
}

// waitRunning waits until pid is running (not stopped), or fails.
func waitRunning(t *testing.T, pid int) proc.Info {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err := proc.Stat(pid)
		if err != nil {
			t.Fatalf("pid %d: %v", pid, err)
		}
		if !info.Stopped() && info.State != 'Z' {
			return info
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d is in state %c, want running", pid, info.State)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// gone reports whether the process pid that started at start has exited.
func gone(pid int, start uint64) bool {
	info, err := proc.Stat(pid)
	return err != nil || info.StartTime != start || info.State == 'Z'
}

// workloadPIDs lists the pids of every running workload process on this
// host.
func workloadPIDs(t *testing.T) map[int]bool {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	pids := map[int]bool{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err == nil && exe == bins.workload {
			if info, err := proc.Stat(pid); err == nil && info.State != 'Z' {
				pids[pid] = true
			}
		}
	}
	return pids
}

// newFaultProxy starts a fault proxy (test/faultproxy) on addr to target,
// closed at the end of the test.
func newFaultProxy(t *testing.T, addr, target string) *faultproxy.Proxy {
	t.Helper()
	p, err := faultproxy.New(addr, target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}
