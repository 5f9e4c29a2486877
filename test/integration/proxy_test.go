//go:build linux

package integration

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"

	"github.com/phaul/phaul/pkg/wire"
)

// faultProxy sits between a source phauld and a destination phauld: the
// source migrates to the proxy's address, the proxy forwards every
// connection to the destination, frame by frame, and can inject one fault
// at one point of the protocol. It parses frames with pkg/wire's header
// format, so it knows where a migration is without any help from the
// daemons.
type faultProxy struct {
	t      *testing.T
	l      net.Listener
	target string

	mu    sync.Mutex
	rule  *rule
	conns []net.Conn
	wg    sync.WaitGroup
}

// Directions a frame travels in.
const (
	toDest   = "to-dest"
	toSource = "to-source"
)

// Actions at the point where a rule fires.
const (
	// actPass forwards the frame held at the point, and everything after.
	actPass = "pass"
	// actDrop closes every connection through the proxy (the held frame
	// is lost).
	actDrop = "drop"
	// actSwallow drops the held frame only: it never arrives, the
	// connections stay.
	actSwallow = "swallow"
	// actInject sends bad bytes in place of the held frame: a peer that
	// breaks the protocol mid-session.
	actInject = "inject"
)

// rule fires at the nth frame of type typ going dir: it holds that frame,
// runs hook, then does action.
type rule struct {
	dir    string
	typ    wire.Type
	nth    int
	hook   func()
	action string
	// inject is what actInject sends instead of the held frame.
	inject []byte

	seen int
	// fired is closed when the rule matches, before the hook runs; done
	// once the hook and the action are over.
	fired chan struct{}
	done  chan struct{}
}

func newFaultProxy(t *testing.T, addr, target string) *faultProxy {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{t: t, l: l, target: target}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *faultProxy) addr() string { return p.l.Addr().String() }

// arm sets the one rule. Its fired channel is closed once it has fired.
func (p *faultProxy) arm(r *rule) {
	r.fired = make(chan struct{})
	r.done = make(chan struct{})
	p.mu.Lock()
	p.rule = r
	p.mu.Unlock()
}

func (p *faultProxy) close() {
	p.l.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *faultProxy) accept() {
	defer p.wg.Done()
	for {
		src, err := p.l.Accept()
		if err != nil {
			return
		}
		dst, err := net.Dial("tcp", p.target)
		if err != nil {
			src.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, src, dst)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pump(src, dst, toDest)
		go p.pump(dst, src, toSource)
	}
}

// dropAll closes every connection through the proxy.
func (p *faultProxy) dropAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}

// pump forwards frames from one side to the other until either closes.
func (p *faultProxy) pump(from, to net.Conn, dir string) {
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
			if r.hook != nil {
				r.hook()
			}
			switch r.action {
			case actDrop:
				p.dropAll()
				close(r.done)
				return
			case actSwallow:
				close(r.done)
				continue
			case actInject:
				frame = r.inject
			}
			close(r.done)
		}
		if _, err := to.Write(frame); err != nil && !errors.Is(err, net.ErrClosed) {
			return
		}
	}
}

// match counts the frame against the rule and returns the rule if it
// fires now (it fires once).
func (p *faultProxy) match(dir string, typ wire.Type) *rule {
	p.mu.Lock()
	defer p.mu.Unlock()
	r := p.rule
	if r == nil || r.dir != dir || r.typ != typ {
		return nil
	}
	r.seen++
	if r.seen != r.nth {
		return nil
	}
	p.rule = nil
	return r
}
