//go:build linux

// Package harness runs phaul for real, for the integration tests, the
// benchmarks and the soak: phauld daemons with their own state directories
// and control sockets, phaulctl against them, and test workloads (the init
// of their own pid namespace, holding pseudo-random memory) to migrate.
// Everything returns errors, so that programs and tests alike can use it;
// it stops only processes it started, by their pid.
package harness

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
	"sync"
	"syscall"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/client"
	"github.com/phaul/phaul/pkg/pki"
)

// DaemonConfig says how to run one phauld.
type DaemonConfig struct {
	// Name is for messages; Addr is the migration address it listens on
	// (loopback).
	Name, Addr string
	// Dir holds its state directory, control socket, log and
	// certificate.
	Dir string
	// Phauld and Phaulctl are the binaries.
	Phauld, Phaulctl string
	// Wrap runs phauld under another command (e.g. unshare).
	Wrap []string
	// Flags are extra phauld flags.
	Flags []string
	// Activated starts phauld through systemd-socket-activate, which
	// listens on the daemon's address and control socket and starts
	// phauld on the first connection to either. --listen and --control
	// are then given values phauld cannot use, to show they are ignored.
	Activated bool
	// Insecure runs it with --insecure; otherwise it gets a certificate
	// for its address from the CA in CA, unless TLSDir names one.
	Insecure   bool
	CA, TLSDir string
	// Env is its environment (nil: this process's); Output, if set, is
	// its stdout and stderr instead of its log file.
	Env    []string
	Output *os.File
}

// Daemon is one phauld.
type Daemon struct {
	DaemonConfig
	Socket, State, LogPath string
	args                   []string
	// mu orders Start, Kill and the rest, for callers that kill and
	// start a daemon from another goroutine (chaos).
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

// NewDaemon prepares a daemon (its directory, certificate and command
// line) without starting it.
func NewDaemon(c DaemonConfig) (*Daemon, error) {
	d := &Daemon{DaemonConfig: c,
		Socket:  filepath.Join(c.Dir, "ctl.sock"),
		State:   filepath.Join(c.Dir, "state"),
		LogPath: filepath.Join(c.Dir, "phauld.log"),
	}
	if err := os.MkdirAll(c.Dir, 0o755); err != nil {
		return nil, err
	}
	d.args = append([]string{}, c.Wrap...)
	if c.Activated {
		d.args = append(d.args, "systemd-socket-activate", "-l", c.Addr, "-l", d.Socket, "--fdname=migrate:control",
			c.Phauld, "--listen", "192.0.2.1:12345", "--control", "/proc/phauld-unused.sock")
	} else {
		d.args = append(d.args, c.Phauld, "--listen", c.Addr, "--control", d.Socket)
	}
	d.args = append(d.args, "--state-dir", d.State, "--log-level", "debug")
	switch {
	case c.Insecure:
		d.args = append(d.args, "--insecure")
	case c.TLSDir != "":
		d.args = append(d.args, "--tls-dir", c.TLSDir)
	default:
		tlsDir := filepath.Join(c.Dir, "tls")
		host, _, _ := net.SplitHostPort(c.Addr)
		if err := pki.Issue(c.CA, tlsDir, []string{host}); err != nil {
			return nil, err
		}
		d.args = append(d.args, "--tls-dir", tlsDir)
	}
	d.args = append(d.args, c.Flags...)
	return d, nil
}

// StartDaemon prepares and starts a daemon, and waits until it answers.
func StartDaemon(c DaemonConfig) (*Daemon, error) {
	d, err := NewDaemon(c)
	if err != nil {
		return nil, err
	}
	return d, d.Start()
}

// Start runs the daemon (again, after a kill: its log goes on in the same
// file) and waits until it answers (activated: until its control socket
// exists, since a connection would start it).
func (d *Daemon) Start() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	logf, err := os.OpenFile(d.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	d.exited = make(chan struct{})
	d.cmd = exec.Command(d.args[0], d.args[1:]...)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if d.Output != nil {
		d.cmd.Stdout, d.cmd.Stderr = d.Output, d.Output
	}
	d.cmd.Env = d.Env
	// Its own process group: a Ctrl-C meant for the tests is not for it.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := d.cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	logf.Close()
	exited, cmd := d.exited, d.cmd
	go func() {
		cmd.Wait()
		close(exited)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var err error
		if d.Activated {
			_, err = os.Stat(d.Socket)
		} else {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err = client.New(d.Socket).Status(ctx)
			cancel()
		}
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("phauld %s exited at start-up: %v\n%s", d.Name, cmd.ProcessState, d.Log())
		default:
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			<-exited
			return fmt.Errorf("phauld %s not answering after 30s: %v", d.Name, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// PID is the daemon's process (or its wrapper's).
func (d *Daemon) PID() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cmd.Process.Pid
}

// Exited is closed once the daemon's process has exited.
func (d *Daemon) Exited() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.exited
}

// Running reports whether the daemon's process runs.
func (d *Daemon) Running() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.running()
}

func (d *Daemon) running() bool {
	if d.exited == nil {
		return false
	}
	select {
	case <-d.exited:
		return false
	default:
		return true
	}
}

// Kill kills the daemon with SIGKILL and waits for it to be gone.
func (d *Daemon) Kill() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.running() {
		return
	}
	d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.exited
}

// Terminate stops the daemon with SIGTERM and fails unless it exits
// within limit and a little slack; it is then killed.
func (d *Daemon) Terminate(limit time.Duration) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	start := time.Now()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
		return nil
	case <-time.After(limit + 5*time.Second):
		d.cmd.Process.Kill()
		<-d.exited
		return fmt.Errorf("phauld %s still running %v after SIGTERM (stop timeout %v); killed it", d.Name, time.Since(start), limit)
	}
}

// Pause stops the daemon with SIGSTOP: it stops answering, its sockets
// stay open. Resume undoes it.
func (d *Daemon) Pause()  { d.signal(syscall.SIGSTOP) }
func (d *Daemon) Resume() { d.signal(syscall.SIGCONT) }

func (d *Daemon) signal(sig syscall.Signal) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.cmd.Process.Signal(sig)
}

// Stop sends SIGTERM (and SIGCONT, in case it was paused) and waits up to
// wait; then SIGKILL, and an error.
func (d *Daemon) Stop(wait time.Duration) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.running() {
		return nil
	}
	d.cmd.Process.Signal(syscall.SIGCONT)
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
		return nil
	case <-time.After(wait):
		d.cmd.Process.Kill()
		<-d.exited
		return fmt.Errorf("phauld %s did not exit within %v of SIGTERM; killed it", d.Name, wait)
	}
}

// Log is what the daemon has logged so far.
func (d *Daemon) Log() string {
	b, _ := os.ReadFile(d.LogPath)
	return string(b)
}

// Sessions lists the daemon's sessions.
func (d *Daemon) Sessions() ([]api.Session, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return client.New(d.Socket).Sessions(ctx)
}

// CtlResult is what one phaulctl run did.
type CtlResult struct {
	Code           int
	Stdout, Stderr string
}

// Ctl runs phaulctl against the daemon.
func (d *Daemon) Ctl(args ...string) (CtlResult, error) {
	return d.CtlContext(context.Background(), args...)
}

// CtlContext is Ctl, killing phaulctl when ctx ends.
func (d *Daemon) CtlContext(ctx context.Context, args ...string) (CtlResult, error) {
	cmd := exec.CommandContext(ctx, d.Phaulctl, append([]string{"--socket", d.Socket}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := CtlResult{Stdout: out.String(), Stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.Code = ee.ExitCode()
	default:
		return r, fmt.Errorf("run phaulctl: %w", err)
	}
	return r, nil
}

// Migrate runs `phaulctl migrate --json` of pid to addr with extra
// arguments, and decodes the result when it exits 0.
func (d *Daemon) Migrate(pid int, addr string, extra ...string) (api.Result, CtlResult, error) {
	r, err := d.Ctl(append([]string{"migrate", "--pid", strconv.Itoa(pid), "--to", addr, "--json"}, extra...)...)
	if err != nil || r.Code != 0 {
		return api.Result{}, r, err
	}
	var res api.Result
	if err := json.Unmarshal([]byte(r.Stdout), &res); err != nil {
		return res, r, fmt.Errorf("phaulctl migrate --json printed %q: %w", r.Stdout, err)
	}
	return res, r, nil
}

// ExitCode is the exit code of the daemon's last run (-1 while it runs,
// or if a signal ended it).
func (d *Daemon) ExitCode() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.running() || d.cmd == nil || d.cmd.ProcessState == nil {
		return -1
	}
	return d.cmd.ProcessState.ExitCode()
}
