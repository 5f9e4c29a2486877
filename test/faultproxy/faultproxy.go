// Package faultproxy is a TCP proxy between a source phauld and a
// destination phauld that reads the protocol's frames (pkg/wire's header
// format), so it knows where a migration is without any help from the
// daemons, and injects one fault at one point of it: it holds the frame of
// a rule, runs the rule's hook, then forwards the frame, loses it, drops
// every connection, or sends bad bytes instead. It can also silence a
// direction (a peer that stops answering) and heal it. The daemons must
// speak plain TCP (--insecure) for it to read frames. The integration
// tier's fault matrix and the unit tier of the commit rule both use it.
package faultproxy

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"github.com/phaul/phaul/pkg/wire"
)

// Directions a frame travels in.
const (
	ToDest   = "to-dest"
	ToSource = "to-source"
)

// Actions at the point where a rule fires.
const (
	// Pass forwards the frame held at the point, and everything after.
	Pass = "pass"
	// Drop closes every connection through the proxy (the held frame is
	// lost).
	Drop = "drop"
	// Swallow drops the held frame only: it never arrives, the
	// connections stay.
	Swallow = "swallow"
	// Inject sends bad bytes in place of the held frame: a peer that
	// breaks the protocol mid-session.
	Inject = "inject"
	// Trickle sends, in place of the held frame and of everything after
	// it in that direction, Bytes (a frame's header, say) and then one
	// more byte every TrickleEvery, never completing a frame: a peer
	// that keeps its connection busy and says nothing.
	Trickle = "trickle"
)

// Rule fires at the Nth frame of type Type going Dir: it holds that
// frame, runs Hook, then does Action.
type Rule struct {
	Dir    string
	Type   wire.Type
	Nth    int
	Hook   func()
	Action string
	// Bytes is what Inject sends instead of the held frame, and what
	// Trickle starts with.
	Bytes []byte
	// TrickleEvery is how often Trickle sends its next byte.
	TrickleEvery time.Duration

	seen  int
	fired chan struct{}
	done  chan struct{}
}

// Fired is closed when the rule matches, before its hook runs.
func (r *Rule) Fired() <-chan struct{} { return r.fired }

// Done is closed once the hook and the action are over.
func (r *Rule) Done() <-chan struct{} { return r.done }

// Proxy is one fault proxy.
type Proxy struct {
	l    net.Listener
	dial func(addr string) (net.Conn, error)

	mu     sync.Mutex
	cond   *sync.Cond
	target string
	rule   *Rule
	conns  []net.Conn
	silent map[string]bool
	closed bool
	wg     sync.WaitGroup
}

// New listens on addr and forwards every connection to target.
func New(addr, target string) (*Proxy, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return Serve(l, target, nil), nil
}

// Serve forwards every connection l accepts to target, connecting with
// dial (nil: net.Dial), e.g. from another network namespace.
func Serve(l net.Listener, target string, dial func(addr string) (net.Conn, error)) *Proxy {
	if dial == nil {
		dial = func(addr string) (net.Conn, error) { return net.Dial("tcp", addr) }
	}
	p := &Proxy{l: l, target: target, silent: map[string]bool{}, dial: dial}
	p.cond = sync.NewCond(&p.mu)
	p.wg.Add(1)
	go p.accept()
	return p
}

// Addr is the address to migrate to.
func (p *Proxy) Addr() string { return p.l.Addr().String() }

// SetTarget makes new connections go to addr (a destination that started
// again elsewhere).
func (p *Proxy) SetTarget(addr string) {
	p.mu.Lock()
	p.target = addr
	p.mu.Unlock()
}

// Arm sets the one rule.
func (p *Proxy) Arm(r *Rule) {
	r.fired = make(chan struct{})
	r.done = make(chan struct{})
	p.mu.Lock()
	p.rule = r
	p.mu.Unlock()
}

// Silence holds every frame going dir, on every connection, old and new,
// until Heal: the side that sends them seems to have stopped answering.
func (p *Proxy) Silence(dir string) {
	p.mu.Lock()
	p.silent[dir] = true
	p.mu.Unlock()
}

// Heal lets what Silence held go on, in order.
func (p *Proxy) Heal(dir string) {
	p.mu.Lock()
	p.silent[dir] = false
	p.cond.Broadcast()
	p.mu.Unlock()
}

// Close closes the listener and every connection, and waits for the
// proxy's goroutines.
func (p *Proxy) Close() {
	p.l.Close()
	p.mu.Lock()
	p.closed = true
	for _, c := range p.conns {
		c.Close()
	}
	p.cond.Broadcast()
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		src, err := p.l.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		target := p.target
		p.mu.Unlock()
		dst, err := p.dial(target)
		if err != nil {
			src.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, src, dst)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pump(src, dst, ToDest)
		go p.pump(dst, src, ToSource)
	}
}

// DropAll closes every connection through the proxy.
func (p *Proxy) DropAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}

// pump forwards frames from one side to the other until either closes.
func (p *Proxy) pump(from, to net.Conn, dir string) {
	defer p.wg.Done()
	defer to.Close()
	defer from.Close()
	var hdr [wire.HeaderLen]byte
	for {
		if _, err := io.ReadFull(from, hdr[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint32(hdr[4:])
		if n > wire.MaxPayload {
			return
		}
		frame := make([]byte, wire.HeaderLen+int(n))
		copy(frame, hdr[:])
		if _, err := io.ReadFull(from, frame[wire.HeaderLen:]); err != nil {
			return
		}
		if r := p.match(dir, wire.Type(hdr[3])); r != nil {
			close(r.fired)
			if r.Hook != nil {
				r.Hook()
			}
			switch r.Action {
			case Drop:
				p.DropAll()
				close(r.done)
				return
			case Swallow:
				close(r.done)
				continue
			case Inject:
				frame = r.Bytes
			case Trickle:
				close(r.done)
				p.trickle(to, r)
				return
			}
			close(r.done)
		}
		if !p.wait(dir) {
			return
		}
		if _, err := to.Write(frame); err != nil && !errors.Is(err, net.ErrClosed) {
			return
		}
	}
}

// trickle writes r.Bytes to to, then a zero byte every r.TrickleEvery,
// until the connection or the proxy closes. Nothing more is read from the
// other side: what it sends stays in its socket.
func (p *Proxy) trickle(to net.Conn, r *Rule) {
	if _, err := to.Write(r.Bytes); err != nil {
		return
	}
	for {
		time.Sleep(r.TrickleEvery)
		p.mu.Lock()
		closed := p.closed
		p.mu.Unlock()
		if closed {
			return
		}
		if _, err := to.Write([]byte{0}); err != nil {
			return
		}
	}
}

// wait blocks while dir is silenced; false if the proxy closed.
func (p *Proxy) wait(dir string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.silent[dir] && !p.closed {
		p.cond.Wait()
	}
	return !p.closed
}

// match counts the frame against the rule and returns the rule if it
// fires now (it fires once).
func (p *Proxy) match(dir string, typ wire.Type) *Rule {
	p.mu.Lock()
	defer p.mu.Unlock()
	r := p.rule
	if r == nil || r.Dir != dir || r.Type != typ {
		return nil
	}
	r.seen++
	if r.seen != r.Nth {
		return nil
	}
	p.rule = nil
	return r
}
