//go:build linux

package transport

import (
	"context"
	"crypto/tls"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/loop"
	"github.com/phaul/phaul/pkg/wire"
)

// pairLink is a link on one end of a connected Unix socket pair, and the
// other end.
func pairLink(t *testing.T) (*Link, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	far := os.NewFile(uintptr(fds[1]), "far")
	c, err := net.FileConn(os.NewFile(uintptr(fds[0]), "near"))
	if err != nil {
		t.Fatal(err)
	}
	lk, err := NewLink(c)
	if err != nil {
		t.Fatal(err)
	}
	return lk, far
}

// TestShutdownAfterCloseTouchesNothing: Shutdown of a link that is closed
// must not reach the socket that has its descriptor number since.
func TestShutdownAfterCloseTouchesNothing(t *testing.T) {
	lk, far := pairLink(t)
	defer far.Close()
	n := lk.Fd()
	lk.Close()
	// A new socket takes the link's old number.
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if fds[1] == n {
		fds[0], fds[1] = fds[1], fds[0]
	}
	if fds[0] != n {
		if err := unix.Dup3(fds[0], n, unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		unix.Close(fds[0])
		fds[0] = n
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	lk.Shutdown()
	lk.Close() // a second close must not close the new socket either
	if _, err := unix.Write(fds[0], []byte("x")); err != nil {
		t.Fatalf("the socket that reuses the closed link's descriptor was shut down or closed: %v", err)
	}
	b := make([]byte, 1)
	if _, err := unix.Read(fds[1], b); err != nil {
		t.Fatalf("read on the reusing socket: %v", err)
	}
}

// TestShutdownWhileHandshaking: one goroutine owns a link blocked in a
// handshake read; another shuts it down (a daemon stopping). The owner is
// woken and closes it; the race detector must see nothing.
func TestShutdownWhileHandshaking(t *testing.T) {
	for i := 0; i < 50; i++ {
		lk, far := pairLink(t)
		woken := make(chan struct{})
		go func() {
			defer close(woken)
			lk.SetDeadline(time.Now().Add(5 * time.Second))
			b := make([]byte, 8)
			lk.Stream().Read(b)
			lk.Close()
		}()
		time.Sleep(time.Millisecond)
		lk.Shutdown()
		select {
		case <-woken:
		case <-time.After(time.Second):
			t.Fatal("Shutdown did not wake the owner within 1 s")
		}
		far.Close()
	}
}

// TestCancelledHandshakeLeavesTheDescriptor: a TLS handshake whose
// context is cancelled (phaulctl went away) returns at once, and the
// descriptor is still the link's, for its owner to close once.
// tls.HandshakeContext closed it itself, and returned only at the
// deadline.
func TestCancelledHandshakeLeavesTheDescriptor(t *testing.T) {
	lk, far := pairLink(t)
	defer far.Close() // the far end never answers
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- lk.ClientTLS(ctx, &tls.Config{InsecureSkipVerify: true})
	}()
	time.Sleep(20 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("the cancelled handshake succeeded")
		}
	case <-time.After(time.Second):
		t.Fatal("the cancelled handshake did not return within 1 s")
	}
	time.Sleep(20 * time.Millisecond) // anything closing it behind us has run
	if _, err := unix.FcntlInt(uintptr(lk.Fd()), unix.F_GETFD, 0); err != nil {
		t.Fatalf("the link's descriptor was closed behind its owner: %v", err)
	}
	lk.Close()
}

// TestWatchFailureFailsConn: when the loop can no longer watch a conn's
// socket for what it needs (epoll refuses the change), the conn fails at
// once; it must not sit unwatched until the peer timeout.
func TestWatchFailureFailsConn(t *testing.T) {
	l, err := loop.New()
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	lk, far := pairLink(t)
	defer far.Close()
	c, err := NewConn(l, "rpc", lk, wire.RPC, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	var failed error
	c.OnClose = func(err error) { failed = err }
	// The socket goes away under the loop (as if its descriptor were
	// closed by mistake and the number reused): epoll then refuses any
	// change for it.
	null, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Dup3(null, lk.Fd(), unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	unix.Close(null)
	c.Pause(true)
	if failed == nil || !c.Closed() {
		t.Fatalf("after epoll refused the change: closed %v, error %v; want the conn failed", c.Closed(), failed)
	}
}

// TestTLSQueueBounded streams 96 MiB through a TLS link in loop mode,
// never queueing past the high-water mark, to a peer reading slowly: the
// link must not keep what it has already written (its write buffer grew
// with everything ever sent while the socket never fully drained), nor
// hold much more than what waits.
func TestTLSQueueBounded(t *testing.T) {
	id, _ := testPKI(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	cli, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	ours, err := NewLink(<-accepted)
	if err != nil {
		t.Fatal(err)
	}
	peer := tls.Client(cli, id.ClientConfig("127.0.0.1"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hs := make(chan error, 1)
	go func() { hs <- peer.HandshakeContext(ctx) }()
	if err := ours.ServerTLS(ctx, id.ServerConfig()); err != nil {
		t.Fatal(err)
	}
	if err := <-hs; err != nil {
		t.Fatal(err)
	}
	lp, err := loop.New()
	if err != nil {
		t.Fatal(err)
	}
	defer lp.Close()
	c, err := NewConn(lp, "rpc", ours, wire.RPC, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.OnMessage = func(wire.Message) error { return nil }
	const total = 96 << 20
	go func() {
		buf := make([]byte, 256<<10)
		for n := 0; ; {
			if n < 32<<20 {
				time.Sleep(2 * time.Millisecond) // slow at first
			}
			m, err := peer.Read(buf)
			n += m
			if err != nil {
				return
			}
		}
	}()
	chunk := make([]byte, wire.HeaderLen+wire.DataChunk)
	wire.PutHeader(chunk, wire.TypeFileData, wire.DataChunk)
	peak := 0
	for sent := 0; sent < total || !c.Flushed(); {
		for sent < total && c.OutLen() < HighWater {
			c.Queue(chunk)
			sent += wire.DataChunk
		}
		held := 0
		for _, b := range ours.fc.out.bufs {
			held += cap(b)
		}
		peak = max(peak, held)
		if sent >= total && c.Flushed() {
			break
		}
		if _, err := lp.RunOnce(); err != nil {
			t.Fatal(err)
		}
	}
	// The mark, the chunk queued on the last look under it, TLS's
	// framing, and the spare room of the buffers copies are packed in
	// (the first, partly written, and the last, partly filled, and under
	// load a partial write may split one more): about 9 MiB, where the
	// link used to keep all it had ever sent.
	if limit := HighWater + 2*wire.DataChunk + 4*copyChunk; peak > limit {
		t.Errorf("the TLS link held %d KiB for a stream kept under %d KiB", peak>>10, HighWater>>10)
	}
	t.Logf("the TLS link held at most %d KiB", peak>>10)
}
