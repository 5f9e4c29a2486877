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
// loop: a link (socket, TLS) with a frame decoder on the way in and a queue
// on the way out.
type conn struct {
	name string
	link *link
	l    *loop
	dec  *wire.Decoder

	paused  bool // reading stopped for flow control
	eof     bool // the peer closed its side
	closed  bool
	failure error
	again   *timer // a read cut short, to resume

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

// newConn registers lk with the loop. ch says which messages may arrive.
func newConn(l *loop, name string, lk *link, ch wire.Channel, bufSize int) (*conn, error) {
	lk.enterLoop()
	c := &conn{name: name, link: lk, l: l, dec: wire.NewDecoder(ch, bufSize), lastRecv: time.Now()}
	if err := l.watch(lk.fd(), epoll.In|epoll.RDHup, c.handle); err != nil {
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
	if events&epoll.Out != 0 || (events&epoll.Err != 0 && c.link.queued() > 0) {
		c.flush()
	}
}

func (c *conn) read() {
	c.again.cancel()
	for round := 0; !c.paused && !c.closed; round++ {
		if round == readRounds {
			// Fair to the loop's other sockets: go on next round. A TLS
			// link may hold whole records the socket no longer signals,
			// so this cannot wait for epoll.
			c.again = c.l.after(0, c.read)
			return
		}
		n, err := c.link.read(c.dec.Space())
		if err == errWouldBlock {
			return
		}
		if err == io.EOF {
			c.eof = true
			c.update()
			if c.dec.Buffered() > 0 {
				c.fail(fmt.Errorf("%s connection: peer closed mid-frame: %w", c.name, io.ErrUnexpectedEOF))
			} else {
				c.fail(io.EOF)
			}
			return
		}
		if err != nil {
			c.fail(fmt.Errorf("%s connection: %w", c.name, err))
			return
		}
		c.dec.Commit(n)
		c.bytesIn += int64(n)
		c.lastRecv = time.Now()
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
	if err := c.link.send(b); err != nil {
		c.fail(fmt.Errorf("%s connection: %w", c.name, err))
		return
	}
	c.bytesOut += int64(len(b))
	c.flush()
}

// maxIovecs bounds one writev.
const maxIovecs = 64

func (c *conn) flush() {
	if c.closed {
		return
	}
	if err := c.link.flush(); err != nil {
		c.fail(fmt.Errorf("%s connection: %w", c.name, err))
		return
	}
	c.update()
	if c.link.queued() < lowWater && c.onDrain != nil && !c.closed {
		c.onDrain()
	}
}

// outLen is how many bytes wait to be written.
func (c *conn) outLen() int {
	if c.closed {
		return 0
	}
	return c.link.queued()
}

// pause stops or restarts reading (flow control).
func (c *conn) pause(p bool) {
	if c.paused == p || c.closed {
		return
	}
	c.paused = p
	c.update()
	if !p {
		// Frames may wait in the decoder, and records in TLS's buffers,
		// that no readiness event will announce.
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
		if !c.closed && !c.paused {
			c.read()
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
	if c.link.queued() > 0 {
		ev |= epoll.Out
	}
	c.l.setEvents(c.link.fd(), ev)
}

// flushed reports whether everything queued has been written.
func (c *conn) flushed() bool { return c.outLen() == 0 }

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
	c.again.cancel()
	c.l.unwatch(c.link.fd())
	c.link.close()
}
