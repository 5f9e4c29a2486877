//go:build linux

package harness

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/test/report"
)

// WorkloadConfig says how to start a test workload.
type WorkloadConfig struct {
	// Bin is the workload binary (test/workload); Dir holds its status
	// files.
	Bin, Dir string
	// MemMiB of pseudo-random memory (64 if 0), seeded by Seed (the
	// time if 0); Children of its own, each a copy.
	MemMiB   int
	Children int
	Seed     uint64
	// Extra are more workload flags.
	Extra []string
	// Output, if set, is its stdout and stderr (else /dev/null).
	Output *os.File
	// OwnCwd runs it in Dir: dumps of processes in one working directory
	// wait for each other (the dump lock), so workloads that must move
	// in parallel each need their own.
	OwnCwd bool
	// HostPidNS starts it as a user's background process would run: in
	// this host's pid namespace, in a session of its own (setsid), not
	// the init of a namespace.
	HostPidNS bool
	// NetNS, if set, is the named network namespace (/run/netns) it
	// starts in: a "host" made of a namespace (nsenter --net, which
	// keeps the mount namespace, as CRIU needs).
	NetNS string
}

// Workload is a test process tree: the init of its own pid namespace
// (unshare -p -f -- setsid workload ...), holding pseudo-random memory,
// with children.
type Workload struct {
	WorkloadConfig
	// Status is its status file; PID the host pid of the namespace's
	// init.
	Status  string
	PID     int
	unshare *exec.Cmd

	mu sync.Mutex
	// pids are every pid this tree has had, on either daemon, to kill at
	// the end.
	pids []int
	seen map[int]bool
}

// StartWorkload starts a workload and waits until it and its children
// have written their first reports.
func StartWorkload(c WorkloadConfig) (*Workload, error) {
	if c.MemMiB == 0 {
		c.MemMiB = 64
	}
	if c.Seed == 0 {
		c.Seed = uint64(time.Now().UnixNano())
	}
	// Processes and Roots tell its copies by their executable.
	bin, err := filepath.Abs(c.Bin)
	if err == nil {
		bin, err = filepath.EvalSymlinks(bin)
	}
	if err != nil {
		return nil, err
	}
	c.Bin = bin
	if err := os.MkdirAll(c.Dir, 0o755); err != nil {
		return nil, err
	}
	w := &Workload{WorkloadConfig: c, Status: filepath.Join(c.Dir, "status.json"), seen: map[int]bool{}}
	args := []string{"-p", "-f", "--", "setsid", c.Bin,
		"--mem", strconv.Itoa(c.MemMiB), "--seed", strconv.FormatUint(c.Seed, 10),
		"--children", strconv.Itoa(c.Children), "--status", w.Status}
	args = append(args, c.Extra...)
	w.unshare = exec.Command("unshare", args...)
	if c.HostPidNS {
		w.unshare = exec.Command(args[4], args[5:]...)
	}
	if c.NetNS != "" {
		// nsenter execs the command (it forks only to enter a pid
		// namespace): the pid stays the same.
		w.unshare = exec.Command("nsenter", append([]string{"--net=/run/netns/" + c.NetNS, "--", w.unshare.Path}, w.unshare.Args[1:]...)...)
	}
	if c.OwnCwd {
		w.unshare.Dir = c.Dir
	}
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer null.Close()
	w.unshare.Stdin, w.unshare.Stdout, w.unshare.Stderr = null, null, null
	if c.Output != nil {
		w.unshare.Stdout, w.unshare.Stderr = c.Output, c.Output
	}
	// Its own session, so it has no terminal CRIU would have to handle.
	w.unshare.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := w.unshare.Start(); err != nil {
		return nil, err
	}
	go w.unshare.Wait()

	deadline := time.Now().Add(30 * time.Second)
	if c.HostPidNS {
		w.PID = w.unshare.Process.Pid
	} else if w.PID, err = OnlyChild(w.unshare.Process.Pid, 30*time.Second); err != nil {
		w.Kill()
		return nil, fmt.Errorf("workload did not start")
	}
	w.Track(w.PID)
	for {
		if st, err := report.Read(w.Status); err == nil && st.Seq >= 1 {
			if kids, _ := proc.Children(w.PID); len(kids) >= c.Children {
				for _, k := range kids {
					w.Track(k)
				}
				if w.childrenReported() {
					return w, nil
				}
			}
		}
		if time.Now().After(deadline) {
			w.Kill()
			return nil, fmt.Errorf("workload did not report")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (w *Workload) childrenReported() bool {
	for i := 0; i < w.Children; i++ {
		if _, err := report.Read(w.ChildStatus(i)); err != nil {
			return false
		}
	}
	return true
}

// ChildStatus is child i's status file.
func (w *Workload) ChildStatus(i int) string { return fmt.Sprintf("%s.child%d", w.Status, i) }

// Track adds pid to the processes Kill kills.
func (w *Workload) Track(pid int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.seen[pid] {
		w.seen[pid] = true
		w.pids = append(w.pids, pid)
	}
}

// Kill kills every process of the tree, wherever it went: the pids that
// were tracked, and every copy still found (Processes: a test that failed
// early never tracked its destination's), only while they run the
// workload.
func (w *Workload) Kill() {
	w.mu.Lock()
	pids := append([]int(nil), w.pids...)
	w.mu.Unlock()
	pids = append(pids, w.Processes()...)
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

// Report asks the process pid (one copy of the tree's root) for a report
// in the root's status file.
func (w *Workload) Report(pid int) (report.Report, error) {
	return report.AskPID(w.Status, pid, 10*time.Second)
}

// Intact checks a report of the root against its memory and an earlier
// report (see report.Intact).
func (w *Workload) Intact(r, before report.Report) string {
	return report.Intact(r, before, w.MemMiB, w.Seed)
}

// Processes are the processes of the tree that have not exited, wherever
// they are: every process running the workload binary with this tree's
// status file. Zombies do not count (this host reaps orphans late).
func (w *Workload) Processes() []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err != nil || exe != w.Bin {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if !strings.Contains(string(cmdline), w.Status) {
			continue
		}
		if info, err := proc.Stat(pid); err == nil && info.State != 'Z' {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Roots are the copies of the tree's root among Processes: those whose
// command line names the root's own status file (children name theirs).
func (w *Workload) Roots() []int {
	var roots []int
	for _, pid := range w.Processes() {
		cmdline, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
		if strings.Contains(string(cmdline), w.Status+"\x00") || strings.HasSuffix(string(cmdline), w.Status) {
			roots = append(roots, pid)
		}
	}
	return roots
}

// ProcessesIn maps the pids that work in one of dirs to where: their
// working directory is under it (CRIU and its helpers run in a session's
// directory), or one of their arguments names a path below it (a copy's
// guard, which runs in /, names its session's directory). The daemons,
// whose --state-dir is dirs itself, are not counted.
func ProcessesIn(dirs ...string) map[int]string {
	ents, _ := os.ReadDir("/proc")
	found := map[int]string{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cwd, err := os.Readlink(filepath.Join("/proc", e.Name(), "cwd"))
		if err != nil {
			continue
		}
		cwd = strings.TrimSuffix(cwd, " (deleted)")
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		args := strings.Split(string(cmdline), "\x00")
		for _, d := range dirs {
			if cwd == d || strings.HasPrefix(cwd, d+"/") {
				found[pid] = cwd
			}
			for _, a := range args {
				if strings.HasPrefix(a, d+"/") {
					found[pid] = a
				}
			}
		}
	}
	return found
}
