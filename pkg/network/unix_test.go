//go:build linux

package network

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// A socketpair is inside the tree; a connection to a server of another
// process is not. The test process is both "tree" and, through a child,
// "outside".
func TestUnixOutside(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("pidfd_getfd on this process's sockets needs root")
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fds[0])
	defer syscall.Close(fds[1])
	if _, err := UnixOutside([]int{os.Getpid()}, nil); err != nil {
		t.Fatalf("a socketpair within the tree: %v", err)
	}
	sock := filepath.Join(t.TempDir(), "srv.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// Both ends are this process's: still within.
	if _, err := UnixOutside([]int{os.Getpid()}, nil); err != nil {
		t.Fatalf("both ends in the tree: %v", err)
	}
	// The accepted end goes to another process (the tree loses it).
	f, _ := s.(*net.UnixConn).File()
	s.Close()
	cmd := execHolding(t, f)
	f.Close()
	defer cmd()
	_, err = UnixOutside([]int{os.Getpid()}, nil)
	if err == nil || !strings.Contains(err.Error(), "connected to") || !strings.Contains(err.Error(), "outside the tree") {
		t.Fatalf("a connection whose peer another process holds: %v; want it named", err)
	}
}

// execHolding starts sleep holding f; the returned func ends it.
func execHolding(t *testing.T, f *os.File) func() {
	t.Helper()
	p, err := os.StartProcess("/bin/sleep", []string{"sleep", "60"}, &os.ProcAttr{Files: []*os.File{nil, nil, nil, f}})
	if err != nil {
		t.Fatal(err)
	}
	return func() { p.Kill(); p.Wait() }
}

// A datagram socket connected to a socket bound to a path outside the
// tree is carried: its peer's path is returned, no error.
func TestUnixOutsideDatagramToAPath(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("pidfd_getfd on this process's sockets needs root")
	}
	path := filepath.Join(t.TempDir(), "log.sock")
	srv, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	cli, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	f, _ := srv.File()
	srv.Close()
	stop := execHolding(t, f)
	f.Close()
	defer stop()
	peers, err := UnixOutside([]int{os.Getpid()}, nil)
	if err != nil || len(peers) != 1 || peers[0] != path {
		t.Fatalf("UnixOutside = %v, %v; want [%s], no error", peers, err, path)
	}
}
