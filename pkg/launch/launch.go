//go:build linux

// Package launch starts a program so that phaul can migrate it (`phaulctl
// run`): the init of a pid namespace of its own, in a session of its own
// with no terminal, stdin /dev/null, stdout and stderr to the journal or a
// file, optionally in a network namespace of its own with a veth on a
// bridge. phauld starts `phauld run-init`, the namespace's first process,
// which waits until phauld has made its network and placed it, then opens
// the log (with the caller's own rights) and execs the program, which so
// becomes pid 1 of its namespace.
package launch

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/journal"
	"github.com/phaul/phaul/pkg/network"
	"github.com/phaul/phaul/pkg/wire"
)

// InitCommand is the argument that makes phauld a launched program's
// first process.
const InitCommand = "run-init"

// CheckName says whether name may name a launched program.
func CheckName(name string) error {
	if !wire.ValidRunName(name) {
		return api.Errorf(api.CodeInvalid, "name %q: want 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", name)
	}
	return nil
}

// Net is a launched program's network: a veth, its end in the program's
// namespace eth0 with Addr (ADDR/PREFIX, optional), its host end on
// Bridge.
type Net struct {
	Bridge string
	Addr   *net.IPNet // with the address itself in IP
}

// ParseNet parses --net BRIDGE[,ADDR/PREFIX] and checks it against this
// host: the bridge exists and is a bridge.
func ParseNet(s string) (*Net, error) {
	bridge, addr, _ := strings.Cut(s, ",")
	n := &Net{Bridge: bridge}
	if addr != "" {
		ip, ipnet, err := net.ParseCIDR(addr)
		if err != nil {
			return nil, api.Errorf(api.CodeInvalid, "--net %q: the address %q is not ADDR/PREFIX", s, addr)
		}
		ipnet.IP = ip
		n.Addr = ipnet
	}
	l, err := netlink.LinkByName(bridge)
	if err != nil {
		return nil, api.Errorf(api.CodePrecondition, "--net %q: there is no interface %q here (make the bridge first: ip link add %s type bridge)", s, bridge, bridge)
	}
	if l.Type() != "bridge" {
		return nil, api.Errorf(api.CodePrecondition, "--net %q: %s is a %s, not a bridge", s, bridge, l.Type())
	}
	return n, nil
}

// Spec is what to start.
type Spec struct {
	// Argv is the program and its arguments; Env its environment; Dir its
	// working directory (absolute).
	Argv []string
	Env  []string
	Dir  string
	// Name, if set, names it in the journal and its scope.
	Name string
	// Log is a file its stdout and stderr are appended to (absolute;
	// opened with Cred's rights); Journal sends them to the journal
	// instead. Neither: /dev/null.
	Log     string
	Journal bool
	// Net, if set, gives it a network namespace of its own.
	Net *Net
	// Cred, if set, are the credentials it runs with (the caller's).
	Cred *syscall.Credential
}

// Process is a started program, not yet let run: Release lets it exec.
type Process struct {
	PID  int
	cmd  *exec.Cmd
	goW  *os.File // closed: go on
	errR *os.File // EOF: the exec succeeded; else the reason it failed
	// HostEnd is the veth's host end, if it has a network.
	HostEnd string
}

// Start starts exe (phauld) as `exe run-init`, the first process of a new
// pid namespace (and network namespace with Net), in a session of its
// own, waiting. Its network is made here; Release lets it run.
func Start(exe string, s Spec) (p *Process, err error) {
	if len(s.Argv) == 0 {
		return nil, api.Errorf(api.CodeInvalid, "no program to run")
	}
	if !filepath.IsAbs(s.Dir) {
		return nil, api.Errorf(api.CodeInvalid, "working directory %q is not absolute", s.Dir)
	}
	if s.Log != "" && !filepath.IsAbs(s.Log) {
		return nil, api.Errorf(api.CodeInvalid, "log file %q is not absolute", s.Log)
	}
	ident := s.Name
	if ident == "" {
		ident = filepath.Base(s.Argv[0])
	}
	out, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		return nil, err
	}
	defer out.Close()
	if s.Journal {
		if !journal.HasStreams() {
			return nil, api.Errorf(api.CodePrecondition, "--journal: this host has no journald (%s is missing): use --log FILE", journal.StreamPath)
		}
		j, err := journal.NewStream(ident, 6)
		if err != nil {
			return nil, err
		}
		defer j.Close()
		out = j
	}
	in, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	defer in.Close()
	goR, goW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer goR.Close()
	errR, errW, err := os.Pipe()
	if err != nil {
		goW.Close()
		return nil, err
	}
	defer errW.Close()
	args := []string{InitCommand}
	if s.Log != "" {
		args = append(args, "--log", s.Log)
	}
	args = append(args, "--")
	cmd := exec.Command(exe, append(args, s.Argv...)...)
	cmd.Env, cmd.Dir = s.Env, s.Dir
	cmd.Stdin, cmd.Stdout, cmd.Stderr = in, out, out
	cmd.ExtraFiles = []*os.File{goR, errW}
	flags := uintptr(syscall.CLONE_NEWPID)
	if s.Net != nil {
		flags |= syscall.CLONE_NEWNET
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: flags, Setsid: true, Credential: s.Cred}
	if err := cmd.Start(); err != nil {
		goW.Close()
		errR.Close()
		return nil, fmt.Errorf("start %s: %w", s.Argv[0], err)
	}
	p = &Process{PID: cmd.Process.Pid, cmd: cmd, goW: goW, errR: errR}
	defer func() {
		if err != nil {
			p.Kill()
		}
	}()
	if s.Net != nil {
		if p.HostEnd, err = makeNet(p.PID, s.Net); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// makeNet gives the network namespace of pid its veth, eth0, on the
// bridge, with the address, and a default route through the bridge's own
// address in the same subnet if it has one. It returns the host end's
// name.
func makeNet(pid int, n *Net) (string, error) {
	h, err := netns.GetFromPid(pid)
	if err != nil {
		return "", err
	}
	defer h.Close()
	outer := "vph" + strconv.Itoa(pid)
	link := wire.NetLink{Name: "eth0"}
	var routes []wire.NetRoute
	if n.Addr != nil {
		ones, _ := n.Addr.Mask.Size()
		link.Addresses = []string{n.Addr.IP.String() + "/" + strconv.Itoa(ones)}
		if gw := bridgeAddrIn(n.Bridge, n.Addr); gw != nil {
			routes = append(routes, wire.NetRoute{Gateway: gw.String(), Dev: "eth0", IPv6: gw.To4() == nil})
		}
	}
	if err := network.Build(h, []wire.NetLink{link}, routes, []wire.Veth{{Inner: "eth0", Outer: outer, Bridge: n.Bridge}}); err != nil {
		return "", api.Errorf(api.CodeAborted, "make its network (eth0 on %s): %v", n.Bridge, err)
	}
	return outer, nil
}

// bridgeAddrIn is the bridge's address in the subnet of a, if any.
func bridgeAddrIn(bridge string, a *net.IPNet) net.IP {
	l, err := netlink.LinkByName(bridge)
	if err != nil {
		return nil
	}
	addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return nil
	}
	for _, x := range addrs {
		if a.Contains(x.IP) && !x.IP.Equal(a.IP) {
			return x.IP
		}
	}
	return nil
}

// Release lets the program exec, and waits until it has: an error says
// why it could not (it has exited then).
func (p *Process) Release() error {
	p.goW.Close()
	b, _ := io.ReadAll(p.errR)
	p.errR.Close()
	if len(b) > 0 {
		p.cmd.Wait()
		return api.Errorf(api.CodeInvalid, "%s", b)
	}
	// Reaped here while phauld lives; by whoever adopts it afterwards.
	go p.cmd.Wait()
	return nil
}

// Kill ends a process that was not released (or whose set-up failed).
func (p *Process) Kill() {
	p.cmd.Process.Kill()
	p.goW.Close()
	p.errR.Close()
	p.cmd.Wait()
	if p.HostEnd != "" {
		if l, err := netlink.LinkByName(p.HostEnd); err == nil {
			netlink.LinkDel(l)
		}
	}
}

// Main is `phauld run-init [--log FILE] -- PROGRAM [ARGS]`, run by Start:
// it waits for fd 3 to close, opens the log, and execs the program; if it
// cannot, it writes why on fd 4 and exits 127.
func Main(args []string) int {
	status := os.NewFile(4, "status")
	fail := func(format string, a ...any) int {
		fmt.Fprintf(status, format, a...)
		return 127
	}
	var logPath string
	if len(args) > 1 && args[0] == "--log" {
		logPath, args = args[1], args[2:]
	}
	if len(args) < 2 || args[0] != "--" {
		fmt.Fprintln(os.Stderr, "usage: phauld run-init [--log FILE] -- PROGRAM [ARGS] (run by phauld for phaulctl run)")
		return 2
	}
	argv := args[1:]
	unix.CloseOnExec(4)
	io.Copy(io.Discard, os.NewFile(3, "go")) // until phauld is done
	unix.Close(3)
	if logPath != "" {
		fd, err := unix.Open(logPath, unix.O_WRONLY|unix.O_APPEND|unix.O_CREAT|unix.O_NOCTTY, 0o644)
		if err != nil {
			return fail("open the log %s: %v", logPath, err)
		}
		unix.Dup2(fd, 1)
		unix.Dup2(fd, 2)
		unix.Close(fd)
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		var ee *exec.Error
		if errors.As(err, &ee) {
			err = ee.Err
		}
		return fail("%s: %v", argv[0], err)
	}
	err = syscall.Exec(path, argv, os.Environ())
	return fail("exec %s: %v", path, err)
}
