//go:build linux

package transport

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/loop"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/pkg/wire"
)

// runLoop runs l on a goroutine until stop is set; it returns a function
// that stops it and waits.
func runLoop(t *testing.T, l *loop.Loop) func() {
	t.Helper()
	var stop atomic.Bool
	done := make(chan struct{})
	go func() {
		defer close(done)
		for !stop.Load() {
			if _, err := l.RunOnce(); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	return func() {
		stop.Store(true)
		l.Wake()
		<-done
		l.Close()
	}
}

// socketpair returns a link on one end of a socket pair, and the other
// end as a blocking file.
func socketpair(t *testing.T) (*Link, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(fds[0], true); err != nil {
		t.Fatal(err)
	}
	return &Link{fc: &fdConn{fd: fds[0]}}, os.NewFile(uintptr(fds[1]), "far")
}

// TestRelayBothWays pushes 48 MiB each way through a relay: from "CRIU"
// (the far end of the local socket) to the peer as page-data frames, and
// from the peer to CRIU, with both ends reading slowly enough for flow
// control to engage. Every byte must arrive, in order, and each side's
// end of stream must reach the other.
func TestRelayBothWays(t *testing.T) {
	l, err := loop.New()
	if err != nil {
		t.Fatal(err)
	}
	local, criuEnd := newPageSocketForTest(t)
	memLink, peer := socketpair(t)
	defer criuEnd.Close()
	defer peer.Close()

	mem, err := NewConn(l, "mem", memLink, wire.Mem, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	ended := make(chan struct{})
	failed := make(chan error, 2)
	r, err := newRelay(l, local, mem)
	if err != nil {
		t.Fatal(err)
	}
	mem.OnMessage = r.FromPeer
	mem.OnClose = func(err error) {
		if err != io.EOF {
			failed <- err
		}
	}
	r.OnError = func(err error) { failed <- err }
	r.OnEnd = func() { close(ended) }
	stop := runLoop(t, l)
	defer stop()

	const size = 48 << 20
	up := make([]byte, size)
	down := make([]byte, size)
	rand.Read(up)
	rand.Read(down)

	// CRIU writes up, then closes its writing side.
	wrote := make(chan struct{})
	defer func() { <-wrote }() // before criuEnd closes
	go func() {
		defer close(wrote)
		criuEnd.Write(up)
		unix.Shutdown(int(criuEnd.Fd()), unix.SHUT_WR)
	}()
	// The peer sends down as frames, then page-eof.
	go func() {
		for off := 0; off < size; off += wire.DataChunk {
			b, _ := wire.Marshal(&wire.PageData{Data: down[off:min(size, off+wire.DataChunk)]})
			peer.Write(b)
		}
		b, _ := wire.Marshal(&wire.PageEOF{})
		peer.Write(b)
	}()
	// CRIU reads down until EOF, slowly at first.
	gotDown := make(chan []byte)
	go func() {
		var buf bytes.Buffer
		chunk := make([]byte, 64<<10)
		for i := 0; ; i++ {
			if i < 50 {
				time.Sleep(time.Millisecond)
			}
			n, err := criuEnd.Read(chunk)
			buf.Write(chunk[:n])
			if err != nil {
				break
			}
		}
		gotDown <- buf.Bytes()
	}()
	// The peer decodes up.
	var gotUp bytes.Buffer
	dec := wire.NewDecoder(wire.Mem, 1<<20)
	sawEOF := false
	for !sawEOF {
		n, err := peer.Read(dec.Space())
		if err != nil {
			t.Fatalf("peer read after %d bytes: %v", gotUp.Len(), err)
		}
		dec.Commit(n)
		for {
			m, err := dec.Next()
			if err != nil {
				t.Fatal(err)
			}
			if m == nil {
				break
			}
			switch m := m.(type) {
			case *wire.PageData:
				gotUp.Write(m.Data)
			case *wire.PageEOF:
				sawEOF = true
			}
		}
	}
	if !bytes.Equal(gotUp.Bytes(), up) {
		t.Fatalf("peer got %d bytes, want the %d CRIU wrote, in order", gotUp.Len(), size)
	}
	select {
	case d := <-gotDown:
		if !bytes.Equal(d, down) {
			t.Fatalf("CRIU got %d bytes, want the %d the peer sent, in order", len(d), size)
		}
	case err := <-failed:
		t.Fatal(err)
	case <-time.After(30 * time.Second):
		t.Fatal("CRIU side never saw the end of the stream")
	}
	select {
	case <-ended:
	case err := <-failed:
		t.Fatal(err)
	case <-time.After(10 * time.Second):
		t.Fatal("relay did not report its end")
	}
}

// newPageSocketForTest is newPageSocket with the far end as a blocking
// file the test can read and write.
func newPageSocketForTest(t *testing.T) (int, *os.File) {
	t.Helper()
	ours, theirs, err := newPageSocket()
	if err != nil {
		t.Fatal(err)
	}
	return ours, theirs
}

// relayForTest is a relay made by openRelay (tcp: a lazy dump's socket)
// between CRIU's end of a page socket, criuEnd, and a mem conn to nobody.
func relayForTest(t *testing.T, tcp bool) (r *Relay, criuEnd *os.File) {
	t.Helper()
	l, err := loop.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	memLink, peer := socketpair(t)
	t.Cleanup(func() { peer.Close() })
	mem, err := NewConn(l, "mem", memLink, wire.Mem, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	r, criuEnd, err = OpenRelay(l, mem, tcp, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { criuEnd.Close() })
	return r, criuEnd
}

// TestRelayCloseFailsCRIU checks the abort path: closing the relay makes a
// CRIU still writing pages fail, which is how a dump is aborted.
func TestRelayCloseFailsCRIU(t *testing.T) {
	r, criuEnd := relayForTest(t, false)
	r.Close()
	if _, err := criuEnd.Write(make([]byte, 1<<20)); err == nil {
		t.Fatal("writing to a closed relay succeeded")
	}
}

// TestRelayLazyEnd checks how a lazy dump's page stream ends: the peer's
// end of stream is held from CRIU (a lazy page server takes a clean close
// for a finished transfer), and closing the relay reaches CRIU as
// ECONNRESET, which it takes for a failed one. (The socket resets on any
// close, the kernel's when phauld dies included.)
func TestRelayLazyEnd(t *testing.T) {
	r, criuEnd := relayForTest(t, true)
	r.HoldEOF = true
	if err := r.FromPeer(&wire.PageData{Data: []byte("request")}); err != nil {
		t.Fatal(err)
	}
	if err := r.FromPeer(&wire.PageEOF{}); err != nil {
		t.Fatal(err)
	}
	fd := int(criuEnd.Fd())
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 200000})
	buf := make([]byte, 64)
	n, err := unix.Read(fd, buf)
	if err != nil || string(buf[:n]) != "request" {
		t.Fatalf("criu read %q, %v", buf[:max(n, 0)], err)
	}
	if n, err := unix.Read(fd, buf); err != unix.EAGAIN {
		t.Fatalf("criu saw the end of a held stream: %d, %v", n, err)
	}
	r.Close()
	if _, err := unix.Read(fd, buf); err != unix.ECONNRESET {
		t.Fatalf("criu read after the relay closed: %v, want ECONNRESET", err)
	}
}

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

// TestRelayOverTLS pushes 32 MiB each way through a relay whose mem
// connection is a TLS link in loop mode, as in a real session.
func TestRelayOverTLS(t *testing.T) {
	id, _ := testPKI(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var srv net.Conn
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		srv, _ = l.Accept()
	}()
	cli, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	ours, err := NewLink(srv)
	if err != nil {
		t.Fatal(err)
	}
	peer := tls.Client(cli, id.ClientConfig("127.0.0.1"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hsErr := make(chan error, 1)
	go func() { hsErr <- peer.HandshakeContext(ctx) }()
	if err := ours.ServerTLS(ctx, id.ServerConfig()); err != nil {
		t.Fatal(err)
	}
	if err := <-hsErr; err != nil {
		t.Fatal(err)
	}

	lp, err := loop.New()
	if err != nil {
		t.Fatal(err)
	}
	local, criuEnd := newPageSocketForTest(t)
	defer criuEnd.Close()
	mem, err := NewConn(lp, "mem", ours, wire.Mem, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	r, err := newRelay(lp, local, mem)
	if err != nil {
		t.Fatal(err)
	}
	mem.OnMessage = r.FromPeer
	failed := make(chan error, 2)
	mem.OnClose = func(err error) {
		if err != io.EOF {
			failed <- err
		}
	}
	r.OnError = func(err error) { failed <- err }
	stop := runLoop(t, lp)
	defer stop()

	const size = 32 << 20
	up, down := make([]byte, size), make([]byte, size)
	rand.Read(up)
	rand.Read(down)
	go func() {
		criuEnd.Write(up)
	}()
	go func() {
		for off := 0; off < size; off += wire.DataChunk {
			b, _ := wire.Marshal(&wire.PageData{Data: down[off:min(size, off+wire.DataChunk)]})
			peer.Write(b)
		}
	}()
	gotDown := make(chan []byte, 1)
	go func() {
		buf := make([]byte, size)
		_, err := io.ReadFull(criuEnd, buf)
		if err != nil {
			failed <- err
		}
		gotDown <- buf
	}()
	var gotUp bytes.Buffer
	dec := wire.NewDecoder(wire.Mem, 1<<20)
	for gotUp.Len() < size {
		n, err := peer.Read(dec.Space())
		if err != nil {
			t.Fatalf("peer read after %d bytes: %v", gotUp.Len(), err)
		}
		dec.Commit(n)
		for {
			m, err := dec.Next()
			if err != nil {
				t.Fatal(err)
			}
			if m == nil {
				break
			}
			gotUp.Write(m.(*wire.PageData).Data)
		}
	}
	if !bytes.Equal(gotUp.Bytes(), up) {
		t.Fatal("bytes CRIU wrote arrived changed")
	}
	select {
	case d := <-gotDown:
		if !bytes.Equal(d, down) {
			t.Fatal("bytes the peer sent arrived changed")
		}
	case err := <-failed:
		t.Fatal(err)
	case <-time.After(30 * time.Second):
		t.Fatal("timed out")
	}
}
