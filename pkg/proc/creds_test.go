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
