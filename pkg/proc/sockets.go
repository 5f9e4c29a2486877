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
// connected to (the peer's bound path; "" for an unnamed peer). It looks
// at each socket through a duplicate taken with pidfd_getfd, so it needs
// the right to ptrace the processes (root).
func UnixStreamPeers(pids []int) (map[uint64]string, error) {
	peers := map[uint64]string{}
	seen := map[uint64]bool{}
	for _, pid := range pids {
		dir := "/proc/" + strconv.Itoa(pid) + "/fd"
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue // the task ended
		}
		pidfd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			continue
		}
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
			if err != nil {
				unix.Close(pidfd)
				return nil, fmt.Errorf("look at pid %d's fd %d: %w", pid, target, err)
			}
			if path, ok := streamPeer(fd); ok {
				peers[ino] = path
			}
			unix.Close(fd)
		}
		unix.Close(pidfd)
	}
	return peers, nil
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
