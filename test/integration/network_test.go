//go:build linux

package integration

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/wire"
	"github.com/phaul/phaul/test/faultproxy"
	"github.com/phaul/phaul/test/harness"
)

// A service keeps its clients: these tests stand for hosts with network
// namespaces (harness.Lab). The service, redis-server from Debian, runs on
// A as the init of its own pid and network namespace, with a veth to A's
// br0 and an address of its own; phauld A and B run in A's and B's
// namespaces. A client on C keeps one connection, a request every 20 ms,
// across the migration.

const (
	labSvcAddr = harness.LabServiceAddr
	redisPort  = harness.RedisPort
)

// netLab is the four namespaces of one test.
type netLab struct {
	*harness.Lab
	t *testing.T
}

func (l *netLab) name(host string) string { return l.Name(host) }
func (l *netLab) path(host string) string { return l.Path(host) }

// hostAddr is a host's address on the segment.
func hostAddr(host string) string { return harness.LabHostAddr(host) }

// newNetLab makes the namespaces; bBridge names B's bridge. They are
// removed at the end of the test, after everything in them was stopped.
func newNetLab(t *testing.T, bBridge string) *netLab {
	t.Helper()
	lab, err := harness.NewLab(bBridge)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(lab.Close)
	return &netLab{Lab: lab, t: t}
}

// daemon starts a phauld in host's namespace, on port; wrap runs it under
// more (after the namespace is entered).
func (l *netLab) daemon(host string, port int, flags []string, wrap ...string) *daemon {
	return startDaemon(l.t, host, hostAddr(host)+":"+strconv.Itoa(port), daemonOpts{
		wrap:     append([]string{"nsenter", "--net=" + l.path(host)}, wrap...),
		flags:    append([]string{"--peer-timeout", "5s"}, flags...),
		insecure: true,
	})
}

// dial connects from host's namespace.
func (l *netLab) dial(host, addr string) (net.Conn, error) { return l.Dial(host, addr) }

// proxy is a fault proxy listening on host's loopback at port, which
// forwards to target from host's namespace.
func (l *netLab) proxy(host string, port int, target string) *faultproxy.Proxy {
	var ln net.Listener
	var err error
	if nerr := l.InNS(host, func() { ln, err = net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port)) }); nerr != nil || err != nil {
		l.t.Fatalf("listen in %s: %v %v", host, nerr, err)
	}
	p := faultproxy.Serve(ln, target, func(addr string) (net.Conn, error) { return l.dial(host, addr) })
	l.t.Cleanup(p.Close)
	return p
}

// service is the lab's service; pid and dir as harness.Service's.
type service struct {
	pid int
	dir string
}

// startRedis starts redis-server as the service; its append-only file is
// in dataDir. Its log is shown if the test fails.
func (l *netLab) startRedis(dataDir string) *service {
	l.t.Helper()
	logDir := l.t.TempDir()
	s, err := l.StartRedis(dataDir, logDir)
	return l.keep(s, err, filepath.Join(logDir, "redis.log"))
}

// startService runs args in dir as the service, waits until it answers on
// port from C, and kills it and every copy of it at the end. logPath is
// shown if the test fails.
func (l *netLab) startService(dir, port, logPath string, args ...string) *service {
	l.t.Helper()
	s, err := l.StartService(dir, port, args...)
	return l.keep(s, err, logPath)
}

func (l *netLab) keep(s *harness.Service, err error, logPath string) *service {
	t := l.t
	t.Helper()
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("--- %s ---\n%s", logPath, b)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return &service{pid: s.PID, dir: s.Dir}
}

// redisClient is a harness.RedisClient on C, a request every 20 ms.
type redisClient struct{ *harness.RedisClient }

func (l *netLab) startClient(key string) *redisClient {
	l.t.Helper()
	return l.startClientTo(labSvcAddr, key)
}

// startClientTo is startClient to the service's address addr.
func (l *netLab) startClientTo(addr, key string) *redisClient {
	l.t.Helper()
	rc, err := l.StartRedisClientTo(addr, key, 20*time.Millisecond)
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(rc.Halt)
	return &redisClient{rc}
}

func (rc *redisClient) state() (int64, time.Duration, error) { return rc.State() }

// goesOn checks that the client's connection is still served: it moves
// on again (within the TCP retransmission backoff a long freeze brings:
// after a 3 s freeze the client's next try may come seconds later), and
// then gets replies at its pace for a second, with no error.
func (rc *redisClient) goesOn(t *testing.T, what string) {
	t.Helper()
	n0, _, _ := rc.state()
	deadline := time.Now().Add(15 * time.Second)
	for {
		n, _, err := rc.state()
		if err != nil {
			t.Fatalf("%s: the client's connection failed: %v", what, err)
		}
		if n > n0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the client got no reply in 15 s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
	n1, _, _ := rc.state()
	time.Sleep(time.Second)
	n, gap, err := rc.state()
	if err != nil {
		t.Fatalf("%s: the client's connection failed: %v", what, err)
	}
	if n < n1+10 {
		t.Fatalf("%s: the client got %d replies in a second (want about 40)", what, n-n1)
	}
	t.Logf("%s: %d replies in sequence, longest wait for one %v", what, n, gap.Round(time.Millisecond))
}

func TestServiceKeepsItsClient(t *testing.T) {
	integration(t)
	for i, mode := range []string{"copy", "lazy"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			lab := newNetLab(t, "br0")
			port := 17900 + 10*i
			a := lab.daemon("A", port, nil)
			b := lab.daemon("B", port+1, nil)
			svc := lab.startRedis(t.TempDir())
			rc := lab.startClient("k")
			// And one over IPv6: its connection moves too, and C learns
			// the address's new place from the unsolicited neighbour
			// advertisement.
			rc6 := lab.startClientTo(harness.LabServiceAddr6, "k6")
			time.Sleep(300 * time.Millisecond)

			res := a.migrateTo(t, svc.pid, b.addr, "--mode", mode)
			rc.goesOn(t, "after the migration")
			rc6.goesOn(t, "after the migration, over IPv6")
			n := res.Network
			if n == nil || n.TCPConnections < 2 || len(n.Veths) != 1 || n.Veths[0].Bridge != "br0" || n.Veths[0].Inner != "eth0" ||
				!slices.Contains(n.Addresses, labSvcAddr+"/24") || !slices.Contains(n.Addresses, harness.LabServiceAddr6+"/64") || n.LockedMS <= 0 {
				t.Errorf("the result says %+v; want the namespace moved: eth0 on br0, %s/24 and %s/64, both connections, the lock's time", n, labSvcAddr, harness.LabServiceAddr6)
			}
			t.Logf("frozen %d ms, network locked %d ms, %d connections carried", res.FrozenMS, n.LockedMS, n.TCPConnections)

			// A new connection reaches the copy on B, which has what the
			// client wrote.
			got, _, _ := rc.state()
			c, err := lab.dial("C", labSvcAddr+":"+redisPort)
			if err != nil {
				t.Fatalf("a new connection to %s: %v", labSvcAddr, err)
			}
			fmt.Fprintf(c, "GET k\r\n")
			c.SetDeadline(time.Now().Add(5 * time.Second))
			br := bufio.NewReader(c)
			br.ReadString('\n')
			line, err := br.ReadString('\n')
			c.Close()
			if v, _ := strconv.ParseInt(strings.TrimSpace(line), 10, 64); err != nil || v < got {
				t.Errorf("GET k on a new connection: %q, %v; want at least %d", line, err, got)
			}
			if !proc.Running(res.DestPID) {
				t.Errorf("the copy on B (pid %d) does not run", res.DestPID)
			}
			// Nothing of the namespace is left on A.
			waitFor(t, "the source's copy to be gone", 10*time.Second, func() bool {
				info, err := proc.Stat(svc.pid)
				return err != nil || info.State == 'Z'
			})
			if lab.HasLink("A", "vsvc") {
				t.Errorf("the namespace's veth vsvc is still on A")
			}
			if !lab.HasLink("B", "vsvc") {
				t.Errorf("no veth vsvc on B")
			}
		})
	}
}

// A service whose namespace reaches the segment by a macvlan on its
// host's interface eth1 (no bridge): the macvlan is made again on B's
// eth1, with its MAC address, the client's connection goes on, and the
// source's namespace, which the test keeps open, is left with nothing
// that could answer for the address.
func TestServiceOnMacvlan(t *testing.T) {
	integration(t)
	for i, mode := range []string{"copy", "lazy"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			lab := newNetLab(t, "br0")
			for _, h := range []string{"A", "B"} {
				if err := lab.AddUplink(h, "eth1"); err != nil {
					t.Fatal(err)
				}
			}
			lab.ServiceLink = "eth1"
			port := 18200 + 10*i
			a := lab.daemon("A", port, nil)
			b := lab.daemon("B", port+1, nil)
			svc := lab.startRedis(t.TempDir())
			mac := func(pid int) string {
				out, err := exec.Command("nsenter", "-t", strconv.Itoa(pid), "-n", "cat", "/sys/class/net/eth0/address").Output()
				if err != nil {
					t.Fatalf("the MAC address of pid %d's eth0: %v", pid, err)
				}
				return strings.TrimSpace(string(out))
			}
			before := mac(svc.pid)
			srcNS, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", svc.pid))
			if err != nil {
				t.Fatal(err)
			}
			defer srcNS.Close()
			rc := lab.startClient("k")
			time.Sleep(300 * time.Millisecond)

			res := a.migrateTo(t, svc.pid, b.addr, "--mode", mode)
			rc.goesOn(t, "after the migration")
			n := res.Network
			if n == nil || len(n.Macvlans) != 1 || n.Macvlans[0].Inner != "eth0" || n.Macvlans[0].Lower != "eth1" || n.TCPConnections < 1 {
				t.Errorf("the result says %+v; want the macvlan eth0 on eth1, and the connection", n)
			}
			if after := mac(res.DestPID); after != before {
				t.Errorf("the copy on B has MAC %s, the source had %s", after, before)
			}
			out, err := exec.Command("nsenter", fmt.Sprintf("--net=/proc/%d/fd/%d", os.Getpid(), srcNS.Fd()), "ip", "-o", "link").CombinedOutput()
			if err != nil || strings.Count(strings.TrimSpace(string(out)), "\n") != 0 || !strings.Contains(string(out), "lo:") {
				t.Errorf("the source's namespace after the commit has (%v):\n%s\nwant only lo", err, out)
			}
		})
	}
}

// Connections not yet accepted do not stop a migration: CRIU leaves them
// behind, and the result counts them as they were at the freeze, not at
// the checks. The service is the test workload, which listens and never
// accepts; startService's probe and three connections from C wait in its
// accept queue at the checks, and two more come while the source is
// between its checks and the freeze (the destination's Ready held).
func TestInFlightLeftBehind(t *testing.T) {
	integration(t)
	lab := newNetLab(t, "br0")
	a := lab.daemon("A", 18230, nil)
	b := lab.daemon("B", 18231, nil)
	px := lab.proxy("A", 18232, b.addr)
	dir := t.TempDir()
	svc := lab.startService(dir, "7000", filepath.Join(dir, "none"),
		bins.workload, "--mem", "8", "--status", filepath.Join(dir, "status"), "--listen", "0.0.0.0:7000")
	connect := func() {
		c, err := lab.dial("C", labSvcAddr+":7000")
		if err != nil {
			t.Error(err)
			return
		}
		t.Cleanup(func() { c.Close() })
	}
	for i := 0; i < 3; i++ {
		connect()
	}
	px.Arm(&faultproxy.Rule{Dir: faultproxy.ToSource, Type: wire.TypeReady, Nth: 1, Action: faultproxy.Pass,
		Hook: func() { connect(); connect(); time.Sleep(100 * time.Millisecond) }})
	res := a.migrateTo(t, svc.pid, px.Addr(), "--mode", "copy")
	if n := res.Network; n == nil || n.TCPInFlight != 6 || n.TCPConnections != 0 {
		t.Fatalf("the result says %+v; want the 6 connections waiting in the queue at the freeze counted as left behind, none carried", res.Network)
	}
	t.Logf("left behind: %d connections not yet accepted", res.Network.TCPInFlight)
	if !proc.Running(res.DestPID) {
		t.Errorf("the copy on B (pid %d) does not run", res.DestPID)
	}
	// Its listener moved: a new connection reaches it on B.
	c, err := lab.dial("C", labSvcAddr+":7000")
	if err != nil {
		t.Fatalf("a new connection after the migration: %v", err)
	}
	c.Close()
}

// The restore fails on B (the service's data directory is read-only there): the
// client's connection goes on with the source's copy, and nothing of the
// namespace is left on B.
func TestServiceKeepsItsClientOnRollback(t *testing.T) {
	integration(t)
	for i, mode := range []string{"copy", "lazy"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			lab := newNetLab(t, "br0")
			port := 17940 + 10*i
			data := t.TempDir()
			a := lab.daemon("A", port, nil)
			b := lab.daemon("B", port+1, nil, readOnlyWrap(data)...)
			svc := lab.startRedis(data)
			rc := lab.startClient("k")
			time.Sleep(300 * time.Millisecond)

			_, r, err := a.Migrate(svc.pid, b.addr, "--mode", mode)
			if err != nil || r.Code != 3 {
				t.Fatalf("phaulctl migrate exited %d (%v): %s %s; want 3 (rolled back)", r.Code, err, r.Stdout, r.Stderr)
			}
			rc.goesOn(t, "after the rollback")
			if !proc.Running(svc.pid) {
				t.Errorf("the service (pid %d) does not run on A", svc.pid)
			}
			waitFor(t, "B's copy and its veth to be gone", 10*time.Second, func() bool { return !lab.HasLink("B", "vsvc") })
			if !lab.HasLink("A", "vsvc") {
				t.Errorf("the veth vsvc is gone from A")
			}
		})
	}
}

// A destination without the bridge refuses before anything is frozen;
// --bridge-map puts the veth on another.
func TestServiceBridgeChecked(t *testing.T) {
	integration(t)
	lab := newNetLab(t, "lanbr")
	port := 17980
	a := lab.daemon("A", port, nil)
	plain := lab.daemon("B", port+1, nil)
	svc := lab.startRedis(t.TempDir())
	rc := lab.startClient("k")
	time.Sleep(300 * time.Millisecond)

	_, r, err := a.Migrate(svc.pid, plain.addr)
	if err != nil || r.Code != 1 || !strings.Contains(r.Stdout, "no bridge br0") || !strings.Contains(r.Stdout, "--bridge-map") {
		t.Fatalf("to a host without br0: exit %d (%v): %s %s; want refused (1), naming br0 and --bridge-map", r.Code, err, r.Stdout, r.Stderr)
	}
	if _, gap, err := rc.state(); err != nil || gap > 200*time.Millisecond {
		t.Errorf("a refused migration touched the service: client %v, longest wait %v", err, gap)
	}

	mapped := startDaemon(t, "B2", hostAddr("B")+":"+strconv.Itoa(port+2), daemonOpts{
		wrap: []string{"nsenter", "--net=" + lab.path("B")}, insecure: true,
		flags: []string{"--peer-timeout", "5s", "--bridge-map", "br0=lanbr"},
	})
	// As a user sees it (no --json): the progress says what moves, the
	// result where it went.
	r2 := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(svc.pid), "--to", mapped.addr)
	if r2.code != 0 {
		t.Fatalf("to a host with --bridge-map br0=lanbr: exit %d: %s %s", r2.code, r2.stdout, r2.stderr)
	}
	rc.goesOn(t, "after the migration to lanbr")
	if !regexp.MustCompile(`network: moving the namespace: interfaces eth0, addresses [^\n]*` + regexp.QuoteMeta(labSvcAddr) + `/24[^\n]*, [1-9][0-9]* TCP connections`).MatchString(r2.stderr) {
		t.Errorf("the progress does not say what of the network moves: %s", r2.stderr)
	}
	if !strings.Contains(r2.stdout, "network: veth eth0, its host end vsvc on bridge lanbr there") ||
		!regexp.MustCompile(`[1-9][0-9]* TCP connections carried, network locked [0-9]`).MatchString(r2.stdout) {
		t.Errorf("the result does not say the veth went onto lanbr, with the connection: %s", r2.stdout)
	}
	out, _ := exec.Command("ip", "-n", lab.name("B"), "-o", "link", "show", "master", "lanbr").Output()
	if !strings.Contains(string(out), "vsvc") {
		t.Errorf("vsvc is not on lanbr on B: %s", out)
	}
}

// A process in its host's namespace with a connection is refused before
// the freeze, saying why and what to do.
func TestHostConnectionRefused(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17990", daemonOpts{insecure: true})
	b := startDaemon(t, "B", "127.0.0.2:17991", daemonOpts{insecure: true})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// redis-cli holding a connection, in the host's namespace, in a pid
	// namespace of its own (so that only the connection is at stake).
	cmd := exec.Command("unshare", "--pid", "--fork", "--", "setsid", "redis-cli", "-h", "127.0.0.1", "-p",
		strconv.Itoa(ln.Addr().(*net.TCPAddr).Port), "-r", "-1", "-i", "1", "PING")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pid, err := harness.OnlyChild(cmd.Process.Pid, 5*time.Second)
	if err != nil {
		t.Fatalf("redis-cli to start: %v", err)
	}
	before, _ := proc.Stat(pid)
	_, r, err := a.Migrate(pid, b.addr)
	if err != nil || r.Code != 1 || !strings.Contains(r.Stdout, "TCP connection") || !strings.Contains(r.Stdout, "namespace of its own") {
		t.Fatalf("exit %d (%v): %s %s; want refused (1): a connection in the host's namespace, and what to do", r.Code, err, r.Stdout, r.Stderr)
	}
	after, err := proc.Stat(pid)
	if err != nil || after.StartTime != before.StartTime || after.Stopped() {
		t.Errorf("the refused process changed: %+v, %v", after, err)
	}
}

// An HTTP server under load, nginx from Debian (a master and a worker),
// migrated in the middle of it: wrk, on the client host, keeps 8
// connections busy and must see no error and no failed request.
func TestServiceUnderLoad(t *testing.T) {
	integration(t)
	for _, tool := range []string{"nginx", "wrk"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing (make deps installs it)", tool)
		}
	}
	for i, mode := range []string{"copy", "lazy"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			lab := newNetLab(t, "br0")
			port := 17960 + 10*i
			a := lab.daemon("A", port, nil)
			b := lab.daemon("B", port+1, nil)
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "index.html"), []byte(strings.Repeat("phaul\n", 200)), 0o644); err != nil {
				t.Fatal(err)
			}
			conf := fmt.Sprintf(`user root;
worker_processes 1;
daemon off;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  keepalive_requests 1000000;
  server { listen 8080; root %[1]s; }
}
`, dir)
			if err := os.WriteFile(filepath.Join(dir, "nginx.conf"), []byte(conf), 0o644); err != nil {
				t.Fatal(err)
			}
			svc := lab.startService(dir, "8080", filepath.Join(dir, "error.log"), "nginx", "-c", filepath.Join(dir, "nginx.conf"), "-p", dir)

			load := exec.Command("nsenter", "--net="+lab.path("C"), "wrk", "-t", "1", "-c", "8", "-d", "8s", "--timeout", "10s",
				"http://"+labSvcAddr+":8080/")
			var out strings.Builder
			load.Stdout, load.Stderr = &out, &out
			if err := load.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { load.Process.Kill(); load.Wait() }()
			time.Sleep(2 * time.Second)
			res := a.migrateTo(t, svc.pid, b.addr, "--mode", mode)
			if err := load.Wait(); err != nil {
				t.Fatalf("wrk: %v\n%s", err, out.String())
			}
			report := out.String()
			t.Logf("frozen %d ms, %d connections carried; wrk:\n%s", res.FrozenMS, res.Network.TCPConnections, report)
			if strings.Contains(report, "Socket errors") || strings.Contains(report, "Non-2xx") {
				t.Errorf("requests failed across the migration (wrk's report above)")
			}
			if !strings.Contains(report, "requests in") {
				t.Errorf("wrk reported no requests")
			}
			if res.Network == nil || res.Network.TCPConnections < 8 {
				t.Errorf("the result says %+v; want at least wrk's 8 connections carried", res.Network)
			}
		})
	}
}

// The fault matrix with a connected client, at the main points: the
// process is redis with one client connection, and after the fault the
// rule's side must run it, once, and the client's connection go on. (All
// these cells end on the source: a rollback, by the source's own hand, by
// CRIU's, or by a restarted source phauld's recovery, with the
// namespace's lock and TCP repair mode to lift each time.)
func TestFaultMatrixConnected(t *testing.T) {
	integration(t)
	var cells []struct {
		mode string
		p    point
		f    fault
	}
	n := 0
	for _, mode := range matrixModes {
		for _, p := range points {
			if p.key != "before-dump" && p.key != "pages" && p.key != "restored" {
				continue
			}
			for _, f := range faults {
				if f.key != "drop" && f.key != "kill-dest" && f.key != "kill-source" {
					continue
				}
				cells = append(cells, struct {
					mode string
					p    point
					f    fault
				}{mode, p, f})
			}
		}
	}
	for _, c := range cells {
		port := 18000 + 10*n
		n++
		t.Run(c.mode+"/"+c.p.key+"/"+c.f.key, func(t *testing.T) {
			t.Parallel()
			runConnectedCell(t, c.mode, c.p, c.f, expected(c.mode, c.p, c.f), port)
		})
	}
}

func runConnectedCell(t *testing.T, mode string, p point, f fault, want string, port int) {
	lab := newNetLab(t, "br0")
	a := lab.daemon("A", port, nil)
	b := lab.daemon("B", port+1, nil)
	px := lab.proxy("A", port+2, b.addr)
	svc := lab.startRedis(t.TempDir())
	rc := lab.startClient("k")
	time.Sleep(200 * time.Millisecond)

	inject := func() {
		switch f.key {
		case "drop":
			px.DropAll()
		case "kill-dest":
			b.kill()
			b.start()
		case "kill-source":
			a.kill() // restarted below
		}
	}
	nth := p.nth
	if p.key == "pages" {
		nth = 2 // redis has a few MiB: a few frames
	}
	r := &faultproxy.Rule{Dir: p.dir, Type: p.typ, Nth: nth, Action: faultproxy.Pass, Hook: inject}
	switch f.key {
	case "drop":
		r.Action, r.Hook = faultproxy.Drop, nil
	case "kill-source":
		r.Action = faultproxy.Swallow
	}
	px.Arm(r)
	migrated := migrateThroughFault(t, a, svc.pid, px, mode, r, time.Minute)
	res := <-migrated
	if f.key == "kill-source" {
		a.start() // it recovers the tree it had frozen
	}
	waitFor(t, "both daemons to be done, and one copy of the service to run", time.Minute, func() bool {
		if len(a.sessions(t)) != 0 || len(b.sessions(t)) != 0 {
			return false
		}
		return len(runningIn(svc.dir)) == 1
	})
	run := runningIn(svc.dir)
	got := sideDest
	if run[0] == svc.pid {
		got = sideSource
	}
	if got != want {
		t.Fatalf("the service runs on the %s (pid %d); the rule says the %s (phaulctl: exit %d %s)", got, run[0], want, res.code, res.stdout)
	}
	checkExitCode(t, f, res, want)
	rc.goesOn(t, "after the fault")
	if want == sideSource && !lab.HasLink("A", "vsvc") {
		t.Errorf("the service's veth is gone from A")
	}
	deadline := time.Now().Add(30 * time.Second)
	for lab.HasLink("B", "vsvc") {
		if time.Now().After(deadline) {
			out, _ := exec.Command("ip", "-n", lab.name("B"), "-d", "link", "show", "vsvc").CombinedOutput()
			t.Fatalf("the namespace's veth is still on B after 30 s: %s; processes in the service's directory: %s; in other namespaces: %s", out, describeIn(svc.dir), otherNS())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// describeIn says what works in dir, for a failure's report.
func describeIn(dir string) string {
	var parts []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if cwd, _ := os.Readlink("/proc/" + e.Name() + "/cwd"); cwd == dir {
			info, _ := proc.Stat(pid)
			ns, _ := os.Readlink("/proc/" + e.Name() + "/ns/net")
			parts = append(parts, fmt.Sprintf("pid %d %s state %c parent %d %s", pid, info.Comm, info.State, info.PPID, ns))
		}
	}
	return strings.Join(parts, "; ")
}

// runningIn lists the running processes whose working directory is dir
// (the service's copies).
func runningIn(dir string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		exe, _ := os.Readlink("/proc/" + e.Name() + "/exe")
		if cwd, _ := os.Readlink("/proc/" + e.Name() + "/cwd"); cwd == dir && strings.HasPrefix(filepath.Base(exe), "redis-") && proc.Running(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// otherNS lists the processes not in this host's network namespace.
func otherNS() string {
	self, _ := os.Readlink("/proc/self/ns/net")
	var parts []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ns, _ := os.Readlink("/proc/" + e.Name() + "/ns/net"); ns != "" && ns != self {
			info, _ := proc.Stat(pid)
			cmd, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
			parts = append(parts, fmt.Sprintf("pid %d %s %c %s %.80q", pid, info.Comm, info.State, ns, cmd))
		}
	}
	return strings.Join(parts, "; ")
}
