//go:build linux

package session

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/migrate"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/wire"
)

// newLimitedManager is newTestManager with limits on sessions.
func newLimitedManager(t *testing.T, maxIn, maxOut int) (*Manager, string) {
	t.Helper()
	m, err := NewManager(Config{
		Log:              zaptest.NewLogger(t),
		CRIU:             migrate.FromClient(criu.New("/nonexistent/criu")),
		Info:             criu.Info{Version: criu.Version{Major: 4, Minor: 2}},
		StateDir:         t.TempDir(),
		PairTimeout:      10 * time.Second,
		HandshakeTimeout: 2 * time.Second,
		PeerTimeout:      10 * time.Second,
		Insecure:         true,
		MaxIncoming:      maxIn,
		MaxOutgoing:      maxOut,
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go m.Serve(l)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := m.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})
	return m, l.Addr().String()
}

// pair opens both connections of an incoming migration and returns its
// rpc connection.
func pair(t *testing.T, addr string) (rpc, mem net.Conn) {
	t.Helper()
	id := newID(t)
	rpc, r1 := hello(t, addr, id, wire.RoleRPC)
	mem, r2 := hello(t, addr, id, wire.RoleMem)
	if !r1.OK || !r2.OK {
		t.Fatalf("hello refused: %s %s", r1.Error, r2.Error)
	}
	return rpc, mem
}

// TestIncomingLimit: with --max-incoming 1, a second migration arriving
// while one runs is refused at its Prepare, with a Fail that names the
// limit and its flag; once the first has ended, the next is taken.
func TestIncomingLimit(t *testing.T) {
	m, addr := newLimitedManager(t, 1, 0)
	rpcX, memX := pair(t, addr)
	waitSessions(t, m, 1)
	rpcY, _ := pair(t, addr)
	if err := wire.WriteMessage(rpcY, &wire.Prepare{PID: 42}); err != nil {
		t.Fatal(err)
	}
	f := readFail(t, rpcY)
	if f.Code != "unavailable" || !strings.Contains(f.Message, "--max-incoming") {
		t.Fatalf("second migration: fail %+v, want unavailable naming --max-incoming", f)
	}
	rpcX.Close()
	memX.Close()
	waitSessions(t, m, 0)
	rpcZ, _ := pair(t, addr)
	if err := wire.WriteMessage(rpcZ, &wire.Prepare{PID: 42}); err != nil {
		t.Fatal(err)
	}
	// Its CRIU does not exist: it fails further on, but it was taken.
	if f := readFail(t, rpcZ); strings.Contains(f.Message, "--max-incoming") {
		t.Fatalf("after the first ended: %+v", f)
	}
}

// TestOutgoingLimit: outgoing migrations past the limit are refused,
// naming the flag, until one gives its slot back.
func TestOutgoingLimit(t *testing.T) {
	m, _ := newLimitedManager(t, 0, 2)
	r1, err := m.admitOut()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.admitOut(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.admitOut(); err == nil || !strings.Contains(err.Error(), "--max-outgoing") {
		t.Fatalf("third: %v, want a refusal naming --max-outgoing", err)
	}
	r1()
	r1()
	if _, err := m.admitOut(); err != nil {
		t.Fatalf("after a release: %v", err)
	}
	if _, err := m.admitOut(); err == nil {
		t.Fatal("a slot given back twice counted twice")
	}
}

// TestCleanFailedAtOnce: with --keep-failed 0, a failed session's images
// and logs go at the janitor's first look, its record stays RecordKeep
// (a source in doubt may still ask), then goes too; the janitor looks
// often when little is kept.
func TestCleanFailedAtOnce(t *testing.T) {
	m, _ := newTestManager(t, time.Second)
	_, recent := sessionDir(t, m, &store.Record{Role: store.RoleDest, State: store.Aborted}, time.Minute)
	_, old := sessionDir(t, m, &store.Record{Role: store.RoleDest, State: store.Aborted}, 2*RecordKeep)
	_, running := sessionDir(t, m, &store.Record{Role: store.RoleSource, State: store.Dumping}, 2*RecordKeep)
	for _, dir := range []string{recent, old, running} {
		if err := os.WriteFile(filepath.Join(dir, "pages-1.img"), make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	m.CleanOld(0)
	if _, err := os.Stat(filepath.Join(recent, "pages-1.img")); !os.IsNotExist(err) {
		t.Errorf("a failed session's pages are still there: %v", err)
	}
	if _, err := store.Load(recent); err != nil {
		t.Errorf("its record went too: %v", err)
	}
	if _, err := os.Stat(old); !os.IsNotExist(err) {
		t.Errorf("a failed session's directory older than RecordKeep is still there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(running, "pages-1.img")); err != nil {
		t.Errorf("a session the commit rule still needs lost its images: %v", err)
	}
	for keep, want := range map[time.Duration]time.Duration{0: time.Minute, 30 * time.Minute: 3 * time.Minute, 7 * 24 * time.Hour: time.Hour} {
		if got := JanitorEvery(keep); got != want {
			t.Errorf("JanitorEvery(%v) = %v, want %v", keep, got, want)
		}
	}
}
