//go:build linux

// Package pidns restores a process tree into a new pid namespace, where it
// keeps the pids it had on the source even when those pids are taken on
// this host (always so when both "hosts" are one machine). It is the
// approach of CRIU's criu-ns script, made part of phauld: `phauld
// pidns-init` starts as the init (pid 1) of a new pid namespace with a
// mount namespace of its own, mounts a /proc that shows that namespace,
// and runs CRIU's restore as its child. The restored tree is CRIU's child;
// when CRIU exits it passes to the init, which reaps what exits and ends
// when nothing is left, taking the namespace with it.
package pidns

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/proc"
)

// Command is the argument that makes phauld the init of a new pid
// namespace.
const Command = "pidns-init"

// Wrap returns the command that runs argv (CRIU) in a new pid namespace,
// as the child of exe (phauld) run as `exe pidns-init`. The caller sets
// ExtraFiles: fds 3 .. 3+n-1 reach CRIU at the same numbers; the last
// extra file (fd 3+n) must be the write end of a pipe, on which the init
// writes CRIU's wait status when CRIU has exited, and which it then
// closes.
func Wrap(exe string, nfiles int, argv ...string) *exec.Cmd {
	args := append([]string{Command, "--status-fd", strconv.Itoa(3 + nfiles), "--"}, argv...)
	cmd := exec.Command(exe, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWPID | syscall.CLONE_NEWNS,
		// Its own session: the tree it holds outlives phauld, and no
		// signal meant for phauld's terminal or group reaches it.
		Setsid: true,
	}
	return cmd
}

// ReadStatus reads the wait status the init writes on its status pipe. It
// returns ok false if the init closed the pipe without one (it died).
func ReadStatus(r *os.File) (ws syscall.WaitStatus, ok bool) {
	var b [4]byte
	if n, err := r.Read(b[:]); err != nil || n != 4 {
		return 0, false
	}
	return syscall.WaitStatus(binary.LittleEndian.Uint32(b[:])), true
}

// Main is `phauld pidns-init --status-fd N -- CRIU ARGS...`, run by Wrap.
func Main(args []string) int {
	if len(args) < 4 || args[0] != "--status-fd" || args[2] != "--" {
		fmt.Fprintln(os.Stderr, "usage: phauld pidns-init --status-fd N -- PROGRAM [ARGS] (run by phauld, as a new pid namespace's init)")
		return 2
	}
	statusFD, err := strconv.Atoi(args[1])
	if err != nil || statusFD < 3 {
		fmt.Fprintln(os.Stderr, "phauld pidns-init: bad --status-fd", args[1])
		return 2
	}
	argv := args[3:]
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "phauld pidns-init: not the init of a new pid namespace")
		return 2
	}
	unix.CloseOnExec(statusFD)
	status := os.NewFile(uintptr(statusFD), "status")
	// Mounts from the host still reach this namespace (slave), none made
	// here goes back; /proc then shows this pid namespace, as CRIU needs
	// it to.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		fmt.Fprintln(os.Stderr, "phauld pidns-init: make / a slave mount:", err)
		return 1
	}
	if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		fmt.Fprintln(os.Stderr, "phauld pidns-init: mount /proc:", err)
		return 1
	}
	files := []*os.File{os.Stdin, os.Stdout, os.Stderr}
	for fd := 3; fd < statusFD; fd++ {
		files = append(files, os.NewFile(uintptr(fd), "fd"+strconv.Itoa(fd)))
	}
	path := argv[0]
	if !strings.Contains(path, "/") {
		if p, err := exec.LookPath(path); err == nil {
			path = p
		}
	}
	child, err := os.StartProcess(path, argv, &os.ProcAttr{Dir: "/", Files: files})
	if err != nil {
		fmt.Fprintln(os.Stderr, "phauld pidns-init:", err)
		return 1
	}
	for _, f := range files[3:] {
		f.Close()
	}
	// The init of the namespace: reap whatever exits, until nothing is
	// left (the restored tree has exited, or CRIU gave it up).
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil { // ECHILD: the namespace is empty
			return 0
		}
		if pid == child.Pid && status != nil {
			var b [4]byte
			binary.LittleEndian.PutUint32(b[:], uint32(ws))
			status.Write(b[:])
			status.Close()
			status = nil
		}
	}
}

// HostPID is the pid, in this daemon's pid namespace, of the task whose
// pid is nsPID in the pid namespace whose init is init: it looks among
// init's descendants.
func HostPID(init, nsPID int) (int, error) {
	tree, err := proc.Tree(init)
	if err != nil {
		return 0, err
	}
	for _, p := range tree[1:] {
		if ns, err := proc.NSPid(p); err == nil && ns == nsPID {
			return p, nil
		}
	}
	return 0, fmt.Errorf("no task is pid %d in the pid namespace of pid %d", nsPID, init)
}

// Taken lists the pids of want that a task of this host's pid namespace
// has (a process or a thread).
func Taken(want []int) []int {
	var out []int
	for _, p := range want {
		if p <= 0 {
			continue
		}
		if _, err := os.Stat("/proc/" + strconv.Itoa(p)); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// Enclosing says where pid sits when it is in a pid namespace below this
// daemon's without being that namespace's init: the init's pid here
// (0 if none of pid's ancestors is: a task that joined the namespace
// from outside), pid's pid in the namespace, and whether the init is
// phauld's pidns-init (a namespace an earlier restore made). nested is
// false for a pid in this daemon's own pid namespace, or the init of its
// own.
func Enclosing(pid int) (nested bool, init, inner int, phaul bool) {
	ids, err := proc.NSPids(pid)
	if err != nil || len(ids) < 2 || ids[len(ids)-1] == 1 {
		return false, 0, 0, false
	}
	inner = ids[len(ids)-1]
	ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", pid))
	if err != nil {
		return true, 0, inner, false
	}
	for p := pid; p > 1; {
		info, err := proc.Stat(p)
		if err != nil {
			break
		}
		p = info.PPID
		if pns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", p)); err != nil || pns != ns {
			break
		}
		if in, err := proc.NSPid(p); err == nil && in == 1 {
			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p))
			args := strings.Split(string(cmdline), "\x00")
			return true, p, inner, len(args) > 1 && args[1] == Command
		}
	}
	return true, 0, inner, false
}
