//go:build linux

package session

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest/observer"

	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/pkg/wire"
)

// testPKI makes a CA with a certificate for 127.0.0.1, and returns it
// with the CA's directory.
func testPKI(t *testing.T) (*pki.Loaded, string) {
	t.Helper()
	dir := t.TempDir()
	if err := pki.Init(dir, []string{"127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	id, err := pki.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	return id, dir
}

// newTLSManager is a manager serving mutual TLS on loopback; its log lines
// are observable.
func newTLSManager(t *testing.T, id *pki.Loaded) (*Manager, string, *observer.ObservedLogs) {
	t.Helper()
	return newAdmitManager(t, id, Admission{})
}

// TestTLSPairs opens a migration's two connections over mutual TLS with
// the manager's own dial, and checks they pair into a session.
func TestTLSPairs(t *testing.T) {
	id, _ := testPKI(t)
	m, addr, _ := newTLSManager(t, id)
	sid := newID(t)
	ctx := context.Background()
	rpc, err := m.dial(ctx, addr, sid, wire.RoleRPC)
	if err != nil {
		t.Fatal(err)
	}
	defer rpc.Close()
	mem, err := m.dial(ctx, addr, sid, wire.RoleMem)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	waitSessions(t, m, 1)
	if rpc.TLSVersion() != tls.VersionTLS13 {
		t.Fatal("the rpc connection is not TLS 1.3")
	}
}

// TestTLSRefusals: a client without a certificate, with one from another
// CA, with an expired one, and one speaking plain TCP are all refused
// before anything of the protocol is read, each with a log line saying
// why; no session starts.
func TestTLSRefusals(t *testing.T) {
	id, caDir := testPKI(t)
	m, addr, logs := newTLSManager(t, id)

	otherDir := t.TempDir()
	if err := pki.Init(otherDir, []string{"127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	other, _ := pki.Load(otherDir)
	expiredDir := filepath.Join(t.TempDir(), "x")
	if err := pki.IssueValid(caDir, expiredDir, []string{"127.0.0.1"}, time.Now().Add(-48*time.Hour), time.Now().Add(-time.Hour)); err != nil {
		t.Fatal(err)
	}
	expired, _ := pki.Load(expiredDir)

	hello, _ := wire.Marshal(&wire.Hello{Proto: 1, Role: wire.RoleRPC, Session: newID(t)})
	cases := []struct {
		name string
		cfg  *tls.Config // nil: plain TCP
		want string
	}{
		{"no certificate", &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: id.CAs, ServerName: "127.0.0.1"}, "didn't provide a certificate"},
		{"another CA", withRoots(other.ClientConfig("127.0.0.1"), id), "unknown authority"},
		{"expired", expired.ClientConfig("127.0.0.1"), "expired"},
		{"plain TCP", nil, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			n := logs.FilterMessage("connection refused").Len()
			raw, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer raw.Close()
			raw.SetDeadline(time.Now().Add(5 * time.Second))
			var conn io.ReadWriter = raw
			if c.cfg != nil {
				tc := tls.Client(raw, c.cfg)
				tc.Handshake() // TLS 1.3: the client may not see the refusal yet
				conn = tc
			}
			conn.Write(hello)
			b, err := io.ReadAll(conn)
			if c.cfg == nil {
				// A plain peer is told, in plain, that TLS is required;
				// it learns nothing else.
				if r := refusalOf(b); r == nil || r.Code != wire.RefusedNeedsTLS {
					t.Fatalf("a plain peer got %q (%v), want a tls_required refusal", b, err)
				}
				waitLog(t, logs, "the peer runs with --insecure")
				return
			}
			if len(b) > 0 && bytes.HasPrefix(b, []byte("PH")) {
				t.Fatalf("the daemon answered the protocol: %q (%v)", b, err)
			}
			deadline := time.Now().Add(5 * time.Second)
			for logs.FilterMessage("connection refused").Len() == n {
				if time.Now().After(deadline) {
					t.Fatal("no log line for the refused connection")
				}
				time.Sleep(10 * time.Millisecond)
			}
			entry := logs.FilterMessage("connection refused").All()[n]
			if got := entry.ContextMap()["error"]; !strings.Contains(got.(string), c.want) {
				t.Errorf("logged %q, want it to say %q", got, c.want)
			}
			if len(m.Sessions()) != 0 {
				t.Fatal("a session started")
			}
		})
	}
}

func withRoots(cfg *tls.Config, trust *pki.Loaded) *tls.Config {
	cfg.RootCAs = trust.CAs
	return cfg
}

// waitLog waits up to 5 s for a log line whose message contains snippet.
func waitLog(t *testing.T, logs *observer.ObservedLogs, snippet string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for logs.FilterMessageSnippet(snippet).Len() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no log line says %q", snippet)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
