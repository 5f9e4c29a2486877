//go:build linux

package proc

import (
	"os"
	"testing"
)

func TestUIDsAndOtherUser(t *testing.T) {
	r, e, err := UIDs(os.Getpid())
	if err != nil || r != os.Getuid() || e != os.Geteuid() {
		t.Fatalf("UIDs(self) = %d, %d, %v; want %d, %d", r, e, err, os.Getuid(), os.Geteuid())
	}
	pid, uid := OtherUser([]int{os.Getpid()})
	if os.Getuid() == 0 && os.Geteuid() == 0 && pid != 0 {
		t.Errorf("OtherUser(root's process) = %d, %d; want none", pid, uid)
	}
	if os.Getuid() != 0 && (pid != os.Getpid() || uid != os.Getuid()) {
		t.Errorf("OtherUser(self) = %d, %d; want %d, %d", pid, uid, os.Getpid(), os.Getuid())
	}
}

func TestIsTerminal(t *testing.T) {
	for path, want := range map[string]bool{"/dev/pts/3": true, "/dev/tty1": true, "/dev/console": true, "/dev/tty": true,
		"/dev/null": false, "/dev/pts/ptmx": false, "/dev/ttyfoo/x": true, "/tmp/tty": false, "pipe:[1]": false} {
		if got := isTerminal(path); got != want {
			t.Errorf("isTerminal(%q) = %v, want %v", path, got, want)
		}
	}
}

func TestTaskCreds(t *testing.T) {
	tasks, err := TaskCreds([]int{os.Getpid(), 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	// A Go test binary runs several threads: every one is listed.
	if len(tasks) < 2 {
		t.Fatalf("TaskCreds(self) = %d tasks, want every thread", len(tasks))
	}
	for _, c := range tasks {
		if c.PID != os.Getpid() || c.UIDs != [4]int{os.Getuid(), os.Geteuid(), os.Geteuid(), os.Geteuid()} || c.Owner != os.Geteuid() ||
			c.GIDs != [4]int{os.Getgid(), os.Getegid(), os.Getegid(), os.Getegid()} {
			t.Errorf("task %+v; want pid %d, uids of uid %d", c, os.Getpid(), os.Getuid())
		}
	}
	status := []byte("Name:\tx\nUid:\t1000\t0\t0\t1000\nGid:\t5\t42\t5\t5\n")
	ids, err := parseIDs(status, "Uid:")
	if err != nil || ids != [4]int{1000, 0, 0, 1000} {
		t.Errorf("parseIDs(Uid:) = %v, %v", ids, err)
	}
	if ids, err := parseIDs(status, "Gid:"); err != nil || ids != [4]int{5, 42, 5, 5} {
		t.Errorf("parseIDs(Gid:) = %v, %v", ids, err)
	}
	for _, bad := range []string{"Name:\tx\n", "Uid:\t1\t2\t3\n", "Uid:\t1\t2\tx\t4\n"} {
		if _, err := parseIDs([]byte(bad), "Uid:"); err == nil {
			t.Errorf("parseIDs(%q) accepted", bad)
		}
	}
}
