//go:build linux

package transport

import (
	"fmt"
	"io"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/epoll"
	"github.com/phaul/phaul/pkg/loop"
	"github.com/phaul/phaul/pkg/wire"
)

// Flow-control marks for queued outbound bytes: producers stop above
// HighWater and start again below LowWater.
const (
	HighWater = 8 << 20
	LowWater  = 2 << 20
)

// readRounds bounds the reads one readiness event may do, so that one busy
// socket cannot starve the others of a session's loop.
const readRounds = 16

// Conn is one connection of a migration (rpc or mem), owned by a session's
// loop: a Link (socket, TLS) with a frame decoder on the way in and a queue
// on the way out.
type Conn struct {
	name string
	link *Link
	l    *loop.Loop
	dec  *wire.Decoder

	paused  bool // reading stopped for flow control
	eof     bool // the peer closed its side
	closed  bool
	failure error
	again   *loop.Timer // a read cut short, to resume

	// pacer, if set, limits what Flush writes; held is the wake-up of a
	// flush it holds back (no epoll.Out meanwhile).
	pacer *Pacer
	held  *loop.Timer

	lastRecv time.Time
	// lastWord is when the last complete frame other than a Ping
	// arrived: a Pong answering ours, or data. Bytes alone are no word
	// (a peer trickling a frame a byte at a time says nothing).
	lastWord time.Time
	bytesIn  int64
	bytesOut int64
	// dataIn counts the bytes of complete frames other than Ping and
	// Pong that arrived; beatOut the bytes of Pings and Pongs sent:
	// what Moved leaves out.
	dataIn  int64
	beatOut int64

	// OnMessage handles each decoded message; an error closes the conn.
	// The message may alias the decoder's buffer: copy what must outlive
	// the call.
	OnMessage func(wire.Message) error
	// OnClose runs once when the conn fails or the peer closes it: err
	// is io.EOF for an orderly close.
	OnClose func(err error)
	// OnDrain, if set, runs when queued bytes fall below LowWater.
	OnDrain func()
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

// NewConn registers lk with the loop. ch says which messages may arrive.
func NewConn(l *loop.Loop, name string, lk *Link, ch wire.Channel, bufSize int) (*Conn, error) {
	lk.enterLoop()
	c := &Conn{name: name, link: lk, l: l, dec: wire.NewDecoder(ch, bufSize), lastRecv: time.Now(), lastWord: time.Now()}
	if err := l.Watch(lk.Fd(), epoll.In|epoll.RDHup, c.handle); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Conn) handle(events uint32) {
	if c.closed {
		return
	}
	if events&(epoll.In|epoll.Hup|epoll.Err|epoll.RDHup) != 0 && !c.paused && !c.eof {
		c.Read()
	}
	if c.closed {
		return
	}
	if events&epoll.Out != 0 || (events&epoll.Err != 0 && c.link.queued() > 0) {
		c.Flush()
	}
}

// Read reads and handles what has arrived, as a readiness event would.
func (c *Conn) Read() {
	c.again.Cancel()
	for round := 0; !c.paused && !c.closed; round++ {
		if round == readRounds {
			// Fair to the loop's other sockets: go on next round. A TLS
			// link may hold whole records the socket no longer signals,
			// so this cannot wait for epoll.
			c.again = c.l.After(0, c.Read)
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
		c.dispatch()
	}
}

// dispatch hands the whole frames the decoder holds to OnMessage, until
// the conn is paused or closed.
func (c *Conn) dispatch() {
	for !c.closed && !c.paused {
		before := c.dec.Buffered()
		m, err := c.dec.Next()
		if err != nil {
			c.fail(fmt.Errorf("%s connection: %w", c.name, err))
			return
		}
		if m == nil {
			return
		}
		switch m.Type() {
		case wire.TypePing:
		case wire.TypePong:
			c.lastWord = time.Now()
		default:
			c.lastWord = time.Now()
			c.dataIn += int64(before - c.dec.Buffered())
		}
		if err := c.OnMessage(m); err != nil {
			c.fail(err)
			return
		}
	}
}

// Send queues m and tries to write it at once.
func (c *Conn) Send(m wire.Message) error {
	b, err := wire.Marshal(m)
	if err != nil {
		return err
	}
	if t := m.Type(); (t == wire.TypePing || t == wire.TypePong) && !c.closed {
		c.beatOut += int64(len(b))
	}
	c.Queue(b)
	return nil
}

// Queue queues an encoded frame (or part of one) and tries to write it.
// The conn owns b from now on.
func (c *Conn) Queue(b []byte) {
	if c.closed || len(b) == 0 {
		return
	}
	if err := c.link.send(b); err != nil {
		c.fail(fmt.Errorf("%s connection: %w", c.name, err))
		return
	}
	c.bytesOut += int64(len(b))
	c.Flush()
}

// SetPacer makes the conn's writes keep to p's rate (nil: no limit, and
// what was held back may go at once). Conns on one loop may share a
// Pacer.
func (c *Conn) SetPacer(p *Pacer) {
	c.pacer = p
	if p == nil && c.held != nil {
		c.held.Cancel()
		c.held = nil
		c.update()
	}
}

// Flush writes what is queued, as much as the socket (and the pacer, if
// any) takes now.
func (c *Conn) Flush() {
	if c.closed || c.held != nil {
		return
	}
	limit := -1
	if c.pacer != nil {
		limit = c.pacer.Budget()
	}
	n, err := c.link.flush(limit)
	if c.pacer != nil {
		c.pacer.Spend(n)
	}
	if err != nil {
		c.fail(fmt.Errorf("%s connection: %w", c.name, err))
		return
	}
	if c.pacer != nil && c.link.queued() > 0 {
		if wait := c.pacer.Wait(); wait > 0 {
			c.held = c.l.After(wait, func() {
				c.held = nil
				c.Flush()
			})
		}
	}
	c.update()
	if c.link.queued() < LowWater && c.OnDrain != nil && !c.closed {
		c.OnDrain()
	}
}

// OutLen is how many bytes wait to be written.
func (c *Conn) OutLen() int {
	if c.closed {
		return 0
	}
	return c.link.queued()
}

// Pause stops or restarts reading (flow control).
func (c *Conn) Pause(p bool) {
	if c.paused == p || c.closed {
		return
	}
	c.paused = p
	c.update()
	if !p {
		// Frames may wait in the decoder, and records in TLS's buffers,
		// that no readiness event will announce.
		c.dispatch()
		if !c.closed && !c.paused {
			c.Read()
		}
	}
}

func (c *Conn) update() {
	if c.closed {
		return
	}
	var ev uint32
	if !c.paused && !c.eof {
		ev |= epoll.In | epoll.RDHup
	}
	if c.link.queued() > 0 && c.held == nil {
		ev |= epoll.Out
	}
	if err := c.l.SetEvents(c.link.Fd(), ev); err != nil {
		// Unwatchable, it would never be read or written again.
		c.fail(fmt.Errorf("%s connection: %w", c.name, err))
	}
}

// Flushed reports whether everything queued has been written.
func (c *Conn) Flushed() bool { return c.OutLen() == 0 }

// fail closes the conn and reports err (io.EOF for an orderly close) to
// OnClose, once.
func (c *Conn) fail(err error) {
	if c.closed {
		return
	}
	c.failure = err
	c.Close()
	if c.OnClose != nil {
		c.OnClose(err)
	}
}

// Close closes the socket without reporting. Unsent data is dropped.
func (c *Conn) Close() {
	if c.closed {
		return
	}
	c.closed = true
	c.again.Cancel()
	c.held.Cancel()
	c.l.Unwatch(c.link.Fd())
	c.link.Close()
}

// Closed reports whether the conn is closed.
func (c *Conn) Closed() bool { return c.closed }

// Link is the conn's link.
func (c *Conn) Link() *Link { return c.link }

// LastRecv is when bytes last arrived.
func (c *Conn) LastRecv() time.Time { return c.lastRecv }

// LastWord is when the peer last said something: a complete frame other
// than a Ping arrived (a Pong, or data). Liveness goes by it, not by
// bytes, so that a peer sending a frame a byte at a time, or only Pings,
// does not count as alive.
func (c *Conn) LastWord() time.Time { return c.lastWord }

// Moved counts the bytes that carried the migration forward: complete
// frames in and bytes queued out, heartbeats (Ping, Pong) left out. A
// phase's progress deadline goes by it.
func (c *Conn) Moved() int64 { return c.dataIn + c.bytesOut - c.beatOut }

// BytesIn and BytesOut count what crossed the connection.
func (c *Conn) BytesIn() int64  { return c.bytesIn }
func (c *Conn) BytesOut() int64 { return c.bytesOut }

// Pending reports whether bytes (or a hang-up) wait to be read that the
// loop has not read yet, on a conn that is not paused.
func (c *Conn) Pending() bool {
	if c.closed || c.paused {
		// Paused, it is not read until its consumer drains: what waits
		// there says nothing about the peer now.
		return false
	}
	fds := []unix.PollFd{{Fd: int32(c.link.Fd()), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0
}
