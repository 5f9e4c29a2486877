//go:build linux

package proc

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// UnixStreamPeers finds the connected Unix stream sockets open in the
// processes pids and returns, by socket inode, the address of what each is
// connected to (the peer's bound path; "" for an unnamed peer). It needs
// the right to ptrace the processes (root): see EachSocket.
func UnixStreamPeers(pids []int) (map[uint64]string, error) {
	peers := map[uint64]string{}
	err := EachSocket(pids, func(s Socket) error {
		if path, ok := streamPeer(s.FD); ok {
			peers[s.Inode] = path
		}
		return nil
	})
	return peers, err
}

// Socket is a socket open in a process, as EachSocket shows it.
type Socket struct {
	// PID and Target are the process and its descriptor number.
	PID, Target int
	Inode       uint64
	// FD is a duplicate of it in this process, valid during the call.
	FD int
}

// EachSocket calls fn once for each socket open in the processes pids
// (once per socket, however many descriptors share it), through a
// duplicate taken with pidfd_getfd: the same socket, so what fn sets on
// it is set on theirs. It needs the right to ptrace the processes (root).
// A process that ends meanwhile is skipped; fn's error stops the walk.
func EachSocket(pids []int, fn func(Socket) error) error {
	seen := map[uint64]bool{}
	for _, pid := range pids {
		if err := eachSocketOf(pid, seen, fn); err != nil {
			return err
		}
	}
	return nil
}

func eachSocketOf(pid int, seen map[uint64]bool, fn func(Socket) error) error {
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil // the task ended
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil
	}
	defer unix.Close(pidfd)
	for _, e := range ents {
		link, err := os.Readlink(dir + "/" + e.Name())
		if err != nil || !strings.HasPrefix(link, "socket:[") {
			continue
		}
		ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 64)
		if err != nil || seen[ino] {
			continue
		}
		seen[ino] = true
		target, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		fd, err := unix.PidfdGetfd(pidfd, target, 0)
		if err == unix.EBADF {
			continue // closed since it was listed
		}
		if err != nil {
			return fmt.Errorf("look at pid %d's fd %d: %w", pid, target, err)
		}
		err = fn(Socket{PID: pid, Target: target, Inode: ino, FD: fd})
		unix.Close(fd)
		if err != nil {
			return err
		}
	}
	return nil
}

// streamPeer returns the peer address of fd if it is a connected Unix
// stream socket.
func streamPeer(fd int) (string, bool) {
	domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil || domain != unix.AF_UNIX {
		return "", false
	}
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil || typ != unix.SOCK_STREAM {
		return "", false
	}
	sa, err := unix.Getpeername(fd)
	if err != nil {
		return "", false // not connected
	}
	if u, ok := sa.(*unix.SockaddrUnix); ok {
		return u.Name, true
	}
	return "", true
}
