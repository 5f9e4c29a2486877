//go:build linux

package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/proc"
)

// counterScript counts up in its log, a line every 50 ms.
const counterScript = `i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done`

// lastCount is the last number the counter wrote to its log.
func lastCount(t *testing.T, log string) int {
	t.Helper()
	b, _ := os.ReadFile(log)
	lines := strings.Fields(string(b))
	if len(lines) == 0 {
		return 0
	}
	n, _ := strconv.Atoi(lines[len(lines)-1])
	return n
}

// runProgram runs phaulctl run on d and returns the pid it printed; the
// process is killed at the end, wherever it went (kill adds pids).
func runProgram(t *testing.T, d *daemon, args ...string) (pid int, kill func(int)) {
	t.Helper()
	r := d.phaulctl(t, append([]string{"run"}, args...)...)
	if r.code != 0 {
		t.Fatalf("phaulctl run %q: exit %d: %s %s", args, r.code, r.stdout, r.stderr)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(r.stdout))
	if err != nil {
		t.Fatalf("phaulctl run printed %q; want the pid", r.stdout)
	}
	pids := []int{pid}
	t.Cleanup(func() {
		for _, p := range pids {
			syscall.Kill(p, syscall.SIGKILL)
		}
	})
	return pid, func(p int) { pids = append(pids, p) }
}

// phaulctl run starts a program as phaul can move it: the init of its own
// pid namespace, a session leader with no terminal, stdin /dev/null,
// stdout and stderr on its log. It migrates by its name, which goes with
// it: to B and back, counting on in its log with no restart. A name in
// use is refused; a program that is not there is refused, with nothing
// left running.
func TestRunLauncher(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17641", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:17642", daemonOpts{})
	dir := t.TempDir()
	log := filepath.Join(dir, "counter.log")
	pid, track := runProgram(t, a, "--name", "counter", "--log", log, "--", "sh", "-c", counterScript)
	waitFor(t, "the counter to count", 10*time.Second, func() bool { return lastCount(t, log) >= 3 })

	if ns, err := proc.NSPid(pid); err != nil || ns != 1 {
		t.Errorf("pid %d is pid %d (%v) in its namespace; want 1, its init", pid, ns, err)
	}
	stat, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+2:]))
	// state ppid pgrp session tty_nr: its own session (its pid as this
	// host sees it), no controlling terminal.
	if f[3] != strconv.Itoa(pid) || f[4] != "0" {
		t.Errorf("session %s, tty_nr %s; want its own session (%d) and no terminal", f[3], f[4], pid)
	}
	for fd, want := range map[string]string{"0": os.DevNull, "1": log, "2": log} {
		if got, _ := os.Readlink("/proc/" + strconv.Itoa(pid) + "/fd/" + fd); got != want {
			t.Errorf("fd %s is %q; want %q", fd, got, want)
		}
	}
	if r := a.phaulctl(t, "names"); !strings.Contains(r.stdout, "counter") || !strings.Contains(r.stdout, strconv.Itoa(pid)) {
		t.Errorf("phaulctl names on A: %q; want counter, pid %d", r.stdout, pid)
	}
	again := a.phaulctl(t, "run", "--name", "counter", "--", "sleep", "600")
	if again.code != 1 || !strings.Contains(again.stderr, `the name "counter" is taken here`) {
		t.Errorf("a second counter: exit %d: %s; want refused (1), the name taken", again.code, again.stderr)
	}
	missing := a.phaulctl(t, "run", "--", "/nonexistent/program")
	if missing.code != 1 || !strings.Contains(missing.stderr, "/nonexistent/program") {
		t.Errorf("run a missing program: exit %d: %s; want refused (1), naming it", missing.code, missing.stderr)
	}

	hop := func(from, to *daemon) api.Result {
		t.Helper()
		before := lastCount(t, log)
		r := from.phaulctl(t, "migrate", "--name", "counter", "--to", to.addr, "--json")
		if r.code != 0 {
			t.Fatalf("migrate --name counter from %s: exit %d: %s %s", from.name, r.code, r.stdout, r.stderr)
		}
		var res api.Result
		if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
			t.Fatal(err)
		}
		track(res.DestPID)
		if res.Name != "counter" {
			t.Errorf("the result names it %q; want counter", res.Name)
		}
		waitRunning(t, res.DestPID)
		waitFor(t, "the counter to count on", 10*time.Second, func() bool { return lastCount(t, log) > before+3 })
		if first := strings.Fields(mustRead(t, log)); strings.Count(" "+strings.Join(first, " ")+" ", " 1 ") != 1 {
			t.Errorf("the counter started again from 1 after the move to %s", to.name)
		}
		if r := to.phaulctl(t, "names"); !strings.Contains(r.stdout, "counter") || !strings.Contains(r.stdout, strconv.Itoa(res.DestPID)) {
			t.Errorf("phaulctl names on %s: %q; want counter, pid %d", to.name, r.stdout, res.DestPID)
		}
		if r := from.phaulctl(t, "names"); strings.Contains(r.stdout, "counter") {
			t.Errorf("phaulctl names on %s still has counter: %q", from.name, r.stdout)
		}
		return res
	}
	res := hop(a, b)
	if res.NewPidNS {
		t.Errorf("the init of its own pid namespace went into a new one on B: %+v", res)
	}
	hop(b, a)
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// phaulctl run --net gives a service a network namespace of its own, its
// eth0 on the bridge with the address: a client on C reaches it, and keeps
// its connection when the service moves to B by its name.
func TestRunServiceKeepsItsClient(t *testing.T) {
	integration(t)
	lab := newNetLab(t, "br0")
	a := lab.daemon("A", 17651, nil)
	b := lab.daemon("B", 17652, nil)
	dir := t.TempDir()
	pid, track := runProgram(t, a, "--name", "redis", "--net", "br0,"+labSvcAddr+"/24", "--log", filepath.Join(dir, "redis.out"), "--",
		"redis-server", "--port", redisPort, "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", dir)
	waitFor(t, "redis to answer from C", 10*time.Second, func() bool {
		c, err := lab.dial("C", labSvcAddr+":"+redisPort)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	if own, _ := os.Readlink("/proc/" + strconv.Itoa(pid) + "/ns/net"); own == "" || own == mustLink(t, "/proc/self/ns/net") {
		t.Fatalf("redis's network namespace %q is not its own", own)
	}
	rc := lab.startClient("k")
	time.Sleep(300 * time.Millisecond)
	r := a.phaulctl(t, "migrate", "--name", "redis", "--to", b.addr, "--json")
	if r.code != 0 {
		t.Fatalf("migrate --name redis: exit %d: %s %s", r.code, r.stdout, r.stderr)
	}
	var res api.Result
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatal(err)
	}
	track(res.DestPID)
	rc.goesOn(t, "after the migration")
	if n := res.Network; n == nil || n.TCPConnections < 1 || len(n.Veths) != 1 || n.Veths[0].Bridge != "br0" || n.Veths[0].Inner != "eth0" {
		t.Errorf("the result says %+v; want its namespace moved: eth0 on br0, the client's connection", res.Network)
	}
}

func mustLink(t *testing.T, path string) string {
	t.Helper()
	s, err := os.Readlink(path)
	if err != nil {
		t.Fatal(err)
	}
	return s
}
