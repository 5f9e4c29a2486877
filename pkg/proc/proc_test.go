//go:build linux

package proc

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	// A command name with spaces and parentheses, as a process may choose.
	line := "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 100 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n"
	info, err := parseStat([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	want := Info{PID: 1234, Comm: "a) b (c", State: 'S', PPID: 1, PGID: 1234, Session: 1234, Flags: 4194560, StartTime: 98765}
	if info != want {
		t.Fatalf("parseStat = %+v, want %+v", info, want)
	}
	if info.KernelThread() {
		t.Error("flags 4194560 read as a kernel thread")
	}
	for _, bad := range []string{"", "12 (x", "x (y) S 1", "1 (y) S x 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5"} {
		if _, err := parseStat([]byte(bad)); err == nil {
			t.Errorf("parseStat(%q) succeeded", bad)
		}
	}
}

func TestStatSelf(t *testing.T) {
	info, err := Stat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if info.PID != os.Getpid() || info.PPID != os.Getppid() || info.UID != os.Getuid() {
		t.Fatalf("Stat(self) = %+v", info)
	}
	if info.KernelThread() || info.Stopped() {
		t.Fatalf("Stat(self) = %+v: kernel thread or stopped", info)
	}
	if _, err := Stat(1 << 30); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Stat(no such pid) = %v, want ErrNotFound", err)
	}
}

// startTree starts sh with two sleeping children and returns sh's pid.
func startTree(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sh", "-c", "sleep 60 & sleep 60 & wait; exec sleep 60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if tree, err := OpenTree(cmd.Process.Pid, 0); err == nil {
			SignalAll(tree, syscall.SIGKILL)
			CloseAll(tree)
		}
		cmd.Process.Kill()
		cmd.Wait()
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		kids, _ := Children(cmd.Process.Pid)
		if len(kids) == 2 {
			return cmd
		}
		if time.Now().After(deadline) {
			t.Fatalf("sh did not start its two children: %v", kids)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestTreeAndSignals(t *testing.T) {
	cmd := startTree(t)
	root := cmd.Process.Pid
	pids, err := Tree(root)
	if err != nil {
		t.Fatal(err)
	}
	if len(pids) != 3 || pids[0] != root {
		t.Fatalf("Tree = %v, want sh and its two children", pids)
	}
	if ok, err := IsAncestor(os.Getpid(), pids[2]); err != nil || !ok {
		t.Fatalf("IsAncestor(test, grandchild) = %v, %v", ok, err)
	}
	if ok, err := IsAncestor(pids[1], os.Getpid()); err != nil || ok {
		t.Fatalf("IsAncestor(child, test) = %v, %v", ok, err)
	}

	tree, err := OpenTree(root, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(tree)
	if err := SignalAll(tree, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	waitState(t, pids, true)
	if err := SignalAll(tree, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	waitState(t, pids, false)
	if err := SignalAll(tree[1:], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := WaitExited(tree[1:], 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if tree[0].Exited() {
		t.Fatal("root reported exited while alive")
	}
}

func waitState(t *testing.T, pids []int, stopped bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for _, p := range pids {
		for {
			info, err := Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if info.Stopped() == stopped {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("pid %d state %c, want stopped=%v", p, info.State, stopped)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

func TestOpenChecksStartTime(t *testing.T) {
	cmd := startTree(t)
	info, err := Stat(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	p, err := Open(info.PID, info.StartTime)
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	if _, err := Open(info.PID, info.StartTime+1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Open with another start time = %v, want ErrNotFound", err)
	}
	if _, err := Open(1<<30, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Open(no such pid) = %v, want ErrNotFound", err)
	}
}

func TestUnixStreamPeers(t *testing.T) {
	dir := t.TempDir()
	l, err := net.Listen("unix", filepath.Join(dir, "s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("unix", filepath.Join(dir, "s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, _ := c.(*net.UnixConn).File()
	defer f.Close()
	var st syscall.Stat_t
	syscall.Fstat(int(f.Fd()), &st)
	peers, err := UnixStreamPeers([]int{os.Getpid()})
	if err != nil {
		if errors.Is(err, syscall.EPERM) {
			t.Skip("pidfd_getfd on itself needs ptrace rights")
		}
		t.Fatal(err)
	}
	if got := peers[st.Ino]; got != filepath.Join(dir, "s.sock") {
		t.Fatalf("peer of the client socket = %q, want the listener's path (all: %v)", got, peers)
	}
}

func TestResident(t *testing.T) {
	buf := make([]byte, 32<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	got := Resident([]int{os.Getpid(), 1 << 30}) // the second is no process
	if got < 32<<20 {
		t.Errorf("Resident(self) = %d, want at least the 32 MiB just touched", got)
	}
	_ = buf[len(buf)-1]
}

func TestFilesOfSelf(t *testing.T) {
	exe, _ := os.Executable()
	f, err := os.CreateTemp(t.TempDir(), "log")
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("x")
	f.Close()
	logf, _ := os.OpenFile(f.Name(), os.O_WRONLY|os.O_APPEND, 0)
	defer logf.Close()
	got := map[string]File{}
	for _, x := range Files([]int{os.Getpid()}) {
		got[x.Path] = x
	}
	self, ok := got[exe]
	if !ok || !self.CheckSize || self.Mode&0o100 == 0 {
		t.Errorf("Files(self) has %+v for the test binary %s; want it, size checked", self, exe)
	}
	if self.BuildID != BuildID(exe) {
		t.Errorf("the test binary's build-id %q, BuildID says %q", self.BuildID, BuildID(exe))
	}
	if l, ok := got[f.Name()]; !ok || l.CheckSize || l.Size != 1 {
		t.Errorf("Files(self) has %+v for a file open to append; want it, size 1, not checked", l)
	}
	for p := range got {
		if strings.HasPrefix(p, "/proc/") || strings.HasPrefix(p, "/dev/") {
			t.Errorf("Files(self) lists %s", p)
		}
	}
}

func TestBuildIDOfAnELF(t *testing.T) {
	// Debian's binaries carry a GNU build-id: 20 bytes, 40 hex digits.
	if id := BuildID("/bin/sh"); len(id) != 40 {
		t.Errorf("BuildID(/bin/sh) = %q; want 40 hex digits", id)
	}
	if id := BuildID("/etc/hostname"); id != "" {
		t.Errorf("BuildID of a text file = %q; want none", id)
	}
}

func TestTaskIDsSkipsWhatExited(t *testing.T) {
	self := os.Getpid()
	// 4194303: no such process (the kernel's largest pid), as a child
	// that exited after the tree was listed.
	ids, err := TaskIDs([]int{self, 4194303})
	if err != nil || len(ids) == 0 || ids[0] == 0 {
		t.Fatalf("TaskIDs(self, gone) = %v, %v; want this process's threads", ids, err)
	}
	if _, err := TaskIDs([]int{4194303, self}); err == nil {
		t.Error("TaskIDs of a tree whose root exited: no error")
	}
}
