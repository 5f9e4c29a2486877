//go:build linux

package integration

import (
	"github.com/phaul/phaul/test/faultproxy"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/wire"
)

// TestConcurrentMigrations runs eight migrations at once between the same
// two daemons, four each way. Each must pair its own connections and
// arrive intact.
func TestConcurrentMigrations(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17301", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:17302", daemonOpts{})
	type job struct {
		from, to *daemon
		w        *workload
		before   status
		res      api.Result
	}
	var jobs []*job
	for i := 0; i < 8; i++ {
		from, to := a, b
		if i%2 == 1 {
			from, to = b, a
		}
		w := startWorkload(t, workloadOpts{memMiB: 32})
		jobs = append(jobs, &job{from: from, to: to, w: w, before: w.report(w.pid, w.status)})
	}
	var wg sync.WaitGroup
	for _, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			j.res = j.from.migrate(t, j.w.pid, j.to)
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	ids := map[string]bool{}
	for i, j := range jobs {
		j.w.track(j.res.DestPID)
		if ids[j.res.ID] {
			t.Errorf("job %d: session id %s used twice", i, j.res.ID)
		}
		ids[j.res.ID] = true
		if j.res.SourcePID != j.w.pid {
			t.Errorf("job %d: result for pid %d, migrated %d: pairs crossed", i, j.res.SourcePID, j.w.pid)
		}
		waitRunning(t, j.res.DestPID)
		after := j.w.report(j.res.DestPID, j.w.status)
		if after.HostPID != j.res.DestPID {
			t.Errorf("job %d: process at dest pid %d reports host pid %d", i, j.res.DestPID, after.HostPID)
		}
		checkIntact(t, "job "+strconv.Itoa(i), after, j.before, j.w.memMiB, j.w.seed)
	}
}

// TestMigratedOutlivesDaemon checks that a migrated process does not
// depend on the destination's phauld: it keeps running when that daemon is
// stopped, killed, and started again.
func TestMigratedOutlivesDaemon(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17311", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:17312", daemonOpts{})
	w := startWorkload(t, workloadOpts{memMiB: 32, children: 1})
	before := w.report(w.pid, w.status)
	res := a.migrate(t, w.pid, b)
	w.track(res.DestPID)
	info := waitRunning(t, res.DestPID)

	alive := func(what string) {
		t.Helper()
		now, err := proc.Stat(res.DestPID)
		if err != nil || now.StartTime != info.StartTime || now.Stopped() || now.State == 'Z' {
			t.Fatalf("%s: the migrated process is gone or stopped (%+v, %v)", what, now, err)
		}
		before = w.reportAfter(t, res.DestPID, before, what)
	}
	b.terminate(t, time.Minute)
	alive("after SIGTERM to the destination phauld")
	b.start()
	alive("after restarting it")
	b.kill()
	alive("after SIGKILL to it")
	b.start()
	alive("after starting it again")
}

// reportAfter asks pid for a report and checks it went on from before.
func (w *workload) reportAfter(t *testing.T, pid int, before status, what string) status {
	t.Helper()
	st := w.report(pid, w.status)
	checkIntact(t, what, st, before, w.memMiB, w.seed)
	return st
}

// TestBadBytesOnPort sends garbage, a truncated frame, an oversize length,
// a message out of order and a second handshake to the migration port
// while a migration is in flight. Each bad connection is dropped with a log
// line; the daemon and the migration go on.
func TestBadBytesOnPort(t *testing.T) {
	integration(t)
	// Plain TCP: the proxy reads the frames to find its point.
	a := startDaemon(t, "A", "127.0.0.1:17321", daemonOpts{insecure: true})
	b := startDaemon(t, "B", "127.0.0.2:17322", daemonOpts{insecure: true, flags: []string{"--pair-timeout", "2s"}})
	px := newFaultProxy(t, "127.0.0.3:17323", b.addr)
	w := startWorkload(t, workloadOpts{memMiB: 32})
	before := w.report(w.pid, w.status)

	hello := func(role wire.Role) []byte {
		f, _ := wire.Marshal(&wire.Hello{Proto: 1, Role: role, Session: wire.SessionID{7}})
		return f
	}
	commit, _ := wire.Marshal(&wire.Commit{})
	bad := map[string][]byte{
		"garbage":              []byte("GET / HTTP/1.1\r\nHost: phaul\r\n\r\n"),
		"truncated frame":      hello(wire.RoleRPC)[:10],
		"oversize length":      {'P', 'H', 1, byte(wire.TypeHello), 0xff, 0xff, 0xff, 0xf0},
		"message out of order": commit,
		// A half pair that then says more: it is dropped at the pair
		// timeout, its second hello never read as a command.
		"second handshake": append(hello(wire.RoleMem), hello(wire.RoleMem)...),
	}
	// While the migration is held at its page transfer, throw the bad
	// bytes at the destination's real port.
	r := &faultproxy.Rule{Dir: faultproxy.ToDest, Type: wire.TypePageData, Nth: 20, Action: faultproxy.Pass, Hook: func() {
		for name, payload := range bad {
			c, err := net.Dial("tcp", b.addr)
			if err != nil {
				t.Errorf("%s: dial: %v", name, err)
				continue
			}
			c.Write(payload)
			if name == "truncated frame" {
				c.(*net.TCPConn).CloseWrite()
			}
			c.SetReadDeadline(time.Now().Add(15 * time.Second))
			buf := make([]byte, 4096)
			for {
				if _, err := c.Read(buf); err != nil {
					break
				}
			}
			c.Close()
		}
	}}
	px.Arm(r)
	res := a.migrateTo(t, w.pid, px.Addr())
	w.track(res.DestPID)
	waitRunning(t, res.DestPID)
	checkIntact(t, "migrated under fire", w.report(res.DestPID, w.status), before, w.memMiB, w.seed)
	log := b.log()
	for _, want := range []string{"bad frame magic", "unexpected EOF", "frame larger than its type allows",
		"message not allowed on this connection", "lone connection dropped"} {
		if !strings.Contains(log, want) {
			t.Errorf("destination log has no line about %q", want)
		}
	}
	if n := strings.Count(log, "handshake failed: connection dropped"); n < 4 {
		t.Errorf("destination logged %d dropped handshakes, want at least 4", n)
	}
	if _, err := proc.Stat(b.PID()); err != nil {
		t.Fatal("the destination daemon died")
	}
}

// TestBadBytesInSession breaks the protocol inside live sessions through
// the proxy: a second handshake on the paired rpc connection, a message
// out of order, an oversize length. Each ends only its session, by the
// rule: the process runs on the source again, intact; both daemons live.
func TestBadBytesInSession(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17331", daemonOpts{insecure: true})
	b := startDaemon(t, "B", "127.0.0.2:17332", daemonOpts{insecure: true})
	px := newFaultProxy(t, "127.0.0.3:17333", b.addr)
	helloFrame, _ := wire.Marshal(&wire.Hello{Proto: 1, Role: wire.RoleRPC, Session: wire.SessionID{9}})
	commitFrame, _ := wire.Marshal(&wire.Commit{})
	cases := []struct {
		name   string
		inject []byte
		log    string
	}{
		{"second handshake on the rpc connection", helloFrame, "message not allowed on this connection"},
		{"commit before the restore", commitFrame, "unexpected commit in state receive"},
		{"oversize length", []byte{'P', 'H', 1, byte(wire.TypeFileData), 0x7f, 0, 0, 0}, "frame larger than its type allows"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			w := startWorkload(t, workloadOpts{memMiB: 32})
			before := w.report(w.pid, w.status)
			info, _ := proc.Stat(w.pid)
			px.Arm(&faultproxy.Rule{Dir: faultproxy.ToDest, Type: wire.TypeFileBegin, Nth: 1, Action: faultproxy.Inject, Bytes: c.inject})
			r := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(w.pid), "--to", px.Addr())
			if r.code == 0 {
				t.Fatalf("migration with bad bytes succeeded: %s", r.stdout)
			}
			got := waitRunning(t, w.pid)
			if got.StartTime != info.StartTime {
				t.Fatal("the source process was replaced")
			}
			checkIntact(t, "source after the bad session", w.report(w.pid, w.status), before, w.memMiB, w.seed)
			if !strings.Contains(b.log(), c.log) {
				t.Errorf("destination log does not say %q", c.log)
			}
			waitFor(t, "the sessions to end", 30*time.Second, func() bool {
				return len(a.sessions(t)) == 0 && len(b.sessions(t)) == 0
			})
			if n := len(w.Processes()); n != 1 {
				t.Errorf("%d copies of the process, want 1", n)
			}
		})
	}
}
