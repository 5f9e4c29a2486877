//go:build linux

package migrate

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/network"
	"github.com/phaul/phaul/pkg/runc"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// Container is a runc container a migration moves: its id, and the runc
// (state root) that runs it on this host.
type Container struct {
	ID   string
	Runc *runc.Runc
	// Bundle is its bundle here (on the destination, the one made for
	// it); HookExe is phauld's binary, which CRIU runs as the restore's
	// action script (runc.HookMain).
	Bundle  string
	HookExe string
	// OwnBundle: phaul made the bundle (it arrived here); the commit that
	// moves the container away removes it.
	OwnBundle bool
}

// Files a container restore keeps in its session directory.
const (
	hookSocket = "hook.sock"
	hookScript = "criu-hook"
	// CRIUConfig is the CRIU configuration file of a container's
	// restore, which its bundle's config.json names (annotation
	// org.criu.config): runc has no option for what phaul needs of CRIU.
	CRIUConfig = "criu.conf"
)

// ContainerCRIU is the CRIU of a container migration: the dump and the
// restore go through runc, which runs CRIU knowing the container; the
// destination's page server, checks and lazy-pages are CRIU's own (base).
//
// runc cannot hold a dumped container for phaul, nor leave a restored one
// stopped, the way phaul asks CRIU to: the source pauses the container
// (its cgroup's freezer) before `runc checkpoint --leave-running`, so that
// it stays frozen after the dump until phaul resumes or deletes it; the
// destination's bundle names a CRIU configuration that makes CRIU leave
// the restored tree stopped and run `phauld criu-hook` at each step, by
// which the restore's setup-namespaces and post-restore reach the session
// as CRIU's notifications would.
func ContainerCRIU(base CRIU, c *Container, log *zap.Logger) CRIU {
	return &containerCRIU{base: base, c: c, log: log}
}

type containerCRIU struct {
	base CRIU
	c    *Container
	log  *zap.Logger
}

func (c *containerCRIU) StartPageServer(o criu.Options) (Op, error) { return c.base.StartPageServer(o) }
func (c *containerCRIU) StartCPUInfoCheck(o criu.Options) (Op, error) {
	return c.base.StartCPUInfoCheck(o)
}
func (c *containerCRIU) StartLazyPages(dir string, ps *os.File) (LazyPages, error) {
	return c.base.StartLazyPages(dir, ps)
}
func (c *containerCRIU) Stopped(dir string) (map[int]bool, error) { return c.base.Stopped(dir) }
func (c *containerCRIU) Taken(ids []int) []int                    { return nil } // runc's own pid namespace

// StartDump pauses the container, locks its namespace's network (CRIU
// lifts its own lock when the dump ends, and the paused copy must take no
// packet the destination's will not have), and checkpoints it, its pages
// to o.PageServer through a loopback TCP listener (runc takes an address,
// not a socket). When runc is done the op says post-dump: true leaves the
// container paused, false resumes it, as CRIU would.
func (c *containerCRIU) StartDump(o criu.Options) (Op, error) {
	if len(o.External) > 0 || len(o.InheritFds) > 0 {
		return nil, errors.New("a container whose processes write to the journal cannot move: give it no journald streams")
	}
	ctx := context.Background()
	r := c.c.Runc
	if err := r.Pause(ctx, c.c.ID); err != nil {
		return nil, err
	}
	undo := func() {
		if err := r.Resume(ctx, c.c.ID); err != nil {
			c.log.Error("cannot resume the container", zap.Error(err))
		}
	}
	if o.Network {
		if err := network.Lock(o.PID); err != nil {
			undo()
			return nil, fmt.Errorf("lock the container's network: %w", err)
		}
	}
	if o.LazyPages {
		op, err := c.startLazyDump(o)
		if err != nil {
			undo()
		}
		return op, err
	}
	var ps net.Conn
	var ln net.Listener
	// No --tcp-skip-in-flight: Debian 12's runc (1.1.5) has none, so a
	// container with connections not yet accepted fails its dump (and
	// resumes).
	cpo := runc.CheckpointOptions{ImagePath: o.ImagesDir, WorkPath: o.ImagesDir, LeaveRunning: true,
		TCPEstablished: o.Network, FileLocks: o.FileLocks}
	if o.PageServer != nil {
		var err error
		if ps, err = net.FileConn(o.PageServer); err == nil {
			ln, err = net.Listen("tcp", "127.0.0.1:0")
		}
		if err != nil {
			if ps != nil {
				ps.Close()
			}
			undo()
			return nil, fmt.Errorf("page server bridge: %w", err)
		}
		cpo.PageServer = ln.Addr().String()
	}
	cmd := r.CheckpointCommand(ctx, c.c.ID, cpo)
	op, err := newAsyncOp(cmd, "checkpoint", filepath.Join(o.ImagesDir, "dump.log"))
	if err != nil {
		if ln != nil {
			ln.Close()
			ps.Close()
		}
		undo()
		return nil, err
	}
	bridged := make(chan struct{})
	if ln != nil {
		go func() {
			defer close(bridged)
			// Paused, the container is frozen and nothing of it has
			// left: the source checks it there, as CRIU's own dump
			// lets it. A no gives CRIU no page server: runc fails, and
			// the container resumes.
			if !op.notify(FrozenNotify, o.PID) {
				ln.Close()
				ps.Close()
				return
			}
			up, down, err := bridge(ln, ps)
			c.log.Debug("page stream bridged", zap.Int64("to_relay", up), zap.Int64("from_relay", down), zap.Error(err))
		}()
	} else {
		close(bridged)
	}
	go func() {
		defer close(op.exited)
		err := op.wait()
		if ln != nil {
			ln.Close()
		}
		<-bridged
		if err != nil {
			c.log.Warn("the container's checkpoint failed; resuming it", zap.Error(err))
			undo()
			op.push(criu.Event{Err: err})
			return
		}
		if !op.notify("post-dump", o.PID) {
			undo()
			op.push(criu.Event{Err: errors.New("the dump was given up: the container was resumed")})
			return
		}
		op.push(criu.Event{})
	}()
	return op, nil
}

// bridge carries the page stream between CRIU's connection to ln (one)
// and ps, the session relay's socket, both ways, until CRIU is done.
func bridge(ln net.Listener, ps net.Conn) (up, down int64, err error) {
	defer ps.Close()
	if tl, ok := ln.(*net.TCPListener); ok {
		tl.SetDeadline(time.Now().Add(time.Minute))
	}
	// The port is on loopback, where any local user may connect first:
	// only a connection from a root socket (CRIU's) is taken.
	var c net.Conn
	for c == nil {
		conn, err := ln.Accept()
		if err != nil {
			ln.Close()
			return 0, 0, err
		}
		if peerUID(conn) == 0 {
			c = conn
		} else {
			conn.Close()
		}
	}
	ln.Close()
	return splice(c, ps)
}

// splice copies c to ps and ps to c until both directions end, and closes
// both: up is what went from c to ps.
func splice(c, ps net.Conn) (up, down int64, err error) {
	defer ps.Close()
	defer c.Close()
	type halfCloser interface{ CloseWrite() error }
	done := make(chan struct{})
	go func() {
		var err error
		down, err = io.Copy(c, ps)
		if tc, ok := c.(*net.TCPConn); ok && err != nil {
			// A reset stays a reset: CRIU must not take a broken
			// stream for one that ended.
			tc.SetLinger(0)
			tc.Close()
		} else if hc, ok := c.(halfCloser); ok {
			hc.CloseWrite()
		}
		close(done)
	}()
	up, err = io.Copy(ps, c)
	if hc, ok := ps.(halfCloser); ok {
		hc.CloseWrite()
	}
	<-done
	return up, down, err
}

// startLazyDump checkpoints the paused container with runc's lazy pages:
// CRIU dumps all but the memory, says so on the status descriptor, and
// serves the memory from a TCP port (runc gives CRIU the port only, so it
// listens on every address, for one connection). phauld connects at once
// (the port is open to anyone only until then) and that is the op's
// post-dump: saying yes bridges the connection to ps, the relay's socket,
// and the destination's lazy-pages daemon pulls the pages through it;
// saying no closes it, and CRIU gives the dump up. runc ends when the
// pages are all served (the container is left paused, as CRIU found it)
// or the serving failed (the container is resumed here).
func (c *containerCRIU) startLazyDump(o criu.Options) (Op, error) {
	if o.PageServer == nil {
		return nil, errors.New("a lazy dump needs the relay's socket")
	}
	ps, err := net.FileConn(o.PageServer)
	if err != nil {
		return nil, fmt.Errorf("page server bridge: %w", err)
	}
	port, err := freePort()
	if err != nil {
		ps.Close()
		return nil, fmt.Errorf("page server port: %w", err)
	}
	statusR, statusW, err := os.Pipe()
	if err != nil {
		ps.Close()
		return nil, err
	}
	ctx := context.Background()
	r := c.c.Runc
	cmd := r.CheckpointCommand(ctx, c.c.ID, runc.CheckpointOptions{ImagePath: o.ImagesDir, WorkPath: o.ImagesDir,
		LeaveRunning: true, TCPEstablished: o.Network, LazyPages: true, StatusFd: 3, FileLocks: o.FileLocks,
		PageServer: net.JoinHostPort("127.0.0.1", strconv.Itoa(port))})
	cmd.ExtraFiles = []*os.File{statusW}
	op, err := newAsyncOp(cmd, "checkpoint", filepath.Join(o.ImagesDir, "dump.log"))
	statusW.Close()
	if err != nil {
		statusR.Close()
		ps.Close()
		return nil, err
	}
	undo := func() {
		if err := r.Resume(ctx, c.c.ID); err != nil {
			c.log.Error("cannot resume the container", zap.Error(err))
		}
	}
	go func() {
		defer close(op.exited)
		defer ps.Close()
		conn, err := awaitLazyServer(statusR, port)
		statusR.Close()
		given := false // told no: runc ends by itself
		if err == nil {
			if !op.notify("post-dump", o.PID) {
				conn.Close() // CRIU reads the end, and gives the dump up
				given = true
				err = errors.New("the dump was given up: the container was resumed")
			} else {
				up, down, serr := splice(conn, ps)
				c.log.Debug("lazy pages bridged", zap.Int64("to_relay", up), zap.Int64("from_relay", down), zap.Error(serr))
			}
		}
		if err != nil && !errors.Is(err, errLazyNotReady) && !given {
			// CRIU waits for a connection that will not come.
			op.kill()
		}
		werr := op.wait()
		if err == nil || errors.Is(err, errLazyNotReady) && werr != nil {
			err = werr // runc's own reason beats "it never listened"
		}
		if err != nil {
			c.log.Warn("the container's lazy checkpoint failed; resuming it", zap.Error(err))
			undo()
			op.push(criu.Event{Err: err})
			return
		}
		op.push(criu.Event{})
	}()
	return op, nil
}

var errLazyNotReady = errors.New("runc ended before CRIU served the pages")

// awaitLazyServer waits for runc's word that CRIU's lazy page server
// listens (a NUL byte on status; its end, if runc exits first), and
// connects to it: a connection CRIU's, root's, or none.
func awaitLazyServer(status *os.File, port int) (net.Conn, error) {
	var b [1]byte
	if n, _ := status.Read(b[:]); n != 1 || b[0] != 0 {
		return nil, errLazyNotReady
	}
	conn, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 10*time.Second)
	if err != nil {
		return nil, fmt.Errorf("connect to CRIU's lazy page server: %w", err)
	}
	if peerUID(conn) != 0 {
		conn.Close()
		return nil, fmt.Errorf("port %d, where CRIU's lazy page server should listen, is not root's", port)
	}
	return conn, nil
}

// freePort is a TCP port free on every address at the time of asking.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", ":0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// peerUID is the owner of the other end of c, a TCP connection on
// loopback, as /proc/net/tcp says (-1 if not found).
func peerUID(c net.Conn) int {
	local, ok1 := c.LocalAddr().(*net.TCPAddr)
	remote, ok2 := c.RemoteAddr().(*net.TCPAddr)
	if !ok1 || !ok2 || remote.IP.To4() == nil {
		return -1
	}
	hexAddr := func(a *net.TCPAddr) string {
		ip := a.IP.To4()
		return fmt.Sprintf("%02X%02X%02X%02X:%04X", ip[3], ip[2], ip[1], ip[0], a.Port)
	}
	// The peer's socket: its local address is our remote one.
	want, peer := hexAddr(remote), hexAddr(local)
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 7 && f[1] == want && f[2] == peer {
			uid, err := strconv.Atoi(f[7])
			if err != nil {
				return -1
			}
			return uid
		}
	}
	return -1
}

// StartRestore restores the container from the images in o.ImagesDir with
// `runc restore --detach`, its bundle's CRIU configuration (written here)
// leaving the tree stopped and running the hook, whose setup-namespaces
// and post-restore come as notifications. The response carries the
// restored root's pid.
func (c *containerCRIU) StartRestore(o criu.Options) (Op, error) {
	sock := filepath.Join(o.ImagesDir, hookSocket)
	os.Remove(sock)
	ln, err := transport.ListenUnixPath(sock)
	if err != nil {
		return nil, fmt.Errorf("hook socket: %w", err)
	}
	if err := WriteCRIUConfig(filepath.Join(c.c.Bundle, CRIUConfig), o.ImagesDir, c.c.HookExe, o.External); err != nil {
		ln.Close()
		return nil, err
	}
	// The work path is the images directory, where the lazy-pages
	// daemon (lazy mode) listens.
	cmd := c.c.Runc.RestoreCommand(context.Background(), c.c.ID, runc.RestoreOptions{
		Bundle: c.c.Bundle, ImagePath: o.ImagesDir, WorkPath: o.ImagesDir, TCPEstablished: o.Network,
		LazyPages: o.LazyPages, FileLocks: o.FileLocks})
	op, err := newAsyncOp(cmd, "restore", filepath.Join(o.ImagesDir, "restore.log"))
	if err != nil {
		ln.Close()
		return nil, err
	}
	go op.serveHook(ln)
	go func() {
		defer close(op.exited)
		err := op.wait()
		ln.Close()
		if err != nil {
			op.push(criu.Event{Err: err})
			return
		}
		st, err := c.c.Runc.State(context.Background(), c.c.ID)
		if err != nil {
			op.push(criu.Event{Err: fmt.Errorf("the restored container: %w", err)})
			return
		}
		op.push(criu.Event{PID: st.PID})
	}()
	return op, nil
}

// WriteCRIUConfig writes the CRIU configuration of a container restore to
// path (in its bundle, which its config.json names): the hook (phauld at
// exe, its script and socket in the session directory dir) as action
// script, the tree left stopped, and the externals (a veth's host end and
// bridge) CRIU needs. After the commit, QuietCRIUConfig empties it.
func WriteCRIUConfig(path, dir, exe string, external []string) error {
	// phauld starts only for the steps it acts on.
	var steps []string
	for a := range runc.Hooked {
		steps = append(steps, a)
	}
	sort.Strings(steps)
	script := fmt.Sprintf("#!/bin/sh\ncase \"$CRTOOLS_SCRIPT_ACTION\" in\n%s) exec %s %s %s ;;\nesac\nexit 0\n",
		strings.Join(steps, "|"), shellQuote(exe), runc.HookCommand, shellQuote(filepath.Join(dir, hookSocket)))
	if err := os.WriteFile(filepath.Join(dir, hookScript), []byte(script), 0o700); err != nil {
		return err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "action-script %s\nleave-stopped\n", filepath.Join(dir, hookScript))
	for _, e := range external {
		fmt.Fprintf(&b, "external %s\n", e)
	}
	return os.WriteFile(path, []byte(b.String()), 0o600)
}

// QuietCRIUConfig empties a committed container's CRIU configuration:
// runc keeps naming it for the container's next checkpoint, which must
// not run this migration's hook (gone with its session directory).
func QuietCRIUConfig(bundle string) error {
	return os.WriteFile(filepath.Join(bundle, CRIUConfig), []byte("# phaul: this container's restore is over\n"), 0o600)
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// asyncOp is a runc command seen as a CRIU request: events come from the
// command's end and from hook calls, on an eventfd the session's loop
// watches.
type asyncOp struct {
	cmd     *exec.Cmd
	command string // runc's: checkpoint, restore
	stderr  bytes.Buffer
	logPath string
	efd     int

	mu        sync.Mutex
	events    []criu.Event
	replies   []chan bool // notifications waiting for their answer, in order
	efdClosed bool

	closeOnce sync.Once
	closed    chan struct{}
	exited    chan struct{}
	reaped    chan struct{} // runc was waited for
}

func newAsyncOp(cmd *exec.Cmd, command, logPath string) (*asyncOp, error) {
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, err
	}
	op := &asyncOp{cmd: cmd, command: command, logPath: logPath, efd: efd, closed: make(chan struct{}), exited: make(chan struct{}), reaped: make(chan struct{})}
	cmd.Stdout = nil
	cmd.Stderr = &op.stderr
	// Its own process group, which CRIU joins: kill ends both.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		unix.Close(efd)
		return nil, fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	go func() {
		// Nobody watches the eventfd once the op ended and was closed.
		<-op.exited
		<-op.closed
		op.mu.Lock()
		op.efdClosed = true
		unix.Close(op.efd)
		op.mu.Unlock()
	}()
	return op, nil
}

// wait waits for the command; a failure says what runc said, and the
// Error lines of CRIU's log.
func (op *asyncOp) wait() error {
	err := op.cmd.Wait()
	close(op.reaped)
	if err == nil {
		return nil
	}
	rerr := runc.CommandError(op.command, err, op.stderr.Bytes())
	if lines := criu.ErrorLines(op.logPath, 3); len(lines) > 0 {
		return fmt.Errorf("%w; CRIU: %s (full log: %s)", rerr, strings.Join(lines, "; "), op.logPath)
	}
	return rerr
}

func (op *asyncOp) push(ev criu.Event) {
	op.mu.Lock()
	defer op.mu.Unlock()
	if op.efdClosed {
		return // too late: nobody reads events any more
	}
	op.events = append(op.events, ev)
	var one [8]byte
	one[0] = 1 // little endian
	unix.Write(op.efd, one[:])
}

// notify queues a notification and waits for its answer (false if the op
// is closed first).
func (op *asyncOp) notify(name string, pid int) bool {
	ch := make(chan bool, 1)
	op.mu.Lock()
	op.replies = append(op.replies, ch)
	op.mu.Unlock()
	op.push(criu.Event{Notify: name, PID: pid})
	select {
	case ok := <-ch:
		return ok
	case <-op.closed:
		return false
	}
}

// serveHook answers the hook's calls, one at a time, until ln closes.
func (op *asyncOp) serveHook(ln *net.UnixListener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.SetDeadline(time.Now().Add(10 * time.Minute))
		line, err := bufio.NewReader(c).ReadString('\n')
		ok := false
		if err == nil {
			action, pidText, _ := strings.Cut(strings.TrimSpace(line), " ")
			pid, _ := strconv.Atoi(pidText)
			ok = !runc.Hooked[action] || op.notify(action, pid)
		}
		if ok {
			io.WriteString(c, "ok\n")
		} else {
			io.WriteString(c, "no\n")
		}
		c.Close()
	}
}

func (op *asyncOp) Fd() int { return op.efd }

func (op *asyncOp) Next() (criu.Event, error) {
	op.mu.Lock()
	defer op.mu.Unlock()
	if op.efdClosed {
		return criu.Event{}, errors.New("runc: the request is over")
	}
	if len(op.events) == 0 {
		var b [8]byte
		unix.Read(op.efd, b[:])
		return criu.Event{}, criu.ErrAgain
	}
	ev := op.events[0]
	op.events = op.events[1:]
	if len(op.events) == 0 {
		var b [8]byte
		unix.Read(op.efd, b[:])
	}
	return ev, nil
}

func (op *asyncOp) Reply(ok bool) error {
	op.mu.Lock()
	defer op.mu.Unlock()
	if len(op.replies) == 0 {
		return errors.New("runc: no notification to answer")
	}
	op.replies[0] <- ok
	op.replies = op.replies[1:]
	return nil
}

func (op *asyncOp) WaitPID(int) error { return errors.New("runc: no page server to wait for") }

// Close answers any pending notification no: a dump resumes the
// container, a restore fails and kills what it restored.
func (op *asyncOp) Close() error {
	op.closeOnce.Do(func() { close(op.closed) })
	return nil
}

// Abandon closes the op and waits up to grace for runc to end; a runc
// still there is killed (it reports whether it had to be).
func (op *asyncOp) Abandon(grace time.Duration) bool {
	op.Close()
	select {
	case <-op.exited:
		return false
	case <-time.After(grace):
	}
	op.kill()
	select {
	case <-op.exited:
	case <-time.After(grace):
	}
	return true
}

// kill kills runc and the CRIU it runs (its process group), unless runc
// was reaped already.
func (op *asyncOp) kill() {
	select {
	case <-op.reaped:
		return
	default:
	}
	syscall.Kill(-op.cmd.Process.Pid, syscall.SIGKILL)
}

func (op *asyncOp) LogPath() string { return op.logPath }
func (op *asyncOp) Pid() int        { return op.cmd.Process.Pid }

// prepareContainer checks, before anything is frozen, that this host can
// take the container c, and makes its bundle: runc runs here, the id is
// free, the root filesystem is on storage both hosts share (the source's
// marker is seen here), the bind mounts' sources exist. The bundle's
// config.json is the source's, with the rootfs at its shared path, a
// cgroup path of its own if the source's is in use here (two daemons on
// one machine), and this session's CRIU configuration.
func (m *dest) prepareContainer(c *wire.Container) error {
	r := m.p.Runc
	if r == nil {
		return api.Errorf(api.CodePrecondition, "the destination takes no containers: its phauld has no runc (install Debian's runc there, and restart phauld)")
	}
	ctx := context.Background()
	v, err := r.Version(ctx)
	if err != nil {
		return api.Errorf(api.CodePrecondition, "the destination cannot run runc: %v", err)
	}
	if _, err := r.State(ctx, c.ID); err == nil {
		return api.Errorf(api.CodeConflict, "the destination already has a container %s (runc --root %s list): remove it there, or migrate elsewhere", c.ID, r.Root)
	} else if !errors.Is(err, runc.ErrNotExist) {
		return api.Errorf(api.CodePrecondition, "the destination cannot ask runc about container %s: %v", c.ID, err)
	}
	cfg, err := runc.ParseConfig(c.Config)
	if err != nil {
		return api.Errorf(api.CodeInvalid, "the container's %v", err)
	}
	shared := false
	if dir, ok := underAny(c.Rootfs, m.p.SharedPaths); ok {
		if fi, err := os.Stat(c.Rootfs); err != nil || !fi.IsDir() {
			return api.Errorf(api.CodePrecondition, "the container's root filesystem %s is under %s, which this phauld's --shared-path says is shared with the source, but it is not here: mount the shared storage, or take %s out of --shared-path", c.Rootfs, dir, dir)
		}
		shared = true
	} else if c.Marker != "" && readMarker(c.Marker, c.Rootfs, m.s.ID) == c.Token {
		shared = true
	} else if _, err := exec.LookPath("rsync"); err != nil {
		return api.Errorf(api.CodePrecondition, "the container's root filesystem %s is not on storage the destination shares with the source, and the destination has no rsync to copy it: install rsync there (or share the storage)", c.Rootfs)
	}
	var missing []string
	for _, src := range cfg.BindSources() {
		if !runc.Exists(src) {
			missing = append(missing, src)
		}
	}
	if len(missing) > 0 {
		return api.Errorf(api.CodePrecondition, "the container bind-mounts paths the destination does not have: %s; create them there", strings.Join(missing, ", "))
	}
	if m.p.ContainersDir == "" {
		return api.Errorf(api.CodePrecondition, "the destination's phauld has no --containers-dir")
	}
	bundle := filepath.Join(m.p.ContainersDir, c.ID)
	if ents, err := os.ReadDir(bundle); err == nil {
		for _, e := range ents {
			if e.Name() != "config.json" && e.Name() != CRIUConfig && e.Name() != "rootfs" {
				return api.Errorf(api.CodeConflict, "the destination's bundle directory %s for container %s exists and is not one phaul made: remove it there", bundle, c.ID)
			}
		}
	}
	// Recorded first: a restart then removes the bundle (and whatever
	// runc made of it).
	m.rec.Container = c.ID
	if err := m.rec.Save(m.p.Dir); err != nil {
		return err
	}
	if err := os.MkdirAll(bundle, 0o700); err != nil {
		return err
	}
	if shared {
		cfg.SetRootfs(c.Rootfs)
	} else {
		m.syncDir = filepath.Join(bundle, "rootfs")
		if err := os.MkdirAll(m.syncDir, 0o755); err != nil {
			return err
		}
		cfg.SetRootfs(m.syncDir)
	}
	if p := cfg.CgroupsPath(); p == "" || cgroupInUse(p) {
		cfg.SetCgroupsPath(fmt.Sprintf("/phaul/%s-%s", c.ID, m.s.ID.String()[:8]))
	}
	cfg.SetAnnotation("org.criu.config", filepath.Join(bundle, CRIUConfig))
	b, err := cfg.Marshal()
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o600); err != nil {
		return err
	}
	m.bundleMade = true
	m.container = &Container{ID: c.ID, Runc: r, Bundle: bundle, HookExe: m.p.HookExe}
	m.s.container.Store(c.ID)
	m.log.Info("a container comes", zap.String("container", c.ID), zap.String("runc", v), zap.String("source_runc", c.RuncVersion),
		zap.String("bundle", bundle), zap.String("rootfs", c.Rootfs), zap.Bool("rootfs_shared", shared))
	return nil
}

// readMarker reads the source's shared-storage marker at path: only where
// the source makes it (next to the rootfs, named for this session), a
// regular file, not through a symlink, 64 bytes at most ("" otherwise).
func readMarker(path, rootfs string, sid wire.SessionID) string {
	if path != filepath.Join(filepath.Dir(rootfs), MarkerPrefix+sid.String()) {
		return ""
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return ""
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return ""
	}
	b := make([]byte, 65)
	n, _ := io.ReadFull(f, b)
	if n > 64 {
		return ""
	}
	return string(b[:n])
}

// MarkerPrefix names the shared-storage marker a source writes next to a
// container's rootfs (its session id follows).
const MarkerPrefix = ".phaul-shared-"

// underAny says which of dirs path is in (or is), if any.
func underAny(path string, dirs []string) (string, bool) {
	path = filepath.Clean(path)
	for _, d := range dirs {
		if path == d || strings.HasPrefix(path, strings.TrimSuffix(d, "/")+"/") {
			return d, true
		}
	}
	return "", false
}

// cgroupInUse reports whether the cgroup path p exists on this host (under
// any v1 controller, or the v2 hierarchy).
func cgroupInUse(p string) bool {
	if strings.Contains(p, ":") {
		return false // systemd's slice:prefix:name: its own units
	}
	if runc.Exists(filepath.Join("/sys/fs/cgroup", p, "cgroup.procs")) {
		return true
	}
	ents, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range ents {
		if runc.Exists(filepath.Join("/sys/fs/cgroup", e.Name(), p)) {
			return true
		}
	}
	return false
}

// forgetContainer makes runc forget a discarded copy, and removes the
// bundle this session made for it.
func forgetContainer(log *zap.Logger, c *Container, bundleMade bool) {
	if err := c.Runc.Delete(context.Background(), c.ID, true); err != nil && !errors.Is(err, runc.ErrNotExist) {
		log.Warn("cannot delete the discarded container", zap.String("container", c.ID), zap.Error(err))
	}
	if bundleMade {
		os.RemoveAll(c.Bundle)
	}
}
