//go:build linux

package network

import (
	"fmt"
	"os/exec"
	"reflect"
	"strings"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/phaul/phaul/pkg/wire"
)

// What ReadConfig reads of one namespace, Build makes in another: the veth
// (its host end on the bridge), its MAC address, MTU, addresses and the
// routes that are not the kernel's.
func TestReadConfigAndBuild(t *testing.T) {
	needRoot(t)
	src := inOwnNS(t)
	outer, bridge := vethTo(t, src, "10.250.1.2/24", false)
	n := fmt.Sprint(src)
	run(t, "nsenter", "-t", n, "-n", "ip", "link", "set", "eth0", "mtu", "1400")
	run(t, "nsenter", "-t", n, "-n", "ip", "addr", "add", "fd77:1::2/64", "dev", "eth0", "nodad")
	run(t, "nsenter", "-t", n, "-n", "ip", "route", "add", "default", "via", "10.250.1.1")
	run(t, "nsenter", "-t", n, "-n", "ip", "route", "add", "10.251.0.0/16", "via", "10.250.1.254")
	run(t, "nsenter", "-t", n, "-n", "ip", "-6", "route", "add", "default", "via", "fd77:1::1")
	links, routes, err := ReadConfig(src)
	if err != nil {
		t.Fatal(err)
	}
	if len(links) != 1 || links[0].Name != "eth0" || links[0].MTU != 1400 || links[0].MAC == "" || len(links[0].Addresses) != 2 {
		t.Fatalf("links %+v; want eth0, mtu 1400, its MAC, two addresses", links)
	}
	if len(routes) != 3 {
		t.Fatalf("routes %+v; want the three added (not the kernel's)", routes)
	}

	dst := inOwnNS(t)
	h, err := netns.GetFromPid(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	here := outer + "x"
	t.Cleanup(func() { exec.Command("ip", "link", "del", here).Run() })
	if err := Build(h, links, routes, []wire.Veth{{Inner: "eth0", Outer: here, Bridge: bridge}}); err != nil {
		t.Fatal(err)
	}
	gotLinks, gotRoutes, err := ReadConfig(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(gotLinks, links) || !reflect.DeepEqual(gotRoutes, routes) {
		t.Errorf("made again: %+v %+v; want %+v %+v", gotLinks, gotRoutes, links, routes)
	}
	out, err := exec.Command("ip", "-o", "link", "show", here).CombinedOutput()
	if err != nil || !contains(strings.Fields(string(out)), bridge) {
		t.Errorf("the host end %s: %v %s; want it on bridge %s", here, err, out, bridge)
	}
	// A link the source did not describe is refused, and the host end
	// made for it removed.
	other := inOwnNS(t)
	h2, err := netns.GetFromPid(other)
	if err != nil {
		t.Fatal(err)
	}
	defer h2.Close()
	if err := Build(h2, links, []wire.NetRoute{{Dev: "eth9"}}, []wire.Veth{{Inner: "eth0", Outer: outer + "y", Bridge: bridge}}); err == nil {
		t.Errorf("Build with a route via a link it did not make: no error")
	}
	if exec.Command("ip", "link", "show", outer+"y").Run() == nil {
		t.Errorf("the host end %s outlived the failed Build", outer+"y")
	}
}
