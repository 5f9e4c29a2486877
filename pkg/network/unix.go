//go:build linux

package network

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"syscall"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/proc"
)

// UnixOutside finds the Unix sockets of the tree pids (its root first)
// connected to a socket outside the tree, but for those in carried
// (journal streams, which the destination connects afresh). A datagram
// socket connected to a socket bound to a path (syslog's /dev/log, say)
// CRIU carries with ext-unix-sk, connecting it to that path again on
// restore: their paths are returned, for the destination to check. Any
// other CRIU cannot dump, and would find out with the tree frozen: an
// error says which. It asks the kernel (sock_diag, in the tree's network
// namespace) for each socket's peer, one socket at a time.
func UnixOutside(pids []int, carried map[uint64]bool) (dgramPeers []string, err error) {
	mine := map[uint64]int{} // the tree's Unix sockets, to their pid
	err = proc.EachSocket(pids, func(s proc.Socket) error {
		if d, err := unix.GetsockoptInt(s.FD, unix.SOL_SOCKET, unix.SO_DOMAIN); err == nil && d == unix.AF_UNIX {
			mine[s.Inode] = s.PID
		}
		return nil
	})
	if err != nil || len(mine) == 0 {
		return nil, err
	}
	diag, err := openSockDiag(pids[0])
	if err != nil {
		return nil, err
	}
	defer unix.Close(diag)
	for ino, pid := range mine {
		if carried[ino] {
			continue
		}
		s, err := unixDiag(diag, ino)
		if errors.Is(err, unix.ENOENT) {
			continue // closed since it was listed
		}
		if err != nil {
			return nil, fmt.Errorf("ask the kernel for pid %d's Unix socket %d (sock_diag): %w", pid, ino, err)
		}
		if s.peer == 0 {
			continue
		}
		if _, in := mine[s.peer]; in {
			continue
		}
		what := "an unnamed socket"
		if p, err := unixDiag(diag, s.peer); err == nil && p.name != "" {
			what = p.name
			if s.typ == unix.SOCK_DGRAM && p.name[0] == '/' {
				if !slices.Contains(dgramPeers, p.name) {
					dgramPeers = append(dgramPeers, p.name)
				}
				continue
			}
		}
		return nil, fmt.Errorf("pid %d has a Unix %s socket (inode %d) connected to %s, which belongs to a process outside the tree: CRIU cannot carry such a connection. Have the program connect after it moved (or reconnect when the peer goes), or move the peer with it (one tree)",
			pid, sockType(s.typ), ino, what)
	}
	return dgramPeers, nil
}

// openSockDiag opens a sock_diag netlink socket in the network namespace
// of pid (a socket's namespace is the one it was made in).
func openSockDiag(pid int) (int, error) {
	ns, err := netns.GetFromPid(pid)
	if err != nil {
		return -1, fmt.Errorf("the network namespace of pid %d: %w", pid, err)
	}
	defer ns.Close()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	here, err := netns.Get()
	if err != nil {
		return -1, err
	}
	defer here.Close()
	if err := netns.Set(ns); err != nil {
		return -1, fmt.Errorf("enter the network namespace of pid %d: %w", pid, err)
	}
	fd, serr := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err := netns.Set(here); err != nil {
		// This thread stays in the other namespace: never let it run
		// anything else.
		runtime.Goexit()
	}
	if serr != nil {
		return -1, fmt.Errorf("sock_diag socket: %w", serr)
	}
	return fd, nil
}

// unixSock is what sock_diag says of one Unix socket.
type unixSock struct {
	typ  uint8
	peer uint64
	name string
}

// Constants of linux/sock_diag.h and linux/unix_diag.h.
const (
	sockDiagByFamily = 20
	udiagShowName    = 0x1
	udiagShowPeer    = 0x4
	unixDiagName     = 0
	unixDiagPeer     = 2
)

// unixDiag asks for the Unix socket ino alone (an exact request: no dump
// to page through), its type, peer and name.
func unixDiag(fd int, ino uint64) (unixSock, error) {
	// nlmsghdr (16) + unix_diag_req (24).
	req := make([]byte, 40)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], 40)
	ne.PutUint16(req[4:], sockDiagByFamily)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(req[8:], uint32(ino)) // seq
	req[16] = unix.AF_UNIX
	ne.PutUint32(req[20:], ^uint32(0))  // every state
	ne.PutUint32(req[24:], uint32(ino)) // udiag_ino
	ne.PutUint32(req[28:], udiagShowName|udiagShowPeer)
	ne.PutUint32(req[32:], ^uint32(0)) // no cookie
	ne.PutUint32(req[36:], ^uint32(0))
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return unixSock{}, err
	}
	buf := make([]byte, 8192)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return unixSock{}, err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return unixSock{}, err
		}
		for _, m := range msgs {
			if m.Header.Seq != uint32(ino) {
				continue // an answer to an earlier request
			}
			switch m.Header.Type {
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if e := int32(ne.Uint32(m.Data)); e != 0 {
						return unixSock{}, unix.Errno(-e)
					}
				}
				return unixSock{}, unix.ENOENT
			case sockDiagByFamily:
				return parseUnixDiag(m.Data)
			}
		}
	}
}

// parseUnixDiag reads a unix_diag_msg (16 bytes) and its attributes.
func parseUnixDiag(b []byte) (unixSock, error) {
	if len(b) < 16 {
		return unixSock{}, errors.New("short unix_diag_msg")
	}
	s := unixSock{typ: b[1]}
	ne := binary.NativeEndian
	for a := b[16:]; len(a) >= 4; {
		l, t := int(ne.Uint16(a)), ne.Uint16(a[2:])
		if l < 4 || l > len(a) {
			break
		}
		v := a[4:l]
		switch t {
		case unixDiagPeer:
			if len(v) >= 4 {
				s.peer = uint64(ne.Uint32(v))
			}
		case unixDiagName:
			name := strings.TrimRight(string(v), "\x00")
			if strings.HasPrefix(string(v), "\x00") {
				name = "@" + strings.TrimRight(string(v[1:]), "\x00") // abstract
			}
			s.name = name
		}
		step := (l + 3) &^ 3
		if step > len(a) {
			break
		}
		a = a[step:]
	}
	return s, nil
}

func sockType(t uint8) string {
	switch t {
	case unix.SOCK_STREAM:
		return "stream"
	case unix.SOCK_DGRAM:
		return "datagram"
	case unix.SOCK_SEQPACKET:
		return "seqpacket"
	}
	return fmt.Sprintf("type-%d", t)
}
