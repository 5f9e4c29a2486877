//go:build linux

package network

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// These tests need root: they make network namespaces, veths and bridges
// (named phtN-…, removed at the end) and look at real sockets.

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs ip (iproute2)")
	}
}

func run(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// inOwnNS starts a process in a network namespace of its own and returns
// its pid; it is killed at the end.
func inOwnNS(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("unshare", "--net", "--", "sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// unshare execs sleep once the namespace is made.
	deadline := time.Now().Add(5 * time.Second)
	for {
		self, _ := nsInode("self")
		ino, _ := nsInode(fmt.Sprint(cmd.Process.Pid))
		if ino != 0 && ino != self {
			return cmd.Process.Pid
		}
		if time.Now().After(deadline) {
			t.Fatal("the process did not get a namespace of its own")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// vethTo gives pid's namespace eth0 with addr, whose host end (returned)
// is on a new bridge (returned) unless noBridge.
func vethTo(t *testing.T, pid int, addr string, noBridge bool) (outer, bridge string) {
	t.Helper()
	tag := fmt.Sprintf("pht%d", rand.IntN(1e6))
	outer, bridge = tag+"v", tag+"b"
	run(t, "ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", fmt.Sprint(pid))
	t.Cleanup(func() { exec.Command("ip", "link", "del", outer).Run() })
	if !noBridge {
		run(t, "ip", "link", "add", bridge, "type", "bridge")
		t.Cleanup(func() { exec.Command("ip", "link", "del", bridge).Run() })
		run(t, "ip", "link", "set", outer, "master", bridge)
		run(t, "ip", "link", "set", bridge, "up")
	}
	run(t, "ip", "link", "set", outer, "up")
	n := fmt.Sprint(pid)
	run(t, "nsenter", "-t", n, "-n", "ip", "addr", "add", addr, "dev", "eth0")
	run(t, "nsenter", "-t", n, "-n", "ip", "link", "set", "eth0", "up")
	run(t, "nsenter", "-t", n, "-n", "ip", "link", "set", "lo", "up")
	return outer, bridge
}

func TestInspectFindsTheVethAndItsBridge(t *testing.T) {
	needRoot(t)
	pid := inOwnNS(t)
	outer, bridge := vethTo(t, pid, "10.250.0.2/24", false)
	ns, err := Inspect([]int{pid})
	if err != nil {
		t.Fatal(err)
	}
	want := Veth{Inner: "eth0", Outer: outer, Bridge: bridge}
	if !ns.Own || len(ns.Veths) != 1 || ns.Veths[0] != want {
		t.Fatalf("Inspect: %+v; want own, veth %+v", ns, want)
	}
	if len(ns.Addresses) == 0 || ns.Addresses[0] != "10.250.0.2/24" {
		t.Errorf("addresses %v; want 10.250.0.2/24 (first)", ns.Addresses)
	}
}

func TestInspectRefusesAVethOnNoBridge(t *testing.T) {
	needRoot(t)
	pid := inOwnNS(t)
	outer, _ := vethTo(t, pid, "10.250.0.2/24", true)
	_, err := Inspect([]int{pid})
	if err == nil || !strings.Contains(err.Error(), "on no bridge") || !strings.Contains(err.Error(), outer) {
		t.Fatalf("Inspect: %v; want refused, naming %s on no bridge", err, outer)
	}
}

// A macvlan on a host interface is found with that interface; RemoveLinks
// then empties the namespace of everything but loopback.
func TestInspectFindsTheMacvlanAndRemoveLinks(t *testing.T) {
	needRoot(t)
	pid := inOwnNS(t)
	lower := fmt.Sprintf("pht%db", rand.IntN(1e6))
	run(t, "ip", "link", "add", lower, "type", "bridge")
	t.Cleanup(func() { exec.Command("ip", "link", "del", lower).Run() })
	run(t, "ip", "link", "set", lower, "up")
	run(t, "ip", "link", "add", lower+"m", "link", lower, "type", "macvlan", "mode", "bridge")
	t.Cleanup(func() { exec.Command("ip", "link", "del", lower+"m").Run() })
	n := fmt.Sprint(pid)
	run(t, "ip", "link", "set", lower+"m", "netns", n)
	run(t, "nsenter", "-t", n, "-n", "ip", "link", "set", lower+"m", "name", "mv0")
	run(t, "nsenter", "-t", n, "-n", "ip", "addr", "add", "10.250.1.2/24", "dev", "mv0")
	ns, err := Inspect([]int{pid})
	if err != nil {
		t.Fatal(err)
	}
	want := Macvlan{Inner: "mv0", Lower: lower}
	if !ns.Own || len(ns.Macvlans) != 1 || ns.Macvlans[0] != want || len(ns.Veths) != 0 {
		t.Fatalf("Inspect: %+v; want own, macvlan %+v", ns, want)
	}
	if err := CheckLower(lower); err != nil {
		t.Errorf("CheckLower(%s): %v", lower, err)
	}
	if err := CheckLower("pht-none"); err == nil || !strings.Contains(err.Error(), "no interface pht-none") {
		t.Errorf("CheckLower of a missing interface: %v", err)
	}
	gone, err := RemoveLinks(pid)
	if err != nil || len(gone) != 1 || gone[0] != "mv0" {
		t.Fatalf("RemoveLinks: %v, %v; want mv0 gone", gone, err)
	}
	out, _ := exec.Command("nsenter", "-t", n, "-n", "ip", "-o", "link").Output()
	if lines := strings.Count(strings.TrimSpace(string(out)), "\n") + 1; lines != 1 || !strings.Contains(string(out), "lo:") {
		t.Errorf("after RemoveLinks the namespace has:\n%s\nwant only lo", out)
	}
	if gone, err := RemoveLinks(os.Getpid()); err != nil || len(gone) != 0 {
		t.Errorf("RemoveLinks in the host's namespace: %v, %v; want nothing done", gone, err)
	}
}

// A child of the test binary that holds a TCP connection in the host's
// namespace.
func TestMain(m *testing.M) {
	if addr := os.Getenv("PHAUL_NETWORK_TEST_CONNECT"); addr != "" {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			os.Exit(2)
		}
		defer c.Close()
		time.Sleep(time.Minute)
		os.Exit(0)
	}
	if os.Getenv("PHAUL_NETWORK_TEST_QUEUE") != "" {
		// In a namespace of its own: a listener with one connection
		// accepted and two waiting in its queue.
		if err := exec.Command("ip", "link", "set", "lo", "up").Run(); err != nil {
			os.Exit(2)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:7777")
		if err != nil {
			os.Exit(2)
		}
		var held []net.Conn
		for i := 0; i < 3; i++ {
			c, err := net.Dial("tcp", "127.0.0.1:7777")
			if err != nil {
				os.Exit(2)
			}
			held = append(held, c)
		}
		a, err := ln.Accept()
		if err != nil {
			os.Exit(2)
		}
		held = append(held, a)
		os.Stdout.WriteString("ready\n")
		time.Sleep(time.Minute)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// queueChild starts the test binary in a network namespace of its own
// with a listener and connections (see TestMain), and waits until it is
// ready.
func queueChild(t *testing.T, env ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("unshare", "--net", "--", os.Args[0])
	cmd.Env = append(append(os.Environ(), "PHAUL_NETWORK_TEST_QUEUE=1"), env...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line := make([]byte, 6)
	if _, err := io.ReadFull(out, line); err != nil || string(line) != "ready\n" {
		t.Fatalf("the child did not get ready: %q %v", line, err)
	}
	return cmd
}

// Go's listeners are MPTCP sockets, which CRIU cannot dump: refused,
// with what to do.
func TestInspectRefusesMPTCP(t *testing.T) {
	needRoot(t)
	cmd := queueChild(t, "GODEBUG=multipathtcp=2")
	_, err := Inspect([]int{cmd.Process.Pid})
	if err == nil || !strings.Contains(err.Error(), "MPTCP") || !strings.Contains(err.Error(), "GODEBUG=multipathtcp=0") {
		t.Fatalf("Inspect: %v; want refused: an MPTCP socket, and GODEBUG=multipathtcp=0", err)
	}
}

func TestInspectCountsConnectionsAndTheAcceptQueue(t *testing.T) {
	needRoot(t)
	cmd := queueChild(t, "GODEBUG=multipathtcp=0")
	ns, err := Inspect([]int{cmd.Process.Pid})
	if err != nil {
		t.Fatal(err)
	}
	// Three client ends and one accepted: four connections; one
	// listener, two connections in its queue.
	if !ns.Own || ns.Connected != 4 || ns.Listening != 1 || ns.InFlight != 2 {
		t.Fatalf("Inspect: %+v; want own, 4 connected, 1 listening, 2 in flight", ns)
	}
}

func TestInspectRefusesHostConnections(t *testing.T) {
	needRoot(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "PHAUL_NETWORK_TEST_CONNECT="+ln.Addr().String())
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ns, err := Inspect([]int{cmd.Process.Pid})
	if err == nil || !strings.Contains(err.Error(), "TCP connection") || !strings.Contains(err.Error(), "namespace of its own") {
		t.Fatalf("Inspect: %+v, %v; want refused: a connection in the host's namespace", ns, err)
	}
}

func lockTables(t *testing.T, pid int) []string {
	t.Helper()
	h, err := netns.GetFromPid(pid)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(h)))
	if err != nil {
		t.Fatal(err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tb := range tables {
		names = append(names, tb.Name)
	}
	return names
}

func TestLockAndUnlock(t *testing.T) {
	needRoot(t)
	pid := inOwnNS(t)
	if err := Lock(pid); err != nil {
		t.Fatal(err)
	}
	if got := lockTables(t, pid); len(got) != 1 || got[0] != LockTable {
		t.Fatalf("tables after Lock: %v; want [%s]", got, LockTable)
	}
	u, err := Unlock([]int{pid})
	if err != nil {
		t.Fatal(err)
	}
	if len(u.Tables) != 1 || u.Tables[0] != LockTable {
		t.Errorf("Unlock removed %v; want [%s]", u.Tables, LockTable)
	}
	if got := lockTables(t, pid); len(got) != 0 {
		t.Errorf("tables after Unlock: %v", got)
	}
	// This host's namespace is never locked.
	if err := Lock(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if got := lockTables(t, os.Getpid()); contains(got, LockTable) {
		t.Fatalf("Lock locked this host's namespace")
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestAnnounceSendsARPAndNA(t *testing.T) {
	needRoot(t)
	pid := inOwnNS(t)
	outer, _ := vethTo(t, pid, "10.250.0.2/24", false)
	link, err := net.InterfaceByName(outer)
	if err != nil {
		t.Fatal(err)
	}
	// Listen on the host end, before its bridge takes the frames.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Ifindex: link.Index, Protocol: htons(unix.ETH_P_ALL)}); err != nil {
		t.Fatal(err)
	}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 2})
	run(t, "nsenter", "-t", fmt.Sprint(pid), "-n", "ip", "addr", "add", "fd00:250::2/64", "dev", "eth0", "nodad")
	a, err := Announce(pid)
	if err != nil {
		t.Fatal(err)
	}
	if a.ARP != 1 || a.NA != 1 {
		t.Fatalf("Announce sent %+v; want 1 ARP and 1 NA (the link-local address is not announced)", a)
	}
	want4, want6 := net.ParseIP("10.250.0.2").To4(), net.ParseIP("fd00:250::2")
	var sawARP, sawNA bool
	buf := make([]byte, 256)
	for !sawARP || !sawNA {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			t.Fatalf("on %s: gratuitous ARP for %s seen %v, neighbour advertisement for %s seen %v: %v", outer, want4, sawARP, want6, sawNA, err)
		}
		if n < 14 {
			continue
		}
		switch p := buf[14:n]; binary.BigEndian.Uint16(buf[12:]) {
		case unix.ETH_P_ARP:
			if len(p) >= 28 && binary.BigEndian.Uint16(p[6:]) == 1 && bytes.Equal(p[14:18], want4) && bytes.Equal(p[24:28], want4) {
				sawARP = true
			}
		case unix.ETH_P_IPV6:
			// IPv6 header (40 bytes, next header ICMPv6, hop limit 255),
			// then type 136 with the override flag and the target.
			if len(p) >= 40+24 && p[6] == 58 && p[7] == 255 && p[40] == 136 && p[44]&0x20 != 0 && net.IP(p[48:64]).Equal(want6) {
				sawNA = true
			}
		}
	}
}
