//go:build linux

package migratetest

import (
	"errors"
	"fmt"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/proc"
)

// child is a process a restore started.
type child struct {
	cmd    *exec.Cmd
	pid    int
	start  uint64
	exited chan struct{}
}

// spawn starts argv (its program at exe), and reaps it when it exits.
func (c *CRIU) spawn(exe string, argv []string) (*child, error) {
	cmd := &exec.Cmd{Path: exe, Args: argv}
	// Its own process group: a Ctrl-C meant for `go test` is not for it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, errors.New("fake CRIU closed")
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	k := &child{cmd: cmd, pid: cmd.Process.Pid, exited: make(chan struct{})}
	if info, err := proc.Stat(k.pid); err == nil {
		k.start = info.StartTime
	}
	c.goroutine(func() {
		cmd.Wait()
		close(k.exited)
	})
	c.children = append(c.children, k)
	return k, nil
}

// kill kills the process and what it forked, and waits for it to be
// reaped.
func (k *child) kill() {
	select {
	case <-k.exited:
		return
	default:
	}
	if tree, err := proc.OpenTree(k.pid, k.start); err == nil {
		proc.SignalAll(tree, syscall.SIGKILL)
		proc.CloseAll(tree)
	}
	k.cmd.Process.Kill()
	select {
	case <-k.exited:
	case <-time.After(5 * time.Second):
	}
}

func (k *child) hasExited() bool {
	select {
	case <-k.exited:
		return true
	default:
		return false
	}
}

// StartTree starts argv ("sleep 600" if none) as a tree to migrate and
// returns its pid. At the test's end it is killed, with what it forked,
// and reaped.
func StartTree(t testing.TB, argv ...string) int {
	t.Helper()
	if len(argv) == 0 {
		argv = []string{"sleep", "600"}
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	// A session of its own, as a tree CRIU can dump has (see the source's
	// checks before the freeze).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %v: %v", argv, err)
	}
	pid := cmd.Process.Pid
	info, _ := proc.Stat(pid)
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		if tree, err := proc.OpenTree(pid, info.StartTime); err == nil {
			proc.SignalAll(tree, syscall.SIGKILL)
			proc.CloseAll(tree)
		}
		cmd.Process.Kill()
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			t.Errorf("test tree %d did not exit", pid)
		}
	})
	return pid
}

// WaitState waits up to timeout until pid is in state ('T': stopped by a
// signal; 0: gone, reaped), and fails the test if it is not.
func WaitState(t testing.TB, pid int, state byte, timeout time.Duration) {
	t.Helper()
	if err := waitState(pid, state, timeout); err != nil {
		t.Fatal(err)
	}
}

// Running reports whether pid exists and runs its program: not stopped,
// not exiting, not a zombie.
func Running(pid int) bool { return proc.Running(pid) }

func waitState(pid int, state byte, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		info, err := proc.Stat(pid)
		var got byte
		switch {
		case errors.Is(err, proc.ErrNotFound):
		case err != nil:
			return err
		default:
			got = info.State
		}
		if got == state {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pid %d in state %q, not %q, after %v", pid, got, state, timeout)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// waitResumed waits until none of tree is stopped.
func waitResumed(tree []*proc.Process, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, p := range tree {
		for {
			info, err := proc.Stat(p.PID)
			if err != nil || !info.Stopped() || p.Exited() {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("pid %d still stopped after %v", p.PID, timeout)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	return nil
}
