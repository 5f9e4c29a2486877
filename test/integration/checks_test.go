//go:build linux

package integration

import (
	"bytes"
	"debug/elf"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/test/harness"
)

// refusedBeforeFreeze migrates pid from a to b and checks that it is
// refused (exit 1) with a message saying each of want, and that the
// process was never frozen: sampled every millisecond during the call it
// was never seen stopped or traced (CRIU's freeze), no dump was started
// (no session of a's has a dump log), and the history's entry for it
// says it was not frozen.
func refusedBeforeFreeze(t *testing.T, a, b *daemon, pid int, want ...string) {
	t.Helper()
	var stopped, samples int
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			case <-time.After(time.Millisecond):
			}
			if info, err := proc.Stat(pid); err == nil {
				samples++
				if info.Stopped() {
					stopped++
				}
			}
		}
	}()
	r := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(pid), "--to", b.addr)
	close(done)
	wg.Wait()
	if r.code != 1 {
		t.Fatalf("migrate pid %d: exit %d: %s %s; want refused (1)", pid, r.code, r.stdout, r.stderr)
	}
	for _, w := range want {
		if !strings.Contains(r.stderr, w) {
			t.Errorf("the refusal does not say %q:\n%s", w, r.stderr)
		}
	}
	t.Logf("refused: %s", strings.TrimSpace(r.stderr))
	if stopped > 0 || samples == 0 {
		t.Errorf("pid %d was seen stopped in %d of %d samples during the refusal; want never", pid, stopped, samples)
	}
	if info, err := proc.Stat(pid); err != nil || info.Stopped() {
		t.Errorf("pid %d after the refusal: %+v, %v; want it running", pid, info, err)
	}
	if logs, _ := filepath.Glob(filepath.Join(a.state, "sessions", "*", "dump.log")); len(logs) != 0 {
		t.Errorf("the refused migration started a dump: %v", logs)
	}
	var hist []api.HistoryEntry
	h := a.phaulctl(t, "history", "--json")
	if err := json.Unmarshal([]byte(h.stdout), &hist); err != nil || len(hist) != 1 {
		t.Fatalf("history: %v: %s; want the refused migration's entry", err, h.stdout)
	}
	if hist[0].Result.FrozenMS != 0 || hist[0].Outcome == api.OutcomeCommitted {
		t.Errorf("the refused migration's entry: %+v; want it not frozen, not committed", hist[0])
	}
}

// startSetsid starts args in a session of its own and returns its pid; it
// is killed at the end.
func startSetsid(t *testing.T, dir string, args ...string) int {
	t.Helper()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd.Process.Pid
}

// startNSInit starts args (unshare ... --fork ...) in a session of its
// own and returns its pid and that of its child, the init of the pid
// namespace it made; both are killed at the end.
func startNSInit(t *testing.T, args ...string) (parent, init int) {
	t.Helper()
	parent = startSetsid(t, t.TempDir(), args...)
	init, err := harness.OnlyChild(parent, 10*time.Second)
	if err != nil {
		t.Fatalf("the namespace's init: %v", err)
	}
	t.Cleanup(func() { syscall.Kill(init, syscall.SIGKILL) })
	return parent, init
}

// What CRIU would refuse only with the tree frozen, phaul refuses first,
// saying the cause and what to do.
func TestRefusedBeforeTheFreeze(t *testing.T) {
	integration(t)

	// The init of a pid namespace of its own, started without setsid:
	// its session is the shell's, outside its namespace.
	t.Run("session leader outside its pid namespace", func(t *testing.T) {
		t.Parallel()
		a := startDaemon(t, "A", "127.0.0.1:17661", daemonOpts{})
		b := startDaemon(t, "B", "127.0.0.2:17662", daemonOpts{})
		_, init := startNSInit(t, "unshare", "--pid", "--fork", "--", "sleep", "600")
		refusedBeforeFreeze(t, a, b, init, "the leader of its session is outside that namespace", "setsid")
	})

	// unshare --mount: a mount namespace of its own.
	t.Run("mount namespace of its own", func(t *testing.T) {
		t.Parallel()
		a := startDaemon(t, "A", "127.0.0.1:17663", daemonOpts{})
		b := startDaemon(t, "B", "127.0.0.2:17664", daemonOpts{})
		_, init := startNSInit(t, "unshare", "--mount", "--pid", "--fork", "--", "setsid", "sleep", "600")
		refusedBeforeFreeze(t, a, b, init, "has a mount namespace of its own", "runc container")
	})

	// A Unix stream connection to a server outside the tree (this test).
	t.Run("unix socket connected outside", func(t *testing.T) {
		t.Parallel()
		a := startDaemon(t, "A", "127.0.0.1:17665", daemonOpts{})
		b := startDaemon(t, "B", "127.0.0.2:17666", daemonOpts{})
		sock := filepath.Join(t.TempDir(), "server.sock")
		l, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				t.Cleanup(func() { c.Close() })
			}
		}()
		w := startWorkload(t, workloadOpts{memMiB: 8, extra: []string{"--unix-connect", sock}})
		refusedBeforeFreeze(t, a, b, w.pid, "Unix stream socket", "connected to "+sock, "outside the tree")
	})

	// Kinds of descriptor CRIU cannot dump: an io_uring instance; and
	// Go's default listener, MPTCP since Go 1.24.
	for i, c := range []struct{ name, flag, arg, want string }{
		{"io_uring", "--io-uring", "", "has an io_uring instance"},
		{"mptcp listener", "--mptcp-listen", "127.0.0.1:17679", "GODEBUG=multipathtcp=0"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			a := startDaemon(t, "A", "127.0.0.1:"+strconv.Itoa(17671+2*i), daemonOpts{})
			b := startDaemon(t, "B", "127.0.0.2:"+strconv.Itoa(17672+2*i), daemonOpts{})
			extra := []string{c.flag}
			if c.arg != "" {
				extra = append(extra, c.arg)
			}
			w := startWorkload(t, workloadOpts{memMiB: 8, extra: extra})
			refusedBeforeFreeze(t, a, b, w.pid, c.want)
		})
	}

	// In its host's network namespace (lab host A's: this test's own),
	// listening on the host's address, which stays with the host.
	t.Run("bound to the host's address", func(t *testing.T) {
		t.Parallel()
		lab := newNetLab(t, "br0")
		a := lab.daemon("A", 17681, nil)
		b := lab.daemon("B", 17682, nil)
		dir := t.TempDir()
		addr := hostAddr("A") + ":17683"
		pid := startSetsid(t, dir, "nsenter", "--net="+lab.path("A"), "--", bins.workload, "--mem", "8",
			"--status", filepath.Join(dir, "status.json"), "--listen", addr)
		waitFor(t, "the workload to listen", 10*time.Second, func() bool {
			c, err := lab.dial("A", addr)
			if err == nil {
				c.Close()
			}
			return err == nil
		})
		refusedBeforeFreeze(t, a, b, pid, "has a TCP socket bound to "+addr+", an address of this host", "network namespace of its own")
	})

	// A file it has open and the program it runs differ on B (its own
	// copy of the directory, a tmpfs in a mount namespace of its own):
	// the file's size, the program's build (same size and mode, another
	// build-id). Both are listed.
	t.Run("files differ on the destination", func(t *testing.T) {
		t.Parallel()
		dir, stage := t.TempDir(), t.TempDir()
		conf, prog := filepath.Join(dir, "app.conf"), filepath.Join(dir, "app")
		if err := os.WriteFile(conf, []byte(strings.Repeat("setting = 1\n", 10)), 0o644); err != nil {
			t.Fatal(err)
		}
		sleep, err := os.ReadFile("/bin/sleep")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(prog, sleep, 0o755); err != nil {
			t.Fatal(err)
		}
		// B's copies: a shorter app.conf; app with a byte of its build-id
		// changed.
		if err := os.WriteFile(filepath.Join(stage, "app.conf"), []byte("setting = 2\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		other := flipBuildID(t, sleep)
		if err := os.WriteFile(filepath.Join(stage, "app"), other, 0o755); err != nil {
			t.Fatal(err)
		}
		a := startDaemon(t, "A", "127.0.0.1:17667", daemonOpts{})
		b := startDaemon(t, "B", "127.0.0.2:17668", daemonOpts{wrap: []string{"unshare", "--mount", "--propagation", "private", "--",
			"sh", "-c", `mount -t tmpfs -o mode=0755 none "$0" && cp -a "$1"/. "$0"/ && shift && exec "$@"`, dir, stage}})
		pid := startSetsid(t, dir, "sh", "-c", `exec 3<"$1"; exec "$2" 600`, "sh", conf, prog)
		waitFor(t, "the program to run", 10*time.Second, func() bool {
			exe, _ := os.Readlink("/proc/" + strconv.Itoa(pid) + "/exe")
			return exe == prog
		})
		refusedBeforeFreeze(t, a, b, pid, "2 of the files the process uses are not the same on the destination",
			conf+": 12 bytes here, 120 on the source", prog+": another build here")
	})
}

// flipBuildID returns a copy of the ELF program b whose GNU build-id has
// one byte changed: the same size, another build.
func flipBuildID(t *testing.T, b []byte) []byte {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	s := f.Section(".note.gnu.build-id")
	if s == nil {
		t.Fatal("/bin/sleep has no build-id note")
	}
	out := append([]byte(nil), b...)
	// The note: namesz, descsz, type (4 bytes each), "GNU\0", then the id.
	out[s.Offset+16] ^= 0xff
	return out
}

// A Unix datagram socket connected to a socket outside the tree, bound to
// a path (as syslog's /dev/log is), moves: CRIU connects it to the same
// path on B, and the server goes on receiving from the moved process. A
// destination with no socket at that path refuses it before the freeze.
func TestUnixDatagramPeerCarried(t *testing.T) {
	integration(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "log.sock")
	srv, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	var mu sync.Mutex
	last := 0
	go func() {
		buf := make([]byte, 64)
		for {
			n, err := srv.Read(buf)
			if err != nil {
				return
			}
			v, _ := strconv.Atoi(string(buf[:n]))
			mu.Lock()
			last = v
			mu.Unlock()
		}
	}()
	got := func() int { mu.Lock(); defer mu.Unlock(); return last }
	w := startWorkload(t, workloadOpts{memMiB: 8, extra: []string{"--unix-dgram", path}})
	waitFor(t, "the workload's datagrams", 10*time.Second, func() bool { return got() > 3 })

	// B without the socket (its own empty directory there): refused.
	a := startDaemon(t, "A", "127.0.0.1:17691", daemonOpts{})
	c := startDaemon(t, "C", "127.0.0.2:17692", daemonOpts{wrap: []string{"unshare", "--mount", "--propagation", "private", "--",
		"sh", "-c", `mount -t tmpfs none "$0" && exec "$@"`, dir}})
	refusedBeforeFreeze(t, a, c, w.pid, "sends datagrams to the Unix socket "+path, "no socket there")

	// B with it: it moves, and goes on sending.
	b := startDaemon(t, "B", "127.0.0.3:17693", daemonOpts{})
	res := a.migrate(t, w.pid, b)
	w.track(res.DestPID)
	waitRunning(t, res.DestPID)
	before := got()
	waitFor(t, "datagrams from the moved process", 10*time.Second, func() bool { return got() > before+3 })
	if info, err := proc.Stat(w.pid); err == nil && info.State != 'Z' && res.DestPID != w.pid {
		t.Errorf("the source copy, pid %d, still runs", w.pid)
	}
}

// A job a shell started in the background (its session and group the
// shell's, in the host's pid namespace) moves as CRIU's shell job: on B
// it runs, in a session of B's making, not the shell's; the source copy
// is gone, the shell goes on waiting.
func TestShellJobMigrates(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:17695", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:17696", daemonOpts{})
	shell := startSetsid(t, t.TempDir(), "sh", "-c", "sleep 600 & wait")
	job, err := harness.OnlyChild(shell, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(job, syscall.SIGKILL) })
	if info, _ := proc.Stat(job); info.Session != shell {
		t.Fatalf("the job's session is %d; want the shell's, %d", info.Session, shell)
	}
	start, _ := proc.Stat(job)
	res := a.migrate(t, job, b)
	t.Cleanup(func() { syscall.Kill(res.DestPID, syscall.SIGKILL) })
	info := waitRunning(t, res.DestPID)
	if info.Session == shell || info.Comm != "sleep" {
		t.Errorf("on B: %+v; want sleep, in another session than the shell's (%d)", info, shell)
	}
	if !gone(job, start.StartTime) {
		t.Errorf("the source copy, pid %d, still runs", job)
	}
	if sh, err := proc.Stat(shell); err != nil || sh.Stopped() {
		t.Errorf("the shell after its job left: %+v, %v; want it running", sh, err)
	}
	if !strings.Contains(a.log(), "it moves as a shell job") {
		t.Errorf("A's log does not say the tree moved as a shell job")
	}
}
