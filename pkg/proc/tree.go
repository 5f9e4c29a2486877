//go:build linux

package proc

import (
	"errors"
	"fmt"
	"syscall"
	"time"
)

// ResumeWithin bounds resuming a stopped tree and seeing it run.
const ResumeWithin = 2 * time.Second

// HeldStopped reports whether p is one of the tasks that were stopped
// (SIGSTOP, SIGTSTP) when CRIU dumped them, as stopped holds them: by
// their pid in their own pid namespace, which is how the images name them
// and how a restore brings them back.
func HeldStopped(p *Process, stopped map[int]bool) bool {
	if len(stopped) == 0 {
		return false
	}
	ns, err := NSPid(p.PID)
	return err == nil && stopped[ns]
}

// ResumeTree sends SIGCONT to the tasks of a tree CRIU left stopped, but
// not to those that were stopped before the migration: their job-control
// state is theirs. It repeats until none of the others is stopped (CRIU's
// own SIGSTOP may land just after its response), for up to ResumeWithin.
func ResumeTree(tree []*Process, stopped map[int]bool) error {
	var run []*Process
	for _, p := range tree {
		if !HeldStopped(p, stopped) {
			run = append(run, p)
		}
	}
	deadline := time.Now().Add(ResumeWithin)
	for {
		if err := SignalAll(run, syscall.SIGCONT); err != nil {
			return err
		}
		time.Sleep(5 * time.Millisecond)
		n := 0
		for _, p := range run {
			if info, err := Stat(p.PID); err == nil && info.Stopped() && !p.Exited() {
				n++
			}
		}
		if n == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of its processes still stopped after %v of SIGCONT", n, ResumeWithin)
		}
	}
}

// VerifyRunning waits up to ResumeWithin to see the tree rooted at pid,
// started at start, running: the root still exists and is not exiting,
// and none of its tasks is stopped or traced but those stopped holds.
func VerifyRunning(pid int, start uint64, stopped map[int]bool) error {
	deadline := time.Now().Add(ResumeWithin)
	for {
		err := running(pid, start, stopped)
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func running(pid int, start uint64, stopped map[int]bool) error {
	tree, err := OpenTree(pid, start)
	if err != nil {
		return fmt.Errorf("the process is gone: %w", err)
	}
	defer CloseAll(tree)
	root := tree[0]
	if root.Exited() {
		return fmt.Errorf("pid %d has exited", pid)
	}
	// A root that is on its way out (exiting, or with SIGKILL pending) is
	// not running, whatever its state letter says yet.
	if info, err := Stat(pid); err != nil || info.Exiting() || info.State == 'Z' || info.State == 'X' || killPending(pid) {
		return fmt.Errorf("pid %d is exiting", pid)
	}
	for _, p := range tree {
		info, err := Stat(p.PID)
		if err != nil || p.Exited() || HeldStopped(p, stopped) {
			continue
		}
		if info.Stopped() {
			return fmt.Errorf("pid %d is still stopped (state %c)", p.PID, info.State)
		}
	}
	return nil
}

// KillWithin bounds waiting for a killed tree to exit.
const KillWithin = 5 * time.Second

// KillTree kills every process of tree and waits up to KillWithin for them
// to exit.
func KillTree(tree []*Process) error {
	if err := SignalAll(tree, syscall.SIGKILL); err != nil {
		return err
	}
	return WaitExited(tree, KillWithin)
}

// StopAndKill kills the tree rooted at pid (if it is still the process that
// started at start) and everything in it, waiting up to KillWithin for it
// to exit. The tree may be running and forking: it is stopped first,
// walked again until no new process shows up, then killed. It reports
// whether there was a tree to kill.
func StopAndKill(pid int, start uint64) (bool, error) {
	tree, err := OpenTree(pid, start)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer func() { CloseAll(tree) }()
	if tree[0].Exited() {
		return false, nil // a zombie: nothing to kill
	}
	for round := 0; round < 100; round++ {
		SignalAll(tree, syscall.SIGSTOP)
		fresh, err := OpenTree(pid, start)
		if err != nil {
			break // the root is gone
		}
		have := map[int]bool{}
		for _, p := range tree {
			have[p.PID] = true
		}
		added := 0
		for _, p := range fresh {
			if have[p.PID] {
				p.Close()
				continue
			}
			tree = append(tree, p)
			added++
		}
		if added == 0 {
			break
		}
	}
	if err := SignalAll(tree, syscall.SIGKILL); err != nil {
		return true, err
	}
	return true, WaitExited(tree, KillWithin)
}

// JobStopped lists the processes of the tree rooted at pid that job
// control stops now (state T: SIGSTOP, SIGTSTP; not a tracer's t), by
// their pid in their own pid namespace, as HeldStopped takes them.
func JobStopped(pid int) []int {
	pids, err := Tree(pid)
	if err != nil {
		return nil
	}
	var out []int
	for _, p := range pids {
		if info, err := Stat(p); err == nil && info.State == 'T' {
			if ns, err := NSPid(p); err == nil {
				out = append(out, ns)
			}
		}
	}
	return out
}
