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
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/client"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/test/pattern"
)

// bins holds the binaries under test, built once by TestMain.
var bins struct {
	dir      string
	phauld   string
	phaulctl string
	workload string
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
	bins.phaulctl = filepath.Join(dir, "phaulctl")
	bins.workload = filepath.Join(dir, "workload")
	// The daemons are built with the race detector: the tests then check
	// the real daemon for data races too.
	for _, b := range []struct{ out, pkg string }{
		{bins.phauld, "./daemon"}, {bins.phaulctl, "./ctl"}, {bins.workload, "./test/workload"},
	} {
		args := []string{"build", "-o", b.out}
		if os.Getenv("PHAUL_RACE") != "0" && b.pkg != "./test/workload" {
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
	t       *testing.T
	name    string
	addr    string
	socket  string
	state   string
	logPath string
	args    []string
	o       daemonOpts
	cmd     *exec.Cmd
	exited  chan struct{}
	notes   *notifySink
}

type daemonOpts struct {
	// wrap runs phauld under another command (e.g. unshare).
	wrap []string
	// extra flags.
	flags []string
	// activated starts phauld through systemd-socket-activate, which
	// listens on the daemon's address and control socket and starts
	// phauld on the first connection to either. --listen and --control
	// are then given values phauld cannot use, to show they are ignored.
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
}

// startDaemon starts a phauld listening on addr (an address on loopback)
// with its own state directory and control socket, and waits until it
// answers. It is stopped at the end of the test; its log is shown if the
// test failed.
func startDaemon(t *testing.T, name, addr string, o daemonOpts) *daemon {
	t.Helper()
	dir := t.TempDir()
	d := &daemon{
		t:       t,
		name:    name,
		addr:    addr,
		o:       o,
		socket:  filepath.Join(dir, "ctl.sock"),
		state:   filepath.Join(dir, "state"),
		logPath: filepath.Join(dir, "phauld.log"),
	}
	d.args = append([]string{}, o.wrap...)
	if o.activated {
		d.args = append(d.args, "systemd-socket-activate", "-l", addr, "-l", d.socket, "--fdname=migrate:control",
			bins.phauld, "--listen", "192.0.2.1:12345", "--control", "/proc/phauld-unused.sock")
	} else {
		d.args = append(d.args, bins.phauld, "--listen", addr, "--control", d.socket)
	}
	d.args = append(d.args, "--state-dir", d.state, "--log-level", "debug")
	switch {
	case o.insecure:
		d.args = append(d.args, "--insecure")
	case o.tlsDir != "":
		d.args = append(d.args, "--tls-dir", o.tlsDir)
	default:
		tlsDir := filepath.Join(dir, "tls")
		host, _, _ := net.SplitHostPort(addr)
		if err := pki.Issue(bins.ca, tlsDir, []string{host}); err != nil {
			t.Fatal(err)
		}
		d.args = append(d.args, "--tls-dir", tlsDir)
	}
	d.args = append(d.args, o.flags...)
	t.Cleanup(func() {
		d.stop(t)
		if t.Failed() {
			b, _ := os.ReadFile(d.logPath)
			t.Logf("--- log of phauld %s (%s) ---\n%s", name, addr, b)
			d.logCRIUErrors(t)
		}
	})
	d.start()
	return d
}

// start runs the daemon (again, after a kill: its log goes on in the same
// file) and waits until it answers.
func (d *daemon) start() {
	t := d.t
	t.Helper()
	logf, err := os.OpenFile(d.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	d.exited = make(chan struct{})
	d.cmd = exec.Command(d.args[0], d.args[1:]...)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if d.o.journal {
		stream, env := journalStderr(t, "phauld-"+d.name)
		d.cmd.Stdout, d.cmd.Stderr = stream, stream
		d.cmd.Env = append(os.Environ(), "JOURNAL_STREAM="+env)
	}
	if d.o.notify {
		if d.notes == nil {
			d.notes = listenNotify(t, d)
		}
		env := d.cmd.Env
		if env == nil {
			env = os.Environ()
		}
		env = append(env, "NOTIFY_SOCKET="+d.notes.path)
		if d.o.watchdog > 0 {
			env = append(env, fmt.Sprintf("WATCHDOG_USEC=%d", d.o.watchdog.Microseconds()))
		}
		d.cmd.Env = env
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logf.Close()
	exited := d.exited
	cmd := d.cmd
	go func() {
		cmd.Wait()
		close(exited)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var err error
		if d.o.activated {
			// Do not connect: that would start phauld.
			_, err = os.Stat(d.socket)
		} else {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err = client.New(d.socket).Status(ctx)
			cancel()
		}
		if err == nil {
			return
		}
		select {
		case <-exited:
			b, _ := os.ReadFile(d.logPath)
			t.Fatalf("phauld %s exited at start-up: %v\n%s", d.name, cmd.ProcessState, b)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("phauld %s not answering after 30s: %v", d.name, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// kill kills the daemon with SIGKILL and waits for it to be gone.
func (d *daemon) kill() {
	d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.exited
}

// terminate stops the daemon with SIGTERM and fails the test unless it
// exits within limit (its --stop-timeout) and a little slack.
func (d *daemon) terminate(t *testing.T, limit time.Duration) {
	start := time.Now()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(limit + 5*time.Second):
		t.Errorf("phauld %s still running %v after SIGTERM (stop timeout %v); killing it", d.name, time.Since(start), limit)
		d.kill()
	}
}

// pause stops the daemon with SIGSTOP: it stops answering, its sockets
// stay open. resume undoes it.
func (d *daemon) pause()  { d.cmd.Process.Signal(syscall.SIGSTOP) }
func (d *daemon) resume() { d.cmd.Process.Signal(syscall.SIGCONT) }

// sessions lists the daemon's sessions.
func (d *daemon) sessions(t *testing.T) []api.Session {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	list, err := client.New(d.socket).Sessions(ctx)
	if err != nil {
		t.Fatalf("phauld %s: list: %v", d.name, err)
	}
	return list
}

// stop sends SIGTERM and waits; SIGKILL if it does not exit in time.
func (d *daemon) stop(t *testing.T) {
	if d.exited == nil {
		return
	}
	select {
	case <-d.exited:
		return
	default:
	}
	d.cmd.Process.Signal(syscall.SIGCONT) // in case a test paused it
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(90 * time.Second):
		t.Errorf("phauld %s did not exit within 90s of SIGTERM; killing it", d.name)
		d.cmd.Process.Kill()
		<-d.exited
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

func (d *daemon) log() string {
	b, _ := os.ReadFile(d.logPath)
	return string(b)
}

// ctlResult is what one phaulctl run did.
type ctlResult struct {
	code   int
	stdout string
	stderr string
}

// phaulctl runs phaulctl against d.
func (d *daemon) phaulctl(t *testing.T, args ...string) ctlResult {
	t.Helper()
	cmd := exec.Command(bins.phaulctl, append([]string{"--socket", d.socket}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := ctlResult{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("run phaulctl: %v", err)
	}
	return r
}

// migrate runs `phaulctl migrate --json` and decodes the result; it fails
// the test if the migration fails.
func (d *daemon) migrate(t *testing.T, pid int, to *daemon) api.Result {
	t.Helper()
	return d.migrateTo(t, pid, to.addr)
}

// migrateTo is migrate to an address (a proxy's).
func (d *daemon) migrateTo(t *testing.T, pid int, addr string) api.Result {
	t.Helper()
	r := d.phaulctl(t, "migrate", "--pid", strconv.Itoa(pid), "--to", addr, "--json")
	if r.code != 0 {
		t.Fatalf("phaulctl migrate exited %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	var res api.Result
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatalf("phaulctl migrate --json printed %q: %v", r.stdout, err)
	}
	return res
}

// status is what the workload reports (test/workload.Status).
type status struct {
	Token    string `json:"token"`
	Seq      uint64 `json:"seq"`
	Counter  uint64 `json:"counter"`
	Sum      string `json:"sum"`
	Expect   string `json:"expect"`
	HostPID  int    `json:"host_pid"`
	NSPID    int    `json:"ns_pid"`
	MaxGapNS int64  `json:"max_gap_ns"`
	GapNS    int64  `json:"gap_ns"`
	MemMiB   int    `json:"mem_mib"`
	Seed     uint64 `json:"seed"`
	Child    int    `json:"child"`
}

// workload is a test process tree: the init of its own pid namespace,
// holding pseudo-random memory, with children.
type workload struct {
	t        *testing.T
	dir      string
	status   string
	seed     uint64
	memMiB   int
	children int
	unshare  *exec.Cmd
	pid      int // host pid of the namespace's init

	mu sync.Mutex
	// pids are every pid this tree has had, on either daemon, to kill at
	// the end.
	pids []int
}

type workloadOpts struct {
	memMiB   int
	children int
	seed     uint64
	extra    []string
	// stdout, if set, is the workload's stdout and stderr.
	stdout *os.File
}

// startWorkload starts `unshare -p -f -- setsid workload ...` and waits
// until it has written its first report.
func startWorkload(t *testing.T, o workloadOpts) *workload {
	t.Helper()
	if o.memMiB == 0 {
		o.memMiB = 64
	}
	if o.seed == 0 {
		o.seed = uint64(time.Now().UnixNano())
	}
	dir := t.TempDir()
	w := &workload{t: t, dir: dir, status: filepath.Join(dir, "status.json"), seed: o.seed, memMiB: o.memMiB, children: o.children}
	args := []string{"-p", "-f", "--", "setsid", bins.workload,
		"--mem", strconv.Itoa(o.memMiB), "--seed", strconv.FormatUint(o.seed, 10),
		"--children", strconv.Itoa(o.children), "--status", w.status}
	args = append(args, o.extra...)
	w.unshare = exec.Command("unshare", args...)
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	w.unshare.Stdin, w.unshare.Stdout, w.unshare.Stderr = null, null, null
	if o.stdout != nil {
		w.unshare.Stdout, w.unshare.Stderr = o.stdout, o.stdout
	}
	// Its own session, so it has no terminal CRIU would have to handle.
	w.unshare.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := w.unshare.Start(); err != nil {
		t.Fatal(err)
	}
	go w.unshare.Wait()
	t.Cleanup(w.kill)

	deadline := time.Now().Add(30 * time.Second)
	for {
		kids, _ := proc.Children(w.unshare.Process.Pid)
		if len(kids) == 1 {
			w.pid = kids[0]
			w.track(w.pid)
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("workload did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for {
		if st, err := w.readFile(w.status); err == nil && st.Seq >= 1 {
			if kids, _ := proc.Children(w.pid); len(kids) >= o.children {
				for _, k := range kids {
					w.track(k)
				}
				if w.childrenReported() {
					return w
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("workload did not report")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (w *workload) childrenReported() bool {
	for i := 0; i < w.children; i++ {
		if _, err := w.readFile(w.childStatus(i)); err != nil {
			return false
		}
	}
	return true
}

func (w *workload) childStatus(i int) string { return fmt.Sprintf("%s.child%d", w.status, i) }

func (w *workload) track(pid int) {
	w.mu.Lock()
	w.pids = append(w.pids, pid)
	w.mu.Unlock()
}

// kill kills every process of the tree this test started, wherever it
// went: only pids this test saw.
func (w *workload) kill() {
	w.mu.Lock()
	pids := append([]int(nil), w.pids...)
	w.mu.Unlock()
	for _, pid := range pids {
		if tree, err := proc.OpenTree(pid, 0); err == nil {
			if info, err := proc.Stat(pid); err == nil && strings.HasPrefix(info.Comm, "workload") {
				proc.SignalAll(tree, syscall.SIGKILL)
			}
			proc.CloseAll(tree)
		}
	}
	if w.unshare.Process != nil {
		w.unshare.Process.Kill()
	}
}

func (w *workload) readFile(path string) (status, error) {
	var st status
	b, err := os.ReadFile(path)
	if err != nil {
		return st, err
	}
	err = json.Unmarshal(b, &st)
	return st, err
}

// report asks the process pid to write its state to path (SIGUSR1) and
// returns the new report.
func (w *workload) report(pid int, path string) status {
	w.t.Helper()
	before, _ := w.readFile(path)
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		w.t.Fatalf("signal workload pid %d: %v", pid, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := w.readFile(path)
		if err == nil && st.Seq > before.Seq {
			return st
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("workload pid %d did not report to %s within 10s", pid, path)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// expectedSum is the checksum the workload's memory must have.
func expectedSum(memMiB int, seed uint64) string {
	return strconv.FormatUint(pattern.Expected(memMiB<<20, seed), 16)
}

// checkIntact checks a report against the memory the process was started
// with and against an earlier report of the same process.
func checkIntact(t *testing.T, what string, st, before status, memMiB int, seed uint64) {
	t.Helper()
	if st.Token != before.Token {
		t.Errorf("%s: token %s, was %s: this is not the same process", what, st.Token, before.Token)
	}
	want := expectedSum(memMiB, seed)
	if st.Sum != want || st.Expect != want {
		t.Errorf("%s: memory checksum %s (at start %s), want %s", what, st.Sum, st.Expect, want)
	}
	if st.Counter <= before.Counter {
		t.Errorf("%s: counter %d, was %d before: it did not go on", what, st.Counter, before.Counter)
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
