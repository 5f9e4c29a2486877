package pki

import (
	"crypto/tls"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// handshake runs a TLS handshake between a server and a client config
// over a pipe and returns each side's error.
func handshake(t *testing.T, server, client *tls.Config) (serr, cerr error) {
	t.Helper()
	// Real sockets: their buffers let both sides write at once (an
	// alert while the other writes data), which net.Pipe does not.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	b, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	a, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	a.SetDeadline(time.Now().Add(10 * time.Second))
	b.SetDeadline(time.Now().Add(10 * time.Second))
	done := make(chan error, 1)
	go func() {
		s := tls.Server(a, server)
		err := s.Handshake()
		if err == nil {
			// TLS 1.3 servers verify the client's certificate after
			// the client thinks it is done: read to see the verdict.
			s.Read(make([]byte, 1))
		}
		a.Close()
		done <- err
	}()
	c := tls.Client(b, client)
	cerr = c.Handshake()
	if cerr == nil {
		c.Write([]byte("x"))
		_, cerr = c.Read(make([]byte, 1))
		if cerr != nil && strings.Contains(cerr.Error(), "EOF") {
			cerr = nil
		}
	}
	b.Close()
	return <-done, cerr
}

func TestInitIssueLoad(t *testing.T) {
	dir := t.TempDir()
	if err := Init(dir, []string{"hostA", "10.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	for f, mode := range map[string]os.FileMode{CAFile: 0o644, CAKeyFile: 0o600, CertFile: 0o644, KeyFile: 0o600} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil || fi.Mode().Perm() != mode {
			t.Errorf("%s: %v, mode %v; want %v", f, err, fi.Mode().Perm(), mode)
		}
	}
	if err := Init(dir, []string{"hostA"}); !errors.Is(err, ErrExists) {
		t.Fatalf("second Init = %v, want ErrExists", err)
	}
	out := filepath.Join(t.TempDir(), "b")
	if err := Issue(dir, out, []string{"hostB"}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(out, CAKeyFile)); !os.IsNotExist(err) {
		t.Fatal("the CA key was copied to another host's directory")
	}
	a, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Load(out)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(a.Names(), ","); got != "hostA,10.0.0.1" {
		t.Errorf("A's names = %s", got)
	}
	// B serves, A connects by B's name: both verify.
	if s, c := handshake(t, b.ServerConfig(), a.ClientConfig("hostB")); s != nil || c != nil {
		t.Fatalf("mutual TLS between A and B: server %v, client %v", s, c)
	}
	// A by its IP address.
	if s, c := handshake(t, a.ServerConfig(), b.ClientConfig("10.0.0.1")); s != nil || c != nil {
		t.Fatalf("mutual TLS to A's address: server %v, client %v", s, c)
	}
	// The wrong name is refused by the client.
	if _, c := handshake(t, b.ServerConfig(), a.ClientConfig("hostC")); c == nil || !strings.Contains(c.Error(), "hostC") {
		t.Fatalf("connecting to B as hostC: %v, want a name mismatch", c)
	}
}

func TestRefusals(t *testing.T) {
	caDir := t.TempDir()
	if err := Init(caDir, []string{"hostA"}); err != nil {
		t.Fatal(err)
	}
	a, _ := Load(caDir)
	other := t.TempDir()
	if err := Init(other, []string{"hostB"}); err != nil {
		t.Fatal(err)
	}
	stranger, _ := Load(other)
	expiredDir := filepath.Join(t.TempDir(), "x")
	if err := IssueValid(caDir, expiredDir, []string{"hostB"}, time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	expired, _ := Load(expiredDir)

	cases := []struct {
		name   string
		client *tls.Config
		want   string
	}{
		{"another CA", stranger.ClientConfig("hostA"), "unknown authority"},
		{"expired", expired.ClientConfig("hostA"), "expired"},
		{"no certificate", &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: a.CAs, ServerName: "hostA"}, "certificate"},
	}
	for _, c := range cases {
		// A's own trust must not matter for what the server refuses:
		// trust the server from the client side where it can.
		c.client.RootCAs = a.CAs
		serr, _ := handshake(t, a.ServerConfig(), c.client)
		if serr == nil || !strings.Contains(serr.Error(), c.want) {
			t.Errorf("%s: server said %v, want a refusal mentioning %q", c.name, serr, c.want)
		}
	}
}
