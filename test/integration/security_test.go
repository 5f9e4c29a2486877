//go:build linux

package integration

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/wire"
)

// capture records the packets on loopback to or from port with tcpdump,
// until stop is called; stop returns the capture file's bytes.
func capture(t *testing.T, port string) (stop func() []byte) {
	return captureSaid(t, port, new(string))
}

// captureSaid is capture; said gets what tcpdump printed at its end (its
// counts of packets captured and dropped).
func captureSaid(t *testing.T, port string, said *string) (stop func() []byte) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "lo.pcap")
	// A 64 MiB capture buffer: with the default one, a fast migration on
	// a busy machine loses packets and the capture would prove less.
	cmd := exec.Command("tcpdump", "-i", "lo", "-s", "0", "-B", "65536", "-U", "-w", file, "tcp port "+port)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatalf("tcpdump: %v", err)
	}
	// tcpdump says "listening on lo" once it captures.
	waitFor(t, "tcpdump to listen", 10*time.Second, func() bool { return strings.Contains(errb.String(), "listening on") })
	return func() []byte {
		time.Sleep(200 * time.Millisecond)
		cmd.Process.Signal(syscall.SIGINT)
		cmd.Wait()
		*said = strings.Join(strings.Fields(errb.String()), " ")
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
}

// TestEncryptedMigration migrates a process whose memory is full of a
// known marker over mutual TLS, capturing the loopback traffic to the
// destination's port: the marker must not appear on the wire, and the
// process must arrive intact. The same migration with --insecure daemons
// is the control: there the capture must show the marker, so the capture
// would have caught a leak.
func TestEncryptedMigration(t *testing.T) {
	integration(t)
	marker := "PHAUL-SECRET-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	for _, mode := range []struct {
		name     string
		insecure bool
		port     int
	}{{"mutual TLS", false, 17401}, {"insecure control", true, 17411}} {
		t.Run(mode.name, func(t *testing.T) {
			a := startDaemon(t, "A", "127.0.0.1:"+strconv.Itoa(mode.port), daemonOpts{insecure: mode.insecure})
			b := startDaemon(t, "B", "127.0.0.2:"+strconv.Itoa(mode.port+1), daemonOpts{insecure: mode.insecure})
			w := startWorkload(t, workloadOpts{memMiB: 16, extra: []string{"--marker", marker}})
			before := w.report(w.pid, w.status)
			var tcpdumpSaid string
			stop := captureSaid(t, strconv.Itoa(mode.port+1), &tcpdumpSaid)
			res := a.migrate(t, w.pid, b)
			w.track(res.DestPID)
			pcap := stop()
			waitRunning(t, res.DestPID)
			after := w.report(res.DestPID, w.status)
			if after.Token != before.Token || after.Sum != before.Sum {
				t.Fatalf("the process arrived changed: %+v, was %+v", after, before)
			}
			if len(pcap) < 16<<20 {
				t.Fatalf("captured only %d bytes of a 16 MiB migration (tcpdump: %s)", len(pcap), tcpdumpSaid)
			}
			seen := bytes.Count(pcap, []byte(marker))
			t.Logf("%s: %d bytes captured, marker seen %d times", mode.name, len(pcap), seen)
			if mode.insecure && seen == 0 {
				t.Fatal("the control capture does not show the marker: the capture proves nothing")
			}
			if !mode.insecure && seen != 0 {
				t.Fatalf("process memory crossed the network in clear: the marker appears %d times", seen)
			}
		})
	}
}

// TestUntrustedPeersRefused offers the destination a peer without a
// certificate, one from another CA, an expired one, and plain TCP: each is
// refused before any session starts, with a log line saying why. A real
// source daemon with another CA's certificate gets a clear error, and a
// source refuses a destination whose certificate does not name the
// address it dialled.
func TestUntrustedPeersRefused(t *testing.T) {
	integration(t)
	b := startDaemon(t, "B", "127.0.0.2:17422", daemonOpts{})
	trust, err := pki.Load(bins.ca)
	if err != nil {
		t.Fatal(err)
	}
	otherCA := t.TempDir()
	if err := pki.Init(otherCA, []string{"127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	other, _ := pki.Load(otherCA)
	expiredDir := filepath.Join(t.TempDir(), "expired")
	if err := pki.IssueValid(bins.ca, expiredDir, []string{"127.0.0.1"}, time.Now().Add(-72*time.Hour), time.Now().Add(-time.Hour)); err != nil {
		t.Fatal(err)
	}
	expired, _ := pki.Load(expiredDir)
	hello, _ := wire.Marshal(&wire.Hello{Proto: 1, Role: wire.RoleRPC, Session: wire.SessionID{1}})

	cases := []struct {
		name string
		cfg  *tls.Config
		want string
	}{
		{"no certificate", &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: trust.CAs, ServerName: "127.0.0.2"}, "didn't provide a certificate"},
		{"another CA", withRoots(other.ClientConfig("127.0.0.2"), trust), "unknown authority"},
		{"expired", expired.ClientConfig("127.0.0.2"), "expired"},
		{"plain TCP", nil, "the peer runs with --insecure"},
	}
	for _, c := range cases {
		before := strings.Count(b.log(), "connection refused")
		raw, err := net.Dial("tcp", b.addr)
		if err != nil {
			t.Fatal(err)
		}
		raw.SetDeadline(time.Now().Add(10 * time.Second))
		var conn io.ReadWriter = raw
		if c.cfg != nil {
			tc := tls.Client(raw, c.cfg)
			tc.Handshake()
			conn = tc
		}
		conn.Write(hello)
		io.ReadAll(conn)
		raw.Close()
		waitFor(t, "the refusal of "+c.name+" in the log", 10*time.Second, func() bool {
			return strings.Count(b.log(), "connection refused") > before
		})
		lines := strings.Split(b.log(), "\n")
		var last string
		for _, l := range lines {
			if strings.Contains(l, "connection refused") {
				last = l
			}
		}
		if !strings.Contains(last, c.want) {
			t.Errorf("%s: logged %q, want it to say %q", c.name, last, c.want)
		}
	}

	// A real source daemon whose certificate comes from another CA.
	strangerDir := filepath.Join(t.TempDir(), "stranger")
	if err := pki.Issue(otherCA, strangerDir, []string{"127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	a := startDaemon(t, "A", "127.0.0.1:17421", daemonOpts{tlsDir: strangerDir})
	w := startWorkload(t, workloadOpts{memMiB: 16})
	r := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(w.pid), "--to", b.addr)
	if r.code == 0 || !strings.Contains(r.stderr, "trusted connection") {
		t.Errorf("migration from an untrusted source: exit %d, %q", r.code, r.stderr)
	}
	if strings.Contains(b.log(), "incoming migration") {
		t.Error("a session started with an untrusted peer")
	}
	waitRunning(t, w.pid)

	// A destination whose certificate is for another address.
	c := startDaemon(t, "C", "127.0.0.1:17423", daemonOpts{})
	wrongDir := filepath.Join(t.TempDir(), "wrong")
	if err := pki.Issue(bins.ca, wrongDir, []string{"127.0.0.9"}); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, "D", "127.0.0.2:17424", daemonOpts{tlsDir: wrongDir})
	r = c.phaulctl(t, "migrate", "--pid", strconv.Itoa(w.pid), "--to", d.addr)
	if r.code == 0 || !strings.Contains(r.stderr, "127.0.0.2") || !strings.Contains(r.stderr, "valid for") {
		t.Errorf("migration to a destination with another address's certificate: exit %d, %q", r.code, r.stderr)
	}
	waitRunning(t, w.pid)
}

func withRoots(cfg *tls.Config, trust *pki.Loaded) *tls.Config {
	cfg.RootCAs = trust.CAs
	return cfg
}

// TestNoCertificatesNoMigrations starts phauld without certificates and
// without --insecure: it serves no migrations, and says what to run.
func TestNoCertificatesNoMigrations(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17431", daemonOpts{tlsDir: t.TempDir()})
	b := startDaemon(t, "B", "127.0.0.2:17432", daemonOpts{})
	r := a.phaulctl(t, "status", "--json")
	var st api.Status
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatal(err)
	}
	if st.Security != api.SecurityDisabled || !strings.Contains(st.Disabled, "phaulctl pki init") || !strings.Contains(st.Disabled, "--insecure") {
		t.Errorf("status of a daemon without certificates: %q, %q", st.Security, st.Disabled)
	}
	w := startWorkload(t, workloadOpts{memMiB: 16})
	r = a.phaulctl(t, "migrate", "--pid", strconv.Itoa(w.pid), "--to", b.addr)
	if r.code == 0 || !strings.Contains(r.stderr, "phaulctl pki init") {
		t.Errorf("migrate from it: exit %d, %q; want what to run", r.code, r.stderr)
	}
	conn, err := net.Dial("tcp", a.addr)
	if err == nil {
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		io.ReadAll(conn)
		conn.Close()
	}
	waitFor(t, "the refusal in the log", 10*time.Second, func() bool {
		return strings.Contains(a.log(), "migrations are disabled")
	})
	if !strings.Contains(a.log(), "phaulctl pki init") {
		t.Error("the log does not say what to run")
	}
}

// TestControlSocketPermissions: the control socket is 0660, root:phaul;
// a user outside group phaul is refused (by the socket, with a message
// saying what to do); a member may use phauld and migrate its own
// processes, not root's.
func TestControlSocketPermissions(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17441", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:17442", daemonOpts{})
	// Other users must reach the socket's directory.
	openUp(filepath.Dir(a.Socket), 0o755)
	g, err := user.LookupGroup("phaul")
	if err != nil {
		t.Fatalf("phauld did not create group phaul: %v", err)
	}
	gid, _ := strconv.Atoi(g.Gid)
	fi, err := os.Stat(a.Socket)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Perm() != 0o660 || st.Uid != 0 || int(st.Gid) != gid {
		t.Errorf("control socket mode %v uid %d gid %d; want 0660 root:phaul(%d)", fi.Mode().Perm(), st.Uid, st.Gid, gid)
	}

	const outsiderUID, memberUID = 54321, 54322
	as := func(uid int, groups []uint32, args ...string) ctlResult {
		cmd := exec.Command(bins.phaulctl, append([]string{"--socket", a.Socket}, args...)...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), Groups: groups}}
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		r := ctlResult{stdout: out.String(), stderr: errb.String()}
		if ee, ok := err.(*exec.ExitError); ok {
			r.code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return r
	}

	r := as(outsiderUID, nil, "status")
	if r.code == 0 || !strings.Contains(r.stderr, "usermod -aG phaul") {
		t.Errorf("outsider: exit %d, %q; want refused, saying what to do", r.code, r.stderr)
	}
	member := []uint32{uint32(gid)}
	if r := as(memberUID, member, "status"); r.code != 0 {
		t.Errorf("member status: exit %d, %q", r.code, r.stderr)
	}

	// Root's process: refused before anything happens.
	w := startWorkload(t, workloadOpts{memMiB: 16})
	r = as(memberUID, member, "migrate", "--pid", strconv.Itoa(w.pid), "--to", b.addr, "--json")
	var out struct{ Error *api.Error }
	json.Unmarshal([]byte(r.stdout), &out)
	if r.code == 0 || out.Error == nil || out.Error.Code != api.CodePermission {
		t.Errorf("member migrating root's process: exit %d, %s; want permission_denied", r.code, r.stdout)
	}
	if strings.Contains(a.log(), "outgoing migration") {
		t.Error("a migration started for a process the caller does not own")
	}

	// phaulctl run: the member's program runs as the member, its log
	// opened with the member's rights; --net is root's.
	runDir := t.TempDir()
	openUp(runDir, 0o777)
	r = as(memberUID, member, "run", "--log", filepath.Join(runDir, "out.log"), "--", "sleep", "600")
	ran, err := strconv.Atoi(strings.TrimSpace(r.stdout))
	if r.code != 0 || err != nil {
		t.Fatalf("member phaulctl run: exit %d: %s %s", r.code, r.stdout, r.stderr)
	}
	t.Cleanup(func() { syscall.Kill(ran, syscall.SIGKILL) })
	if real, eff, err := proc.UIDs(ran); err != nil || real != memberUID || eff != memberUID {
		t.Errorf("the member's program runs as uid %d/%d (%v); want %d", real, eff, err, memberUID)
	}
	if fi, err := os.Stat(filepath.Join(runDir, "out.log")); err != nil || fi.Sys().(*syscall.Stat_t).Uid != memberUID {
		t.Errorf("the member's log: %v; want it made by uid %d", err, memberUID)
	}
	if r := as(memberUID, member, "run", "--log", "/root/phaul-member.log", "--", "true"); r.code == 0 || !strings.Contains(r.stderr, "permission denied") {
		t.Errorf("member run with a log it may not write: exit %d, %s; want refused", r.code, r.stderr)
	}
	if r := as(memberUID, member, "run", "--net", "lo", "--", "sleep", "1"); r.code == 0 || !strings.Contains(r.stderr, "root's only") {
		t.Errorf("member run --net: exit %d, %s; want refused, root's only", r.code, r.stderr)
	}

	// Its own process: allowed. CRIU can dump only root's trees on a
	// machine whose root lacks CAP_SYS_RESOURCE (this VM): there the dump
	// fails after the authorization, and the process resumes.
	dir := t.TempDir()
	openUp(dir, 0o777)
	status := filepath.Join(dir, "status.json")
	own := exec.Command(bins.workload, "--mem", "8", "--status", status)
	own.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: &syscall.Credential{Uid: memberUID, Gid: memberUID}}
	own.Dir = dir
	if err := own.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { own.Process.Kill(); own.Wait() }()
	waitFor(t, "the member's workload", 10*time.Second, func() bool { _, err := os.Stat(status); return err == nil })
	// --detach-terminal FILE is root's: the destination opens FILE as root.
	r = as(memberUID, member, "migrate", "--pid", strconv.Itoa(own.Process.Pid), "--to", b.addr, "--detach-terminal", "/tmp/x.out", "--json")
	out.Error = nil
	json.Unmarshal([]byte(r.stdout), &out)
	if r.code == 0 || out.Error == nil || out.Error.Code != api.CodePermission || !strings.Contains(out.Error.Message, "root's only") {
		t.Errorf("member with --detach-terminal FILE: exit %d, %s; want permission_denied, root's only", r.code, r.stdout)
	}

	r = as(memberUID, member, "migrate", "--pid", strconv.Itoa(own.Process.Pid), "--to", b.addr, "--json")
	out.Error = nil
	json.Unmarshal([]byte(r.stdout), &out)
	switch {
	case r.code == 0:
		var res api.Result
		json.Unmarshal([]byte(r.stdout), &res)
		t.Logf("the member's own process migrated (pid %d on the destination)", res.DestPID)
		if tree, err := proc.OpenTree(res.DestPID, 0); err == nil {
			proc.SignalAll(tree, syscall.SIGKILL)
			proc.CloseAll(tree)
		}
	case out.Error != nil && out.Error.Code == api.CodePermission:
		t.Errorf("member migrating its own process was refused: %s", out.Error.Message)
	case out.Error != nil && strings.Contains(out.Error.Message, "lacks CAP_SYS_RESOURCE") && r.code == 1:
		// Refused before the freeze, saying why.
		t.Logf("authorized; the dump itself needs CAP_SYS_RESOURCE, which root lacks here: %s", out.Error.Message)
		waitRunning(t, own.Process.Pid)
	default:
		t.Errorf("member migrating its own process: exit %d, %s", r.code, r.stdout)
	}
}

// openUp lets other users into dir (mode), and through its parent (a
// t.TempDir's, made 0700).
func openUp(dir string, mode os.FileMode) {
	os.Chmod(dir, mode)
	os.Chmod(filepath.Dir(dir), 0o755)
}
