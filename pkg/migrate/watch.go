//go:build linux

package migrate

import (
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/epoll"
	"github.com/phaul/phaul/pkg/loop"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// phaseTimer logs one line per phase with its duration.
type phaseTimer struct {
	s     *Session
	log   *zap.Logger
	name  string
	start time.Time
	// took records each finished phase's duration in milliseconds.
	took map[string]int64
}

func newPhaseTimer(s *Session, log *zap.Logger) *phaseTimer {
	return &phaseTimer{s: s, log: log, took: map[string]int64{}}
}

// enter ends the current phase (logging it) and starts the next.
func (p *phaseTimer) enter(name string) {
	now := time.Now()
	if p.name != "" {
		d := now.Sub(p.start)
		p.took[p.name] += d.Milliseconds()
		p.log.Info("phase done", zap.String("phase", p.name), zap.Duration("duration", d))
	}
	p.name, p.start = name, now
	p.s.phase.Store(name)
}

// criuWatch drives a CRIU request from the loop: each event goes to fn.
// It stops watching once CRIU has sent the number of responses the request
// makes (notifications do not count), or failed. It then takes group and
// others' access to what CRIU left in dir (store.Private): CRIU writes
// its images and logs 0644.
type criuWatch struct {
	op        Op
	l         *loop.Loop
	dir       string
	log       *zap.Logger
	fn        func(criu.Event) error
	fail      func(error)
	responses int
	done      bool
}

// watchCRIU watches op, which will send responses responses (2 for a page
// server: its start, then WaitPID's answer).
func watchCRIU(l *loop.Loop, op Op, dir string, log *zap.Logger, responses int, fn func(criu.Event) error, fail func(error)) (*criuWatch, error) {
	w := &criuWatch{op: op, l: l, dir: dir, log: log, fn: fn, fail: fail, responses: responses}
	if err := l.Watch(op.Fd(), epoll.In, w.handle); err != nil {
		return nil, err
	}
	return w, nil
}

func (w *criuWatch) handle(uint32) {
	for !w.done {
		ev, err := w.op.Next()
		if errors.Is(err, criu.ErrAgain) {
			return
		}
		if err != nil {
			w.stop()
			w.fail(err)
			return
		}
		if ev.Notify == "" {
			w.responses--
			if w.responses <= 0 || ev.Err != nil {
				w.stop()
				if err := store.Private(w.dir); err != nil {
					w.log.Warn("cannot make the session's files private", zap.String("dir", w.dir), zap.Error(err))
				}
			}
		}
		if err := w.fn(ev); err != nil {
			w.stop()
			w.fail(err)
			return
		}
	}
}

// stop stops watching and closes the RPC socket (CRIU then finishes on
// its own; see criu.Op.Close).
func (w *criuWatch) stop() {
	if w.done {
		return
	}
	w.done = true
	w.l.Unwatch(w.op.Fd())
	w.op.Close()
}

// abandonGrace is how long an abandoned CRIU request may take to exit
// before it is killed (see Op.Abandon).
const abandonGrace = 3 * time.Second

// heartbeat keeps a session's peer honest. It pings the peer on the rpc
// connection every third of timeout, and calls silent once the peer has
// said nothing for timeout: no Pong to our Pings and no data, on any of
// the session's connections. Bytes that never complete a frame are not a
// word, nor are the peer's own Pings: a peer that only trickles, or only
// pings, is lost all the same.
//
// It also keeps each phase's progress deadline: if phaseTimeout is set,
// and for that long the phase has not changed and no byte of the
// migration has moved (Conn.Moved: data in or out, heartbeats left out),
// it calls stalled once for that phase. A peer that answers every Ping
// but never advances so cannot hold a session, nor a frozen tree.
type heartbeat struct {
	l        *loop.Loop
	rpc      *transport.Conn
	conns    []*transport.Conn
	timeout  time.Duration
	silent   func(time.Duration)
	seq      uint64
	lastPing time.Time
	t        *loop.Timer

	ph           *phaseTimer
	phaseTimeout time.Duration
	stalled      func(phase string, waited time.Duration)
	moved        int64     // Moved, summed, when last looked at
	progress     time.Time // when the phase last advanced or bytes moved
	stalledAt    time.Time // the phase start stalled was called for
}

func startHeartbeat(l *loop.Loop, rpc *transport.Conn, conns []*transport.Conn, timeout time.Duration, silent func(time.Duration)) *heartbeat {
	h := &heartbeat{l: l, rpc: rpc, conns: conns, timeout: timeout, silent: silent, lastPing: time.Now(), progress: time.Now()}
	h.t = l.After(h.tick(), h.beat)
	return h
}

// deadline sets the phases' progress deadline (0: none); ph is the
// machine's phase timer, stalled what to do when a phase stalls.
func (h *heartbeat) deadline(ph *phaseTimer, timeout time.Duration, stalled func(string, time.Duration)) {
	h.ph, h.phaseTimeout, h.stalled = ph, timeout, stalled
}

// tick is how often the heartbeat looks: often enough that silence is
// noticed within a few percent of timeout.
func (h *heartbeat) tick() time.Duration {
	t := min(time.Second, max(h.timeout/10, 10*time.Millisecond))
	if h.phaseTimeout > 0 {
		t = min(t, max(h.phaseTimeout/10, 10*time.Millisecond))
	}
	return t
}

func (h *heartbeat) beat() {
	var last time.Time
	for _, c := range h.conns {
		if c.LastWord().After(last) {
			last = c.LastWord()
		}
	}
	if quiet := time.Since(last); quiet >= h.timeout {
		// Frames may be waiting that this loop has not read yet (it was
		// descheduled, or the whole daemon stopped and resumed): they
		// may hold a word from the peer. Read them first.
		for _, c := range h.conns {
			if c.Pending() {
				h.t = h.l.After(time.Millisecond, h.beat)
				return
			}
		}
		h.silent(quiet)
		return
	}
	if h.phaseTimeout > 0 {
		h.checkProgress()
	}
	if time.Since(h.lastPing) >= h.timeout/3 {
		h.seq++
		h.lastPing = time.Now()
		h.rpc.Send(&wire.Ping{Seq: h.seq})
	}
	h.t = h.l.After(h.tick(), h.beat)
}

// checkProgress calls stalled once a phase has gone phaseTimeout without
// advancing and without a byte of the migration moving.
func (h *heartbeat) checkProgress() {
	now := time.Now()
	var moved int64
	for _, c := range h.conns {
		moved += c.Moved()
	}
	if moved != h.moved || h.ph.start.After(h.progress) {
		h.moved, h.progress = moved, now
		return
	}
	if waited := now.Sub(h.progress); waited >= h.phaseTimeout && !h.stalledAt.Equal(h.ph.start) {
		h.stalledAt = h.ph.start
		h.stalled(h.ph.name, waited)
	}
}

// stop stops the heartbeat. A nil heartbeat is a no-op.
func (h *heartbeat) stop() {
	if h != nil {
		h.t.Cancel()
	}
}

// stalledError is the error of a phase that made no progress within its
// deadline; peer names the other side ("destination", "source").
func stalledError(phase string, waited time.Duration, peer string) error {
	return api.Errorf(api.CodeAborted,
		"no progress in phase %s for %v: nothing advanced and no byte of the migration moved, though the %s still answers pings (the limit is phauld --phase-timeout)",
		phase, waited.Round(100*time.Millisecond), peer)
}
