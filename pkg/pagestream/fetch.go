package pagestream

import (
	"fmt"
	"sort"
)

// Range is a run of a task's pages that a lazy dump's page server holds:
// a lazy entry of the dump's pagemap (criu.LazyRanges). ID is the id a
// get names the task by: its pid in the images.
type Range struct {
	ID, Addr, Pages uint64
}

// Fetching ahead: CRIU's lazy-pages daemon asks the source's page server
// for one run of pages at a time in the background (up to 4 MiB), and
// copies it into the restored tree before it asks the next, so the link
// idles while it copies and it idles while the link carries. The Fetcher
// sits between the two on the destination: it asks the page server for
// the lazy ranges itself, a few chunks ahead, holds what comes back, and
// answers lazy-pages' requests from it; a request for pages it has not
// asked goes on to the page server as it is (cut where pages fetched
// ahead begin, so no page crosses twice). Answers go back in the order
// lazy-pages asked, as it expects. The page server's get is repeatable
// and clamps a request to its run's end, so a request that ends short is
// no error; but it fails on an address it does not hold, so only the
// plan's ranges are fetched ahead.
type Fetcher struct {
	toPeer, toLocal func([]byte)

	spans []*span
	// The next page to fetch ahead: spans[cur] at page next.
	cur  int
	next uint64

	chunks  map[int32]*chunk
	serial  int32
	free    [][]byte
	started bool
	closing bool
	// held is the bytes fetched ahead (or on their way) that lazy-pages
	// has not taken yet; inFlight the chunks asked and not yet come.
	held     uint64
	inFlight int

	pending []*request  // lazy-pages' requests, not yet answered, in order
	asked   []*expected // what the page server owes, in order
	// Parsing lazy-pages' commands and the page server's answers.
	lhdr  []byte
	phdr  []byte
	hdr   []byte // an answer's header, reused
	pleft uint64 // page bytes left of the answer being read
	pdone uint64 // of which already read

	// ChunkPages is the size of a request fetching ahead (4 MiB: the
	// most lazy-pages asks at once, and a page pipe of the source's);
	// InFlight how many may be on their way at once (a page fault's
	// request, passed on, waits behind them); Window bounds what is held.
	ChunkPages uint64
	InFlight   int
	Window     uint64

	// Stats: pages fetched ahead, those lazy-pages took from them, and
	// pages the page server sent for requests passed on.
	Fetched, Served, Passed uint64
}

// span is one range of the plan, page by page: who holds each page.
type span struct {
	Range
	owner []int32
}

const (
	unclaimed int32 = 0  // nobody asked for it yet
	passed    int32 = -1 // asked by lazy-pages itself
	taken     int32 = -2 // fetched ahead and handed to lazy-pages
)

// chunk is a run of pages fetched ahead, or on its way.
type chunk struct {
	sp    *span
	first uint64 // page index in sp
	pages uint64 // asked; what came, once arrived
	data  []byte
	left  uint64 // pages not yet taken
	here  bool
}

// request is one of lazy-pages' requests.
type request struct {
	hdr Header
	// For a request passed on: the page server's answer, once whole.
	passedOn bool
	answer   []byte
	done     bool
}

// expected is an answer the page server owes: a chunk's, a passed
// request's, or a close's status.
type expected struct {
	chunk *chunk
	req   *request
	want  Header // what was asked
	close bool
}

// NewFetcher returns a Fetcher of the lazy ranges plan. What it sends the
// page server goes to toPeer, what it answers lazy-pages to toLocal; both
// may keep nothing of the slice after the call. It fetches nothing ahead
// before Start.
func NewFetcher(plan []Range, toPeer, toLocal func([]byte)) *Fetcher {
	f := &Fetcher{toPeer: toPeer, toLocal: toLocal, chunks: map[int32]*chunk{},
		ChunkPages: 1024, InFlight: 2, Window: 64 << 20}
	for _, r := range plan {
		if r.Pages > 0 {
			f.spans = append(f.spans, &span{Range: r, owner: make([]int32, r.Pages)})
		}
	}
	sort.Slice(f.spans, func(i, j int) bool {
		a, b := f.spans[i], f.spans[j]
		return a.ID < b.ID || (a.ID == b.ID && a.Addr < b.Addr)
	})
	return f
}

// Start begins fetching ahead.
func (f *Fetcher) Start() {
	f.started = true
	f.fill()
}

// Held is what is fetched ahead and not yet taken, in bytes.
func (f *Fetcher) Held() uint64 { return f.held }

// find is the span holding page addr of id, and the page's index in it.
func (f *Fetcher) find(id, addr uint64) (*span, uint64) {
	i := sort.Search(len(f.spans), func(i int) bool {
		s := f.spans[i]
		return s.ID > id || (s.ID == id && s.Addr+s.Pages*PageSize > addr)
	})
	if i == len(f.spans) {
		return nil, 0
	}
	s := f.spans[i]
	if s.ID != id || addr < s.Addr || addr%PageSize != 0 {
		return nil, 0
	}
	return s, (addr - s.Addr) / PageSize
}

// Local takes what lazy-pages wrote: its commands.
func (f *Fetcher) Local(b []byte) error {
	for len(b) > 0 {
		var whole bool
		if f.lhdr, b, whole = Gather(f.lhdr, HeaderLen, b); !whole {
			break
		}
		h := ParseHeader(f.lhdr)
		f.lhdr = f.lhdr[:0]
		switch h.Command() {
		case CmdGet:
			if err := f.get(h); err != nil {
				return err
			}
		case CmdClose, CmdForceClose:
			f.closing = true
			f.toPeer(h.Append(nil))
			f.asked = append(f.asked, &expected{close: true})
		default:
			return fmt.Errorf("lazy-pages sent command %#x, which the relay does not know", h.Cmd)
		}
	}
	f.answer()
	f.fill()
	return nil
}

func (f *Fetcher) get(h Header) error {
	if h.Pages == 0 {
		return fmt.Errorf("lazy-pages asked for no pages at %#x", h.Addr)
	}
	if f.closing {
		return fmt.Errorf("lazy-pages asked for pages after its close")
	}
	r := &request{hdr: h}
	f.pending = append(f.pending, r)
	sp, i := f.find(h.ID, h.Addr)
	if sp != nil && sp.owner[i] > 0 {
		return nil // fetched ahead: answered once it is here
	}
	f.pass(r, sp, i)
	return nil
}

// pass sends lazy-pages' request r on to the page server, cut where pages
// fetched ahead begin, and claims its pages.
func (f *Fetcher) pass(r *request, sp *span, i uint64) {
	h := r.hdr
	if sp != nil {
		n := uint64(0)
		for ; n < h.Pages && i+n < sp.Pages && sp.owner[i+n] <= 0; n++ {
			if sp.owner[i+n] == unclaimed {
				sp.owner[i+n] = passed
			}
		}
		// The rest is fetched ahead, or past the range (lazy-pages
		// asks again for what an answer leaves out).
		h.Pages = n
	}
	r.passedOn = true
	want := Header{Cmd: CmdGet, Pages: h.Pages, Addr: h.Addr, ID: h.ID}
	f.toPeer(want.Append(nil))
	f.asked = append(f.asked, &expected{req: r, want: want})
}

// fill fetches ahead while the window has room.
func (f *Fetcher) fill() {
	for f.started && !f.closing && f.inFlight < f.InFlight && f.held+f.ChunkPages*PageSize <= f.Window {
		sp, first, n := f.nextRun()
		if sp == nil {
			return
		}
		f.serial++
		c := &chunk{sp: sp, first: first, pages: n, left: n}
		f.chunks[f.serial] = c
		for k := first; k < first+n; k++ {
			sp.owner[k] = f.serial
		}
		f.held += n * PageSize
		f.inFlight++
		want := Header{Cmd: CmdGet, Pages: n, Addr: sp.Addr + first*PageSize, ID: sp.ID}
		f.toPeer(want.Append(nil))
		f.asked = append(f.asked, &expected{chunk: c, want: want})
	}
}

// nextRun is the next run of unclaimed pages, at most a chunk.
func (f *Fetcher) nextRun() (*span, uint64, uint64) {
	for ; f.cur < len(f.spans); f.cur, f.next = f.cur+1, 0 {
		sp := f.spans[f.cur]
		for f.next < sp.Pages && sp.owner[f.next] != unclaimed {
			f.next++
		}
		if f.next == sp.Pages {
			continue
		}
		first := f.next
		for f.next < sp.Pages && f.next-first < f.ChunkPages && sp.owner[f.next] == unclaimed {
			f.next++
		}
		return sp, first, f.next - first
	}
	return nil, 0, 0
}

// Peer takes what the page server answered.
func (f *Fetcher) Peer(b []byte) error {
	for len(b) > 0 {
		if len(f.asked) == 0 {
			return fmt.Errorf("the page server sent %d bytes nobody asked for", len(b))
		}
		e := f.asked[0]
		var whole bool
		if e.close {
			if f.phdr, b, whole = Gather(f.phdr, StatusLen, b); whole {
				f.toLocal(f.phdr)
				f.phdr = f.phdr[:0]
				f.asked = f.asked[1:]
			}
			continue
		}
		if len(f.phdr) < HeaderLen {
			if f.phdr, b, whole = Gather(f.phdr, HeaderLen, b); !whole {
				break
			}
			if err := f.begin(e, ParseHeader(f.phdr)); err != nil {
				return err
			}
			if f.pleft == 0 {
				f.end(e)
			}
			continue
		}
		n := min(f.pleft-f.pdone, uint64(len(b)))
		if c := e.chunk; c != nil {
			copy(c.data[f.pdone:], b[:n])
		} else {
			e.req.answer = append(e.req.answer, b[:n]...)
		}
		f.pdone += n
		b = b[n:]
		if f.pdone == f.pleft {
			f.end(e)
		}
	}
	f.answer()
	f.fill()
	return nil
}

// begin reads the header of the answer e is waiting for.
func (f *Fetcher) begin(e *expected, h Header) error {
	want := e.want
	if h.Command() != CmdAddF || h.Flags()&FlagPresent == 0 || h.Addr != want.Addr || h.ID != want.ID || h.Pages == 0 || h.Pages > want.Pages {
		return fmt.Errorf("the page server answered %d pages at %#x of %#x (command %#x) to a request for %d at %#x of %#x",
			h.Pages, h.Addr, h.ID, h.Cmd, want.Pages, want.Addr, want.ID)
	}
	f.pleft, f.pdone = h.Pages*PageSize, 0
	if c := e.chunk; c != nil {
		// Pages it did not send are nobody's again: lazy-pages' own
		// requests fetch them.
		for k := c.first + h.Pages; k < c.first+c.pages; k++ {
			c.sp.owner[k] = unclaimed
		}
		f.held -= (c.pages - h.Pages) * PageSize
		c.pages, c.left = h.Pages, h.Pages
		c.data = f.buffer(h.Pages * PageSize)
		if f.cur < len(f.spans) && f.spans[f.cur] == c.sp && f.next > c.first+h.Pages {
			f.next = c.first + h.Pages
		}
	} else {
		f.Passed += h.Pages
		e.req.answer = h.Append(make([]byte, 0, HeaderLen+f.pleft))
	}
	return nil
}

// end completes the answer e was waiting for.
func (f *Fetcher) end(e *expected) {
	f.phdr = f.phdr[:0]
	f.asked = f.asked[1:]
	if c := e.chunk; c != nil {
		c.here = true
		f.inFlight--
		f.Fetched += c.pages
		return
	}
	e.req.done = true
}

// answer answers lazy-pages' requests that can be, in order.
func (f *Fetcher) answer() {
	for len(f.pending) > 0 {
		r := f.pending[0]
		if r.passedOn {
			if !r.done {
				return
			}
			f.toLocal(r.answer)
			r.answer = nil
		} else {
			sp, i := f.find(r.hdr.ID, r.hdr.Addr)
			c := f.chunks[sp.owner[i]]
			if c == nil {
				// Its chunk came short: the page is nobody's now.
				f.pass(r, sp, i)
				return
			}
			if !c.here {
				return
			}
			f.serve(r, sp, i)
		}
		f.pending[0] = nil
		f.pending = f.pending[1:]
	}
}

// serve answers r from what is fetched ahead: the run of pages that are
// here, from its first, at most what it asked.
func (f *Fetcher) serve(r *request, sp *span, i uint64) {
	var n uint64
	for ; n < r.hdr.Pages && i+n < sp.Pages; n++ {
		c := f.chunks[sp.owner[i+n]]
		if c == nil || !c.here {
			break
		}
	}
	f.hdr = Header{Cmd: FlagPresent<<CmdBits | CmdAddF, Pages: n, Addr: r.hdr.Addr, ID: r.hdr.ID}.Append(f.hdr[:0])
	f.toLocal(f.hdr)
	// The pages go from the chunks as they are, a run of each chunk at
	// a time (toLocal keeps nothing of them).
	for k := i; k < i+n; {
		id := sp.owner[k]
		c := f.chunks[id]
		j := k
		for j < i+n && sp.owner[j] == id {
			sp.owner[j] = taken
			j++
		}
		f.toLocal(c.data[(k-c.first)*PageSize : (j-c.first)*PageSize])
		f.held -= (j - k) * PageSize
		if c.left -= j - k; c.left == 0 {
			delete(f.chunks, id)
			f.free = append(f.free, c.data)
		}
		k = j
	}
	f.Served += n
}

// buffer returns a buffer of n bytes, reusing a chunk's.
func (f *Fetcher) buffer(n uint64) []byte {
	for len(f.free) > 0 {
		b := f.free[len(f.free)-1]
		f.free = f.free[:len(f.free)-1]
		if uint64(cap(b)) >= n {
			return b[:n]
		}
	}
	return make([]byte, n, f.ChunkPages*PageSize)
}
