//go:build linux

package integration

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/phaul/phaul/pkg/netlock"
)

// TestLeftoverNetLockRemoved leaves a CRIU network-lock table in a network
// namespace of the test's own, starts phauld there, and checks phauld
// removed it and said so, while a table of another name stays.
func TestLeftoverNetLockRemoved(t *testing.T) {
	integration(t)
	ns := "phaul-test-" + strconv.Itoa(os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	if out, err := exec.Command("ip", "-n", ns, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v: %s", err, out)
	}
	f, err := os.Open("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	leftover := netlock.Prefix + "0b9e6c3a-5d2f-4e55-9d8e-3c1f7a2b4d6e"
	c.AddTable(&nftables.Table{Name: leftover, Family: nftables.TableFamilyINet})
	c.AddTable(&nftables.Table{Name: "keep-me", Family: nftables.TableFamilyINet})
	if err := c.Flush(); err != nil {
		t.Fatalf("create tables: %v", err)
	}

	d := startDaemon(t, "A", "127.0.0.1:17341", daemonOpts{wrap: []string{"ip", "netns", "exec", ns}})
	waitFor(t, "phauld to report the sweep", 10*time.Second, func() bool {
		return strings.Contains(d.log(), "removed CRIU's leftover network-lock tables")
	})
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, tb := range tables {
		names[tb.Name] = true
	}
	if names[leftover] || !names["keep-me"] {
		t.Fatalf("tables after phauld started: %v; want %s gone and keep-me kept", names, leftover)
	}
}
