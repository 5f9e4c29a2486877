//go:build linux

package integration

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/wire"
	"github.com/phaul/phaul/test/faultproxy"
	"github.com/phaul/phaul/test/harness"
)

// Containers: a runc container moves with runc's own checkpoint and
// restore, under the commit rule. Two daemons on one machine stand for two
// hosts with --runc-root (runc's state root) and --containers-dir of their
// own; the bundle is in the test's directory, which both see at the same
// path: shared storage.

// counterLoop is the container's init: it appends a counter to /count in
// its rootfs every 50 ms, holding 8 MiB in a tmpfs file meanwhile.
const counterLoop = `dd if=/dev/urandom of=/dev/shm/held bs=1M count=8 2>/dev/null; i=0; while :; do i=$((i+1)); echo $i >> /count; sleep 0.05; done`

type containerLab struct {
	t      *testing.T
	rootA  string
	rootB  string
	bundle string
	id     string
	a, b   *daemon
}

// newContainerLab makes the bundle, starts the container under A's runc
// root and the two daemons (B's runc is runcB, if set: a wrapper).
func newContainerLab(t *testing.T, port int, runcB string) *containerLab {
	return newContainerLabOn(t, port, runcB, false)
}

// newContainerLabOn is newContainerLab; unshared runs B where the
// bundle's directory is hidden (a tmpfs over it in B's own mount
// namespace), as on a host that does not share its storage.
func newContainerLabOn(t *testing.T, port int, runcB string, unshared bool, bExtra ...string) *containerLab {
	t.Helper()
	for _, tool := range []string{"runc", "busybox"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing (make deps installs it)", tool)
		}
	}
	dir := t.TempDir()
	l := &containerLab{t: t, rootA: filepath.Join(dir, "runc-a"), rootB: filepath.Join(dir, "runc-b"),
		bundle: filepath.Join(t.TempDir(), "bundle"), id: fmt.Sprintf("phaul-t%d-%d", os.Getpid(), port)}
	cgroup := "/phaul-test/" + l.id
	if err := harness.MakeBundle(harness.BundleConfig{Dir: l.bundle, Args: []string{"/bin/sh", "-c", counterLoop}, CgroupsPath: cgroup}); err != nil {
		t.Fatal(err)
	}
	// A 4 MiB file in the rootfs, to find intact afterwards.
	blob := make([]byte, 4<<20)
	rand.Read(blob)
	if err := os.WriteFile(filepath.Join(l.bundle, "rootfs", "blob"), blob, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		harness.DeleteContainer(l.rootA, l.id)
		harness.DeleteContainer(l.rootB, l.id)
		removeCgroups(cgroup)
		// The destination's copy ran in /phaul/ID-SESSION (its source's
		// cgroup was in use on this one machine): runc removes that, not
		// its parent. (Empty unless another test runs a container.)
		removeCgroups("/phaul/x")
	})
	if err := harness.RunContainer(l.rootA, l.bundle, l.id); err != nil {
		t.Fatal(err)
	}
	bFlags := []string{"--runc-root", l.rootB, "--containers-dir", filepath.Join(dir, "containers-b")}
	if runcB != "" {
		bFlags = append(bFlags, "--runc", runcB)
	}
	bFlags = append(bFlags, bExtra...)
	l.a = startDaemon(t, "A", "127.0.0.1:"+strconv.Itoa(port), daemonOpts{insecure: true,
		flags: []string{"--runc-root", l.rootA, "--containers-dir", filepath.Join(dir, "containers-a")}})
	bOpts := daemonOpts{insecure: true, flags: bFlags}
	if unshared {
		bOpts.wrap = []string{"unshare", "--mount", "--propagation", "private", "--",
			"sh", "-c", `mount -t tmpfs none "$0" && exec "$@"`, filepath.Dir(l.bundle)}
	}
	l.b = startDaemon(t, "B", "127.0.0.2:"+strconv.Itoa(port+1), bOpts)
	waitFor(t, "the container to count", 10*time.Second, func() bool { return len(l.counts()) >= 3 })
	return l
}

// removeCgroups removes the cgroup path under every v1 controller (and
// v2), where runc left it.
func removeCgroups(p string) {
	ents, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range ents {
		os.Remove(filepath.Join("/sys/fs/cgroup", e.Name(), p))
		os.Remove(filepath.Join("/sys/fs/cgroup", e.Name(), filepath.Dir(p)))
	}
	os.Remove(filepath.Join("/sys/fs/cgroup", p))
}

func (l *containerLab) counts() []int { return countsIn(filepath.Join(l.bundle, "rootfs")) }

func countsIn(rootfs string) []int {
	b, _ := os.ReadFile(filepath.Join(rootfs, "count"))
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out
}

// checkCounting checks that the counter never skipped or restarted, and
// that it goes on.
func (l *containerLab) checkCounting(what string) {
	l.checkCountingIn(what, filepath.Join(l.bundle, "rootfs"))
}

func (l *containerLab) checkCountingIn(what, rootfs string) {
	t := l.t
	t.Helper()
	before := countsIn(rootfs)
	time.Sleep(500 * time.Millisecond)
	after := countsIn(rootfs)
	if len(after) <= len(before) {
		t.Fatalf("%s: the counter stopped at %d", what, len(before))
	}
	for i, n := range after {
		if n != i+1 {
			t.Fatalf("%s: the counter went %d after %d: the container restarted or lost its state", what, n, i)
		}
	}
}

func (l *containerLab) state(root string) (string, error) {
	out, err := exec.Command("runc", "--root", root, "state", l.id).CombinedOutput()
	return string(out), err
}

func TestContainerMigrates(t *testing.T) {
	integration(t)
	for _, c := range []struct {
		mode string
		port int
	}{{"copy", 18300}, {"lazy", 18400}, {"precopy", 18600}} {
		t.Run(c.mode, func(t *testing.T) { testContainerMigrates(t, c.mode, c.port) })
	}
}

func testContainerMigrates(t *testing.T, mode string, port int) {
	l := newContainerLab(t, port, "")
	sum := func() [32]byte {
		b, _ := os.ReadFile(filepath.Join(l.bundle, "rootfs", "blob"))
		return sha256.Sum256(b)
	}
	blob := sum()
	r := l.a.phaulctl(t, "migrate", "--container", l.id, "--to", l.b.addr, "--mode", mode)
	if r.code != 0 {
		t.Fatalf("phaulctl migrate --container: exit %d: %s %s", r.code, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stdout, "container "+l.id+" now runs on "+l.b.addr) || !strings.Contains(r.stdout, mode) {
		t.Errorf("phaulctl said: %s", r.stdout)
	}
	t.Logf("A to B: %s", r.stdout)
	if mode == "precopy" && (!strings.Contains(r.stdout, "pre-copy (by content)") || strings.Contains(r.stdout, "at the freeze 0 of")) {
		t.Errorf("a pre-copy migration that reused no page sent ahead: %s", r.stdout)
	}
	st, err := l.state(l.rootB)
	if err != nil || !strings.Contains(st, `"status": "running"`) {
		t.Fatalf("runc on B: %v %s; want the container running", err, st)
	}
	if st, err := l.state(l.rootA); err == nil {
		t.Errorf("runc on A still knows the container: %s", st)
	}
	l.checkCounting("after the migration")
	if sum() != blob {
		t.Errorf("the 4 MiB file in the rootfs changed")
	}
	// The tmpfs it held came along.
	out, err := exec.Command("runc", "--root", l.rootB, "exec", l.id, "/bin/sh", "-c", "wc -c < /dev/shm/held").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != strconv.Itoa(8<<20) {
		t.Errorf("the container's tmpfs file on B: %q, %v; want 8 MiB", out, err)
	}
	// B's history and list name it.
	h := l.b.phaulctl(t, "history")
	if !strings.Contains(h.stdout, "container "+l.id) {
		t.Errorf("B's history does not name the container: %s", h.stdout)
	}
	// Its peer is A's daemon, not the port A's connection came from.
	if !strings.Contains(h.stdout, " "+l.a.addr+" ") {
		t.Errorf("B's history does not name A (%s) as the peer: %s", l.a.addr, h.stdout)
	}
	// And back: the bundle B made is used, and removed when it leaves.
	r = l.b.phaulctl(t, "migrate", "--container", l.id, "--to", l.a.addr, "--mode", mode)
	if r.code != 0 {
		t.Fatalf("migrating it back: exit %d: %s %s", r.code, r.stdout, r.stderr)
	}
	t.Logf("B to A: %s", r.stdout)
	if st, err := l.state(l.rootA); err != nil || !strings.Contains(st, `"status": "running"`) {
		t.Fatalf("runc on A after the way back: %v %s", err, st)
	}
	l.checkCounting("after the way back")
	if ents, _ := os.ReadDir(filepath.Join(filepath.Dir(l.bundle), "containers-b")); len(ents) != 0 {
		t.Errorf("B kept %d entries in its containers directory after the container left", len(ents))
	}
}

// A restore that fails on B (its runc fails the restore): the container
// runs on A again, counting on, and B has no trace of it.
func TestContainerRollback(t *testing.T) {
	integration(t)
	wrapper := filepath.Join(t.TempDir(), "runc-failing-restore")
	script := "#!/bin/sh\nfor a; do [ \"$a\" = restore ] && { echo 'level=error msg=\"restore refused by the test\"' >&2; exit 1; }; done\nexec runc \"$@\"\n"
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	l := newContainerLab(t, 18310, wrapper)
	r := l.a.phaulctl(t, "migrate", "--container", l.id, "--to", l.b.addr, "--mode", "copy")
	if r.code != 3 || !strings.Contains(r.stderr+r.stdout, "restore refused by the test") {
		t.Fatalf("phaulctl migrate: exit %d: %s %s; want 3 (rolled back), with runc's reason", r.code, r.stdout, r.stderr)
	}
	if st, err := l.state(l.rootA); err != nil || !strings.Contains(st, `"status": "running"`) {
		t.Fatalf("runc on A: %v %s; want the container running again", err, st)
	}
	l.checkCounting("after the rollback")
	if st, err := l.state(l.rootB); err == nil {
		t.Errorf("runc on B knows the container: %s", st)
	}
	if ents, _ := os.ReadDir(filepath.Join(filepath.Dir(l.bundle), "containers-b")); len(ents) != 0 {
		t.Errorf("B kept %d entries in its containers directory", len(ents))
	}
	// The history gives the cause (its outcome column says the rest).
	if h := l.a.phaulctl(t, "history"); !strings.Contains(h.stdout, "restore refused by the test") || strings.Contains(h.stdout, "was resumed here") {
		t.Errorf("A's history does not give the cause of the failure:\n%s", h.stdout)
	}
}

// What B cannot take is refused before anything is frozen (an id it has
// already), and what phaulctl cannot find at once.
func TestContainerChecks(t *testing.T) {
	integration(t)
	l := newContainerLab(t, 18320, "")
	// The same id under B's runc root.
	other := filepath.Join(t.TempDir(), "other")
	if err := harness.MakeBundle(harness.BundleConfig{Dir: other, Args: []string{"/bin/sleep", "600"}, CgroupsPath: "/phaul-test/" + l.id + "-b"}); err != nil {
		t.Fatal(err)
	}
	if err := harness.RunContainer(l.rootB, other, l.id); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeCgroups("/phaul-test/" + l.id + "-b") })
	r := l.a.phaulctl(t, "migrate", "--container", l.id, "--to", l.b.addr)
	if r.code != 1 || !strings.Contains(r.stderr, "already has a container "+l.id) {
		t.Fatalf("to a host with the id taken: exit %d: %s %s; want refused (1), naming the id", r.code, r.stdout, r.stderr)
	}
	harness.DeleteContainer(l.rootB, l.id)
	st, _ := l.state(l.rootA)
	if !strings.Contains(st, `"status": "running"`) {
		t.Errorf("the refused container is not running on A: %s", st)
	}
	l.checkCounting("after the refusal")
	// An unknown container, and one named with --pid too.
	r = l.a.phaulctl(t, "migrate", "--container", "no-such-container", "--to", l.b.addr)
	if r.code != 1 || !strings.Contains(r.stderr, "knows no container no-such-container") {
		t.Errorf("an unknown container: exit %d: %s", r.code, r.stderr)
	}
	// status says how this host moves containers.
	if st := l.a.phaulctl(t, "status"); !strings.Contains(st.stdout, "containers: runc ") || !strings.Contains(st.stdout, "state root "+l.rootA) {
		t.Errorf("phaulctl status does not say how containers move: %s", st.stdout)
	}
	r = l.a.phaulctl(t, "migrate", "--container", l.id, "--pid", "1", "--to", l.b.addr)
	if r.code != 1 || !bytes.Contains([]byte(r.stderr), []byte("give one")) {
		t.Errorf("--pid with --container: exit %d: %s", r.code, r.stderr)
	}
}

// B does not share the bundle's storage: the rootfs is synced with rsync
// over phaul's link, once while the container runs and once while it is
// frozen. On B, the counter file in B's copy goes on from A's last value,
// the 4 MiB file is intact, and the result gives both passes.
func TestContainerRootfsSynced(t *testing.T) {
	integration(t)
	if _, err := exec.LookPath("rsync"); err != nil {
		t.Fatal("rsync is missing (make deps installs it)")
	}
	for i, mode := range []string{"copy", "lazy", "precopy"} {
		t.Run(mode, func(t *testing.T) { testContainerRootfsSynced(t, mode, 18330+100*i) })
	}
}

func testContainerRootfsSynced(t *testing.T, mode string, port int) {
	l := newContainerLabOn(t, port, "", true)
	blob, _ := os.ReadFile(filepath.Join(l.bundle, "rootfs", "blob"))
	r := l.a.phaulctl(t, "migrate", "--container", l.id, "--to", l.b.addr, "--mode", mode, "--json")
	if r.code != 0 {
		t.Fatalf("phaulctl migrate --container: exit %d: %s %s", r.code, r.stdout, r.stderr)
	}
	var res struct {
		FrozenMS int64 `json:"frozen_ms"`
		Rootfs   *struct {
			Bytes       int64 `json:"bytes"`
			MS          int64 `json:"ms"`
			FrozenBytes int64 `json:"frozen_bytes"`
			FrozenMS    int64 `json:"frozen_ms"`
		} `json:"rootfs"`
		Precopy *api.Precopy `json:"precopy"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.Rootfs == nil {
		t.Fatalf("the result has no rootfs sync: %v %s", err, r.stdout)
	}
	t.Logf("rootfs: %d bytes in %d ms while it ran, %d bytes in %d ms frozen; frozen %d ms in all",
		res.Rootfs.Bytes, res.Rootfs.MS, res.Rootfs.FrozenBytes, res.Rootfs.FrozenMS, res.FrozenMS)
	if mode == "precopy" && (res.Precopy == nil || len(res.Precopy.Rounds) == 0 || res.Precopy.ReusedPages == 0) {
		// Its memory went ahead after the rootfs, while it still ran.
		t.Errorf("pre-copy after the rootfs sync: %+v; want rounds, and pages reused at the freeze", res.Precopy)
	}
	if res.Rootfs.Bytes < int64(len(blob)) || res.Rootfs.FrozenBytes <= 0 || res.Rootfs.FrozenBytes >= res.Rootfs.Bytes {
		t.Errorf("the passes moved %d and %d bytes: want the first at least the 4 MiB file, the frozen one less", res.Rootfs.Bytes, res.Rootfs.FrozenBytes)
	}
	st, err := l.state(l.rootB)
	if err != nil || !strings.Contains(st, `"status": "running"`) {
		t.Fatalf("runc on B: %v %s", err, st)
	}
	var bst struct {
		Rootfs string `json:"rootfs"`
	}
	json.Unmarshal([]byte(st), &bst)
	if bst.Rootfs == "" || strings.HasPrefix(bst.Rootfs, filepath.Dir(l.bundle)) {
		t.Fatalf("B's container runs on rootfs %q; want B's own copy", bst.Rootfs)
	}
	if got, _ := os.ReadFile(filepath.Join(bst.Rootfs, "blob")); !bytes.Equal(got, blob) {
		t.Errorf("the 4 MiB file in B's copy differs (%d bytes)", len(got))
	}
	lastA := len(l.counts())
	l.checkCountingIn("on B's copy", bst.Rootfs)
	if n := len(countsIn(bst.Rootfs)); n <= lastA {
		t.Errorf("B's counter is at %d, A's stopped at %d", n, lastA)
	}
	if st, err := l.state(l.rootA); err == nil {
		t.Errorf("runc on A still knows the container: %s", st)
	}
}

// The source's phauld is killed once the destination has restored the
// container (the commit not yet asked), then started again: the
// destination discards its copy (runc forgets it, its bundle goes), and
// the restarted source resumes the container it held paused, which counts
// on. Likewise at the main points before: the page transfer, and before
// the dump (nothing frozen yet).
func TestContainerSourceKilled(t *testing.T) {
	integration(t)
	for i, at := range []struct {
		name string
		rule faultproxy.Rule
	}{
		{"before the dump", faultproxy.Rule{Dir: faultproxy.ToSource, Type: wire.TypeReady, Nth: 1}},
		{"during the pages", faultproxy.Rule{Dir: faultproxy.ToDest, Type: wire.TypePageData, Nth: 2}},
		{"after the restore", faultproxy.Rule{Dir: faultproxy.ToSource, Type: wire.TypeRestored, Nth: 1}},
	} {
		t.Run(at.name, func(t *testing.T) {
			port := 18340 + 10*i
			l := newContainerLab(t, port, "")
			px := newFaultProxy(t, "127.0.0.3:"+strconv.Itoa(port+2), l.b.addr)
			r := at.rule
			r.Action, r.Hook = faultproxy.Swallow, func() { l.a.kill() }
			px.Arm(&r)
			res := l.a.phaulctl(t, "migrate", "--container", l.id, "--to", px.Addr(), "--mode", "copy")
			select {
			case <-r.Fired():
			default:
				t.Fatalf("the migration ended before the point was reached: exit %d: %s %s", res.code, res.stdout, res.stderr)
			}
			if res.code != 4 {
				t.Errorf("phaulctl migrate, its phauld killed: exit %d; want 4 (not known here): %s %s", res.code, res.stdout, res.stderr)
			}
			waitFor(t, "the destination to end its session", time.Minute, func() bool { return len(l.b.sessions(t)) == 0 })
			l.a.start()
			waitFor(t, "the container to run on A again", 30*time.Second, func() bool {
				st, err := l.state(l.rootA)
				return err == nil && strings.Contains(st, `"status": "running"`)
			})
			l.checkCounting("after the restart")
			if st, err := l.state(l.rootB); err == nil {
				t.Errorf("runc on B knows the container: %s", st)
			}
			if ents, _ := os.ReadDir(filepath.Join(filepath.Dir(l.rootB), "containers-b")); len(ents) != 0 {
				t.Errorf("B kept %d entries in its containers directory", len(ents))
			}
		})
	}
}

// A container with a network namespace of its own, linked as the lab's
// service (a veth on A's br0, its own address), running redis; a client
// on C keeps one connection, a request every 20 ms. The namespace moves
// with the container: the client's connection goes on with the copy on
// B, whose veth is on B's br0, and nothing of it is left on A.
func TestContainerKeepsItsClient(t *testing.T) {
	integration(t)
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatal("redis-server is missing (make deps installs it)")
	}
	for i, mode := range []string{"copy", "lazy"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			port := 18410 + 10*i
			lab := newNetLab(t, "br0")
			dir := t.TempDir()
			rootA, rootB := filepath.Join(dir, "runc-a"), filepath.Join(dir, "runc-b")
			bundle := filepath.Join(dir, "bundle")
			id := fmt.Sprintf("phaul-t%d-%d", os.Getpid(), port)
			cgroup := "/phaul-test/" + id
			// redis from the host's /usr (bound in, the same path on
			// both "hosts"), its append-only file in the rootfs.
			if err := harness.MakeBundle(harness.BundleConfig{Dir: bundle, CgroupsPath: cgroup, Binds: []string{"/usr"},
				Args: []string{"/usr/bin/redis-server", "--port", redisPort, "--bind", "0.0.0.0", "--protected-mode", "no",
					"--save", "", "--appendonly", "yes", "--dir", "/data", "--logfile", "/data/redis.log"}}); err != nil {
				t.Fatal(err)
			}
			rootfs := filepath.Join(bundle, "rootfs")
			for _, l := range []string{"lib", "lib64"} {
				if err := os.Symlink("usr/"+l, filepath.Join(rootfs, l)); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.Mkdir(filepath.Join(rootfs, "data"), 0o755); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if t.Failed() {
					b, _ := os.ReadFile(filepath.Join(rootfs, "data", "redis.log"))
					t.Logf("--- redis.log ---\n%s", b)
				}
				harness.DeleteContainer(rootA, id)
				harness.DeleteContainer(rootB, id)
				removeCgroups(cgroup)
				removeCgroups("/phaul/x")
			})
			a := lab.daemon("A", port, []string{"--runc-root", rootA, "--containers-dir", filepath.Join(dir, "containers-a")})
			b := lab.daemon("B", port+1, []string{"--runc-root", rootB, "--containers-dir", filepath.Join(dir, "containers-b")})
			if _, err := lab.StartContainer(rootA, bundle, id, redisPort); err != nil {
				t.Fatal(err)
			}
			rc := lab.startClient("k")
			time.Sleep(300 * time.Millisecond)

			r := a.phaulctl(t, "migrate", "--container", id, "--to", b.addr, "--mode", mode, "--json")
			if r.code != 0 {
				t.Fatalf("phaulctl migrate --container: exit %d: %s %s", r.code, r.stdout, r.stderr)
			}
			var res api.Result
			if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
				t.Fatalf("the result: %v: %s", err, r.stdout)
			}
			rc.goesOn(t, "after the migration")
			n := res.Network
			if n == nil || n.TCPConnections < 1 || len(n.Veths) != 1 || n.Veths[0].Bridge != "br0" || n.Veths[0].Inner != "eth0" ||
				!slices.Contains(n.Addresses, labSvcAddr+"/24") {
				t.Errorf("the result says %+v; want the namespace moved: eth0 on br0, %s/24, the connection", n, labSvcAddr)
			}
			t.Logf("mode %s: frozen %d ms, network locked %d ms, %d connections carried", res.Mode, res.FrozenMS, n.LockedMS, n.TCPConnections)
			out, err := exec.Command("runc", "--root", rootB, "state", id).CombinedOutput()
			if err != nil || !strings.Contains(string(out), `"status": "running"`) {
				t.Fatalf("runc on B: %v %s; want the container running", err, out)
			}
			if out, err := exec.Command("runc", "--root", rootA, "state", id).CombinedOutput(); err == nil {
				t.Errorf("runc on A still knows the container: %s", out)
			}
			if lab.HasLink("A", "vsvc") {
				t.Errorf("the namespace's veth vsvc is still on A")
			}
			if !lab.HasLink("B", "vsvc") {
				t.Errorf("no veth vsvc on B")
			}
		})
	}
}

// The link to B is cut at the main points of a container's migration to a
// host that does not share its storage (so that the rootfs is synced):
// before the dump; during the frozen sync of the rootfs; during the
// restore on B; after the restore, before the commit. Each time the
// container runs on A again, counting on with no gap, its files intact,
// and B has no trace of it: runc there does not know it, its bundle is
// gone, no session is left.
func TestContainerRollbackCells(t *testing.T) {
	integration(t)
	if _, err := exec.LookPath("rsync"); err != nil {
		t.Fatal("rsync is missing (make deps installs it)")
	}
	type cell struct {
		name string
		rule faultproxy.Rule
		// later: the link is cut this long after the frame passed.
		later time.Duration
	}
	cells := []cell{
		{"before the dump", faultproxy.Rule{Dir: faultproxy.ToSource, Type: wire.TypeReady, Nth: 1}, 0},
		{"during the frozen sync", faultproxy.Rule{Dir: faultproxy.ToDest, Type: wire.TypeSyncOpen, Nth: 2}, 0},
		// The restore takes over a second here (runc, CRIU, the hook).
		{"during the restore", faultproxy.Rule{Dir: faultproxy.ToDest, Type: wire.TypeRestore, Nth: 1}, 300 * time.Millisecond},
		{"after the restore", faultproxy.Rule{Dir: faultproxy.ToSource, Type: wire.TypeRestored, Nth: 1}, 0},
	}
	n := 0
	for _, mode := range []string{"copy", "lazy"} {
		for _, c := range cells {
			port := 18440 + 5*n
			n++
			t.Run(mode+"/"+c.name, func(t *testing.T) {
				t.Parallel()
				l := newContainerLabOn(t, port, "", true)
				blob, _ := os.ReadFile(filepath.Join(l.bundle, "rootfs", "blob"))
				px := newFaultProxy(t, "127.0.0.3:"+strconv.Itoa(port+2), l.b.addr)
				r := c.rule
				if c.later > 0 {
					r.Action, r.Hook = faultproxy.Pass, func() { time.AfterFunc(c.later, px.DropAll) }
				} else {
					r.Action = faultproxy.Drop
				}
				px.Arm(&r)
				res := l.a.phaulctl(t, "migrate", "--container", l.id, "--to", px.Addr(), "--mode", mode)
				select {
				case <-r.Fired():
				default:
					t.Fatalf("the migration ended before the point was reached: exit %d: %s %s", res.code, res.stdout, res.stderr)
				}
				if res.code == 0 {
					t.Fatalf("phaulctl migrate succeeded with its link cut: %s", res.stdout)
				}
				t.Logf("phaulctl migrate: exit %d: %s", res.code, strings.TrimSpace(res.stderr))
				if c.name != "before the dump" && res.code != 3 {
					t.Errorf("phaulctl migrate: exit %d; want 3 (rolled back): %s %s", res.code, res.stdout, res.stderr)
				}
				st, err := l.state(l.rootA)
				if err != nil || !strings.Contains(st, `"status": "running"`) {
					t.Fatalf("runc on A: %v %s; want the container running", err, st)
				}
				l.checkCounting("after the rollback")
				if got, _ := os.ReadFile(filepath.Join(l.bundle, "rootfs", "blob")); !bytes.Equal(got, blob) {
					t.Errorf("the 4 MiB file in A's rootfs changed")
				}
				waitFor(t, "B to end its session", time.Minute, func() bool { return len(l.b.sessions(t)) == 0 })
				if st, err := l.state(l.rootB); err == nil {
					t.Errorf("runc on B knows the container: %s", st)
				}
				if ents, _ := os.ReadDir(filepath.Join(filepath.Dir(l.rootB), "containers-b")); len(ents) != 0 {
					t.Errorf("B kept %d entries in its containers directory", len(ents))
				}
			})
		}
	}
}

// A podman container (Debian's podman, with runc as its runtime) is found
// by its name or its id, and refused before anything is frozen, with the
// reason: podman cannot keep it frozen here until a commit. It runs on,
// unpaused.
func TestPodmanContainerRefused(t *testing.T) {
	integration(t)
	if _, err := exec.LookPath("podman"); err != nil {
		t.Fatal("podman is missing (make deps installs it)")
	}
	dir := t.TempDir()
	bundle := filepath.Join(dir, "bundle")
	if err := harness.MakeBundle(harness.BundleConfig{Dir: bundle, Args: []string{"/bin/true"}}); err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("phaul-t%d-podman", os.Getpid())
	image := "localhost/" + name + ":latest"
	podman := func(args ...string) (string, error) {
		out, err := exec.Command("podman", args...).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	imp := exec.Command("sh", "-c", `tar -C "$1" -c . | podman import -q - "$2"`, "sh", filepath.Join(bundle, "rootfs"), image)
	if out, err := imp.CombinedOutput(); err != nil {
		t.Fatalf("podman import: %v: %s", err, out)
	}
	t.Cleanup(func() { podman("rmi", "-f", image) })
	// runc as its runtime, and limits this host's root can set (see
	// docs/operations.md).
	id, err := podman("run", "-d", "--runtime", "runc", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
		"--name", name, image, "/bin/sh", "-c", "while :; do sleep 0.1; done")
	t.Cleanup(func() { podman("rm", "-f", "-t", "0", name) })
	if err != nil {
		t.Fatalf("podman run: %v: %s", err, id)
	}
	// podman's runc keeps its state in runc's default root.
	a := startDaemon(t, "A", "127.0.0.1:18490", daemonOpts{insecure: true, flags: []string{"--runc-root", "/run/runc"}})
	b := startDaemon(t, "B", "127.0.0.2:18491", daemonOpts{insecure: true,
		flags: []string{"--runc-root", filepath.Join(dir, "runc-b"), "--containers-dir", filepath.Join(dir, "containers-b")}})
	for _, ref := range []string{name, id} {
		r := a.phaulctl(t, "migrate", "--container", ref, "--to", b.addr)
		if r.code != 1 || !strings.Contains(r.stderr, "is podman's") || !strings.Contains(r.stderr, "cannot keep a container frozen") {
			t.Errorf("migrate --container %s (podman's): exit %d: %s %s; want refused (1), saying why", ref, r.code, r.stdout, r.stderr)
		}
	}
	if st, err := podman("container", "inspect", "--format", "{{.State.Status}}", name); err != nil || st != "running" {
		t.Errorf("podman says the refused container is %q (%v); want running", st, err)
	}
	if len(a.sessions(t)) != 0 || len(b.sessions(t)) != 0 {
		t.Errorf("a refused migration left sessions")
	}
	if st := a.phaulctl(t, "status"); !strings.Contains(st.stdout, "podman is installed: its containers are refused") {
		t.Errorf("phaulctl status does not say podman's containers are refused: %s", st.stdout)
	}
}

// phauld --shared-path DIR on the destination: a rootfs under DIR is taken
// as shared without a marker file (here the source cannot write one: the
// bundle directory is immutable), and nothing is copied; where DIR does
// not hold the rootfs, the migration is refused before the freeze.
func TestContainerSharedPath(t *testing.T) {
	integration(t)
	shared := os.TempDir() // the tests' directories are in it
	t.Run("shared", func(t *testing.T) {
		l := newContainerLabOn(t, 18500, "", false, "--shared-path", shared)
		if out, err := exec.Command("chattr", "+i", l.bundle).CombinedOutput(); err != nil {
			t.Fatalf("chattr +i: %v: %s", err, out)
		}
		t.Cleanup(func() { exec.Command("chattr", "-i", l.bundle).Run() })
		r := l.a.phaulctl(t, "migrate", "--container", l.id, "--to", l.b.addr, "--mode", "copy", "--json")
		if r.code != 0 {
			t.Fatalf("phaulctl migrate --container: exit %d: %s %s", r.code, r.stdout, r.stderr)
		}
		// Shared by --shared-path alone: the source wrote no marker.
		if !strings.Contains(l.a.log(), "cannot write the shared-storage marker") {
			t.Errorf("A wrote the shared-storage marker into an immutable directory?\n%s", l.a.log())
		}
		var res api.Result
		if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.Rootfs != nil {
			t.Errorf("the result: %v; rootfs %+v: want no sync", err, res.Rootfs)
		}
		st, err := l.state(l.rootB)
		if err != nil || !strings.Contains(st, `"status": "running"`) || !strings.Contains(st, filepath.Join(l.bundle, "rootfs")) {
			t.Fatalf("runc on B: %v %s; want the container running on the source's rootfs", err, st)
		}
		l.checkCounting("on B")
	})
	t.Run("not there", func(t *testing.T) {
		l := newContainerLabOn(t, 18510, "", true, "--shared-path", shared)
		r := l.a.phaulctl(t, "migrate", "--container", l.id, "--to", l.b.addr, "--mode", "copy")
		if r.code != 1 || !strings.Contains(r.stderr, "--shared-path says is shared") {
			t.Fatalf("phaulctl migrate: exit %d: %s %s; want refused (1): the rootfs is not where --shared-path says", r.code, r.stdout, r.stderr)
		}
		l.checkCounting("after the refusal")
	})
}
