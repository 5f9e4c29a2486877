//go:build linux

package network

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/wire"
)

// A runc container's network namespace reaches the destination empty:
// runc has CRIU dump it so (it does not manage a container's network), and
// the restore makes a new namespace with nothing in it. Its set-up then
// travels apart (ReadConfig on the source) and phauld makes it again
// (Build) once CRIU has made the namespace and before CRIU restores the
// sockets, which need their addresses and routes there.

// ReadConfig reads the set-up of pid's network namespace that Build makes
// again: its veths (CheckConfigurable says which namespaces it can make)
// with their MAC addresses, MTUs and addresses, and the routes of its main
// table that are not the kernel's own.
func ReadConfig(pid int) ([]wire.NetLink, []wire.NetRoute, error) {
	tree, err := netns.GetFromPid(pid)
	if err != nil {
		return nil, nil, fmt.Errorf("open the network namespace of pid %d: %w", pid, err)
	}
	defer tree.Close()
	h, err := netlink.NewHandleAt(tree)
	if err != nil {
		return nil, nil, fmt.Errorf("netlink in the namespace of pid %d: %w", pid, err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil, nil, err
	}
	names := map[int]string{}
	var out []wire.NetLink
	for _, l := range links {
		a := l.Attrs()
		names[a.Index] = a.Name
		if a.Flags&net.FlagLoopback != 0 {
			continue
		}
		nl := wire.NetLink{Name: a.Name, MTU: a.MTU}
		if a.HardwareAddr != nil {
			nl.MAC = a.HardwareAddr.String()
		}
		addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return nil, nil, fmt.Errorf("list the addresses of %s: %w", a.Name, err)
		}
		for _, ad := range addrs {
			if ad.IP.To4() == nil && ad.IP.IsLinkLocalUnicast() {
				continue // the kernel makes it again (from the MAC: it moves)
			}
			nl.Addresses = append(nl.Addresses, ad.IPNet.String())
		}
		out = append(out, nl)
	}
	routes, err := h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, nil, fmt.Errorf("list the namespace's routes: %w", err)
	}
	var rs []wire.NetRoute
	for _, r := range routes {
		if r.Protocol == unix.RTPROT_KERNEL || r.Type != unix.RTN_UNICAST {
			continue // made by the addresses, or not ours to make
		}
		dev, ok := names[r.LinkIndex]
		if !ok {
			continue
		}
		nr := wire.NetRoute{Dev: dev, IPv6: r.Family == unix.AF_INET6, Metric: r.Priority, Scope: int(r.Scope),
			Onlink: r.Flags&unix.RTNH_F_ONLINK != 0}
		if r.Src != nil {
			nr.Src = r.Src.String()
		}
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones > 0 || !r.Dst.IP.IsUnspecified() {
				nr.Dst = r.Dst.String()
			}
		}
		if r.Gw != nil {
			nr.Gateway = r.Gw.String()
		}
		rs = append(rs, nr)
	}
	return out, rs, nil
}

// CheckConfigurable refuses a namespace Build cannot make again: one with
// interfaces other than veths to a bridge on the host (and loopback).
func (ns Namespace) CheckConfigurable() error {
	veths := map[string]bool{}
	for _, v := range ns.Veths {
		veths[v.Inner] = true
	}
	for _, name := range ns.Interfaces {
		if !veths[name] {
			return fmt.Errorf("the container's network namespace has an interface %s that is not a veth to a bridge: runc leaves a container's namespace to phaul to make again on the destination, and phaul makes veths (and loopback) only", name)
		}
	}
	return nil
}

// Build makes, in the namespace tree (new, empty), the set-up links and
// routes describe: loopback up; each veth of veths (its host end Outer, on
// Bridge, made here; the end Inner in tree, with its MAC address, MTU and
// addresses, IPv6 ones without duplicate detection, so that sockets can
// use them at once); then the routes. A host end it made is removed if it
// fails.
func Build(tree netns.NsHandle, links []wire.NetLink, routes []wire.NetRoute, veths []wire.Veth) (err error) {
	inner, err := netlink.NewHandleAt(tree)
	if err != nil {
		return err
	}
	defer inner.Close()
	host, err := netlink.NewHandle()
	if err != nil {
		return err
	}
	defer host.Close()
	if lo, err := inner.LinkByName("lo"); err == nil {
		if err := inner.LinkSetUp(lo); err != nil {
			return fmt.Errorf("loopback up: %w", err)
		}
	}
	byName := map[string]wire.NetLink{}
	for _, l := range links {
		byName[l.Name] = l
	}
	var made []string
	defer func() {
		if err != nil {
			for _, name := range made {
				if l, e := host.LinkByName(name); e == nil {
					host.LinkDel(l)
				}
			}
		}
	}()
	for _, v := range veths {
		l, ok := byName[v.Inner]
		if !ok {
			return fmt.Errorf("the source described no interface %s", v.Inner)
		}
		attrs := netlink.NewLinkAttrs()
		attrs.Name = v.Outer
		if l.MTU > 0 {
			attrs.MTU = l.MTU
		}
		pair := &netlink.Veth{LinkAttrs: attrs, PeerName: v.Inner, PeerNamespace: netlink.NsFd(int(tree))}
		if l.MAC != "" {
			mac, err := net.ParseMAC(l.MAC)
			if err != nil {
				return fmt.Errorf("%s's MAC address %q: %w", v.Inner, l.MAC, err)
			}
			pair.PeerHardwareAddr = mac
		}
		if err := host.LinkAdd(pair); err != nil {
			return fmt.Errorf("make veth %s (%s here): %w", v.Inner, v.Outer, err)
		}
		made = append(made, v.Outer)
		outer, err := host.LinkByName(v.Outer)
		if err != nil {
			return err
		}
		br, err := host.LinkByName(v.Bridge)
		if err != nil {
			return fmt.Errorf("bridge %s: %w", v.Bridge, err)
		}
		if err := host.LinkSetMaster(outer, br); err != nil {
			return fmt.Errorf("put %s on bridge %s: %w", v.Outer, v.Bridge, err)
		}
		if err := host.LinkSetUp(outer); err != nil {
			return err
		}
		in, err := inner.LinkByName(v.Inner)
		if err != nil {
			return err
		}
		if l.MTU > 0 && in.Attrs().MTU != l.MTU {
			if err := inner.LinkSetMTU(in, l.MTU); err != nil {
				return fmt.Errorf("%s's MTU: %w", v.Inner, err)
			}
		}
		for _, a := range l.Addresses {
			addr, err := netlink.ParseAddr(a)
			if err != nil {
				return fmt.Errorf("%s's address %q: %w", v.Inner, a, err)
			}
			if addr.IP.To4() == nil {
				addr.Flags |= unix.IFA_F_NODAD
			}
			if err := inner.AddrAdd(in, addr); err != nil {
				return fmt.Errorf("give %s address %s: %w", v.Inner, a, err)
			}
		}
		if err := inner.LinkSetUp(in); err != nil {
			return err
		}
	}
	// Routes without a gateway first: a gateway must be reachable when
	// its route is made (Calico's 169.254.1.1 on the link, then the
	// default route through it).
	ordered := make([]wire.NetRoute, 0, len(routes))
	for _, direct := range []bool{true, false} {
		for _, r := range routes {
			if (r.Gateway == "") == direct {
				ordered = append(ordered, r)
			}
		}
	}
	for _, r := range ordered {
		dev, err := inner.LinkByName(r.Dev)
		if err != nil {
			return fmt.Errorf("route via %s: %w", r.Dev, err)
		}
		route := &netlink.Route{LinkIndex: dev.Attrs().Index, Family: unix.AF_INET, Priority: r.Metric, Scope: netlink.Scope(r.Scope)}
		if r.Onlink {
			route.Flags = unix.RTNH_F_ONLINK
		}
		if r.Src != "" {
			route.Src = net.ParseIP(r.Src)
		}
		if r.IPv6 {
			route.Family = unix.AF_INET6
		}
		if r.Dst != "" {
			_, dst, err := net.ParseCIDR(r.Dst)
			if err != nil {
				return fmt.Errorf("route to %q: %w", r.Dst, err)
			}
			route.Dst = dst
		}
		if r.Gateway != "" {
			if route.Gw = net.ParseIP(r.Gateway); route.Gw == nil {
				return fmt.Errorf("route gateway %q: not an address", r.Gateway)
			}
		}
		if err := inner.RouteAdd(route); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("route %s via %s dev %s: %w", orDefault(r.Dst), r.Gateway, r.Dev, err)
		}
	}
	return nil
}

func orDefault(dst string) string {
	if dst == "" {
		return "default"
	}
	return dst
}
