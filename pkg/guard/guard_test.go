//go:build linux

package guard

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/store"
)

// The test binary is also the guard: Start re-executes it.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == Command {
		os.Exit(Main(os.Args[2:]))
	}
	os.Exit(m.Run())
}

// copyTree starts a shell that forks a child, as a restored copy might,
// and returns the shell's identity and its child's pid.
func copyTree(t *testing.T) (proc.Info, int) {
	t.Helper()
	cmd := exec.Command("sh", "-c", "sleep 600 & wait")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		kids, _ := proc.Children(cmd.Process.Pid)
		if len(kids) == 1 {
			info, err := proc.Stat(cmd.Process.Pid)
			if err != nil {
				t.Fatal(err)
			}
			// The whole tree goes at the end, the child first (a
			// shell killed first leaves its sleep behind).
			t.Cleanup(func() {
				syscall.Kill(kids[0], syscall.SIGKILL)
				cmd.Process.Kill()
				cmd.Wait()
			})
			return info, kids[0]
		}
		if time.Now().After(deadline) {
			t.Fatal("the copy did not fork")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func record(t *testing.T, state string) string {
	t.Helper()
	dir := t.TempDir()
	if err := (&store.Record{ID: "x", Role: store.RoleDest, State: state}).Save(dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

func gone(pid int) bool {
	info, err := proc.Stat(pid)
	return err != nil || info.State == 'Z'
}

func waitGone(t *testing.T, what string, pids ...int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for !gone(pid) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: pid %d still there", what, pid)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// TestGuardProcess runs the guard as its own process, as phauld does: its
// daemon's end closing (phauld dying) kills the copy it guards and what
// the copy forked, within a second, unless the record says committed; a
// release leaves the copy be.
func TestGuardProcess(t *testing.T) {
	for _, c := range []struct {
		name  string
		state string
		end   func(*Guard)
		kill  bool
	}{
		{"daemon died, not committed", store.Restored, (*Guard).Close, true},
		{"daemon died after the commit", store.Committed, (*Guard).Close, false},
		{"released", store.Restored, (*Guard).Release, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			root, child := copyTree(t)
			g, err := Start(os.Args[0], record(t, c.state), root.PID, root.StartTime)
			if err != nil {
				t.Fatal(err)
			}
			time.Sleep(50 * time.Millisecond)
			if gone(root.PID) || gone(child) {
				t.Fatal("the guard killed the copy while its daemon was there")
			}
			ended := time.Now()
			c.end(g)
			if c.kill {
				waitGone(t, "the copy of a daemon that died", root.PID, child)
				if took := time.Since(ended); took > time.Second {
					t.Errorf("the copy died %v after its daemon", took)
				}
				return
			}
			// Once the guard has ended, whatever it was to do is done.
			waitGone(t, "the guard", g.cmd.Process.Pid)
			if gone(root.PID) || gone(child) {
				t.Fatal("the guard killed a copy it had to leave be")
			}
		})
	}
}

// TestGuardEndsWhenReleased: a released guard's process ends, and so its
// end of the socket pair shows the daemon it ended.
func TestGuardEndsWhenReleased(t *testing.T) {
	root, _ := copyTree(t)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan bool)
	go func() {
		killed, _ := Watch(fds[1], record(t, store.Restored), root.PID, root.StartTime)
		done <- killed
	}()
	unix.Write(fds[0], []byte(release))
	select {
	case killed := <-done:
		if killed {
			t.Fatal("a released guard killed the copy")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a released guard did not end")
	}
	unix.Close(fds[0])
}

// TestKillStopsForksFirst: proc.StopAndKill finds a tree's processes even while it
// forks.
func TestKillStopsForksFirst(t *testing.T) {
	// Bounded, and in a process group of its own: whatever the test
	// finds, nothing it forked outlives it.
	cmd := exec.Command("sh", "-c", "i=0; while [ $i -lt 5000 ]; do sleep 600 & i=$((i+1)); done; wait")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	time.Sleep(100 * time.Millisecond)
	info, err := proc.Stat(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	kids, _ := proc.Children(info.PID)
	if killed, err := proc.StopAndKill(info.PID, info.StartTime); !killed || err != nil {
		t.Fatalf("Kill = %v, %v", killed, err)
	}
	waitGone(t, "the forking tree", append(kids, info.PID)...)
	if killed, _ := proc.StopAndKill(info.PID, info.StartTime); killed {
		t.Error("Kill of a tree that is gone reported killing it")
	}
	// The sleeps it forked were its children: gone with it (reparented
	// to init, but killed first).
	for _, k := range kids {
		if b, err := os.ReadFile("/proc/" + strconv.Itoa(k) + "/cmdline"); err == nil && strings.Contains(string(b), "sleep") && !gone(k) {
			syscall.Kill(k, syscall.SIGKILL)
			t.Errorf("forked pid %d survived", k)
		}
	}
}
