//go:build linux

package session

import (
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/migrate"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// newTestManager returns a manager serving on a loopback port. Its CRIU
// does not exist: these tests stop before anything would run it.
func newTestManager(t *testing.T, pairTimeout time.Duration) (*Manager, string) {
	t.Helper()
	m, err := NewManager(Config{
		Log:              zaptest.NewLogger(t),
		CRIU:             migrate.FromClient(criu.New("/nonexistent/criu")),
		Info:             criu.Info{Version: criu.Version{Major: 4, Minor: 2}},
		StateDir:         t.TempDir(),
		PairTimeout:      pairTimeout,
		HandshakeTimeout: 2 * time.Second,
		Insecure:         true,
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- m.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := m.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return m, l.Addr().String()
}

func newID(t *testing.T) wire.SessionID {
	var id wire.SessionID
	rand.Read(id[:])
	return id
}

// hello dials addr and sends a Hello; it returns the connection and the
// reply.
func hello(t *testing.T, addr string, id wire.SessionID, role wire.Role) (net.Conn, *wire.HelloReply) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := wire.WriteMessage(c, &wire.Hello{Proto: wire.Version, Role: role, Session: id}); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	m, err := wire.ReadMessage(c, wire.Handshake)
	if err != nil {
		t.Fatalf("read hello reply: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	return c, m.(*wire.HelloReply)
}

func waitSessions(t *testing.T, m *Manager, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(m.Sessions()) != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions, want %d", len(m.Sessions()), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// readFail reads rpc messages until a Fail, which it returns.
func readFail(t *testing.T, c net.Conn) *wire.Fail {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	for {
		m, err := wire.ReadMessage(c, wire.RPC)
		if err != nil {
			t.Fatalf("waiting for fail: %v", err)
		}
		if f, ok := m.(*wire.Fail); ok {
			return f
		}
	}
}

// TestPairsByIDNotOrder opens the connections of two migrations crossed
// (mem of X, rpc of Y, rpc of X, mem of Y) and checks each mem connection
// landed in the session of its own id.
func TestPairsByIDNotOrder(t *testing.T) {
	m, addr := newTestManager(t, 10*time.Second)
	x, y := newID(t), newID(t)
	_, r1 := hello(t, addr, x, wire.RoleMem)
	rpcY, r2 := hello(t, addr, y, wire.RoleRPC)
	rpcX, r3 := hello(t, addr, x, wire.RoleRPC)
	memY, r4 := hello(t, addr, y, wire.RoleMem)
	for i, r := range []*wire.HelloReply{r1, r2, r3, r4} {
		if !r.OK {
			t.Fatalf("hello %d refused: %s", i, r.Error)
		}
	}
	waitSessions(t, m, 2)
	ids := map[string]bool{}
	for _, s := range m.Sessions() {
		ids[s.ID] = s.Direction == api.DirectionIn
	}
	if !ids[x.String()] || !ids[y.String()] {
		t.Fatalf("sessions %v, want incoming %s and %s", ids, x, y)
	}

	// Page data on Y's mem connection, before Y's page server exists, is
	// a protocol error in session Y: Y's rpc connection hears of it.
	frame, _ := wire.Marshal(&wire.PageData{Data: []byte("x")})
	memY.Write(frame)
	f := readFail(t, rpcY)
	if !strings.Contains(f.Message, "page data before the page stream began") {
		t.Fatalf("Y's fail = %+v", f)
	}
	waitSessions(t, m, 1)
	if s := m.Sessions(); s[0].ID != x.String() {
		t.Fatalf("remaining session %s, want %s: Y's error ended the wrong session", s[0].ID, x)
	}
	// X is untouched and still answers.
	ping, _ := wire.Marshal(&wire.Ping{Seq: 7})
	rpcX.Write(ping)
	rpcX.SetReadDeadline(time.Now().Add(5 * time.Second))
	msg, err := wire.ReadMessage(rpcX, wire.RPC)
	if pong, ok := msg.(*wire.Pong); err != nil || !ok || pong.Seq != 7 {
		t.Fatalf("X answered %v, %v; want pong 7", msg, err)
	}
}

// TestLoneConnectionDropped checks that half a pair is closed after the
// pair timeout.
func TestLoneConnectionDropped(t *testing.T) {
	m, addr := newTestManager(t, 200*time.Millisecond)
	c, r := hello(t, addr, newID(t), wire.RoleRPC)
	if !r.OK {
		t.Fatal(r.Error)
	}
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("read on a lone connection: %v, want EOF", err)
	}
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Fatalf("lone connection closed after %v, before the pair timeout", d)
	}
	if n := len(m.Sessions()); n != 0 {
		t.Fatalf("%d sessions from a lone connection", n)
	}
}

// TestBadHandshakes sends garbage, a truncated frame, an oversize length,
// a non-hello first message and a duplicate role: each is refused or
// dropped, and the daemon goes on pairing valid connections.
func TestBadHandshakes(t *testing.T) {
	m, addr := newTestManager(t, 10*time.Second)
	expectClosed := func(name string, payload []byte) {
		t.Helper()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(payload)
		if tc, ok := c.(*net.TCPConn); ok && name == "truncated" {
			tc.CloseWrite()
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadAll(c); err != nil && !isReset(err) {
			t.Errorf("%s: connection not closed: %v", name, err)
		}
	}
	expectClosed("garbage", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	expectClosed("oversize", []byte{'P', 'H', 1, byte(wire.TypeHello), 0x7f, 0xff, 0xff, 0xff})
	ping, _ := wire.Marshal(&wire.Ping{Seq: 1})
	expectClosed("not a hello", ping)
	good, _ := wire.Marshal(&wire.Hello{Proto: 1, Role: wire.RoleRPC, Session: newID(t)})
	expectClosed("truncated", good[:len(good)-3])

	id := newID(t)
	_, r := hello(t, addr, id, wire.RoleRPC)
	if !r.OK {
		t.Fatal(r.Error)
	}
	_, r = hello(t, addr, id, wire.RoleRPC)
	if r.OK || !strings.Contains(r.Error, "already has its rpc connection") {
		t.Fatalf("duplicate rpc connection: %+v", r)
	}
	_, r = hello(t, addr, id, wire.RoleMem)
	if !r.OK {
		t.Fatalf("valid mem connection after the bad ones: %s", r.Error)
	}
	waitSessions(t, m, 1)
	// A third connection for a running session is refused.
	_, r = hello(t, addr, id, wire.RoleMem)
	if r.OK || !strings.Contains(r.Error, "already running") {
		t.Fatalf("connection for a running session: %+v", r)
	}
}

func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "reset")
}

// TestShutdownStopsSessions checks that Shutdown ends running sessions
// through their eventfds and returns in time.
func TestShutdownStopsSessions(t *testing.T) {
	m, addr := newTestManager(t, 10*time.Second)
	id := newID(t)
	rpc, _ := hello(t, addr, id, wire.RoleRPC)
	hello(t, addr, id, wire.RoleMem)
	waitSessions(t, m, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := m.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if n := len(m.Sessions()); n != 0 {
		t.Fatalf("%d sessions after Shutdown", n)
	}
	f := readFail(t, rpc)
	if !strings.Contains(f.Message, "shutting down") {
		t.Fatalf("fail on shutdown = %+v", f)
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Fatal("the listener still accepts after Shutdown")
	}
}

func TestDestAddr(t *testing.T) {
	for in, want := range map[string]string{
		"hostB":          "hostB:12345",
		"hostB:7000":     "hostB:7000",
		"10.0.0.2":       "10.0.0.2:12345",
		"::1":            "[::1]:12345",
		"[::1]":          "[::1]:12345",
		"[fe80::1]:7000": "[fe80::1]:7000",
	} {
		if got, err := destAddr(in); err != nil || got != want {
			t.Errorf("destAddr(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "hostB:port", "hostB:99999"} {
		if _, err := destAddr(bad); err == nil {
			t.Errorf("destAddr(%q) succeeded", bad)
		}
	}
}

// TestCheckPID refuses what must not be migrated before anything starts.
func TestCheckPID(t *testing.T) {
	m, _ := newTestManager(t, time.Second)
	cases := []struct {
		pid  int
		code api.Code
		want string
	}{
		{0, api.CodeInvalid, "give the pid"},
		{1, api.CodeInvalid, "init"},
		{2, api.CodeInvalid, "kernel thread"}, // kthreadd
		{os.Getpid(), api.CodeInvalid, "phauld itself"},
		{os.Getppid(), api.CodeInvalid, "ancestor of phauld"},
		{1 << 22, api.CodeNotFound, "no process"},
	}
	// A thread of this process (the runtime always has several).
	tasks, _ := os.ReadDir("/proc/self/task")
	for _, e := range tasks {
		if tid, _ := strconv.Atoi(e.Name()); tid != os.Getpid() && tid > 0 {
			cases = append(cases, struct {
				pid  int
				code api.Code
				want string
			}{tid, api.CodeInvalid, "is a thread of process"})
			break
		}
	}
	if len(cases) != 7 {
		t.Fatalf("no thread of this process found in /proc/self/task: %v", tasks)
	}
	for _, c := range cases {
		_, err := m.checkPID(c.pid)
		if api.CodeOf(err) != c.code || err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("checkPID(%d) = %v; want %s mentioning %q", c.pid, err, c.code, c.want)
		}
	}
	child := exec.Command("sleep", "30")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { child.Process.Kill(); child.Wait() }()
	if info, err := m.checkPID(child.Process.Pid); err != nil || info.PID != child.Process.Pid {
		t.Errorf("checkPID(child) = %+v, %v", info, err)
	}
}

// TestLoneHalvesAndShutdown opens many lone connections whose pairs time
// out at once, while phauld stops: a connection dropped while its reply is
// being written belongs to its handshake goroutine, which closes it; no
// descriptor is closed twice (the race detector watches), every client
// sees its own reply or the end of its connection, and Shutdown returns.
func TestLoneHalvesAndShutdown(t *testing.T) {
	m, addr := newTestManager(t, time.Millisecond)
	var wg sync.WaitGroup
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				return // the listener closed
			}
			defer c.Close()
			wire.WriteMessage(c, &wire.Hello{Proto: wire.Version, Role: wire.RoleRPC, Session: newID(t)})
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			msg, err := wire.ReadMessage(c, wire.Handshake)
			if err != nil {
				return
			}
			if _, ok := msg.(*wire.HelloReply); !ok {
				t.Errorf("a client read %s, not its reply", msg.Type())
			}
			// Then nothing more: the connection ends.
			if m, err := wire.ReadMessage(c, wire.Handshake); err == nil {
				t.Errorf("a client read a second message (%s): another connection's", m.Type())
			}
		}()
	}
	time.Sleep(5 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
}

// TestBWLimitRefused: a rate the pacer cannot keep to is refused before
// the process is even looked at.
func TestBWLimitRefused(t *testing.T) {
	m, addr := newTestManager(t, time.Second)
	for _, rate := range []int64{-1, 1, transport.MinRate - 1} {
		_, err := m.Migrate(context.Background(), api.Caller{}, api.MigrateRequest{PID: os.Getpid(), To: addr, BWLimit: rate}, nil)
		var ae *api.Error
		if !errors.As(err, &ae) || ae.Code != api.CodeInvalid || !strings.Contains(err.Error(), "--bwlimit") {
			t.Errorf("--bwlimit %d B/s: %v, want an invalid --bwlimit", rate, err)
		}
	}
}

// TestCompressRefused: an unknown compression is refused before the
// process is looked at.
func TestCompressRefused(t *testing.T) {
	m, addr := newTestManager(t, time.Second)
	_, err := m.Migrate(context.Background(), api.Caller{}, api.MigrateRequest{PID: os.Getpid(), To: addr, Compress: "gzip"}, nil)
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Code != api.CodeInvalid || !strings.Contains(err.Error(), "want zstd or none") {
		t.Errorf("--compress gzip: %v, want an invalid --compress", err)
	}
}
