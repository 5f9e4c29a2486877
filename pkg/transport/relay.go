//go:build linux

package transport

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/epoll"
	"github.com/phaul/phaul/pkg/loop"
	"github.com/phaul/phaul/pkg/pagestream"
	"github.com/phaul/phaul/pkg/precopy"
	"github.com/phaul/phaul/pkg/wire"
)

// Relay carries CRIU's page-server stream between a local socket, whose
// other end CRIU holds, and the mem connection to the peer daemon. The
// same relay runs on both sides: the source's CRIU dumps into it, the
// destination's CRIU page server reads from it, and the page server's
// acknowledgements travel back the same way. phauld sits in the middle of
// the stream so that it can count it (and, later, encrypt it).
type Relay struct {
	l     *loop.Loop
	local int // our end of the socketpair; CRIU has the other
	mem   *Conn

	localOut    queue
	localPaused bool // reading local stopped: mem's queue is full
	localEOF    bool // CRIU closed its side
	remoteEOF   bool // the peer's CRIU closed its side
	shutdown    bool // we shut down writing to CRIU
	closed      bool

	// sent and received count page-stream bytes (payload, not framing);
	// sentWire what sent became on the wire (compressed or not).
	sent, received, sentWire int64
	// zbuf is reused for compressed frames when the mem link copies.
	zbuf []byte
	// buf is reused for reads from CRIU when the mem link copies what it
	// sends (TLS); a plain link sends the buffer itself.
	buf []byte

	// HoldEOF keeps the end of the peer's page stream from CRIU: a lazy
	// dump's page server takes a clean end of stream for a finished
	// transfer. It ends well by lazy-pages' own close command, inside the
	// stream, or as a failure by close (a reset).
	HoldEOF bool

	// Codec, if set, compresses what CRIU writes (frames that come out
	// smaller go as PageDataZ) and decompresses the peer's PageDataZ.
	// Without it PageDataZ is a protocol error.
	Codec *Codec

	// Diff, if set (a pre-copy source), rewrites what CRIU writes
	// against the pages sent ahead: unchanged pages go as PageRefs.
	Diff *precopy.Diff
	// Ahead and Fill, if set (a pre-copy destination), keep the pages
	// sent ahead (PrecopyPages) and fill a PageRefs in from them, as
	// precopy.Store does. Without them both are protocol errors.
	Ahead func(frame []byte) error
	Fill  func(dst, frame []byte) ([]byte, error)
	fill  []byte
	ahead []byte // a PrecopyPagesZ decoded

	// Fetch, if set (a lazy destination, see FetchAhead), stands between
	// CRIU's lazy-pages and the peer's page server.
	Fetch *pagestream.Fetcher

	// OnError reports a failure of the local side. Failures of the mem
	// side go to the mem conn's onClose.
	OnError func(error)
	// OnEnd runs once both directions have ended.
	OnEnd func()
}

// newPageSocket returns a connected pair of stream sockets: ours
// (non-blocking, close-on-exec) and CRIU's, as a file to pass to it.
// deepBuffers gives page sockets 4 MiB buffers, so that CRIU can hand
// over a whole page pipe at once. SO_*BUFFORCE may exceed the sysctl
// limits; plain SO_*BUF if not root.
func deepBuffers(fds ...int) {
	for _, fd := range fds {
		for _, o := range [][2]int{{unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}, {unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}} {
			if unix.SetsockoptInt(fd, unix.SOL_SOCKET, o[0], 4<<20) != nil {
				unix.SetsockoptInt(fd, unix.SOL_SOCKET, o[1], 4<<20)
			}
		}
	}
}

func newPageSocket() (ours int, theirs *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, nil, fmt.Errorf("page socketpair: %w", err)
	}
	deepBuffers(fds[:]...)
	if err := unix.SetNonblock(fds[0], true); err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		return -1, nil, err
	}
	return fds[0], os.NewFile(uintptr(fds[1]), "criu-pages"), nil
}

// newTCPPageSocket is newPageSocket over loopback TCP, for a lazy dump:
// unlike a Unix socket, phauld can then end the connection with a reset
// (see Relay.Close), which CRIU tells apart from a clean close.
func newTCPPageSocket() (ours int, theirs *os.File, err error) {
	lfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, nil, fmt.Errorf("page socket: %w", err)
	}
	defer unix.Close(lfd)
	loopback := &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
	if err := unix.Bind(lfd, loopback); err != nil {
		return -1, nil, fmt.Errorf("page socket: bind: %w", err)
	}
	if err := unix.Listen(lfd, 1); err != nil {
		return -1, nil, fmt.Errorf("page socket: listen: %w", err)
	}
	addr, err := unix.Getsockname(lfd)
	if err != nil {
		return -1, nil, fmt.Errorf("page socket: %w", err)
	}
	cfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, nil, fmt.Errorf("page socket: %w", err)
	}
	if err := unix.Connect(cfd, addr); err != nil {
		unix.Close(cfd)
		return -1, nil, fmt.Errorf("page socket: connect: %w", err)
	}
	mine, err := unix.Getsockname(cfd)
	if err != nil {
		unix.Close(cfd)
		return -1, nil, fmt.Errorf("page socket: %w", err)
	}
	// Only our own connection is taken: anything else that raced to the
	// port is refused.
	for {
		afd, peer, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		if err != nil {
			unix.Close(cfd)
			return -1, nil, fmt.Errorf("page socket: accept: %w", err)
		}
		if p, ok := peer.(*unix.SockaddrInet4); ok && p.Port == mine.(*unix.SockaddrInet4).Port && p.Addr == loopback.Addr {
			for _, fd := range []int{afd, cfd} {
				unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
			}
			deepBuffers(afd, cfd)
			// Every close of our end is a reset, even the kernel's when
			// phauld dies: a clean end of stream would tell a lazy
			// dump's page server the transfer succeeded, and CRIU would
			// leave the tree stopped instead of resuming it. The
			// successful end needs no FIN from us: lazy-pages ends it
			// with a close command inside the stream.
			if err := unix.SetsockoptLinger(afd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}); err != nil {
				unix.Close(afd)
				unix.Close(cfd)
				return -1, nil, fmt.Errorf("page socket: SO_LINGER: %w", err)
			}
			if err := unix.SetNonblock(afd, true); err != nil {
				unix.Close(afd)
				unix.Close(cfd)
				return -1, nil, err
			}
			return afd, os.NewFile(uintptr(cfd), "criu-pages"), nil
		}
		unix.Close(afd)
	}
}

// OpenRelay makes the socket a CRIU gets for its page stream (a socket
// pair; with tcp, a loopback TCP connection whose every close is a reset)
// and the relay between our end of it and mem. The caller hands theirs to
// CRIU and closes it.
func OpenRelay(l *loop.Loop, mem *Conn, tcp bool, onError func(error)) (r *Relay, theirs *os.File, err error) {
	open := newPageSocket
	if tcp {
		open = newTCPPageSocket
	}
	local, theirs, err := open()
	if err != nil {
		return nil, nil, err
	}
	if r, err = newRelay(l, local, mem); err != nil {
		unix.Close(local)
		theirs.Close()
		return nil, nil, err
	}
	r.OnError = onError
	return r, theirs, nil
}

func newRelay(l *loop.Loop, local int, mem *Conn) (*Relay, error) {
	r := &Relay{l: l, local: local, mem: mem}
	if err := l.Watch(local, epoll.In|epoll.RDHup, r.handle); err != nil {
		return nil, err
	}
	mem.OnDrain = r.memDrained
	return r, nil
}

func (r *Relay) handle(events uint32) {
	if r.closed {
		return
	}
	if events&(epoll.In|epoll.Hup|epoll.Err|epoll.RDHup) != 0 && !r.localPaused && !r.localEOF {
		r.readLocal()
	}
	if !r.closed && events&(epoll.Out|epoll.Err) != 0 {
		r.flushLocal()
	}
}

// smallFrame is the largest read a plain link gets a copy of.
const smallFrame = 64 << 10

// readLocal forwards what CRIU wrote as PageData frames. Each read lands
// behind room for the frame header, so the bytes are not copied again.
func (r *Relay) readLocal() {
	for round := 0; round < readRounds && !r.localPaused && !r.closed; round++ {
		if r.buf == nil {
			r.buf = make([]byte, wire.HeaderLen+wire.DataChunk)
		}
		buf := r.buf
		n, err := unix.Read(r.local, buf[wire.HeaderLen:])
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			break
		}
		if err != nil {
			r.fail(fmt.Errorf("read page stream from criu: %w", err))
			return
		}
		if n == 0 {
			r.localEOF = true
			r.mem.Send(&wire.PageEOF{})
			r.update()
			r.checkEnd()
			return
		}
		r.sent += int64(n)
		if r.Fetch != nil {
			if err := r.Fetch.Local(buf[wire.HeaderLen : wire.HeaderLen+n]); err != nil {
				r.fail(err)
				return
			}
			if r.mem.OutLen() >= HighWater {
				r.localPaused = true
			}
			continue
		}
		if r.Diff != nil {
			if err := r.Diff.Write(buf[wire.HeaderLen : wire.HeaderLen+n]); err != nil {
				r.fail(err)
				return
			}
			if r.mem.OutLen() >= HighWater {
				r.localPaused = true
			}
			continue
		}
		if z := r.compress(buf[wire.HeaderLen : wire.HeaderLen+n]); z != nil {
			r.sentWire += int64(len(z) - wire.HeaderLen)
			r.mem.Queue(z)
			if r.mem.OutLen() >= HighWater {
				r.localPaused = true
			}
			continue
		}
		r.sentWire += int64(n)
		wire.PutHeader(buf, wire.TypePageData, n)
		frame := buf[:wire.HeaderLen+n]
		if !r.mem.link.Copies() {
			// A plain link keeps the frame until the socket takes it,
			// so the buffer cannot be read into again. A small read (a
			// lazy page answer) is copied out; a big one keeps its
			// buffer and the next read gets a new one. A fresh 1 MiB
			// buffer per 4 KiB answer made the garbage collector the
			// bottleneck of lazy migrations.
			if n <= smallFrame {
				frame = append([]byte(nil), frame...)
			} else {
				r.buf = nil
			}
		}
		r.mem.Queue(frame)
		if r.mem.OutLen() >= HighWater {
			r.localPaused = true
		}
	}
	r.update()
}

// compress returns b as a whole PageDataZ frame, or nil if there is no
// codec or b does not shrink. A plain link keeps the frame until written,
// so it gets a buffer of its own; a copying one reuses zbuf.
func (r *Relay) compress(b []byte) []byte {
	if r.Codec == nil {
		return nil
	}
	var dst []byte
	if r.mem.link.Copies() {
		dst = r.zbuf[:0]
	}
	dst = append(dst, make([]byte, wire.HeaderLen)...)
	z := r.Codec.Compress(dst, b)
	if z == nil {
		return nil
	}
	if r.mem.link.Copies() {
		r.zbuf = z
	}
	wire.PutHeader(z, wire.TypePageDataZ, len(z)-wire.HeaderLen)
	return z
}

// diffOut queues what the Diff makes of CRIU's stream.
type diffOut Relay

func (o *diffOut) Literal(b []byte) {
	r := (*Relay)(o)
	if z := r.compress(b); z != nil {
		r.sentWire += int64(len(z) - wire.HeaderLen)
		if r.mem.link.Copies() {
			z = append([]byte(nil), z...) // zbuf is reused
		}
		r.mem.Queue(z)
		return
	}
	r.sentWire += int64(len(b))
	r.mem.Send(&wire.PageData{Data: b})
}

func (o *diffOut) Refs(id, addr uint64, hashes []byte) {
	r := (*Relay)(o)
	m := &wire.PageRefs{Data: precopy.AppendRefs(nil, id, addr, hashes)}
	r.sentWire += int64(len(m.Data))
	r.mem.Send(m)
}

// DiffAgainst makes the relay rewrite CRIU's stream against sent (see
// Diff).
func (r *Relay) DiffAgainst(sent *precopy.Sent) {
	r.Diff = precopy.NewDiff(sent, (*diffOut)(r))
}

// FetchAhead makes a lazy destination's relay fetch the lazy ranges of
// plan ahead of CRIU's lazy-pages, once StartFetching is called, holding
// at most window bytes of them (see pagestream.Fetcher).
func (r *Relay) FetchAhead(plan []pagestream.Range, window uint64) {
	r.Fetch = pagestream.NewFetcher(plan, func(b []byte) {
		r.sentWire += int64(len(b))
		r.mem.Send(&wire.PageData{Data: b})
	}, r.writeLocal)
	r.Fetch.Window = window
}

// StartFetching starts fetching ahead (if FetchAhead was called).
func (r *Relay) StartFetching() {
	if r != nil && r.Fetch != nil && !r.closed {
		r.Fetch.Start()
	}
}

// fromPeer hands the peer's page stream to CRIU, through the fetcher if
// there is one.
func (r *Relay) fromPeer(b []byte) error {
	r.received += int64(len(b))
	if r.Fetch != nil {
		if err := r.Fetch.Peer(b); err != nil {
			return fmt.Errorf("page stream: %w", err)
		}
		return nil
	}
	r.writeLocal(b)
	return nil
}

// memDrained restarts reading CRIU's side once the mem queue has room.
func (r *Relay) memDrained() {
	if r.localPaused && !r.closed {
		r.localPaused = false
		r.update()
	}
}

// FromPeer handles a page message from the mem connection.
func (r *Relay) FromPeer(m wire.Message) error {
	switch m := m.(type) {
	case *wire.PageData:
		if r.remoteEOF {
			return fmt.Errorf("page data after end of page stream")
		}
		return r.fromPeer(m.Data)
	case *wire.PageDataZ:
		if r.remoteEOF {
			return fmt.Errorf("page data after end of page stream")
		}
		if r.Codec == nil {
			return fmt.Errorf("compressed page data, but no compression was agreed")
		}
		b, err := r.Codec.Decompress(m.Data)
		if err != nil {
			return fmt.Errorf("page stream: %w", err)
		}
		return r.fromPeer(b)
	case *wire.PrecopyPages:
		if r.Ahead == nil {
			return fmt.Errorf("pages sent ahead, but this is not a pre-copy migration")
		}
		return r.Ahead(m.Data)
	case *wire.PrecopyPagesZ:
		if r.Ahead == nil {
			return fmt.Errorf("pages sent ahead, but this is not a pre-copy migration")
		}
		if r.Codec == nil {
			return fmt.Errorf("compressed pages sent ahead, but no compression was agreed")
		}
		if len(m.Data) <= precopy.HeadLen {
			return fmt.Errorf("compressed pages sent ahead: a frame of %d bytes", len(m.Data))
		}
		b, err := r.Codec.Decompress(m.Data[precopy.HeadLen:])
		if err != nil {
			return fmt.Errorf("pages sent ahead: %w", err)
		}
		r.ahead = append(append(r.ahead[:0], m.Data[:precopy.HeadLen]...), b...)
		return r.Ahead(r.ahead)
	case *wire.PageRefs:
		if r.remoteEOF {
			return fmt.Errorf("page data after end of page stream")
		}
		if r.Fill == nil {
			return fmt.Errorf("page references, but this is not a pre-copy migration")
		}
		b, err := r.Fill(r.fill[:0], m.Data)
		if err != nil {
			return fmt.Errorf("page stream: %w", err)
		}
		r.fill = b
		r.received += int64(len(b))
		r.writeLocal(b)
	case *wire.PageEOF:
		if r.remoteEOF {
			return fmt.Errorf("second end of page stream")
		}
		r.remoteEOF = true
		r.flushLocal()
	default:
		return fmt.Errorf("unexpected %s on mem connection", m.Type())
	}
	return nil
}

// writeLocal writes b to CRIU, queueing (a copy of) what does not fit now.
// b may alias the mem decoder's buffer.
func (r *Relay) writeLocal(b []byte) {
	if r.closed {
		return
	}
	if r.localOut.len() == 0 {
		n, err := write(r.local, b)
		if err != nil {
			r.fail(fmt.Errorf("write page stream to criu: %w", err))
			return
		}
		b = b[n:]
	}
	if len(b) > 0 {
		r.localOut.push(append([]byte(nil), b...))
		if r.localOut.len() >= HighWater {
			r.mem.Pause(true)
		}
	}
	r.update()
}

func (r *Relay) flushLocal() {
	if _, err := r.localOut.writeTo(r.local, -1); err != nil {
		r.fail(fmt.Errorf("write page stream to criu: %w", err))
		return
	}
	if r.closed {
		return
	}
	if r.localOut.len() < LowWater {
		// Restarting mem hands it the frames it holds: one may fail the
		// relay (closing its socket), or end the stream.
		r.mem.Pause(false)
		if r.closed {
			return
		}
	}
	if r.remoteEOF && r.localOut.len() == 0 && !r.shutdown && !r.HoldEOF {
		r.shutdown = true
		// CRIU may be gone already; then there is nobody to tell.
		unix.Shutdown(r.local, unix.SHUT_WR)
	}
	r.update()
	r.checkEnd()
}

func (r *Relay) update() {
	if r.closed {
		return
	}
	var ev uint32
	if !r.localPaused && !r.localEOF {
		ev |= epoll.In | epoll.RDHup
	}
	if r.localOut.len() > 0 {
		ev |= epoll.Out
	}
	if err := r.l.SetEvents(r.local, ev); err != nil {
		// Unwatchable, CRIU's side would never be served again.
		r.fail(fmt.Errorf("page stream from criu: %w", err))
	}
}

func (r *Relay) checkEnd() {
	if r.localEOF && r.shutdown && r.OnEnd != nil {
		end := r.OnEnd
		r.OnEnd = nil
		end()
	}
}

func (r *Relay) fail(err error) {
	if r.closed {
		return
	}
	r.Close()
	if r.OnError != nil {
		r.OnError(err)
	}
}

// Close closes our end of the local socket: a CRIU still writing to it
// fails, which is how a dump in progress is aborted. On a lazy dump's TCP
// socket the close is a reset (SO_LINGER 0 from its creation): CRIU's
// lazy page server reads ECONNRESET, takes the transfer for failed and
// resumes the tree, where a clean end of stream would count as success.
func (r *Relay) Close() {
	if r.closed {
		return
	}
	r.closed = true
	r.l.Unwatch(r.local)
	unix.Close(r.local)
	r.localOut = queue{}
	r.mem.OnDrain = nil
}

// Sent and Received count the page-stream bytes that crossed the relay
// (payload, not framing), as CRIU wrote and read them; SentWire is what
// Sent came to on the wire (less, compressed).
func (r *Relay) Sent() int64     { return r.sent }
func (r *Relay) SentWire() int64 { return r.sentWire }
func (r *Relay) Received() int64 { return r.received }
