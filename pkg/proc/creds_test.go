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
