//go:build linux

package migratetest_test

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/migrate"
	"github.com/phaul/phaul/pkg/migrate/migratetest"
	"github.com/phaul/phaul/pkg/proc"
)

const timeout = 10 * time.Second

// next waits for op's next event.
func next(t *testing.T, op migrate.Op) criu.Event {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ev, err := op.Next()
		if err == nil {
			return ev
		}
		if !errors.Is(err, criu.ErrAgain) {
			t.Fatalf("next event: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no event from the fake CRIU in %v", timeout)
		}
		readable(op.Fd(), 100*time.Millisecond)
	}
}

// readable waits up to d for fd to be readable.
func readable(fd int, d time.Duration) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, int(d.Milliseconds()))
	return err == nil && n > 0
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not %s after %v", what, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func stopped(pid int) bool {
	info, err := proc.Stat(pid)
	return err == nil && info.State == 'T'
}

func gone(pid int) bool {
	_, err := proc.Stat(pid)
	return errors.Is(err, proc.ErrNotFound)
}

// streamPair is a connected pair of Unix stream sockets: a file to hand to
// the fake, and a conn standing in for the relay's end.
func streamPair(t *testing.T) (*os.File, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(fds[0]), "criu-pages"), fileConn(t, os.NewFile(uintptr(fds[1]), "relay"))
}

// tcpPair is a loopback TCP connection, as a lazy dump's page socket: a
// file for the fake, and the relay's end, which resets on close.
func tcpPair(t *testing.T) (*os.File, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	relay := server.(*net.TCPConn)
	relay.SetLinger(0)
	t.Cleanup(func() { relay.Close() })
	f, err := client.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	return f, relay
}

func fileConn(t *testing.T, f *os.File) net.Conn {
	t.Helper()
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// relay copies between the two page sockets' relay ends, as phauld's two
// relays and the mem connection between them do. With hold, the end of the
// destination's stream is not passed to the source (a lazy dump's relay).
func relay(t *testing.T, src, dst net.Conn, hold bool) {
	var wg sync.WaitGroup
	pipe := func(from, to net.Conn, passEOF bool) {
		defer wg.Done()
		io.Copy(to, from)
		if passEOF {
			to.(interface{ CloseWrite() error }).CloseWrite()
		}
	}
	wg.Add(2)
	go pipe(src, dst, true)
	go pipe(dst, src, !hold)
	t.Cleanup(func() {
		src.Close()
		dst.Close()
		wg.Wait()
	})
}

// copyImages ships the images of src to dst, as the source's shipImages
// does.
func copyImages(t *testing.T, src, dst string) {
	t.Helper()
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		n := e.Name()
		if strings.HasSuffix(n, ".log") || n == criu.LazyDumpConf {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, n))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func wantNotify(t *testing.T, ev criu.Event, name string) {
	t.Helper()
	if ev.Notify != name || ev.Err != nil {
		t.Fatalf("event %+v, want notification %s", ev, name)
	}
}

// passFrozen answers yes to the notification a dump sends once the tree
// is frozen, before anything is written.
func passFrozen(t *testing.T, op migrate.Op) {
	t.Helper()
	wantNotify(t, next(t, op), migrate.FrozenNotify)
	if err := op.Reply(true); err != nil {
		t.Fatal(err)
	}
}

func wantSuccess(t *testing.T, ev criu.Event) {
	t.Helper()
	if ev.Notify != "" || ev.Err != nil {
		t.Fatalf("event %+v, want a successful response", ev)
	}
}

func wantFailure(t *testing.T, ev criu.Event, msg string) {
	t.Helper()
	if ev.Notify != "" || ev.Err == nil || !strings.Contains(ev.Err.Error(), msg) {
		t.Fatalf("event %+v, want a failure saying %q", ev, msg)
	}
}

// dumpLocal dumps pid into dir without a page socket (its pages in
// pages-1.img), answering post-dump yes: the tree ends stopped.
func dumpLocal(t *testing.T, c *migratetest.CRIU, pid int, dir string) {
	t.Helper()
	op, err := c.StartDump(criu.Options{ImagesDir: dir, LogFile: "dump.log", PID: pid, LeaveStopped: true, Notify: true})
	if err != nil {
		t.Fatal(err)
	}
	passFrozen(t, op)
	defer op.Close()
	wantNotify(t, next(t, op), "post-dump")
	if err := op.Reply(true); err != nil {
		t.Fatal(err)
	}
	wantSuccess(t, next(t, op))
}

// restoreOpts are the destination's restore options.
func restoreOpts(dir string, lazy bool) criu.Options {
	return criu.Options{ImagesDir: dir, LogFile: "restore.log", LeaveStopped: true, Notify: true, LazyPages: lazy}
}

// A copy migration: the dump streams its pages through the relay into the
// destination's page server, stops at post-dump, and is released; the
// restore starts the process again, stopped, with its memory intact.
func TestCopyMigration(t *testing.T) {
	c := migratetest.New(t, migratetest.Config{})
	pid := migratetest.StartTree(t)
	src, dst := t.TempDir(), t.TempDir()
	dumpSock, srcRelay := streamPair(t)
	psSock, dstRelay := streamPair(t)
	relay(t, srcRelay, dstRelay, false)

	ps, err := c.StartPageServer(criu.Options{ImagesDir: dst, LogFile: "page-server.log", PageServer: psSock})
	psSock.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Close()
	ev := next(t, ps)
	wantSuccess(t, ev)
	if ev.PID <= 0 {
		t.Fatalf("page server pid %d", ev.PID)
	}
	if err := ps.WaitPID(ev.PID); err != nil {
		t.Fatal(err)
	}

	dump, err := c.StartDump(criu.Options{ImagesDir: src, LogFile: "dump.log", PID: pid, LeaveStopped: true, Notify: true, PageServer: dumpSock})
	dumpSock.Close()
	if err != nil {
		t.Fatal(err)
	}
	passFrozen(t, dump)
	defer dump.Close()
	wantNotify(t, next(t, dump), "post-dump")
	if !stopped(pid) {
		t.Fatal("source tree not stopped at post-dump")
	}
	if ev := next(t, ps); ev.Err != nil || !ev.Status.Exited() || ev.Status.ExitStatus() != 0 {
		t.Fatalf("page server ended with %+v", ev)
	}
	if st, err := c.Stopped(src); err != nil || len(st) != 0 {
		t.Fatalf("stopped tasks %v, %v; want none", st, err)
	}
	copyImages(t, src, dst)
	if err := dump.Reply(true); err != nil {
		t.Fatal(err)
	}
	wantSuccess(t, next(t, dump))
	if !stopped(pid) {
		t.Fatal("source tree not left stopped after the dump")
	}

	restore, err := c.StartRestore(restoreOpts(dst, false))
	if err != nil {
		t.Fatal(err)
	}
	defer restore.Close()
	ev = next(t, restore)
	wantNotify(t, ev, "post-restore")
	newPID := ev.PID
	if !stopped(newPID) {
		t.Fatalf("restored pid %d not stopped at post-restore", newPID)
	}
	if err := restore.Reply(true); err != nil {
		t.Fatal(err)
	}
	ev = next(t, restore)
	wantSuccess(t, ev)
	if ev.PID != newPID {
		t.Fatalf("restore answered pid %d, announced %d", ev.PID, newPID)
	}
	if got := c.Restored(); len(got) != 1 || got[0].PID != newPID || got[0].Source != pid || got[0].Dir != dst {
		t.Fatalf("restored %+v", got)
	}
	if !c.Intact(newPID) {
		t.Fatal("restored memory not intact")
	}
	if !stopped(newPID) || !stopped(pid) {
		t.Fatal("both copies should be stopped")
	}
}

// A dump whose socket closes at post-dump (its daemon crashed) resumes the
// tree.
func TestDumpClosedAtPostDumpResumes(t *testing.T) {
	c := migratetest.New(t, migratetest.Config{})
	pid := migratetest.StartTree(t)
	op, err := c.StartDump(criu.Options{ImagesDir: t.TempDir(), LogFile: "dump.log", PID: pid, LeaveStopped: true, Notify: true})
	if err != nil {
		t.Fatal(err)
	}
	passFrozen(t, op)
	wantNotify(t, next(t, op), "post-dump")
	if !stopped(pid) {
		t.Fatal("tree not stopped at post-dump")
	}
	op.Close()
	eventually(t, "resumed", func() bool { return migratetest.Running(pid) })
}

// A rollback leaves a task that job control had stopped stopped, and
// Stopped names it.
func TestDumpKeepsJobControlStop(t *testing.T) {
	c := migratetest.New(t, migratetest.Config{})
	pid := migratetest.StartTree(t)
	syscall.Kill(pid, syscall.SIGSTOP)
	migratetest.WaitState(t, pid, 'T', timeout)
	dir := t.TempDir()
	op, err := c.StartDump(criu.Options{ImagesDir: dir, LogFile: "dump.log", PID: pid, LeaveStopped: true, Notify: true})
	if err != nil {
		t.Fatal(err)
	}
	passFrozen(t, op)
	defer op.Close()
	wantNotify(t, next(t, op), "post-dump")
	if st, err := c.Stopped(dir); err != nil || !st[pid] || len(st) != 1 {
		t.Fatalf("stopped tasks %v, %v; want %d", st, err, pid)
	}
	op.Reply(false)
	wantFailure(t, next(t, op), "post-dump")
	if !stopped(pid) {
		t.Fatal("a task job control had stopped was resumed")
	}
}

// A dump whose page socket breaks fails, and resumes the tree before it
// says so.
func TestDumpPageSocketBroken(t *testing.T) {
	c := migratetest.New(t, migratetest.Config{Memory: 8 << 20})
	pid := migratetest.StartTree(t)
	sock, peer := streamPair(t)
	peer.Close()
	op, err := c.StartDump(criu.Options{ImagesDir: t.TempDir(), LogFile: "dump.log", PID: pid, LeaveStopped: true, Notify: true, PageServer: sock})
	sock.Close()
	if err != nil {
		t.Fatal(err)
	}
	passFrozen(t, op)
	defer op.Close()
	wantFailure(t, next(t, op), "page transfer failed")
	if !migratetest.Running(pid) {
		t.Fatal("tree not resumed before the failure was reported")
	}
}

// A hook's error fails its step as CRIU would fail there.
func TestHookFailsStep(t *testing.T) {
	c := migratetest.New(t, migratetest.Config{Hook: migratetest.FailAt(migratetest.StepDumpEnd, errors.New("injected"))})
	pid := migratetest.StartTree(t)
	op, err := c.StartDump(criu.Options{ImagesDir: t.TempDir(), LogFile: "dump.log", PID: pid, LeaveStopped: true, Notify: true})
	if err != nil {
		t.Fatal(err)
	}
	passFrozen(t, op)
	defer op.Close()
	wantNotify(t, next(t, op), "post-dump")
	op.Reply(true)
	wantFailure(t, next(t, op), "injected")
	if !migratetest.Running(pid) {
		t.Fatal("tree not resumed after a failure past post-dump")
	}

	// A CPU check CRIU cannot make fails with ENOTSUP.
	c.SetHook(migratetest.FailAt(migratetest.StepCPUCheck, &criu.Error{Op: "cpuinfo-check", Errno: unix.ENOTSUP}))
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "cpuinfo.img"), []byte("cpu"), 0o600)
	check, err := c.StartCPUInfoCheck(criu.Options{ImagesDir: dir, LogFile: "cpuinfo-check.log"})
	if err != nil {
		t.Fatal(err)
	}
	defer check.Close()
	ev := next(t, check)
	var ce *criu.Error
	if !errors.As(ev.Err, &ce) || ce.Errno != unix.ENOTSUP {
		t.Fatalf("cpu check: %+v, want ENOTSUP", ev)
	}
	c.SetHook(nil)
	check2, err := c.StartCPUInfoCheck(criu.Options{ImagesDir: dir, LogFile: "cpuinfo-check.log"})
	if err != nil {
		t.Fatal(err)
	}
	defer check2.Close()
	wantSuccess(t, next(t, check2))
}

// A restore whose socket closes at post-restore kills what it restored.
func TestRestoreClosedAtPostRestoreKills(t *testing.T) {
	c := migratetest.New(t, migratetest.Config{})
	pid := migratetest.StartTree(t)
	dir := t.TempDir()
	dumpLocal(t, c, pid, dir)
	op, err := c.StartRestore(restoreOpts(dir, false))
	if err != nil {
		t.Fatal(err)
	}
	ev := next(t, op)
	wantNotify(t, ev, "post-restore")
	if !stopped(ev.PID) {
		t.Fatal("restored process not stopped")
	}
	op.Close()
	eventually(t, "killed", func() bool { return gone(ev.PID) })
}

// Abandon lets a restore end when its socket closes; one wedged is killed,
// with what it restored.
func TestAbandon(t *testing.T) {
	c := migratetest.New(t, migratetest.Config{})
	pid := migratetest.StartTree(t)
	dir := t.TempDir()
	dumpLocal(t, c, pid, dir)

	// Hangs at post-restore until its socket closes.
	c.SetHook(func(ctx context.Context, s migratetest.Step, _ string) error {
		if s == migratetest.StepPostRestore {
			<-ctx.Done()
		}
		return nil
	})
	op, err := c.StartRestore(restoreOpts(dir, false))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "restored", func() bool { return len(c.Restored()) == 1 })
	first := c.Restored()[0].PID
	if op.Abandon(time.Second) {
		t.Fatal("a restore that ends when told to was killed")
	}
	if !gone(first) {
		t.Fatal("the abandoned restore left its process")
	}
	if _, err := op.Next(); err == nil {
		t.Fatal("an abandoned restore answered")
	}

	// Wedged: deaf to its socket.
	c.SetHook(func(_ context.Context, s migratetest.Step, _ string) error {
		if s == migratetest.StepPostRestore {
			return migratetest.ErrWedge
		}
		return nil
	})
	op, err = c.StartRestore(restoreOpts(dir, false))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "restored", func() bool { return len(c.Restored()) == 2 })
	second := c.Restored()[1].PID
	if !op.Abandon(50 * time.Millisecond) {
		t.Fatal("a wedged restore was not killed")
	}
	if k := c.Killed(); len(k) != 1 || k[0].Kind != "restore" || k[0].Dir != dir || k[0].PID != op.Pid() {
		t.Fatalf("killed %+v", k)
	}
	eventually(t, "killed", func() bool { return gone(second) })
}

// startLazyDump starts a lazy dump of pid into dir, on the TCP socket
// whose relay end it returns, and answers post-dump yes.
func startLazyDump(t *testing.T, c *migratetest.CRIU, pid int, dir string) (migrate.Op, *net.TCPConn) {
	t.Helper()
	sock, relayEnd := tcpPair(t)
	op, err := c.StartDump(criu.Options{ImagesDir: dir, LogFile: "dump.log", PID: pid, LeaveStopped: true, Notify: true, PageServer: sock, LazyPages: true})
	sock.Close()
	if err != nil {
		t.Fatal(err)
	}
	passFrozen(t, op)
	t.Cleanup(func() { op.Close() })
	wantNotify(t, next(t, op), "post-dump")
	if !stopped(pid) {
		t.Fatal("tree not stopped at post-dump")
	}
	if err := op.Reply(true); err != nil {
		t.Fatal(err)
	}
	return op, relayEnd
}

// A lazy migration: the restored process's memory comes from the dump,
// through the relay, fetched by lazy-pages; then both sides end well.
func TestLazyMigration(t *testing.T) {
	c := migratetest.New(t, migratetest.Config{Chunk: 100 << 10})
	pid := migratetest.StartTree(t)
	src, dst := t.TempDir(), t.TempDir()
	dump, srcRelay := startLazyDump(t, c, pid, src)
	copyImages(t, src, dst)

	lpSock, dstRelay := streamPair(t)
	relay(t, srcRelay, dstRelay, true)
	lp, err := c.StartLazyPages(dst, lpSock)
	lpSock.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer lp.Close()
	if !readable(lp.StatusFd(), timeout) || !lp.Ready() {
		t.Fatal("lazy-pages not ready")
	}
	restore, err := c.StartRestore(restoreOpts(dst, true))
	if err != nil {
		t.Fatal(err)
	}
	defer restore.Close()
	ev := next(t, restore)
	wantNotify(t, ev, "post-restore")
	newPID := ev.PID
	restore.Reply(true)
	wantSuccess(t, next(t, restore))

	if !readable(lp.ExitFd(), timeout) {
		t.Fatal("lazy-pages did not exit")
	}
	if err := lp.Result(); err != nil {
		t.Fatal(err)
	}
	copied, total, ok := lp.Transferred()
	if !ok || copied != total || total != (1<<20)/4096 {
		t.Fatalf("transferred %d/%d (%v)", copied, total, ok)
	}
	if !c.Intact(newPID) {
		t.Fatal("lazily restored memory not intact")
	}
	wantSuccess(t, next(t, dump))
	if !stopped(pid) || !stopped(newPID) {
		t.Fatal("both copies should be stopped")
	}
}

// A lazy dump whose page socket is reset (phauld aborting) resumes the
// tree and fails; a clean end of stream is a success that leaves the tree
// stopped, as CRIU 4.2's.
func TestLazyDumpEnd(t *testing.T) {
	c := migratetest.New(t, migratetest.Config{})
	pid := migratetest.StartTree(t)
	dump, relayEnd := startLazyDump(t, c, pid, t.TempDir())
	relayEnd.Close() // SO_LINGER 0: a reset
	wantFailure(t, next(t, dump), "reset")
	if !migratetest.Running(pid) {
		t.Fatal("tree not resumed after the reset")
	}

	dump, relayEnd = startLazyDump(t, c, pid, t.TempDir())
	relayEnd.SetLinger(-1)
	relayEnd.CloseWrite()
	wantSuccess(t, next(t, dump))
	if !stopped(pid) {
		t.Fatal("tree not left stopped after a clean end of stream")
	}
}

// A lazy-pages daemon that is killed fails; one that cannot start never
// says it is ready, and a lazy restore without one fails.
func TestLazyPagesFailures(t *testing.T) {
	c := migratetest.New(t, migratetest.Config{})
	dir := t.TempDir()
	sock, _ := streamPair(t)
	lp, err := c.StartLazyPages(dir, sock)
	sock.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer lp.Close()
	if !readable(lp.StatusFd(), timeout) || !lp.Ready() {
		t.Fatal("lazy-pages not ready")
	}
	lp.Kill()
	if !readable(lp.ExitFd(), timeout) {
		t.Fatal("killed lazy-pages did not exit")
	}
	if err := lp.Result(); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("killed lazy-pages: %v", err)
	}

	pid := migratetest.StartTree(t)
	dumpLocal(t, c, pid, dir)
	restore, err := c.StartRestore(restoreOpts(dir, true))
	if err != nil {
		t.Fatal(err)
	}
	defer restore.Close()
	wantFailure(t, next(t, restore), "lazy-pages")

	c.SetHook(migratetest.FailAt(migratetest.StepLazyPagesStart, errors.New("no userfaultfd")))
	sock, _ = streamPair(t)
	lp2, err := c.StartLazyPages(t.TempDir(), sock)
	sock.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer lp2.Close()
	if !readable(lp2.StatusFd(), timeout) || lp2.Ready() {
		t.Fatal("lazy-pages that failed to start said it was ready")
	}
	if err := lp2.Result(); err == nil || !strings.Contains(err.Error(), "no userfaultfd") {
		t.Fatalf("lazy-pages that failed to start: %v", err)
	}
}
