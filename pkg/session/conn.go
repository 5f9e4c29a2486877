//go:build linux

package session

import (
	"fmt"
	"io"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/epoll"
	"github.com/phaul/phaul/pkg/wire"
)

// Flow-control marks for queued outbound bytes: producers stop above
// highWater and start again below lowWater.
const (
	highWater = 8 << 20
	lowWater  = 2 << 20
)

// readRounds bounds the reads one readiness event may do, so that one busy
// socket cannot starve the others of a session's loop.
const readRounds = 16

// conn is one connection of a migration (rpc or mem), owned by a session's
// loop: a non-blocking socket with a frame decoder on the way in and a
// queue on the way out.
type conn struct {
	name string
	fd   int
	l    *loop
	dec  *wire.Decoder

	out    [][]byte
	outLen int

	paused  bool // reading stopped for flow control
	eof     bool // the peer closed its side
	closed  bool
	failure error

	lastRecv time.Time
	bytesIn  int64
	bytesOut int64

	// onMessage handles each decoded message; an error closes the conn.
	// The message may alias the decoder's buffer: copy what must outlive
	// the call.
	onMessage func(wire.Message) error
	// onClose runs once when the conn fails or the peer closes it: err
	// is io.EOF for an orderly close.
	onClose func(err error)
	// onDrain, if set, runs when queued bytes fall below lowWater.
	onDrain func()
}

// detach takes the socket out of a net.Conn: it duplicates the descriptor
// (close-on-exec) and closes the net.Conn, so that the session loop alone
// owns the socket. It never calls (*os.File).Fd, which would make the
// socket blocking.
func detach(c net.Conn) (int, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		c.Close()
		return -1, fmt.Errorf("%T has no file descriptor", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		c.Close()
		return -1, err
	}
	fd := -1
	var dupErr error
	if err := raw.Control(func(f uintptr) {
		fd, dupErr = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		c.Close()
		return -1, err
	}
	c.Close()
	if dupErr != nil {
		return -1, fmt.Errorf("dup socket: %w", dupErr)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// newConn registers fd with the loop. ch says which messages may arrive.
func newConn(l *loop, name string, fd int, ch wire.Channel, bufSize int) (*conn, error) {
	c := &conn{name: name, fd: fd, l: l, dec: wire.NewDecoder(ch, bufSize), lastRecv: time.Now()}
	if err := l.watch(fd, epoll.In|epoll.RDHup, c.handle); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *conn) handle(events uint32) {
	if c.closed {
		return
	}
	if events&(epoll.In|epoll.Hup|epoll.Err|epoll.RDHup) != 0 && !c.paused && !c.eof {
		c.read()
	}
	if c.closed {
		return
	}
	if events&epoll.Out != 0 || (events&epoll.Err != 0 && c.outLen > 0) {
		c.flush()
	}
}

func (c *conn) read() {
	for round := 0; round < readRounds && !c.paused && !c.closed; round++ {
		buf := c.dec.Space()
		n, err := unix.Read(c.fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			return
		}
		if err != nil {
			c.fail(fmt.Errorf("%s connection: %w", c.name, err))
			return
		}
		if n == 0 {
			c.eof = true
			c.update()
			if c.dec.Buffered() > 0 {
				c.fail(fmt.Errorf("%s connection: peer closed mid-frame: %w", c.name, io.ErrUnexpectedEOF))
			} else {
				c.fail(io.EOF)
			}
			return
		}
		c.dec.Commit(n)
		c.bytesIn += int64(n)
		c.lastRecv = time.Now()
		for !c.closed {
			m, err := c.dec.Next()
			if err != nil {
				c.fail(fmt.Errorf("%s connection: %w", c.name, err))
				return
			}
			if m == nil {
				break
			}
			if err := c.onMessage(m); err != nil {
				c.fail(err)
				return
			}
		}
	}
}

// send queues m and tries to write it at once.
func (c *conn) send(m wire.Message) error {
	b, err := wire.Marshal(m)
	if err != nil {
		return err
	}
	c.queue(b)
	return nil
}

// queue queues an encoded frame (or part of one) and tries to write it.
// The conn owns b from now on.
func (c *conn) queue(b []byte) {
	if c.closed || len(b) == 0 {
		return
	}
	c.out = append(c.out, b)
	c.outLen += len(b)
	c.flush()
}

// maxIovecs bounds one writev.
const maxIovecs = 64

func (c *conn) flush() {
	for c.outLen > 0 && !c.closed {
		iov := c.out
		if len(iov) > maxIovecs {
			iov = iov[:maxIovecs]
		}
		n, err := unix.Writev(c.fd, iov)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			break
		}
		if err != nil {
			c.fail(fmt.Errorf("%s connection: %w", c.name, err))
			return
		}
		c.bytesOut += int64(n)
		c.outLen -= n
		for n > 0 {
			if n >= len(c.out[0]) {
				n -= len(c.out[0])
				c.out[0] = nil
				c.out = c.out[1:]
			} else {
				c.out[0] = c.out[0][n:]
				n = 0
			}
		}
	}
	c.update()
	if c.outLen < lowWater && c.onDrain != nil && !c.closed {
		c.onDrain()
	}
}

// pause stops or restarts reading (flow control).
func (c *conn) pause(p bool) {
	if c.paused == p || c.closed {
		return
	}
	c.paused = p
	c.update()
	if !p && c.dec.Buffered() > 0 {
		// Frames may be waiting in the decoder already.
		for !c.closed && !c.paused {
			m, err := c.dec.Next()
			if err != nil {
				c.fail(fmt.Errorf("%s connection: %w", c.name, err))
				return
			}
			if m == nil {
				break
			}
			if err := c.onMessage(m); err != nil {
				c.fail(err)
				return
			}
		}
	}
}

func (c *conn) update() {
	if c.closed {
		return
	}
	var ev uint32
	if !c.paused && !c.eof {
		ev |= epoll.In | epoll.RDHup
	}
	if c.outLen > 0 {
		ev |= epoll.Out
	}
	c.l.setEvents(c.fd, ev)
}

// flushed reports whether everything queued has been written.
func (c *conn) flushed() bool { return c.outLen == 0 }

// fail closes the conn and reports err (io.EOF for an orderly close) to
// onClose, once.
func (c *conn) fail(err error) {
	if c.closed {
		return
	}
	c.failure = err
	c.close()
	if c.onClose != nil {
		c.onClose(err)
	}
}

// close closes the socket without reporting. Unsent data is dropped.
func (c *conn) close() {
	if c.closed {
		return
	}
	c.closed = true
	c.l.unwatch(c.fd)
	unix.Close(c.fd)
	c.out, c.outLen = nil, 0
}

// closeFd closes a socket no conn owns yet.
func closeFd(fd int) { unix.Close(fd) }
