package systemd

import (
	"github.com/phaul/phaul/pkg/api"
	"net"
	"path/filepath"
	"testing"
)

func listen(t *testing.T, network, addr string) net.Listener {
	t.Helper()
	l, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func TestSplitByFamily(t *testing.T) {
	dir := t.TempDir()
	tcp4 := listen(t, "tcp", "127.0.0.1:0")
	tcp6 := listen(t, "tcp", "127.0.0.1:0")
	ctl := listen(t, "unix", filepath.Join(dir, "c.sock"))
	mig, c, err := Split(map[string][]net.Listener{
		"phauld.socket": {tcp4, ctl},
		"extra":         {tcp6},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(mig) != 2 || c != ctl {
		t.Fatalf("Split = %v, %v; want both TCP listeners and the unix one", mig, c)
	}
}

func TestSplitEmpty(t *testing.T) {
	mig, c, err := Split(nil)
	if err != nil || mig != nil || c != nil {
		t.Fatalf("Split(nil) = %v, %v, %v", mig, c, err)
	}
}

func TestSplitRejects(t *testing.T) {
	dir := t.TempDir()
	a := listen(t, "unix", filepath.Join(dir, "a.sock"))
	b := listen(t, "unix", filepath.Join(dir, "b.sock"))
	if _, _, err := Split(map[string][]net.Listener{"x": {a, b}}); err == nil {
		t.Error("two control sockets accepted")
	}
	pkt := listen(t, "unixpacket", filepath.Join(dir, "p.sock"))
	if _, _, err := Split(map[string][]net.Listener{"x": {pkt}}); err == nil {
		t.Error("a seqpacket socket accepted as the control socket")
	}
}

func TestStatusLine(t *testing.T) {
	listen := []string{"[::]:12345"}
	if got, want := StatusLine(listen, nil), "serving migrations on [::]:12345; idle"; got != want {
		t.Errorf("idle: %q, want %q", got, want)
	}
	got := StatusLine(listen, []api.Session{
		{ID: "0123456789abcdef0123456789abcdef", Direction: "out", PID: 42, Phase: "dump"},
		{ID: "fedcba9876543210fedcba9876543210", Direction: "in", PID: 7, Phase: "restore"},
	})
	if want := "serving migrations on [::]:12345; 2 migration(s): 01234567 out pid 42 dump, fedcba98 in pid 7 restore"; got != want {
		t.Errorf("busy: %q, want %q", got, want)
	}
}
