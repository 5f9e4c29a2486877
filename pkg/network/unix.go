//go:build linux

package network

import (
	"fmt"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/proc"
)

// UnixOutside finds a Unix socket of the tree pids (its root first)
// connected to a socket outside the tree, but for those in carried
// (journal streams, which the destination connects afresh): CRIU cannot
// dump such a connection, and would find out with the tree frozen. It
// asks the kernel (sock_diag, in the tree's network namespace) for each
// socket's peer, and returns nil if there is none.
func UnixOutside(pids []int, carried map[uint64]bool) error {
	mine := map[uint64]int{} // the tree's Unix sockets, to their pid
	err := proc.EachSocket(pids, func(s proc.Socket) error {
		if d, err := unix.GetsockoptInt(s.FD, unix.SOL_SOCKET, unix.SO_DOMAIN); err == nil && d == unix.AF_UNIX {
			mine[s.Inode] = s.PID
		}
		return nil
	})
	if err != nil || len(mine) == 0 {
		return err
	}
	ns, err := netns.GetFromPid(pids[0])
	if err != nil {
		return fmt.Errorf("the network namespace of pid %d: %w", pids[0], err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	socks, err := h.UnixSocketDiagInfo()
	if err != nil {
		return fmt.Errorf("list the Unix sockets (sock_diag): %w", err)
	}
	names := map[uint64]string{}
	for _, s := range socks {
		if s.Name != nil {
			names[uint64(s.DiagMsg.INode)] = strings.TrimRight(*s.Name, "\x00")
		}
	}
	for _, s := range socks {
		ino := uint64(s.DiagMsg.INode)
		pid, ok := mine[ino]
		if !ok || s.Peer == nil || *s.Peer == 0 || carried[ino] {
			continue
		}
		peer := uint64(*s.Peer)
		if _, in := mine[peer]; in {
			continue
		}
		what := "an unnamed socket"
		if n := names[peer]; n != "" {
			what = n
			if n[0] == 0 {
				what = "@" + n[1:] // abstract
			}
		}
		return fmt.Errorf("pid %d has a Unix %s socket (inode %d) connected to %s, which belongs to a process outside the tree: CRIU cannot carry such a connection. Have the program connect after it moved (or reconnect when the peer goes), or move the peer with it (one tree)",
			pid, sockType(s.DiagMsg.Type), ino, what)
	}
	return nil
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
