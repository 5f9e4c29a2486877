//go:build linux

// Package system tests phaul end to end under a real systemd: two Debian
// containers (systemd-nspawn of a debootstrapped bookworm tree) stand for
// two hosts, each with the phaul .deb installed and phauld.socket enabled.
// It runs with PHAUL_SYSTEM=1 (`make test-system`, part of `make test`),
// which also builds the .deb and the root filesystem cache; without it the
// tests skip.
package system

import (
	"bytes"
	"encoding/json"
	"fmt"
	"github.com/phaul/phaul/test/report"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/pki"
)

// Inputs, from make test-system.
var (
	rootfs   = os.Getenv("PHAUL_SYSTEM_ROOTFS") // the debootstrapped tree
	deb      = os.Getenv("PHAUL_SYSTEM_DEB")    // the package under test
	workload = os.Getenv("PHAUL_SYSTEM_WORKLOAD")
)

func enabled(t *testing.T) {
	t.Helper()
	if os.Getenv("PHAUL_SYSTEM") != "1" {
		t.Skip("system test: run it with 'make test-system' (as root)")
	}
	for name, v := range map[string]string{"PHAUL_SYSTEM_ROOTFS": rootfs, "PHAUL_SYSTEM_DEB": deb, "PHAUL_SYSTEM_WORKLOAD": workload} {
		if v == "" {
			t.Fatalf("%s is not set (make test-system sets it)", name)
		}
	}
}

// container is one booted systemd-nspawn container: a "host".
type container struct {
	name  string
	root  string
	netns string
	addr  string
	cmd   *exec.Cmd
	log   string
	init  int // the container's PID 1, as the host sees it
}

// newContainer copies the root filesystem, installs CRIU (the host's
// `make criu` tree, which carries its own libraries), the workload and
// the TLS identity into it, and boots it in network namespace netns.
func newContainer(t *testing.T, name, netns, addr, tlsDir string) *container {
	t.Helper()
	dir := t.TempDir()
	c := &container{name: name, root: filepath.Join(dir, "root"), netns: netns, addr: addr, log: filepath.Join(dir, "console.log")}
	run(t, "cp", "-a", rootfs, c.root)
	for _, p := range []string{"usr/local/lib", "usr/local/sbin", "usr/local/bin", "etc/phauld", "var/lib/workload"} {
		os.MkdirAll(filepath.Join(c.root, p), 0o755)
	}
	run(t, "cp", "-a", "/usr/local/lib/phaul-criu", filepath.Join(c.root, "usr/local/lib/"))
	run(t, "cp", "-a", "/usr/local/sbin/criu", filepath.Join(c.root, "usr/local/sbin/"))
	run(t, "cp", "../../packaging/criu/install-criu.sh", filepath.Join(c.root, "root/"))
	run(t, "cp", deb, filepath.Join(c.root, "root/phaul.deb"))
	run(t, "cp", workload, filepath.Join(c.root, "usr/local/bin/workload"))
	run(t, "cp", "-a", tlsDir, filepath.Join(c.root, "etc/phauld/tls"))

	logf, err := os.Create(c.log)
	if err != nil {
		t.Fatal(err)
	}
	c.cmd = exec.Command("systemd-nspawn", "-D", c.root, "-b", "--register=no", "--keep-unit",
		"--capability=all", "--network-namespace-path=/run/netns/"+netns, "-M", name)
	// What CRIU needs in a container (see docs/operations.md).
	c.cmd.Env = append(os.Environ(), "SYSTEMD_SECCOMP=0", "SYSTEMD_NSPAWN_API_VFS_WRITABLE=1")
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	c.cmd.Stdin = nil
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { c.cmd.Wait(); logf.Close(); close(exited) }()
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(c.log)
			t.Logf("--- console of %s (last 3000 bytes) ---\n%s", name, tail(b, 3000))
			if out, err := c.sh("journalctl --no-pager -n 200 -u phauld -u 'phaul*'"); err == nil {
				t.Logf("--- journal of %s ---\n%s", name, out)
			}
			if out, err := c.sh("grep -h -B8 Error /var/lib/phauld/sessions/*/*.log | tail -60"); err == nil {
				t.Logf("--- CRIU errors on %s ---\n%s", name, out)
			}
		}
		if c.init > 0 {
			c.sh("systemctl poweroff")
		}
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			c.cmd.Process.Kill()
			<-exited
		}
	})

	deadline := time.Now().Add(60 * time.Second)
	for {
		if kids, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", c.cmd.Process.Pid, c.cmd.Process.Pid)); err == nil {
			if f := strings.Fields(string(kids)); len(f) > 0 {
				c.init, _ = strconv.Atoi(f[0])
			}
		}
		if c.init > 0 {
			if out, _ := c.sh("systemctl is-system-running"); strings.Contains(out, "running") || strings.Contains(out, "degraded") {
				return c
			}
		}
		select {
		case <-exited:
			b, _ := os.ReadFile(c.log)
			t.Fatalf("container %s exited while booting:\n%s", name, tail(b, 3000))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("container %s did not boot in 60s", name)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// sh runs a shell command inside the container.
func (c *container) sh(script string) (string, error) {
	cmd := exec.Command("nsenter", "-t", strconv.Itoa(c.init), "-a", "--", "sh", "-c", script)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// must runs a shell command inside the container and fails the test if it
// fails.
func (c *container) must(t *testing.T, script string) string {
	t.Helper()
	out, err := c.sh(script)
	if err != nil {
		t.Fatalf("%s: %s: %v\n%s", c.name, script, err, out)
	}
	return out
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// report asks the workload (pid in the container) for a report.
func (c *container) report(t *testing.T, pid int) report.Report {
	t.Helper()
	st, err := report.Ask(filepath.Join(c.root, "var/lib/workload/status.json"), func() error {
		_, err := c.sh(fmt.Sprintf("kill -USR1 %d", pid))
		return err
	}, 10*time.Second)
	if err != nil {
		t.Fatalf("%s: workload pid %d: %v", c.name, pid, err)
	}
	return st
}

// TestTwoHosts installs the .deb in two containers, enables phauld.socket
// (all the set-up a host needs, with its certificate), starts a workload
// as a systemd service (its output on the journal), migrates it, and
// checks: it runs on the other host, intact, in a scope of its own; the
// migration's log lines are found with journalctl -u phauld
// PHAUL_SESSION=ID on both; the workload's output reaches the new host's
// journal; and the process survives `systemctl restart phauld` there.
func TestTwoHosts(t *testing.T) {
	enabled(t)

	// Two network namespaces joined by a veth pair: two hosts' network.
	suffix := strconv.Itoa(os.Getpid())
	nsA, nsB := "phaul-sys-a-"+suffix, "phaul-sys-b-"+suffix
	vethA, vethB := "phsa"+suffix, "phsb"+suffix
	for _, ns := range []string{nsA, nsB} {
		run(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	}
	run(t, "ip", "link", "add", vethA, "netns", nsA, "type", "veth", "peer", "name", vethB, "netns", nsB)
	for _, x := range []struct{ ns, dev, addr string }{{nsA, vethA, "10.213.0.1/24"}, {nsB, vethB, "10.213.0.2/24"}} {
		run(t, "ip", "-n", x.ns, "addr", "add", x.addr, "dev", x.dev)
		run(t, "ip", "-n", x.ns, "link", "set", x.dev, "up")
		run(t, "ip", "-n", x.ns, "link", "set", "lo", "up")
	}

	// Certificates, as an operator makes them with phaulctl pki.
	tls := t.TempDir()
	if err := pki.Init(filepath.Join(tls, "a"), []string{"10.213.0.1"}); err != nil {
		t.Fatal(err)
	}
	if err := pki.Issue(filepath.Join(tls, "a"), filepath.Join(tls, "b"), []string{"10.213.0.2"}); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(tls, "a", pki.CAKeyFile)) // the CA key stays off the hosts

	a := newContainer(t, "phaul-a", nsA, "10.213.0.1", filepath.Join(tls, "a"))
	b := newContainer(t, "phaul-b", nsB, "10.213.0.2", filepath.Join(tls, "b"))
	// The package needs CRIU >= 4.2: Debian 12's criu is not enough, and
	// dpkg says so; the CRIU that 'make criu' installs is.
	if out, err := a.sh("dpkg -i /root/phaul.deb"); err == nil || !strings.Contains(out, "criu") {
		t.Errorf("dpkg -i phaul.deb without CRIU: %v\n%s", err, out)
	}
	for _, c := range []*container{a, b} {
		c.must(t, "/root/install-criu.sh >/dev/null 2>&1 && dpkg -i /root/phaul.deb")
		// What the package installs: sysusers, tmpfiles, man pages,
		// completion.
		c.must(t, "getent group phaul && test -d /var/lib/phauld && test -s /usr/share/man/man8/phauld.8.gz && test -s /usr/share/man/man1/phaulctl.1.gz && "+
			"test -s /usr/share/bash-completion/completions/phaulctl && dpkg -s phaul | grep -q '^Status: install ok installed'")
		c.must(t, "systemctl enable --now phauld.socket")
		if out := c.must(t, "phaulctl status --json"); !strings.Contains(out, `"security": "mutual-tls"`) {
			t.Fatalf("%s: phauld status: %s", c.name, out)
		}
		// Started by that first connection, ready, and telling systemd
		// what it does.
		out := c.must(t, "systemctl show -p Type,KillMode,WatchdogUSec,ActiveState,StatusText phauld.service")
		for _, want := range []string{"Type=notify", "KillMode=process", "WatchdogUSec=30s", "ActiveState=active", "StatusText=serving migrations on [::]:12345; idle"} {
			if !strings.Contains(out, want) {
				t.Errorf("%s: phauld.service lacks %s:\n%s", c.name, want, out)
			}
		}
	}

	// The workload, as a service: systemd connects its output to the
	// journal. It runs as the init of its own pid namespace: the two
	// containers boot alike, so the same pids (and thread ids) are taken
	// in both, and a restore must not need them. setsid makes it lead its
	// own session: CRIU restores a session only with its leader.
	a.must(t, "systemd-run --unit=phaul-workload --property=Restart=no unshare -p -f -- setsid /usr/local/bin/workload --mem 64 --status /var/lib/workload/status.json")
	var pid int
	deadline := time.Now().Add(10 * time.Second)
	for pid == 0 {
		out, _ := a.sh("cat /proc/$(systemctl show -p MainPID --value phaul-workload)/task/*/children")
		pid, _ = strconv.Atoi(strings.TrimSpace(out))
		if _, err := os.Stat(filepath.Join(a.root, "var/lib/workload/status.json")); err != nil {
			pid = 0
		}
		if time.Now().After(deadline) {
			t.Fatal("the workload service did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}
	before := a.report(t, pid)

	out := a.must(t, fmt.Sprintf("phaulctl migrate --pid %d --to %s --json", pid, b.addr))
	var res api.Result
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("phaulctl migrate printed %q: %v", out, err)
	}
	t.Logf("migrated: session %s, pid %d on %s is pid %d on %s, frozen %d ms", res.ID, pid, a.name, res.DestPID, b.name, res.FrozenMS)

	after := b.report(t, res.DestPID)
	if after.Token != before.Token || after.Sum != before.Expect || after.Counter <= before.Counter {
		t.Fatalf("on %s: %+v; before: %+v", b.name, after, before)
	}
	if _, err := a.sh(fmt.Sprintf("kill -0 %d", pid)); err == nil {
		t.Errorf("pid %d still exists on %s", pid, a.name)
	}

	// In a scope of its own, not in phauld's cgroup.
	scope := "phaul-" + res.ID + ".scope"
	if out := b.must(t, fmt.Sprintf("cat /proc/%d/cgroup", res.DestPID)); !strings.Contains(out, scope) {
		t.Errorf("the migrated process's cgroup: %s; want %s", out, scope)
	}

	// The session in both journals, by unit and session id.
	for _, c := range []*container{a, b} {
		out := c.must(t, "journalctl -u phauld PHAUL_SESSION="+res.ID+" -o json --no-pager")
		n := strings.Count(out, `"PHAUL_SESSION":"`+res.ID+`"`)
		if n < 3 || !strings.Contains(out, `"PHAUL_PHASE":"restore"`) {
			t.Errorf("%s: journalctl -u phauld PHAUL_SESSION=%s: %d entries\n%s", c.name, res.ID, n, out)
		}
	}
	// The workload's own output, after the migration, in the new host's
	// journal.
	line := fmt.Sprintf("report %d: counter %d", after.Seq, after.Counter)
	if out := b.must(t, "journalctl -t workload --no-pager -o cat"); !strings.Contains(out, line) {
		t.Errorf("%s's journal lacks the migrated workload's line %q:\n%s", b.name, line, out)
	}

	// phaulctl run: a program started to be moved, in a scope of its own
	// under phaul.slice, its output in the journal under its name; moved
	// by that name, which it keeps on the other host.
	out = a.must(t, "phaulctl run --name ticker --journal -- sh -c 'while :; do echo tick; sleep 0.2; done' 2>/dev/null")
	runPID, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("phaulctl run printed %q", out)
	}
	if out := a.must(t, fmt.Sprintf("cat /proc/%d/cgroup; systemctl show -p Slice --value phaul-run-ticker.scope", runPID)); !strings.Contains(out, "phaul.slice/phaul-run-ticker.scope") {
		t.Errorf("the program phaulctl run started: its cgroup and scope's slice: %s; want phaul-run-ticker.scope in phaul.slice", out)
	}
	time.Sleep(500 * time.Millisecond)
	if out := a.must(t, "journalctl -t ticker --no-pager -o cat"); !strings.Contains(out, "tick") {
		t.Errorf("%s's journal lacks the ticker's output:\n%s", a.name, out)
	}
	out = a.must(t, "phaulctl migrate --name ticker --to "+b.addr+" --json")
	var ran api.Result
	if err := json.Unmarshal([]byte(out), &ran); err != nil || ran.Name != "ticker" || ran.DestPID <= 0 {
		t.Fatalf("phaulctl migrate --name ticker printed %q (%v)", out, err)
	}
	if out := b.must(t, "phaulctl names"); !strings.Contains(out, "ticker") || !strings.Contains(out, strconv.Itoa(ran.DestPID)) {
		t.Errorf("phaulctl names on %s: %q; want ticker, pid %d", b.name, out, ran.DestPID)
	}
	b.must(t, fmt.Sprintf("kill %d", ran.DestPID))

	// Restarting phauld leaves it running.
	b.must(t, "systemctl restart phauld.service")
	again := b.report(t, res.DestPID)
	if again.Token != before.Token || again.Counter <= after.Counter {
		t.Fatalf("after systemctl restart phauld: %+v", again)
	}
	b.must(t, "systemctl stop phauld.service phauld.socket")
	last := b.report(t, res.DestPID)
	if last.Counter <= again.Counter {
		t.Fatalf("after systemctl stop phauld: %+v", last)
	}
}
