//go:build linux

package migrate

import (
	"errors"
	"time"

	"go.uber.org/zap"

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

// heartbeat keeps a session's peer honest: it pings the peer on the rpc
// connection every third of timeout, and calls silent once nothing at all
// has arrived on any of the session's connections for timeout.
type heartbeat struct {
	l        *loop.Loop
	rpc      *transport.Conn
	conns    []*transport.Conn
	timeout  time.Duration
	silent   func(time.Duration)
	seq      uint64
	lastPing time.Time
	t        *loop.Timer
}

func startHeartbeat(l *loop.Loop, rpc *transport.Conn, conns []*transport.Conn, timeout time.Duration, silent func(time.Duration)) *heartbeat {
	h := &heartbeat{l: l, rpc: rpc, conns: conns, timeout: timeout, silent: silent, lastPing: time.Now()}
	h.t = l.After(h.tick(), h.beat)
	return h
}

// tick is how often the heartbeat looks: often enough that silence is
// noticed within a few percent of timeout.
func (h *heartbeat) tick() time.Duration {
	return min(time.Second, max(h.timeout/10, 10*time.Millisecond))
}

func (h *heartbeat) beat() {
	var last time.Time
	for _, c := range h.conns {
		if c.LastRecv().After(last) {
			last = c.LastRecv()
		}
	}
	if quiet := time.Since(last); quiet >= h.timeout {
		// Bytes may be waiting that this loop has not read yet (it was
		// descheduled, or the whole daemon stopped and resumed): they
		// are a word from the peer. Read them first.
		for _, c := range h.conns {
			if c.Pending() {
				h.t = h.l.After(time.Millisecond, h.beat)
				return
			}
		}
		h.silent(quiet)
		return
	}
	if time.Since(h.lastPing) >= h.timeout/3 {
		h.seq++
		h.lastPing = time.Now()
		h.rpc.Send(&wire.Ping{Seq: h.seq})
	}
	h.t = h.l.After(h.tick(), h.beat)
}

// stop stops the heartbeat. A nil heartbeat is a no-op.
func (h *heartbeat) stop() {
	if h != nil {
		h.t.Cancel()
	}
}
