//go:build linux

// Package network says what a process tree's network holds and does the
// parts of moving a network namespace that CRIU leaves to its caller:
// finding the host end of each veth and its bridge, refusing what cannot
// move before anything is frozen, lifting the locks CRIU leaves on a tree
// it dumped, and announcing the addresses where the tree arrives.
//
// A tree moves its network only in a namespace of its own: CRIU then dumps
// the namespace (links, addresses, routes, neighbours, firewall) and its
// established TCP connections in repair mode, with the namespace's network
// locked from the freeze on. A tree in its host's namespace cannot take an
// address with it, so its connections and bound addresses are refused.
package network

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/proc"
)

// Veth is one veth pair that leads from a tree's namespace to its host.
type Veth struct {
	// Inner is its name in the tree's namespace, Outer the host end's.
	Inner string `json:"inner"`
	Outer string `json:"outer"`
	// Bridge is the host bridge the outer end is enslaved to.
	Bridge string `json:"bridge"`
}

// Macvlan is a macvlan interface of a tree's namespace on a host
// interface: the destination recreates it, with its MAC address, on the
// interface of the same name there.
type Macvlan struct {
	// Inner is its name in the tree's namespace, Lower the host
	// interface it is on.
	Inner string `json:"inner"`
	Lower string `json:"lower"`
}

// Namespace is what a tree's network holds, as Inspect found it.
type Namespace struct {
	// Own: the tree has a network namespace of its own (not its host's).
	Own bool
	// Interfaces are the namespace's links but loopback, by name; Veths
	// and Macvlans those that lead to the host.
	Interfaces []string
	Veths      []Veth
	Macvlans   []Macvlan
	// Addresses are the addresses on them, as ADDR/PREFIX.
	Addresses []string
	// TCP counts the tree's TCP sockets: connections (established or
	// closing), listeners, and connections waiting in the listeners'
	// accept queues (in flight: no task holds them yet).
	Connected, Listening, InFlight int
}

// Inspect looks at the network of the tree pids (its root first): whether
// it has a namespace of its own, what leads out of it, and its TCP
// sockets. It refuses, with what to do, what phaul cannot move: a tree
// spread over several namespaces; in its host's namespace, connections
// and sockets bound to one of the host's addresses; in its own, links
// that CRIU cannot recreate on another host. It needs root.
func Inspect(pids []int) (Namespace, error) {
	var ns Namespace
	if len(pids) == 0 {
		return ns, errors.New("no processes")
	}
	self, err := nsInode("self")
	if err != nil {
		return ns, err
	}
	root, err := nsInode(strconv.Itoa(pids[0]))
	if err != nil {
		return ns, err
	}
	for _, pid := range pids[1:] {
		if ino, err := nsInode(strconv.Itoa(pid)); err == nil && ino != root {
			return ns, fmt.Errorf("pid %d of the tree is in another network namespace than its root %d: phaul moves a tree whose processes share one network namespace", pid, pids[0])
		}
	}
	ns.Own = root != self
	socks, err := tcpSockets(pids)
	if err != nil {
		return ns, err
	}
	for _, s := range socks {
		switch {
		case s.state == unix.BPF_TCP_LISTEN:
			ns.Listening++
			ns.InFlight += s.queued
		case s.state != unix.BPF_TCP_CLOSE:
			ns.Connected++
		}
	}
	if !ns.Own {
		return ns, refuseHostSockets(socks)
	}
	if err := ns.links(pids[0]); err != nil {
		return ns, err
	}
	return ns, nil
}

// CountTCP counts the TCP connections of the tree pids and those waiting,
// not yet accepted, in its listeners' queues. Taken while CRIU holds the
// tree frozen and its namespace locked, it is what the dump carried and
// what it left behind: nothing is accepted, and nothing new arrives, from
// the freeze on.
func CountTCP(pids []int) (connected, inFlight int, err error) {
	socks, err := tcpSockets(pids)
	for _, s := range socks {
		switch {
		case s.state == unix.BPF_TCP_LISTEN:
			inFlight += s.queued
		case s.state != unix.BPF_TCP_CLOSE:
			connected++
		}
	}
	return connected, inFlight, err
}

// refuseHostSockets refuses the sockets of a tree in its host's network
// namespace that cannot move: connections, and sockets bound to an address
// of this host (not loopback, not the wildcard), which the destination
// does not have.
func refuseHostSockets(socks []tcpSocket) error {
	const what = "run it in a network namespace of its own (any container tool, or unshare --net with a veth to a bridge), which phaul moves with its address and connections"
	for _, s := range socks {
		switch {
		case s.state != unix.BPF_TCP_LISTEN && s.state != unix.BPF_TCP_CLOSE:
			return fmt.Errorf("pid %d has a TCP connection (%s to %s) in the host's network namespace: its address stays with this host, so the connection cannot move; %s",
				s.pid, s.local, s.remote, what)
		case s.local.IP != nil && !s.local.IP.IsUnspecified() && !s.local.IP.IsLoopback():
			return fmt.Errorf("pid %d has a TCP socket bound to %s, an address of this host that does not move with it; %s",
				s.pid, s.local, what)
		}
	}
	return nil
}

// links finds the namespace's interfaces, the host ends of its veths and
// their bridges, and its addresses.
func (ns *Namespace) links(pid int) error {
	tree, err := netns.GetFromPid(pid)
	if err != nil {
		return fmt.Errorf("open the network namespace of pid %d: %w", pid, err)
	}
	defer tree.Close()
	inner, err := netlink.NewHandleAt(tree)
	if err != nil {
		return fmt.Errorf("netlink in the namespace of pid %d: %w", pid, err)
	}
	defer inner.Close()
	host, err := netlink.NewHandle()
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer host.Close()
	links, err := inner.LinkList()
	if err != nil {
		return fmt.Errorf("list the interfaces of pid %d's namespace: %w", pid, err)
	}
	hostLinks, err := host.LinkList()
	if err != nil {
		return fmt.Errorf("list this host's interfaces: %w", err)
	}
	// The id this namespace gives the tree's, and the tree's this one
	// (-1: none; a veth or a macvlan across the two gives them one).
	nsid, _ := host.GetNetNsIdByFd(int(tree))
	hostID := -1
	if self, err := netns.GetFromPath("/proc/self/ns/net"); err == nil {
		hostID, _ = inner.GetNetNsIdByFd(int(self))
		self.Close()
	}
	for _, l := range links {
		a := l.Attrs()
		if a.Flags&net.FlagLoopback != 0 {
			continue
		}
		ns.Interfaces = append(ns.Interfaces, a.Name)
		switch l.Type() {
		case "veth":
			v, err := hostEnd(l, hostLinks, nsid)
			if err != nil {
				return err
			}
			ns.Veths = append(ns.Veths, v)
		case "macvlan":
			mv, err := lowerOf(l, hostLinks, hostID)
			if err != nil {
				return err
			}
			ns.Macvlans = append(ns.Macvlans, mv)
		case "macvtap", "ipvlan":
			return fmt.Errorf("the namespace has a %s interface, %s, which CRIU cannot recreate: phaul moves a namespace whose links to the host are veths on a bridge or macvlans; give it one of those instead", l.Type(), a.Name)
		case "bridge", "dummy", "tun", "vxlan", "gre", "gretap", "sit", "ipip":
			// CRIU recreates these inside the namespace.
		default:
			return fmt.Errorf("the namespace has a %s interface, %s, which CRIU cannot recreate on another host; phaul moves a namespace with veths to a bridge (and loopback)", l.Type(), a.Name)
		}
		addrs, err := inner.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("list the addresses of %s: %w", a.Name, err)
		}
		for _, ad := range addrs {
			ns.Addresses = append(ns.Addresses, ad.IPNet.String())
		}
	}
	sort.Strings(ns.Addresses)
	return nil
}

// hostEnd finds, among the host's links, the other end of the tree's veth
// l, and the bridge it is on.
func hostEnd(l netlink.Link, hostLinks []netlink.Link, nsid int) (Veth, error) {
	a := l.Attrs()
	v := Veth{Inner: a.Name}
	var outer netlink.Link
	for _, h := range hostLinks {
		ha := h.Attrs()
		if h.Type() == "veth" && ha.Index == a.ParentIndex && ha.ParentIndex == a.Index && (nsid < 0 || ha.NetNsID == nsid) {
			outer = h
			break
		}
	}
	if outer == nil {
		return v, fmt.Errorf("the namespace's veth %s leads to another namespace than this host's: phaul moves a namespace whose veths lead to the host, where it recreates them", a.Name)
	}
	v.Outer = outer.Attrs().Name
	master := outer.Attrs().MasterIndex
	for _, h := range hostLinks {
		if h.Attrs().Index == master && master != 0 {
			if h.Type() != "bridge" {
				return v, fmt.Errorf("the host end %s of the namespace's veth %s is on %s, a %s: phaul recreates the veth on the destination's bridge of the same name, so it moves veths on a bridge", v.Outer, a.Name, h.Attrs().Name, h.Type())
			}
			v.Bridge = h.Attrs().Name
		}
	}
	if v.Bridge == "" {
		return v, fmt.Errorf("the host end %s of the namespace's veth %s is on no bridge: phaul recreates the veth on the destination's bridge of the same name; enslave it to one (ip link set %s master BRIDGE)", v.Outer, a.Name, v.Outer)
	}
	return v, nil
}

// lowerOf finds, among the host's links, the interface the tree's macvlan
// l is on; hostID is the id the tree's namespace gives this host's.
func lowerOf(l netlink.Link, hostLinks []netlink.Link, hostID int) (Macvlan, error) {
	a := l.Attrs()
	mv := Macvlan{Inner: a.Name}
	if hostID >= 0 && a.NetNsID == hostID {
		for _, h := range hostLinks {
			if h.Attrs().Index == a.ParentIndex {
				mv.Lower = h.Attrs().Name
				return mv, nil
			}
		}
	}
	return mv, fmt.Errorf("the namespace's macvlan %s is on an interface outside this host's namespace: phaul moves a macvlan on a host interface, which it recreates on the destination's interface of the same name", a.Name)
}

// CheckLower says whether this host has an interface called name that a
// macvlan can be made on, and if not, why.
func CheckLower(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("this host has no interface %s for it", name)
	}
	if l.Attrs().Flags&net.FlagLoopback != 0 {
		return fmt.Errorf("%s here is a loopback interface", name)
	}
	return nil
}

// RemoveLinks deletes every interface but loopback in the network
// namespace of pid, unless that is this host's: a copy that goes (the
// source's after the commit, a discarded one on the destination) must not
// answer for its addresses while the kernel tears its namespace down,
// which a connection closing under the lock delays for minutes. A veth's
// host end goes with it; a macvlan would otherwise keep its address and
// MAC on the host's interface. It returns the names it deleted.
func RemoveLinks(pid int) ([]string, error) {
	self, err := nsInode("self")
	if err != nil {
		return nil, err
	}
	if ino, err := nsInode(strconv.Itoa(pid)); err != nil || ino == self {
		return nil, nil // gone already, or the host's
	}
	h, err := netns.GetFromPid(pid)
	if err != nil {
		return nil, nil // gone meanwhile
	}
	defer h.Close()
	return RemoveLinksIn(h)
}

// RemoveLinksIn is RemoveLinks for the namespace h.
func RemoveLinksIn(h netns.NsHandle) ([]string, error) {
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		return nil, err
	}
	defer nl.Close()
	links, err := nl.LinkList()
	if err != nil {
		return nil, err
	}
	var gone []string
	var errs []error
	for _, l := range links {
		if l.Attrs().Flags&net.FlagLoopback != 0 {
			continue
		}
		if err := nl.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete %s: %w", l.Attrs().Name, err))
			continue
		}
		gone = append(gone, l.Attrs().Name)
	}
	return gone, errors.Join(errs...)
}

// nsInode is the inode of the network namespace of /proc/WHO.
func nsInode(who string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/"+who+"/ns/net", &st); err != nil {
		return 0, fmt.Errorf("network namespace of %s: %w", who, err)
	}
	return st.Ino, nil
}

// tcpSocket is one TCP socket of a tree.
type tcpSocket struct {
	pid           int
	state         int
	local, remote *net.TCPAddr
	// queued is, for a listener, the length of its accept queue.
	queued int
}

// tcpSockets lists the TCP sockets open in pids.
func tcpSockets(pids []int) ([]tcpSocket, error) {
	var out []tcpSocket
	err := proc.EachSocket(pids, func(s proc.Socket) error {
		if isMPTCP(s.FD) {
			return fmt.Errorf("pid %d has an MPTCP socket (Go programs since 1.24 open one for each listener), which CRIU cannot dump: start the program with GODEBUG=multipathtcp=0", s.PID)
		}
		if !isTCP(s.FD) {
			return nil
		}
		info, err := unix.GetsockoptTCPInfo(s.FD, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return fmt.Errorf("pid %d's TCP socket %d: %w", s.PID, s.Target, err)
		}
		t := tcpSocket{pid: s.PID, state: int(info.State)}
		if t.state == unix.BPF_TCP_LISTEN {
			t.queued = int(info.Unacked) // a listener's accept queue
		}
		if sa, err := unix.Getsockname(s.FD); err == nil {
			t.local = tcpAddr(sa)
		}
		if sa, err := unix.Getpeername(s.FD); err == nil {
			t.remote = tcpAddr(sa)
		}
		out = append(out, t)
		return nil
	})
	return out, err
}

// isMPTCP reports whether fd is a multipath TCP socket.
func isMPTCP(fd int) bool {
	proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	return err == nil && proto == unix.IPPROTO_MPTCP
}

func isTCP(fd int) bool {
	domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil || (domain != unix.AF_INET && domain != unix.AF_INET6) {
		return false
	}
	proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	return err == nil && proto == unix.IPPROTO_TCP
}

func tcpAddr(sa unix.Sockaddr) *net.TCPAddr {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return &net.TCPAddr{IP: net.IP(sa.Addr[:]).To16(), Port: sa.Port}
	case *unix.SockaddrInet6:
		return &net.TCPAddr{IP: net.IP(sa.Addr[:]), Port: sa.Port}
	}
	return nil
}

// Summary is the namespace in a line, for logs.
func (ns Namespace) Summary() string {
	if !ns.Own {
		return "the host's"
	}
	return fmt.Sprintf("own: interfaces %s, addresses %s, TCP %d connected, %d listening, %d in flight",
		strings.Join(ns.Interfaces, ","), strings.Join(ns.Addresses, ","), ns.Connected, ns.Listening, ns.InFlight)
}

// RemoveHostEnds deletes the host ends of veths that are still there (a
// veth goes with its namespace, but the kernel tears a namespace down
// later, and one kept open elsewhere stays): after a commit, nothing of the
// namespace may answer for its addresses here. It returns the names it
// deleted.
func RemoveHostEnds(veths []Veth) ([]string, error) {
	var gone []string
	for _, v := range veths {
		l, err := netlink.LinkByName(v.Outer)
		if err != nil {
			continue // gone with its namespace
		}
		if l.Type() != "veth" {
			continue // a new link of that name: not ours
		}
		if err := netlink.LinkDel(l); err != nil {
			return gone, fmt.Errorf("delete %s, the host end of the namespace's %s: %w", v.Outer, v.Inner, err)
		}
		gone = append(gone, v.Outer)
	}
	return gone, nil
}

// CheckBridge refuses, with what to do, a bridge this host does not have.
func CheckBridge(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("there is no bridge %s here: create it (ip link add %s type bridge) and connect it to the segment the source's is on, or map the source's bridge to another with phauld --bridge-map", name, name)
	}
	if l.Type() != "bridge" {
		return fmt.Errorf("%s here is a %s, not a bridge: map the source's bridge to one with phauld --bridge-map", name, l.Type())
	}
	return nil
}

// FreeName returns name if no interface here has it, else a name made
// from prefix and random hex that none has.
func FreeName(name string) string {
	if _, err := netlink.LinkByName(name); err != nil {
		return name
	}
	for {
		b := make([]byte, 4)
		rand.Read(b)
		n := fmt.Sprintf("phv%x", b)
		if _, err := netlink.LinkByName(n); err != nil {
			return n
		}
	}
}
