//go:build linux

// Package transport carries a migration's bytes: a Link is one TCP
// connection (mutual TLS unless the daemons run --insecure) taken out of Go's
// net package so a session loop alone owns it; a Conn frames messages on a
// Link with flow control; a Relay carries CRIU's page-server stream between a
// local socket CRIU holds and the mem connection. Everything here runs on a
// session's loop (pkg/loop) and never blocks it.
package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Link is one connection of a migration as its session loop drives it: a
// non-blocking socket, and the TLS session on it unless the daemons run
// with --insecure. Before it joins a loop (handshakes) it is used blocking,
// with deadlines; in the loop it never blocks: reads return
// errWouldBlock, writes are queued and flushed when the socket takes them.
type Link struct {
	fc  *fdConn
	tls *tls.Conn // nil on a plain link

	// mu orders Close, which the link's owner calls, with Shutdown, which
	// others may call to wake the owner: once closed, the descriptor's
	// number may belong to another socket, which Shutdown must not touch.
	mu     sync.Mutex
	closed bool
}

// errWouldBlock is what a link in loop mode returns when there is nothing
// to read now. It is a temporary net.Error, which crypto/tls passes on
// without failing the connection, so reading can resume later.
var errWouldBlock error = wouldBlock{}

type wouldBlock struct{}

func (wouldBlock) Error() string   { return "would block" }
func (wouldBlock) Timeout() bool   { return true }
func (wouldBlock) Temporary() bool { return true }

// NewLink takes the socket out of c (see detach) and wraps it.
func NewLink(c net.Conn) (*Link, error) {
	local, remote := c.LocalAddr(), c.RemoteAddr()
	fd, err := detach(c)
	if err != nil {
		return nil, err
	}
	return &Link{fc: &fdConn{fd: fd, local: local, remote: remote}}, nil
}

// ServerTLS runs the server side of a TLS handshake on l, blocking until
// ctx ends.
func (l *Link) ServerTLS(ctx context.Context, cfg *tls.Config) error {
	l.tls = tls.Server(l.fc, cfg)
	return l.handshakeTLS(ctx)
}

// ClientTLS runs the client side of a TLS handshake on l.
func (l *Link) ClientTLS(ctx context.Context, cfg *tls.Config) error {
	l.tls = tls.Client(l.fc, cfg)
	return l.handshakeTLS(ctx)
}

// handshakeTLS runs the handshake until it ends, ctx's deadline passes or
// ctx is cancelled. Not tls.HandshakeContext: on cancellation it closes
// the descriptor itself, behind the link's owner, who would close the
// number again (maybe someone else's socket by then). A cancelled
// handshake is woken by Shutdown instead, and the owner closes it.
func (l *Link) handshakeTLS(ctx context.Context) error {
	if d, ok := ctx.Deadline(); ok {
		l.fc.SetDeadline(d)
		defer l.fc.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, l.Shutdown)
	defer stop()
	err := l.tls.Handshake()
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", ctx.Err(), err)
	}
	return err
}

// Preface is what the peer sent first (up to 1 KiB), as the socket gave
// it, TLS or not: after a failed TLS handshake it shows whether the peer
// answered in phaul's plain frames instead (see wire.HelloReply).
func (l *Link) Preface() []byte { return l.fc.preface }

// WritePlain writes b on the socket itself, outside any TLS session, by
// deadline: a refusal the peer reads whatever mode it speaks. Only before
// the link joins a loop.
func (l *Link) WritePlain(b []byte, deadline time.Time) error {
	l.fc.wrDeadline = deadline
	defer func() { l.fc.wrDeadline = time.Time{} }()
	_, err := l.fc.Write(b)
	return err
}

// WaitFirstBytes waits until the peer has sent something, for at most d
// (or until ctx ends, or Shutdown). It returns io.EOF if the peer closed
// the connection without a byte, os.ErrDeadlineExceeded if it sent
// nothing in time. Only before the link joins a loop.
func (l *Link) WaitFirstBytes(ctx context.Context, d time.Duration) error {
	stop := context.AfterFunc(ctx, l.Shutdown)
	defer stop()
	if err := l.fc.wait(unix.POLLIN, time.Now().Add(d)); err != nil {
		return err
	}
	var b [1]byte
	for {
		n, _, err := unix.Recvfrom(l.fc.fd, b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return os.ErrDeadlineExceeded // woken without data
		case err != nil:
			return err
		case n == 0:
			return io.EOF
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return nil
	}
}

// PeerClosed waits up to d for the peer to close its side of the
// connection (FIN, reset or error) and reports whether it did. It does not
// read: data the peer sent stays for the link's owner. Any goroutine may
// call it while the link waits for its owner (a connection waiting for
// its pair): it only polls.
func (l *Link) PeerClosed(d time.Duration) bool {
	fds := []unix.PollFd{{Fd: int32(l.fc.fd), Events: unix.POLLRDHUP}}
	n, err := unix.Poll(fds, int(d/time.Millisecond))
	if err != nil || n == 0 {
		return false
	}
	return fds[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0
}

// Stream is l as a blocking byte stream, for the handshakes.
func (l *Link) Stream() io.ReadWriter {
	if l.tls != nil {
		return l.tls
	}
	return l.fc
}

// SetDeadline bounds blocking reads and writes.
func (l *Link) SetDeadline(t time.Time) { l.fc.SetDeadline(t) }

// PeerName is the first name of the peer's verified certificate, for
// logs ("" on a plain link).
func (l *Link) PeerName() string {
	if l.tls == nil {
		return ""
	}
	certs := l.tls.ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return ""
	}
	return certs[0].Subject.CommonName
}

// enterLoop switches l to loop mode: non-blocking from now on.
func (l *Link) enterLoop() { l.fc.loop = true }

// Fd is the socket's descriptor.
func (l *Link) Fd() int { return l.fc.fd }

// RemoteAddr is the peer's address.
func (l *Link) RemoteAddr() net.Addr { return l.fc.remote }

// read reads what is available now into p, or returns errWouldBlock.
func (l *Link) read(p []byte) (int, error) {
	if l.tls != nil {
		return l.tls.Read(p)
	}
	return l.fc.Read(p)
}

// send queues b to be sent; the link owns b from now on (a plain link
// sends it as is, without a copy).
func (l *Link) send(b []byte) error {
	if l.tls != nil {
		_, err := l.tls.Write(b)
		return err
	}
	l.fc.queue(b)
	return nil
}

// Copies reports whether sending copies what it is given (TLS encrypts it
// into its own buffers): the caller may then reuse its buffer. A plain
// link keeps the buffer until the socket has taken it.
func (l *Link) Copies() bool { return l.tls != nil }

// flush writes what is queued, as much as the socket takes now but no
// more than limit bytes (limit < 0: no limit), and returns how much it
// wrote.
func (l *Link) flush(limit int) (int, error) { return l.fc.flush(limit) }

// queued is how many bytes wait to be written to the socket.
func (l *Link) queued() int { return l.fc.outLen }

// Close closes the socket; only the link's owner calls it, once it is
// done with it (later calls do nothing). What is still queued is lost.
func (l *Link) Close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	l.closed = true
	l.fc.Close()
}

// Shutdown shuts the socket down both ways, waking its owner if it blocks
// on it, without closing the descriptor (the owner does). Any goroutine
// may call it; on a closed link it does nothing.
func (l *Link) Shutdown() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.closed {
		unix.Shutdown(l.fc.fd, unix.SHUT_RDWR)
	}
}

// fdConn is a net.Conn on a non-blocking socket the session owns, so that
// crypto/tls can run on it: blocking (with deadlines, by poll) while the
// handshakes run, non-blocking once the session loop drives it.
type fdConn struct {
	fd            int
	local, remote net.Addr
	loop          bool
	closed        bool
	rdDeadline    time.Time
	wrDeadline    time.Time

	// out queues what waits for the socket: the buffers a plain link's
	// send hands over, as they are, or copies of what TLS writes record
	// by record, packed into chunks so that it goes out in few large
	// writes. Either way a buffer is let go once written.
	out    queue
	outLen int

	// rbuf batches socket reads: crypto/tls asks for a record at a time.
	rbuf       []byte
	rpos, rend int

	// preface is the first bytes the peer sent, kept while the link is
	// used blocking (the handshakes), to tell what a peer that does not
	// speak our mode sent instead (see Preface).
	preface []byte
}

// prefaceMax is how much of the peer's first bytes a link keeps: a
// handshake refusal frame fits.
const prefaceMax = 1024

// readBatch is how much one read from the socket may bring.
const readBatch = 256 << 10

func (c *fdConn) Read(p []byte) (int, error) {
	if c.rpos < c.rend {
		n := copy(p, c.rbuf[c.rpos:c.rend])
		c.rpos += n
		return n, nil
	}
	if c.loop && len(p) < readBatch {
		// Read a batch and serve p from it.
		if c.rbuf == nil {
			c.rbuf = make([]byte, readBatch)
		}
		n, err := c.rawRead(c.rbuf)
		if err != nil {
			return 0, err
		}
		c.rpos, c.rend = 0, n
		m := copy(p, c.rbuf[:n])
		c.rpos = m
		return m, nil
	}
	return c.rawRead(p)
}

// rawRead reads from the socket into p.
func (c *fdConn) rawRead(p []byte) (int, error) {
	for {
		n, err := unix.Read(c.fd, p)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			if c.loop {
				return 0, errWouldBlock
			}
			if err := c.wait(unix.POLLIN, c.rdDeadline); err != nil {
				return 0, err
			}
			continue
		case err != nil:
			return 0, err
		case n == 0 && len(p) > 0:
			return 0, io.EOF
		}
		if !c.loop && len(c.preface) < prefaceMax {
			c.preface = append(c.preface, p[:min(n, prefaceMax-len(c.preface))]...)
		}
		return n, nil
	}
}

// Write, in loop mode, collects p to be flushed (crypto/tls reuses its
// buffers, and writes a record at a time); before, it writes it all,
// blocking.
func (c *fdConn) Write(p []byte) (int, error) {
	if c.loop {
		if !c.closed {
			c.out.pushCopy(p)
			c.outLen += len(p)
		}
		return len(p), nil
	}
	for off := 0; off < len(p); {
		n, err := write(c.fd, p[off:])
		off += n
		switch {
		case err != nil:
			return off, err
		case off < len(p):
			if err := c.wait(unix.POLLOUT, c.wrDeadline); err != nil {
				return off, err
			}
		}
	}
	return len(p), nil
}

// wait polls for events until deadline (none: forever).
func (c *fdConn) wait(events int16, deadline time.Time) error {
	for {
		ms := -1
		if !deadline.IsZero() {
			left := time.Until(deadline)
			if left <= 0 {
				return os.ErrDeadlineExceeded
			}
			ms = int((left + time.Millisecond - 1) / time.Millisecond)
		}
		fds := []unix.PollFd{{Fd: int32(c.fd), Events: events}}
		n, err := unix.Poll(fds, ms)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n > 0 {
			return nil
		}
	}
}

func (c *fdConn) queue(b []byte) {
	if c.closed || len(b) == 0 {
		return
	}
	c.out.push(b)
	c.outLen += len(b)
}

// flush writes queued bytes until the socket would block or limit bytes
// are written (limit < 0: no limit).
func (c *fdConn) flush(limit int) (int, error) {
	n, err := c.out.writeTo(c.fd, limit)
	c.outLen -= n
	return n, err
}

func (c *fdConn) Close() error {
	if c.closed {
		return nil
	}
	c.closed = true
	c.out, c.outLen = queue{}, 0
	return unix.Close(c.fd)
}

func (c *fdConn) LocalAddr() net.Addr  { return c.local }
func (c *fdConn) RemoteAddr() net.Addr { return c.remote }

func (c *fdConn) SetDeadline(t time.Time) error {
	c.rdDeadline, c.wrDeadline = t, t
	return nil
}

func (c *fdConn) SetReadDeadline(t time.Time) error  { c.rdDeadline = t; return nil }
func (c *fdConn) SetWriteDeadline(t time.Time) error { c.wrDeadline = t; return nil }

// TLSError explains a failed TLS handshake in an operator's terms.
func TLSError(err error) error {
	var rec tls.RecordHeaderError
	if errors.As(err, &rec) {
		return fmt.Errorf("TLS handshake failed: the peer does not speak TLS (a daemon running with --insecure?): %w", err)
	}
	return fmt.Errorf("TLS handshake failed: %w", err)
}

// TLSVersion is the negotiated TLS version (tls.VersionTLS13, ...), or 0
// on a plain link.
func (l *Link) TLSVersion() uint16 {
	if l.tls == nil {
		return 0
	}
	return l.tls.ConnectionState().Version
}
