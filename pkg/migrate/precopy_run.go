//go:build linux

package migrate

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"path/filepath"
	"sync"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/precopy"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// Pre-copy (mode precopy, see pkg/precopy): before the dump, the source
// sends the running tree's memory ahead in rounds, each the pages that
// changed since the one before, until the stop rule says the final dump
// would move about as little as another round. The dump then goes as in
// copy mode, its relay sending only what changed since. Everything sent
// ahead sits in the destination's session directory, and goes with it
// on any failure; the tree here is not touched until the freeze.

// PrecopyStore is the destination's file of pages sent ahead, in the
// session's directory.
const PrecopyStore = "precopy.pages"

// newSeed is a migration's page-hash seed.
func newSeed() uint64 {
	var b [8]byte
	rand.Read(b[:])
	return binary.LittleEndian.Uint64(b[:])
}

// rounds runs the pre-copy rounds of a source in a goroutine, sending
// what each finds on the mem connection from the loop, one frame at a
// time while its queue is under the high-water mark (as syncOut does).
type rounds struct {
	m       *source
	sent    *precopy.Sent
	credit  chan struct{}
	stopped chan struct{}
	once    sync.Once

	// Set by the goroutine, read on the loop once done (set on the
	// loop when the goroutine's last post runs).
	stats []api.PrecopyRound
	why   string
	done  bool
	// bytes is what was sent ahead so far (on the loop).
	bytes int64
	// zc compresses the pages sent ahead, in the rounds' goroutine (nil:
	// they go as they are).
	zc *transport.Codec
}

// startPrecopy starts the rounds; the dump follows when they end.
func (m *source) startPrecopy() error {
	r := &rounds{m: m, sent: precopy.NewSent(precopy.Hasher{Seed: m.seed}), credit: make(chan struct{}, 1), stopped: make(chan struct{})}
	if m.precopyZ {
		zc, err := transport.NewCodec()
		if err != nil {
			return err
		}
		r.zc = zc
	}
	m.rounds = r
	m.ph.enter("precopy")
	m.log.Info("pre-copy: sending memory ahead while the tree runs", zap.Int64("dest_cap", m.precopyCap))
	go r.run(m.p.Proc.PID, m.precopyCap)
	m.tickProgress()
	return nil
}

func (r *rounds) run(root int, capBytes int64) {
	var all []round
	why := ""
	var err error
	for {
		var more bool
		if more, why = defaultStopRule.next(all); !more {
			break
		}
		var tasks []precopy.Task
		if tasks, err = treeTasks(root); err != nil {
			break
		}
		var st precopy.RoundStats
		st, err = r.sent.Round(tasks, capBytes, r.stopped, r.send)
		if err != nil {
			break
		}
		all = append(all, round{scanned: st.Scanned, written: st.Sent, took: st.Took})
		r.stats = append(r.stats, api.PrecopyRound{Scanned: st.Scanned, Sent: st.Sent, MS: st.Took.Milliseconds()})
	}
	r.why = why
	r.zc.Close()
	r.m.s.l.Post(func() { r.m.precopyDone(err) })
}

// treeTasks are the tree's processes as the dump will stream them: by
// their pid in their own namespace.
func treeTasks(root int) ([]precopy.Task, error) {
	pids, err := proc.Tree(root)
	if err != nil {
		return nil, err
	}
	var tasks []precopy.Task
	for _, pid := range pids {
		ns, err := proc.NSPid(pid)
		if err != nil {
			continue // gone since listed
		}
		tasks = append(tasks, precopy.Task{PID: pid, ID: precopy.TaskID(ns)})
	}
	return tasks, nil
}

// send sends one run of pages from the loop and waits for room.
func (r *rounds) send(id, addr uint64, pages []byte) error {
	for len(pages) > 0 {
		n := min(len(pages), wire.DataChunk)
		var msg wire.Message
		if r.zc != nil {
			if z := r.zc.Compress(precopy.AppendPages(nil, id, addr, nil), pages[:n]); z != nil {
				msg = &wire.PrecopyPagesZ{Data: z}
			}
		}
		if msg == nil {
			msg = &wire.PrecopyPages{Data: precopy.AppendPages(make([]byte, 0, 16+n), id, addr, pages[:n])}
		}
		addr += uint64(n)
		pages = pages[n:]
		c := r.m.mem
		r.m.s.l.Post(func() {
			if c.Closed() {
				return
			}
			c.Send(msg)
			r.bytes += int64(n)
			if c.OutLen() < transport.HighWater {
				r.give()
			} else {
				c.OnDrain = func() {
					c.OnDrain = nil
					r.give()
				}
			}
		})
		select {
		case <-r.credit:
		case <-r.stopped:
			return errRoundsStopped
		}
	}
	return nil
}

var errRoundsStopped = errors.New("pre-copy stopped")

func (r *rounds) give() {
	select {
	case r.credit <- struct{}{}:
	default:
	}
}

func (r *rounds) stop() { r.once.Do(func() { close(r.stopped) }) }

// precopyDone runs on the loop when the rounds end: the dump follows, or
// the migration aborts.
func (m *source) precopyDone(err error) {
	r := m.rounds
	r.done = true
	m.progressTimer.Cancel() // the dump starts its own
	if m.state != srcPrepare {
		return // aborted meanwhile
	}
	if err != nil {
		m.abort(api.Errorf(api.CodeAborted, "pre-copy: %v", err))
		return
	}
	var sent uint64
	for _, x := range r.stats {
		sent += x.Sent
	}
	m.log.Info("pre-copy rounds done", zap.Int("rounds", len(r.stats)), zap.Uint64("pages_sent", sent),
		zap.Int64("held_bytes", r.sent.Bytes), zap.String("stop", r.why))
	if err := m.startDumpWhenFree(); err != nil {
		m.abort(err)
	}
}

// precopyResult is what the rounds and the final dump's relay did.
func (m *source) precopyResult() *api.Precopy {
	r := m.rounds
	if r == nil || !r.done {
		return nil
	}
	p := &api.Precopy{Method: api.PrecopyContent, Rounds: r.stats, Stop: r.why, HeldBytes: r.sent.Bytes}
	if m.relay != nil && m.relay.Diff != nil {
		p.FreezePages, p.ReusedPages = m.relay.Diff.Pages, m.relay.Diff.Matched
	}
	return p
}

// destPrecopy opens a pre-copy destination's store and hands the relay
// its two ends: pages sent ahead are kept (counted against the disk
// limits), references filled in.
func (m *dest) openPrecopyStore(seed uint64) error {
	st, err := precopy.CreateStore(filepath.Join(m.p.Dir, PrecopyStore), precopy.Hasher{Seed: seed}, m.p.PrecopyCap)
	if err != nil {
		return err
	}
	st.Once = true // the final dump names each page once
	m.store = st
	m.relay.Ahead = func(frame []byte) error {
		grown, err := st.Put(frame)
		if err != nil {
			return err
		}
		return m.disk.add(grown)
	}
	m.relay.Fill = func(dst, frame []byte) ([]byte, error) {
		n := len(dst)
		b, err := st.Fill(dst, frame)
		if err == nil {
			// CRIU writes the filled pages into the images.
			err = m.disk.add(int64(len(b) - n))
		}
		return b, err
	}
	return nil
}

// dropPrecopyStore removes the store: once the page server has written
// the pages, or when the session ends.
func (m *dest) dropPrecopyStore() {
	if m.store == nil {
		return
	}
	if err := m.store.Remove(); err != nil {
		m.log.Warn("cannot remove the pre-copy store", zap.Error(err))
	}
	m.store = nil
}
