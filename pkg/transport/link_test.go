//go:build linux

package transport

import (
	"net"
	"os"
	"sync"
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
	// The next socket made gets the lowest free number: the link's.
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	if fds[0] != n && fds[1] != n {
		t.Skipf("descriptor %d was not reused (got %v)", n, fds)
	}
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
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			lk.SetDeadline(time.Now().Add(5 * time.Second))
			b := make([]byte, 8)
			lk.Stream().Read(b)
			lk.Close()
		}()
		time.Sleep(time.Millisecond)
		lk.Shutdown()
		wg.Wait()
		far.Close()
	}
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
	// closed by mistake): epoll then refuses any change for it.
	unix.Close(lk.Fd())
	c.Pause(true)
	if failed == nil || !c.Closed() {
		t.Fatalf("after epoll refused the change: closed %v, error %v; want the conn failed", c.Closed(), failed)
	}
}
