//go:build linux

package session

import (
	"bytes"
	"net"
	"net/netip"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/version"
	"github.com/phaul/phaul/pkg/wire"
)

// Admission bounds the connections that are not a session yet, so that
// nobody who can reach the port stops migrations by opening connections
// and saying nothing, or half of a migration and never the rest. Each
// stage has a total and a per-address bound; a new connection that finds
// its stage full takes the place of the oldest one there (from its own
// address first), unless that one is too young to be anything but a
// real migration's connection at work: then the new one is refused, with
// a reply the source shows as "the destination is saturated".
//
//	idle:      accepted, nothing received yet; dropped after FirstByte
//	handshake: TLS and the Hello being read
//	halves:    one connection of a pair waiting for the other
//	           (PairTimeout); dropped at once if its peer closes it
type Admission struct {
	// AllowPeers, if set, are the only source addresses accepted
	// (phauld --allow-peer); others are refused before any byte is read.
	AllowPeers []netip.Prefix
	// FirstByte is how long a new connection may stay silent.
	FirstByte time.Duration
	// Idle bounds connections that have sent nothing yet (no per-address
	// bound: the oldest gives way).
	Idle int
	// Handshakes and HandshakesPerAddr bound handshakes in progress;
	// one younger than HandshakeGrace is never displaced.
	Handshakes, HandshakesPerAddr int
	HandshakeGrace                time.Duration
	// Halves and HalvesPerAddr bound lone connections waiting for their
	// pair; one younger than HalfGrace is never displaced.
	Halves, HalvesPerAddr int
	HalfGrace             time.Duration
}

func (a *Admission) setDefaults() {
	if a.FirstByte == 0 {
		a.FirstByte = 3 * time.Second
	}
	if a.Idle == 0 {
		a.Idle = 1024
	}
	if a.Handshakes == 0 {
		a.Handshakes = 256
	}
	if a.HandshakesPerAddr == 0 {
		a.HandshakesPerAddr = 32
	}
	if a.HandshakeGrace == 0 {
		a.HandshakeGrace = time.Second
	}
	if a.Halves == 0 {
		a.Halves = 128
	}
	if a.HalvesPerAddr == 0 {
		a.HalvesPerAddr = 16
	}
	if a.HalfGrace == 0 {
		a.HalfGrace = 250 * time.Millisecond
	}
}

// allowed reports whether addr may connect at all.
func (a *Admission) allowed(addr netip.Addr) bool {
	if len(a.AllowPeers) == 0 {
		return true
	}
	for _, p := range a.AllowPeers {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// peerAddr is c's remote address without its port, IPv4 unmapped.
func peerAddr(a net.Addr) netip.Addr {
	if ap, err := netip.ParseAddrPort(a.String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

// Stages of an incoming connection before it is a session.
const (
	stageIdle = iota
	stageHandshake
)

// incoming is a connection in the idle or handshake stage.
type incoming struct {
	lk      *transport.Link
	addr    netip.Addr
	stage   int
	since   time.Time
	evicted bool // displaced: no longer counted, its goroutine closes it
}

// enter registers a new connection as idle, displacing the oldest idle
// one if the stage is full (m.mu held). It returns nil when phauld is
// closing.
func (m *Manager) enter(lk *transport.Link, addr netip.Addr) *incoming {
	if m.closing {
		return nil
	}
	a := &m.cfg.Admission
	if m.stageCount(stageIdle, netip.Addr{}) >= a.Idle {
		if old := m.oldest(stageIdle, netip.Addr{}, 0); old != nil {
			m.evict(old)
			m.drops.add(m.log, "idle connections dropped: more than the bound were waiting to send their first byte", old.addr)
		}
	}
	in := &incoming{lk: lk, addr: addr, stage: stageIdle, since: time.Now()}
	m.incoming[lk] = in
	return in
}

// startHandshake moves in to the handshake stage if there is room, by
// displacing the oldest handshake past its grace (from in's address if
// that address is at its bound). False: saturated (m.mu held).
func (m *Manager) startHandshake(in *incoming) bool {
	if in.evicted || m.closing {
		return false
	}
	a := &m.cfg.Admission
	if m.stageCount(stageHandshake, in.addr) >= a.HandshakesPerAddr {
		old := m.oldest(stageHandshake, in.addr, a.HandshakeGrace)
		if old == nil {
			return false
		}
		m.evict(old)
	} else if m.stageCount(stageHandshake, netip.Addr{}) >= a.Handshakes {
		old := m.oldest(stageHandshake, netip.Addr{}, a.HandshakeGrace)
		if old == nil {
			return false
		}
		m.evict(old)
	}
	in.stage, in.since = stageHandshake, time.Now()
	return true
}

// displaced reports whether in was displaced by a newer connection (its
// handshake then failed for that reason alone): counted in one line, not
// logged alone.
func (m *Manager) displaced(in *incoming) bool {
	m.mu.Lock()
	evicted := in.evicted
	m.mu.Unlock()
	if evicted {
		m.drops.add(m.log, "handshakes displaced by newer connections: more than the bound were in progress", in.addr)
	}
	return evicted
}

// leave forgets in (m.mu held).
func (m *Manager) leave(in *incoming) { delete(m.incoming, in.lk) }

// stageCount counts the connections in stage, from addr if it is valid.
func (m *Manager) stageCount(stage int, addr netip.Addr) int {
	n := 0
	for _, in := range m.incoming {
		if !in.evicted && in.stage == stage && (!addr.IsValid() || in.addr == addr) {
			n++
		}
	}
	return n
}

// oldest is the oldest connection in stage (from addr if valid) that has
// been there at least grace, or nil.
func (m *Manager) oldest(stage int, addr netip.Addr, grace time.Duration) *incoming {
	var old *incoming
	cut := time.Now().Add(-grace)
	for _, in := range m.incoming {
		if in.evicted || in.stage != stage || addr.IsValid() && in.addr != addr || in.since.After(cut) {
			continue
		}
		if old == nil || in.since.Before(old.since) {
			old = in
		}
	}
	return old
}

// evict displaces in: it stops counting at once, and its goroutine, woken
// by the shutdown, closes it.
func (m *Manager) evict(in *incoming) {
	in.evicted = true
	in.lk.Shutdown()
}

// makeRoomForHalf finds room for a new lone connection from addr among
// m.halves, displacing the oldest one past its grace if a bound is
// reached. False: saturated (m.mu held).
func (m *Manager) makeRoomForHalf(addr netip.Addr) bool {
	a := &m.cfg.Admission
	count := func(from netip.Addr) int {
		n := 0
		for _, h := range m.halves {
			if !from.IsValid() || h.addr == from {
				n++
			}
		}
		return n
	}
	from := netip.Addr{}
	switch {
	case count(addr) >= a.HalvesPerAddr:
		from = addr
	case len(m.halves) >= a.Halves:
	default:
		return true
	}
	var oldID wire.SessionID
	var old *half
	cut := time.Now().Add(-a.HalfGrace)
	for id, h := range m.halves {
		if from.IsValid() && h.addr != from || h.since.After(cut) {
			continue
		}
		if old == nil || h.since.Before(old.since) {
			oldID, old = id, h
		}
	}
	if old == nil {
		return false
	}
	delete(m.halves, oldID)
	for _, c := range old.drop() {
		if c != nil {
			c.Close()
		}
	}
	m.drops.add(m.log, "lone connections dropped to make room: more than the bound were waiting for their pair", old.addr)
	return true
}

// watchLone drops the lone connection of role in h as soon as its peer
// closes it, so that a closed connection does not hold a place until the
// pair timeout. It ends when the pair completes or the half is dropped.
func (m *Manager) watchLone(id wire.SessionID, h *half, role int, lk *transport.Link) {
	for {
		m.mu.Lock()
		mine := m.halves[id] == h && h.conns[role] == lk
		m.mu.Unlock()
		if !mine {
			return
		}
		// While the half holds lk nobody else closes it, so its
		// descriptor is lk's; if it was dropped meanwhile, the check
		// under the lock below sees it.
		if !lk.PeerClosed(200 * time.Millisecond) {
			continue
		}
		m.mu.Lock()
		if m.halves[id] != h || h.conns[role] != lk || !h.ready[role] {
			m.mu.Unlock()
			return
		}
		h.conns[role], h.ready[role] = nil, false
		if h.conns[0] == nil && h.conns[1] == nil {
			delete(m.halves, id)
			h.timer.Stop()
		}
		m.mu.Unlock()
		lk.Close()
		m.log.Debug("lone connection closed by its peer; its place is free", zap.Stringer("session", id))
		return
	}
}

// dropLog counts connections dropped by the admission bounds and logs
// them at most once every 10 s, so that a flood does not flood the
// journal too.
type dropLog struct {
	mu    sync.Mutex
	n     map[string]int
	peers map[string]map[netip.Addr]bool
	last  time.Time
}

func (d *dropLog) add(log *zap.Logger, what string, addr netip.Addr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.n == nil {
		d.n, d.peers = map[string]int{}, map[string]map[netip.Addr]bool{}
	}
	d.n[what]++
	if d.peers[what] == nil {
		d.peers[what] = map[netip.Addr]bool{}
	}
	if len(d.peers[what]) < 8 {
		d.peers[what][addr] = true
	}
	if time.Since(d.last) < 10*time.Second {
		return
	}
	d.last = time.Now()
	for w, n := range d.n {
		var peers []string
		for p := range d.peers[w] {
			peers = append(peers, p.String())
		}
		log.Warn(w, zap.Int("count", n), zap.Strings("peers", peers))
	}
	d.n, d.peers = map[string]int{}, map[string]map[netip.Addr]bool{}
}

// refuse tells the peer, in plain frames whatever the mode, why its
// connection is refused (code: one of wire's Refused codes): a source
// reads it even while it expects a TLS handshake (see refusalOf).
func refuse(lk *transport.Link, code, why string) {
	b, err := wire.Marshal(&wire.HelloReply{Code: code, Error: why, Daemon: version.Daemon()})
	if err == nil {
		lk.WritePlain(b, time.Now().Add(100*time.Millisecond))
	}
}

// plainPeer reports whether a connection's first bytes are phaul's plain
// frames: the peer runs with --insecure.
func plainPeer(preface []byte) bool {
	_, err := wire.ParseHeader(preface, wire.Handshake)
	return err == nil
}

// tlsPeer reports whether a connection's first bytes are a TLS
// handshake record (a ClientHello).
func tlsPeer(preface []byte) bool {
	return len(preface) >= 3 && preface[0] == 0x16 && preface[1] == 0x03
}

// refusalOf is the refusal a destination wrote in plain frames where the
// source expected a TLS handshake, or nil.
func refusalOf(preface []byte) *wire.HelloReply {
	msg, err := wire.ReadMessage(bytes.NewReader(preface), wire.Handshake)
	if err != nil {
		return nil
	}
	r, _ := msg.(*wire.HelloReply)
	if r == nil || r.OK {
		return nil
	}
	return r
}

// refusedError says, in the source's words, why the destination at addr
// refused a connection.
func refusedError(addr string, role wire.Role, r *wire.HelloReply) error {
	switch r.Code {
	case wire.RefusedBusy:
		return api.Errorf(api.CodeUnavailable,
			"the destination phauld at %s is saturated: too many connections there are not migrations yet (%s), and it refused this one; try again shortly. If it lasts, something floods it: 'journalctl -u phauld' there names the addresses, and phauld --allow-peer limits who may connect", addr, r.Error)
	case wire.RefusedPeer:
		return api.Errorf(api.CodePermission,
			"the destination phauld at %s does not accept connections from this host's address: add it to the destination's --allow-peer", addr)
	case wire.RefusedNeedsTLS:
		return api.Errorf(api.CodePrecondition,
			"the destination phauld at %s requires mutual TLS, and this phauld runs with --insecure: run both daemons with certificates (see 'phaulctl pki --help'), or both with --insecure", addr)
	case wire.RefusedInsecure:
		return api.Errorf(api.CodePrecondition,
			"the destination phauld at %s runs with --insecure, and this phauld uses mutual TLS: run both daemons with certificates, or both with --insecure", addr)
	}
	return api.Errorf(api.CodeUnavailable, "the destination phauld at %s refused the %s connection: %s", addr, role, r.Error)
}
