//go:build linux

package integration

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/test/harness"
)

// A process that holds a flock on a file and an open file it deleted
// migrates with both, without any option: on the destination the lock is
// held (another process cannot take it) and the deleted file's content is
// intact behind the new process's descriptor; nothing of it runs on the
// source.
func TestFileLockAndDeletedFile(t *testing.T) {
	integration(t)
	dir := t.TempDir()
	a := startDaemon(t, "A", "127.0.0.1:17601", daemonOpts{})
	// B has its own copy of the directory (a tmpfs over it, in a mount
	// namespace of its own), with an unlocked lock file of its own: on
	// one machine both copies would otherwise want the one lock, which
	// the frozen source holds until the commit.
	b := startDaemon(t, "B", "127.0.0.2:17602", daemonOpts{wrap: []string{"unshare", "--mount", "--propagation", "private", "--",
		"sh", "-c", `mount -t tmpfs -o mode=0755 none "$0" && install -m 644 /dev/null "$0/lock" && exec "$@"`, dir}})
	lock, data := filepath.Join(dir, "lock"), filepath.Join(dir, "data")
	content := bytes.Repeat([]byte("phaul keeps what was deleted\n"), 1000)
	if err := os.WriteFile(data, content, 0o600); err != nil {
		t.Fatal(err)
	}
	// The shell holds fd 3 (flock'ed: the lock is its open file's) and
	// fd 4 (the data file, deleted).
	script := `exec 3>"$1" 4<"$2"; flock 3; rm "$2"; while :; do sleep 0.1; done`
	cmd := exec.Command("unshare", "--pid", "--fork", "--", "setsid", "sh", "-c", script, "sh", lock, data)
	null, _ := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	defer null.Close()
	cmd.Stdin, cmd.Stdout, cmd.Stderr, cmd.Dir = null, null, null, dir
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	pid, err := harness.OnlyChild(cmd.Process.Pid, 10*time.Second)
	if err != nil {
		t.Fatalf("the shell to start: %v", err)
	}
	waitFor(t, "the shell to hold its lock", 10*time.Second, func() bool {
		_, err := os.Stat(data)
		return os.IsNotExist(err) && exec.Command("flock", "-n", lock, "true").Run() != nil
	})
	res := a.migrate(t, pid, b)
	if res.DestPID <= 0 {
		t.Fatalf("the result names no pid on B: %+v", res)
	}
	t.Cleanup(func() { syscall.Kill(res.DestPID, syscall.SIGKILL) })
	waitRunning(t, res.DestPID)
	onB := []string{"--mount=/proc/" + strconv.Itoa(res.DestPID) + "/ns/mnt", "--"}
	if exec.Command("nsenter", append(onB, "flock", "-n", lock, "true")...).Run() == nil {
		t.Errorf("the lock on B's %s is free after the migration; want it held by the copy", lock)
	}
	if locks, _ := os.ReadFile("/proc/locks"); !strings.Contains(string(locks), " "+strconv.Itoa(res.DestPID)+" ") {
		t.Errorf("/proc/locks names no lock of pid %d:\n%s", res.DestPID, locks)
	}
	got, err := os.ReadFile("/proc/" + strconv.Itoa(res.DestPID) + "/fd/4")
	if err != nil || !bytes.Equal(got, content) {
		t.Errorf("the deleted file behind fd 4 of the copy: %d bytes, %v; want the %d bytes it had", len(got), err, len(content))
	}
	waitFor(t, "the source's copy to be gone", 10*time.Second, func() bool {
		info, err := proc.Stat(pid)
		return err != nil || info.State == 'Z'
	})
}

// Given the pid of `unshare`, the parent of a pid namespace's init, phaul
// says to migrate the init instead, before anything is frozen: the
// process never stops, and nothing was dumped.
func TestUnshareParentRefused(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17611", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:17612", daemonOpts{})
	parent, init := startNSInit(t, "unshare", "--pid", "--fork", "--", "setsid", "sleep", "600")
	refusedBeforeFreeze(t, a, b, parent, "migrate pid "+strconv.Itoa(init)+", the init of that namespace")
	if info, err := proc.Stat(init); err != nil || info.Stopped() {
		t.Errorf("the init, pid %d, after the refusal: %+v, %v; want it running", init, info, err)
	}
}

// A process on a terminal (a pty of script's) is refused before anything
// is frozen, the terminal named as the cause and --detach-terminal as the
// way; it never stops. With --detach-terminal FILE it migrates: on B it
// runs on a new terminal whose output goes to FILE, and its source copy
// is gone. Back to A with --detach-terminal null (on B it is on B's
// terminal, refused without), FILE grows no more.
func TestTerminal(t *testing.T) {
	integration(t)
	if _, err := exec.LookPath("script"); err != nil {
		t.Fatal("script is missing (util-linux)")
	}
	a := startDaemon(t, "A", "127.0.0.1:17621", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:17622", daemonOpts{})
	cmd := exec.Command("script", "-qfec", "unshare --pid --fork -- setsid sh -c 'while :; do echo tick; sleep 0.1; done'", "/dev/null")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var pid int
	t.Cleanup(func() {
		if pid != 0 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		cmd.Process.Kill()
		cmd.Wait()
	})
	waitFor(t, "the process on script's terminal", 10*time.Second, func() bool {
		tree, _ := proc.Tree(cmd.Process.Pid)
		for _, p := range tree {
			if b, err := os.ReadFile("/proc/" + strconv.Itoa(p) + "/cmdline"); err == nil && strings.Contains(string(b), "echo tick") {
				if n, err := proc.NSPid(p); err == nil && n == 1 {
					pid = p
				}
			}
		}
		return pid != 0
	})
	tty, _ := os.Readlink("/proc/" + strconv.Itoa(pid) + "/fd/1")
	r := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(pid), "--to", b.addr)
	if r.code != 1 || !strings.Contains(r.stderr, "has a terminal, "+tty) || !strings.Contains(r.stderr, "--detach-terminal") {
		t.Fatalf("migrate a process on a terminal: exit %d: %s %s; want refused (1), naming the terminal %s and --detach-terminal", r.code, r.stdout, r.stderr, tty)
	}
	if info, err := proc.Stat(pid); err != nil || info.Stopped() {
		t.Errorf("pid %d after the refusal: %+v, %v; want it running", pid, info, err)
	}
	// To B, its terminal's output to a file there.
	out := filepath.Join(t.TempDir(), "tty.out")
	res := a.migrateTo(t, pid, b.addr, "--detach-terminal", out)
	if res.DestPID <= 0 {
		t.Fatalf("the result names no pid on B: %+v", res)
	}
	t.Cleanup(func() { syscall.Kill(res.DestPID, syscall.SIGKILL) })
	waitRunning(t, res.DestPID)
	now, err := os.Readlink("/proc/" + strconv.Itoa(res.DestPID) + "/fd/1")
	if err != nil || !strings.HasPrefix(now, "/dev/pts/") || now == tty {
		t.Errorf("the copy's stdout is %q (%v); want a new terminal, not %s", now, err, tty)
	}
	waitFor(t, "its ticks in "+out, 10*time.Second, func() bool {
		b, _ := os.ReadFile(out)
		return strings.Count(string(b), "tick") >= 3
	})
	waitFor(t, "the source's copy to be gone", 10*time.Second, func() bool {
		info, err := proc.Stat(pid)
		return err != nil || info.State == 'Z'
	})
	// And back, its output to nowhere: on B it is on a terminal too (the
	// one B gave it), refused without the option.
	r = b.phaulctl(t, "migrate", "--pid", strconv.Itoa(res.DestPID), "--to", a.addr)
	if r.code != 1 || !strings.Contains(r.stderr, "--detach-terminal") {
		t.Fatalf("migrate it back without --detach-terminal: exit %d: %s; want refused (1)", r.code, r.stderr)
	}
	back := b.migrateTo(t, res.DestPID, a.addr, "--detach-terminal", "null")
	t.Cleanup(func() { syscall.Kill(back.DestPID, syscall.SIGKILL) })
	waitRunning(t, back.DestPID)
	size := func() int64 { st, _ := os.Stat(out); return st.Size() }
	was := size()
	time.Sleep(300 * time.Millisecond)
	if size() != was {
		t.Errorf("%s still grows after the process left B", out)
	}
}
