// Package precopy is phaul's pre-copy without kernel dirty tracking.
// While the tree runs, the source reads its memory and sends it ahead to
// the destination, which keeps it (Store); the source keeps a hash of
// each page it sent (Sent). At the freeze CRIU's dump streams its pages
// through the source's relay as in copy mode; the relay (Diff) compares
// each page with what was sent and replaces those that did not change by
// references, which the destination's relay fills in from its Store, so
// that its CRIU page server receives the whole stream and nothing in CRIU
// changes. A reference names the page and the hash of its content: a page
// the destination does not hold, or holds with other content, fails the
// migration (which rolls back); it never restores wrong memory.
package precopy

import (
	"encoding/binary"
	"fmt"

	"github.com/zeebo/xxh3"

	"github.com/phaul/phaul/pkg/pagestream"
)

// PageSize is the unit of CRIU's page transfers.
const PageSize = pagestream.PageSize

// Key names a page as CRIU's page-server stream does: the stream's
// destination id (the task's pid in its namespace, shifted, and a type)
// and the page's address.
type Key struct{ ID, Addr uint64 }

// Hash is a page's content hash: XXH3-128, seeded per migration.
type Hash [16]byte

// HashSize is the length of a Hash on the wire.
const HashSize = 16

// Hasher hashes pages with a migration's seed; both sides use the same.
type Hasher struct{ Seed uint64 }

// Sum is the hash of b.
func (h Hasher) Sum(b []byte) Hash {
	s := xxh3.Hash128Seed(b, h.Seed)
	var out Hash
	binary.LittleEndian.PutUint64(out[:8], s.Lo)
	binary.LittleEndian.PutUint64(out[8:], s.Hi)
	return out
}

// TaskID is CRIU's page-stream destination id of a task's pagemap (see
// pagestream.TaskID).
func TaskID(nsPID int) uint64 { return pagestream.TaskID(nsPID) }

// The commands of CRIU's page-server protocol the Diff reads.
const (
	psHeaderLen = pagestream.HeaderLen
	psCmdBits   = pagestream.CmdBits
	psIovAdd    = pagestream.CmdAdd
	psIovAddF   = pagestream.CmdAddF
	psIovGet    = pagestream.CmdGet
	pePresent   = pagestream.FlagPresent
)

// maxRun bounds the pages of one reference frame to a chunk's worth
// (256 KiB): what the destination fills in for one frame is no more than
// a page-data frame brings, so its queue to CRIU stays as bounded.
const maxRun = 256 << 10 / PageSize

// Out receives what Diff makes of the stream, in order: literal bytes to
// relay as they are (Diff reuses the slice after the call), and runs of
// pages the destination holds.
type Out interface {
	Literal(b []byte)
	Refs(id, addr uint64, hashes []byte)
}

// Diff rewrites CRIU's page-server stream (what a dump writes to its page
// server) against what was sent ahead. It is fed the stream as it comes,
// in pieces of any size; each call's output is complete when it returns
// (nothing waits for a later call), so CRIU's commands that expect an
// answer are never held back.
type Diff struct {
	sent *Sent
	out  Out

	hdr  [psHeaderLen]byte
	nhdr int
	// In an add's pages: its id, the address of the next page, and the
	// bytes left.
	id, addr uint64
	left     uint64
	page     []byte // a page read in part
	lit      []byte
	run      struct {
		id, addr uint64
		hashes   []byte
	}
	// Pages counts the pages of the stream, Matched those sent as
	// references.
	Pages, Matched uint64
}

// NewDiff returns a Diff of the stream against sent, writing to out.
func NewDiff(sent *Sent, out Out) *Diff {
	return &Diff{sent: sent, out: out, page: make([]byte, 0, PageSize)}
}

// Write takes the next piece of the stream.
func (d *Diff) Write(b []byte) error {
	for len(b) > 0 {
		if d.left == 0 {
			n := copy(d.hdr[d.nhdr:], b)
			d.nhdr += n
			d.literal(b[:n])
			b = b[n:]
			if d.nhdr < psHeaderLen {
				break
			}
			d.nhdr = 0
			if err := d.header(); err != nil {
				return err
			}
			continue
		}
		if len(d.page) == 0 && len(b) >= PageSize {
			d.onPage(b[:PageSize])
			b = b[PageSize:]
			continue
		}
		var whole bool
		if d.page, b, whole = pagestream.Gather(d.page, PageSize, b); whole {
			d.onPage(d.page)
			d.page = d.page[:0]
		}
	}
	d.flush()
	return nil
}

// header reads a command: an add with present pages starts its pages.
func (d *Diff) header() error {
	h := pagestream.ParseHeader(d.hdr[:])
	nr := h.Pages
	switch h.Command() {
	case psIovAdd:
	case psIovAddF:
		if h.Flags()&pePresent == 0 {
			return nil
		}
	case psIovGet:
		return fmt.Errorf("page stream: a lazy request in a pre-copy dump")
	default:
		return nil
	}
	if nr > 1<<40/PageSize {
		return fmt.Errorf("page stream: an add of %d pages", nr)
	}
	d.id, d.addr = h.ID, h.Addr
	d.left = nr * PageSize
	return nil
}

// onPage is one whole page of an add: a reference if the destination
// holds it as it is, else literal.
func (d *Diff) onPage(p []byte) {
	key := Key{d.id, d.addr}
	d.addr += PageSize
	d.left -= PageSize
	d.Pages++
	h, ok := d.sent.pages[key]
	if ok && h == d.sent.h.Sum(p) {
		d.Matched++
		r := &d.run
		if len(r.hashes) == 0 || r.id != key.ID || r.addr+uint64(len(r.hashes)/HashSize)*PageSize != key.Addr || len(r.hashes) >= maxRun*HashSize {
			d.flushRun()
			r.id, r.addr = key.ID, key.Addr
		}
		r.hashes = append(r.hashes, h[:]...)
		return
	}
	d.literal(p)
}

func (d *Diff) literal(b []byte) {
	if len(d.run.hashes) > 0 {
		d.flushRun()
	}
	if len(d.lit)+len(b) > 256<<10 {
		d.flushLit()
	}
	d.lit = append(d.lit, b...)
}

func (d *Diff) flushLit() {
	if len(d.lit) > 0 {
		d.out.Literal(d.lit)
		d.lit = d.lit[:0]
	}
}

func (d *Diff) flushRun() {
	d.flushLit()
	if len(d.run.hashes) > 0 {
		d.out.Refs(d.run.id, d.run.addr, d.run.hashes)
		d.run.hashes = d.run.hashes[:0]
	}
}

func (d *Diff) flush() {
	d.flushRun()
	d.flushLit()
}

// Sent is what the source sent ahead: each page's hash, by key. It is
// written by the rounds and read by the Diff, never both at once.
type Sent struct {
	h     Hasher
	pages map[Key]Hash
	// Bytes is what the destination holds: a page each key.
	Bytes int64
}

// NewSent returns an empty Sent hashing with h.
func NewSent(h Hasher) *Sent { return &Sent{h: h, pages: map[Key]Hash{}} }

// Len is the number of pages the destination holds.
func (s *Sent) Len() int { return len(s.pages) }
