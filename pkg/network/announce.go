//go:build linux

package network

import (
	"encoding/binary"
	"fmt"
	"net"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Announced says what Announce sent.
type Announced struct {
	// ARP is how many gratuitous ARPs (IPv4), NA how many unsolicited
	// neighbour advertisements (IPv6) were sent.
	ARP, NA int
	// Skipped are the IPv6 addresses not announced: the namespace had
	// no address yet to send from (duplicate address detection).
	Skipped []string
}

// Announce tells the segment that the addresses of pid's network namespace
// are here now: for each IPv4 address on an interface that is up, a
// gratuitous ARP (a request for the address from itself, broadcast); for
// each IPv6 address, an unsolicited neighbour advertisement with the
// override flag, to all nodes. Switches learn the interface's port from
// them, and neighbours update their caches at once, not when they age out.
// It does nothing for a process in this host's namespace.
func Announce(pid int) (Announced, error) {
	var a Announced
	self, err := nsInode("self")
	if err != nil {
		return a, err
	}
	ino, err := nsInode(fmt.Sprint(pid))
	if err != nil || ino == self {
		return a, err
	}
	tree, err := netns.GetFromPid(pid)
	if err != nil {
		return a, fmt.Errorf("open the network namespace of pid %d: %w", pid, err)
	}
	defer tree.Close()
	h, err := netlink.NewHandleAt(tree)
	if err != nil {
		return a, fmt.Errorf("netlink in the namespace of pid %d: %w", pid, err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return a, err
	}
	// The sockets are made in the tree's namespace, and used from here.
	arp, icmp6, err := socketsIn(tree)
	if err != nil {
		return a, err
	}
	defer unix.Close(arp)
	defer unix.Close(icmp6)
	for _, l := range links {
		at := l.Attrs()
		if at.Flags&net.FlagLoopback != 0 || at.Flags&net.FlagUp == 0 || len(at.HardwareAddr) != 6 {
			continue
		}
		addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return a, err
		}
		for _, ad := range addrs {
			if ip4 := ad.IP.To4(); ip4 != nil {
				if err := sendARP(arp, at.Index, at.HardwareAddr, ip4); err != nil {
					return a, fmt.Errorf("gratuitous ARP for %s on %s: %w", ip4, at.Name, err)
				}
				a.ARP++
				continue
			}
			if ad.IP.IsLinkLocalUnicast() {
				continue // its neighbours follow the interface, whose frames move the switches
			}
			if err := sendNA(icmp6, at.Index, at.HardwareAddr, ad.IP); err == unix.EADDRNOTAVAIL {
				// No address to send from yet (still tentative).
				a.Skipped = append(a.Skipped, ad.IP.String())
				continue
			} else if err != nil {
				return a, fmt.Errorf("neighbour advertisement for %s on %s: %w", ad.IP, at.Name, err)
			}
			a.NA++
		}
	}
	return a, nil
}

// socketsIn opens a packet socket for ARP and an ICMPv6 socket in the
// network namespace ns. The thread that enters ns is locked to it; should
// it fail to come back, it is not unlocked, so Go ends it.
func socketsIn(ns netns.NsHandle) (arp, icmp6 int, err error) {
	runtime.LockOSThread()
	home, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return -1, -1, err
	}
	defer home.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return -1, -1, fmt.Errorf("enter the namespace: %w", err)
	}
	arp, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ARP)))
	if err == nil {
		icmp6, err = unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMPV6)
		if err != nil {
			unix.Close(arp)
		}
	}
	if serr := netns.Set(home); serr != nil {
		// This thread stays in the tree's namespace: Go ends it.
		return -1, -1, fmt.Errorf("leave the namespace: %w", serr)
	}
	runtime.UnlockOSThread()
	if err != nil {
		return -1, -1, err
	}
	return arp, icmp6, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// sendARP broadcasts a gratuitous ARP request for ip from mac.
func sendARP(fd, ifindex int, mac net.HardwareAddr, ip net.IP) error {
	p := make([]byte, 28)
	binary.BigEndian.PutUint16(p[0:], 1)      // Ethernet
	binary.BigEndian.PutUint16(p[2:], 0x0800) // IPv4
	p[4], p[5] = 6, 4
	binary.BigEndian.PutUint16(p[6:], 1) // request
	copy(p[8:], mac)
	copy(p[14:], ip)
	// target hardware address: zero
	copy(p[24:], ip)
	to := &unix.SockaddrLinklayer{Ifindex: ifindex, Protocol: htons(unix.ETH_P_ARP), Halen: 6}
	copy(to.Addr[:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	return unix.Sendto(fd, p, 0, to)
}

// sendNA sends an unsolicited neighbour advertisement for ip (override
// set) to all nodes on ifindex. The kernel fills in the checksum.
func sendNA(fd, ifindex int, mac net.HardwareAddr, ip net.IP) error {
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_IF, ifindex); err != nil {
		return err
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_HOPS, 255); err != nil {
		return err
	}
	p := make([]byte, 32)
	p[0] = 136  // neighbour advertisement
	p[4] = 0x20 // override
	copy(p[8:], ip.To16())
	p[24], p[25] = 2, 1 // option: target link-layer address, 8 bytes
	copy(p[26:], mac)
	to := &unix.SockaddrInet6{ZoneId: uint32(ifindex)}
	copy(to.Addr[:], net.ParseIP("ff02::1").To16())
	return unix.Sendto(fd, p, 0, to)
}
