//go:build linux

// Package proc reads what phauld needs to know about processes from /proc,
// and signals process trees without racing against pid reuse.
package proc

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrNotFound means there is no process with that pid (or it is not the
// process that was meant: same pid, other start time).
var ErrNotFound = errors.New("no such process")

// Task flags from the kernel's sched.h: PF_EXITING, the task is exiting
// (killed, or returning from main: no longer running its program);
// PF_KTHREAD, it is a kernel thread.
const (
	pfExiting = 0x00000004
	pfKthread = 0x00200000
)

// Info is a snapshot of one process.
type Info struct {
	PID  int
	Comm string
	// State is the one-letter state: R, S, D, T (stopped), t (traced), Z...
	State byte
	PPID  int
	// PGID and Session are its process group and session (their
	// leaders' pids, as this reader's pid namespace sees them; 0 if the
	// leader is outside it).
	PGID, Session int
	Flags         uint64
	// StartTime is when the process started, in clock ticks since boot.
	// With PID it names a process uniquely.
	StartTime uint64
	// UID is the real user id.
	UID int
}

// KernelThread reports whether the process is a kernel thread.
func (i Info) KernelThread() bool { return i.Flags&pfKthread != 0 }

// Exiting reports whether the process is on its way out: it runs no more
// of its program, whatever its state letter says for the moment.
func (i Info) Exiting() bool { return i.Flags&pfExiting != 0 }

// Stopped reports whether the process is stopped by a signal or a tracer.
func (i Info) Stopped() bool { return i.State == 'T' || i.State == 't' }

// Stat reads /proc/PID/stat and the uid from /proc/PID.
func Stat(pid int) (Info, error) {
	if pid <= 0 {
		return Info{}, fmt.Errorf("pid %d: %w", pid, ErrNotFound)
	}
	dir := "/proc/" + strconv.Itoa(pid)
	b, err := os.ReadFile(dir + "/stat")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
			return Info{}, fmt.Errorf("pid %d: %w", pid, ErrNotFound)
		}
		return Info{}, err
	}
	info, err := parseStat(b)
	if err != nil {
		return Info{}, fmt.Errorf("pid %d: %w", pid, err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return Info{}, fmt.Errorf("pid %d: %w", pid, ErrNotFound)
	}
	info.UID = int(st.Uid)
	return info, nil
}

// parseStat parses the contents of /proc/PID/stat. The command name is
// in parentheses and may itself hold spaces and parentheses, so fields are
// counted from the last ')'.
func parseStat(b []byte) (Info, error) {
	open := bytes.IndexByte(b, '(')
	end := bytes.LastIndexByte(b, ')')
	if open < 0 || end < open {
		return Info{}, fmt.Errorf("malformed stat %q", b)
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(b[:open])))
	if err != nil {
		return Info{}, fmt.Errorf("malformed stat pid: %w", err)
	}
	// Fields from 3 (state) on; f[0] is field 3.
	f := strings.Fields(string(b[end+1:]))
	if len(f) < 20 {
		return Info{}, fmt.Errorf("malformed stat: %d fields", len(f)+2)
	}
	info := Info{PID: pid, Comm: string(b[open+1 : end]), State: f[0][0]}
	if info.PPID, err = strconv.Atoi(f[1]); err != nil {
		return Info{}, fmt.Errorf("malformed stat ppid: %w", err)
	}
	if info.PGID, err = strconv.Atoi(f[2]); err != nil {
		return Info{}, fmt.Errorf("malformed stat pgrp: %w", err)
	}
	if info.Session, err = strconv.Atoi(f[3]); err != nil {
		return Info{}, fmt.Errorf("malformed stat session: %w", err)
	}
	if info.Flags, err = strconv.ParseUint(f[6], 10, 64); err != nil {
		return Info{}, fmt.Errorf("malformed stat flags: %w", err)
	}
	if info.StartTime, err = strconv.ParseUint(f[19], 10, 64); err != nil {
		return Info{}, fmt.Errorf("malformed stat starttime: %w", err)
	}
	return info, nil
}

// Children returns the children of every thread of pid.
func Children(pid int) ([]int, error) {
	taskDir := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(taskDir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("pid %d: %w", pid, ErrNotFound)
		}
		return nil, err
	}
	var kids []int
	for _, t := range tasks {
		b, err := os.ReadFile(taskDir + "/" + t.Name() + "/children")
		if err != nil {
			continue // the thread ended
		}
		for _, s := range strings.Fields(string(b)) {
			if k, err := strconv.Atoi(s); err == nil {
				kids = append(kids, k)
			}
		}
	}
	return kids, nil
}

// Tree returns pid and all its descendants, parents before children.
// Run it on a frozen or stopped tree for a stable answer.
func Tree(pid int) ([]int, error) {
	tree := []int{pid}
	seen := map[int]bool{pid: true}
	for i := 0; i < len(tree); i++ {
		kids, err := Children(tree[i])
		if err != nil {
			if i == 0 {
				return nil, err
			}
			continue
		}
		for _, k := range kids {
			if !seen[k] {
				seen[k] = true
				tree = append(tree, k)
			}
		}
	}
	return tree, nil
}

// IsAncestor reports whether ancestor is pid itself or one of its
// ancestors.
func IsAncestor(ancestor, pid int) (bool, error) {
	for p := pid; p > 0; {
		if p == ancestor {
			return true, nil
		}
		info, err := Stat(p)
		if err != nil {
			return false, err
		}
		p = info.PPID
	}
	return false, nil
}

// Process is a handle on one process that cannot be confused with a later
// process of the same pid: it holds a pidfd.
type Process struct {
	PID       int
	StartTime uint64
	fd        int
}

// Open returns a handle on pid, checking that it is still the process that
// started at startTime (0 accepts any).
func Open(pid int, startTime uint64) (*Process, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if err == unix.ESRCH {
			return nil, fmt.Errorf("pid %d: %w", pid, ErrNotFound)
		}
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	// The pidfd pins the process: if its stat matches now, the fd refers
	// to the process that was meant.
	info, err := Stat(pid)
	if err == nil && startTime != 0 && info.StartTime != startTime {
		err = fmt.Errorf("pid %d started at %d, not %d: %w", pid, info.StartTime, startTime, ErrNotFound)
	}
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &Process{PID: pid, StartTime: info.StartTime, fd: fd}, nil
}

// Signal sends sig to the process. A process that has already exited is
// not an error.
func (p *Process) Signal(sig syscall.Signal) error {
	err := unix.PidfdSendSignal(p.fd, sig, nil, 0)
	if err == unix.ESRCH {
		return nil
	}
	if err != nil {
		return fmt.Errorf("signal %v to pid %d: %w", sig, p.PID, err)
	}
	return nil
}

// Exited reports whether the process has exited (it may still be a zombie
// waiting for its parent).
func (p *Process) Exited() bool {
	fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0
}

// Close releases the handle.
func (p *Process) Close() error { return unix.Close(p.fd) }

// OpenTree opens handles on pid and all its descendants. Call it on a
// stopped tree.
func OpenTree(pid int, startTime uint64) ([]*Process, error) {
	root, err := Open(pid, startTime)
	if err != nil {
		return nil, err
	}
	pids, err := Tree(pid)
	if err != nil {
		root.Close()
		return nil, err
	}
	tree := []*Process{root}
	for _, p := range pids[1:] {
		h, err := Open(p, 0)
		if err != nil {
			continue // it ended meanwhile
		}
		tree = append(tree, h)
	}
	return tree, nil
}

// CloseAll closes every handle.
func CloseAll(tree []*Process) {
	for _, p := range tree {
		p.Close()
	}
}

// SignalAll sends sig to every process, and returns the first error.
func SignalAll(tree []*Process, sig syscall.Signal) error {
	var first error
	for _, p := range tree {
		if err := p.Signal(sig); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// WaitExited waits until every process has exited, or timeout passes.
func WaitExited(tree []*Process, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, p := range tree {
		for !p.Exited() {
			if time.Now().After(deadline) {
				return fmt.Errorf("pid %d still running after %v", p.PID, timeout)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return nil
}

// Resident is the resident memory of the processes pids, in bytes (from
// /proc/PID/statm; memory shared between them counts once per process).
// Processes that are gone count nothing.
func Resident(pids []int) int64 {
	page := int64(os.Getpagesize())
	var total int64
	for _, pid := range pids {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/statm")
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) < 2 {
			continue
		}
		if n, err := strconv.ParseInt(f[1], 10, 64); err == nil {
			total += n * page
		}
	}
	return total
}

// NSPid is pid's pid in its own (innermost) pid namespace, from the NSpid
// line of /proc/PID/status: the pid CRIU records it by in a dump.
func NSPid(pid int) (int, error) {
	ids, err := NSPids(pid)
	if err != nil {
		return 0, err
	}
	return ids[len(ids)-1], nil
}

// NSPids are pid's pids in each pid namespace it is in, from the reader's
// inwards (the NSpid line of /proc/PID/status).
func NSPids(pid int) ([]int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
			return nil, fmt.Errorf("pid %d: %w", pid, ErrNotFound)
		}
		return nil, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f, ok := strings.CutPrefix(line, "NSpid:"); ok {
			var ids []int
			for _, x := range strings.Fields(f) {
				n, err := strconv.Atoi(x)
				if err != nil {
					return nil, fmt.Errorf("pid %d: NSpid %q", pid, f)
				}
				ids = append(ids, n)
			}
			if len(ids) > 0 {
				return ids, nil
			}
		}
	}
	return nil, fmt.Errorf("pid %d: no NSpid in its status", pid)
}

// TaskIDs are the ids of every task of pids (each process and each of its
// threads) in their innermost pid namespace: the ids a dump records and
// a restore must have free. A process that has exited since pids was
// listed is left out (a running tree's short-lived children come and
// go); only its root's exit is an error.
func TaskIDs(pids []int) ([]int, error) {
	var out []int
	for i, pid := range pids {
		tasks, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
		if err != nil && i == 0 {
			return nil, fmt.Errorf("pid %d: %w", pid, ErrNotFound)
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			if ns, err := NSPid(tid); err == nil {
				out = append(out, ns)
			}
		}
	}
	return out, nil
}

// Running reports whether pid runs its program: it exists, is neither
// stopped (by a signal or a tracer) nor a zombie, and is not on its way
// out. A process sent SIGKILL counts as gone from that moment, though it
// may wait in the run queue a while before it exits.
func Running(pid int) bool {
	info, err := Stat(pid)
	if err != nil || info.Stopped() || info.Exiting() || info.State == 'Z' || info.State == 'X' {
		return false
	}
	return !killPending(pid)
}

// Tgid is the process (thread group) that the task pid belongs to: pid
// itself for a process, another pid for one of its threads.
func Tgid(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, fmt.Errorf("pid %d: %w", pid, ErrNotFound)
		}
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Tgid:"); ok {
			return strconv.Atoi(strings.TrimSpace(v))
		}
	}
	return 0, fmt.Errorf("pid %d: no Tgid in its status", pid)
}

// killPending reports whether SIGKILL waits to be taken by pid, from the
// SigPnd and ShdPnd lines of /proc/PID/status.
// KillPending reports whether pid has a SIGKILL pending (it is on its way
// out, or stuck in the kernel where the kill cannot reach it yet), or is
// gone.
func KillPending(pid int) bool { return killPending(pid) }

func killPending(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return true // gone
	}
	const kill = 1 << (uint(syscall.SIGKILL) - 1)
	for _, line := range strings.Split(string(b), "\n") {
		for _, prefix := range []string{"SigPnd:", "ShdPnd:"} {
			if v, ok := strings.CutPrefix(line, prefix); ok {
				if set, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64); err == nil && set&kill != 0 {
					return true
				}
			}
		}
	}
	return false
}

// WorkingIn lists the processes whose working directory is dir, with
// their command lines (arguments joined by spaces).
func WorkingIn(dir string) map[int]string {
	found := map[int]string{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return found
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cwd, err := os.Readlink("/proc/" + e.Name() + "/cwd")
		if err != nil || cwd != dir {
			continue
		}
		b, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		found[pid] = strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
	}
	return found
}

// IsCRIU reports whether cmdline (as /proc/PID/cmdline has it) is CRIU's:
// an argument among the first four is a path whose last element is "criu"
// (CRIU itself, or run by a dynamic loader, as make criu's wrapper does),
// or the title CRIU gives itself while it works for an RPC client
// ("criu: restore --rpc").
func IsCRIU(cmdline []byte) bool {
	args := bytes.Split(bytes.TrimRight(cmdline, "\x00"), []byte{0})
	for i, a := range args {
		if i > 3 {
			break // criu is argv[0], or right after a loader's options
		}
		if filepath.Base(string(a)) == "criu" || bytes.HasPrefix(a, []byte("criu: ")) {
			return true
		}
	}
	return false
}

// NestedPidNS finds, in the tree pids (its root first), the first process
// in another pid namespace than the root's: CRIU cannot dump a tree that
// spans pid namespaces. It returns its pid and its pid inside its own
// namespace (1: that namespace's init), or 0 if there is none.
func NestedPidNS(pids []int) (pid, inner int) {
	if len(pids) == 0 {
		return 0, 0
	}
	root, err := os.Readlink("/proc/" + strconv.Itoa(pids[0]) + "/ns/pid")
	if err != nil {
		return 0, 0
	}
	for _, p := range pids[1:] {
		ns, err := os.Readlink("/proc/" + strconv.Itoa(p) + "/ns/pid")
		if err != nil || ns == root {
			continue
		}
		in, err := NSPid(p)
		if err != nil {
			continue
		}
		return p, in
	}
	return 0, 0
}
