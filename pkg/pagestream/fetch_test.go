package pagestream

import (
	"bytes"
	"encoding/binary"
	"math/rand"
	"testing"
)

// pageServer is a lazy dump's page server as criu/page-xfer.c behaves:
// it holds runs of pages (its page pipes' iovecs, which may cut a pagemap
// entry in two), answers a get with the pages from the address to the end
// of the run holding it or the request's end, and fails on an address it
// does not hold.
type pageServer struct {
	t    *testing.T
	runs []Range
	in   []byte
	out  []byte
	// sent counts each page it sent, by task and address.
	sent   map[[2]uint64]int
	closed bool
}

func content(id, addr uint64) []byte {
	p := make([]byte, PageSize)
	binary.LittleEndian.PutUint64(p, id)
	binary.LittleEndian.PutUint64(p[8:], addr)
	p[PageSize-1] = byte(addr / PageSize)
	return p
}

func (s *pageServer) take(b []byte) {
	s.in = append(s.in, b...)
	for len(s.in) >= HeaderLen {
		h := ParseHeader(s.in)
		s.in = s.in[HeaderLen:]
		switch h.Command() {
		case CmdForceClose, CmdClose:
			s.closed = true
			s.out = append(s.out, 0, 0, 0, 0)
			continue
		case CmdGet:
		default:
			s.t.Fatalf("page server: command %#x", h.Cmd)
		}
		var run *Range
		for i := range s.runs {
			r := &s.runs[i]
			if r.ID == h.ID && h.Addr >= r.Addr && h.Addr < r.Addr+r.Pages*PageSize {
				run = r
			}
		}
		if run == nil || h.Pages == 0 {
			s.t.Fatalf("page server: get of %d pages at %#x of %#x, which it does not hold: it would fail", h.Pages, h.Addr, h.ID)
		}
		n := min(h.Pages, (run.Addr+run.Pages*PageSize-h.Addr)/PageSize)
		s.out = Header{Cmd: FlagPresent<<CmdBits | CmdAddF, Pages: n, Addr: h.Addr, ID: h.ID}.Append(s.out)
		for k := uint64(0); k < n; k++ {
			a := h.Addr + k*PageSize
			s.out = append(s.out, content(h.ID, a)...)
			s.sent[[2]uint64{h.ID, a}]++
		}
	}
}

// lazyPages asks as CRIU's lazy-pages daemon does: one background run at
// a time, growing from 64 KiB to 4 MiB, mostly in address order, and now
// and then a fault of one page anywhere not yet in. Answers come in the order
// it asked; a short one leaves the rest to ask again.
type lazyPages struct {
	t       *testing.T
	todo    []Range // pages not yet in, by task and address
	asked   []Header
	in      []byte
	xfer    uint64
	bgOut   bool
	got     map[[2]uint64]int
	closing bool
	status  bool
}

func (l *lazyPages) remaining() (n uint64) {
	for _, r := range l.todo {
		n += r.Pages
	}
	return n
}

// drop removes [addr, addr+n pages) of id from todo.
func (l *lazyPages) drop(id, addr, n uint64) {
	var out []Range
	end := addr + n*PageSize
	for _, r := range l.todo {
		rend := r.Addr + r.Pages*PageSize
		if r.ID != id || rend <= addr || r.Addr >= end {
			out = append(out, r)
			continue
		}
		if r.Addr < addr {
			out = append(out, Range{r.ID, r.Addr, (addr - r.Addr) / PageSize})
		}
		if rend > end {
			out = append(out, Range{r.ID, end, (rend - end) / PageSize})
		}
	}
	l.todo = out
}

func (l *lazyPages) inFlight(id, addr uint64) bool {
	for _, h := range l.asked {
		if h.ID == id && addr >= h.Addr && addr < h.Addr+h.Pages*PageSize {
			return true
		}
	}
	return false
}

// ask returns its next requests: a fault now and then, and a background
// run if none is out.
func (l *lazyPages) ask(rng *rand.Rand) []byte {
	var b []byte
	if len(l.todo) > 0 && rng.Intn(4) == 0 {
		r := l.todo[rng.Intn(len(l.todo))]
		a := r.Addr + uint64(rng.Int63n(int64(r.Pages)))*PageSize
		if !l.inFlight(r.ID, a) {
			h := Header{Cmd: CmdGet, Pages: 1, Addr: a, ID: r.ID}
			l.asked = append(l.asked, h)
			b = h.Append(b)
		}
	}
	if !l.bgOut && len(l.todo) > 0 {
		r := l.todo[0]
		if rng.Intn(3) == 0 {
			// Not always in order: a run from anywhere, as after a
			// remap or with several tasks.
			r = l.todo[rng.Intn(len(l.todo))]
			k := uint64(rng.Int63n(int64(r.Pages)))
			r = Range{r.ID, r.Addr + k*PageSize, r.Pages - k}
		}
		if !l.inFlight(r.ID, r.Addr) {
			l.xfer = min(l.xfer+16, 1024)
			n := r.Pages
			for k := uint64(0); k < min(n, l.xfer); k++ {
				if l.inFlight(r.ID, r.Addr+k*PageSize) {
					n = k
					break
				}
			}
			h := Header{Cmd: CmdGet, Pages: min(n, l.xfer), Addr: r.Addr, ID: r.ID}
			l.asked = append(l.asked, h)
			l.bgOut = true
			b = h.Append(b)
		}
	}
	if len(l.todo) == 0 && len(l.asked) == 0 && !l.closing {
		l.closing = true
		b = Header{Cmd: CmdForceClose}.Append(b)
	}
	return b
}

func (l *lazyPages) take(b []byte) {
	l.in = append(l.in, b...)
	for {
		if l.closing && len(l.asked) == 0 {
			if len(l.in) >= StatusLen {
				l.status = true
				l.in = l.in[StatusLen:]
			}
			if len(l.in) > 0 {
				l.t.Fatalf("lazy-pages: %d bytes after the close's status", len(l.in))
			}
			return
		}
		if len(l.in) < HeaderLen {
			return
		}
		h := ParseHeader(l.in)
		if len(l.in) < HeaderLen+int(h.Pages)*PageSize {
			return
		}
		if len(l.asked) == 0 {
			l.t.Fatalf("lazy-pages: an answer it did not ask for: %+v", h)
		}
		want := l.asked[0]
		l.asked = l.asked[1:]
		if h.Command() != CmdAddF || h.Flags()&FlagPresent == 0 || h.Addr != want.Addr || h.ID != want.ID || h.Pages == 0 || h.Pages > want.Pages {
			l.t.Fatalf("lazy-pages asked %+v, got %+v", want, h)
		}
		data := l.in[HeaderLen : HeaderLen+int(h.Pages)*PageSize]
		for k := uint64(0); k < h.Pages; k++ {
			a := h.Addr + k*PageSize
			if !bytes.Equal(data[k*PageSize:(k+1)*PageSize], content(h.ID, a)) {
				l.t.Fatalf("lazy-pages: page %#x of %#x has wrong content", a, h.ID)
			}
			l.got[[2]uint64{h.ID, a}]++
		}
		l.drop(h.ID, h.Addr, h.Pages)
		if want.Pages > 1 || !l.bgOut {
			l.bgOut = false
		}
		l.in = l.in[HeaderLen+int(h.Pages)*PageSize:]
	}
}

func TestFetcherServesInOrderAndSendsEachPageOnce(t *testing.T) {
	// Three tasks' lazy ranges; the page server holds one range in two
	// runs (its pipes), so a chunk across the cut comes back short.
	plan := []Range{
		{1, 0x400000, 300},
		{1, 0x7f0000000000, 1000},
		{2, 0x400000, 5},
		{3, 0x10000000, 2500},
	}
	runs := []Range{plan[0], {1, 0x7f0000000000, 600}, {1, 0x7f0000000000 + 600*PageSize, 400}, plan[2], plan[3]}
	var total uint64
	for _, r := range plan {
		total += r.Pages
	}
	for seed := int64(1); seed <= 20; seed++ {
		rng := rand.New(rand.NewSource(seed))
		srv := &pageServer{t: t, runs: runs, sent: map[[2]uint64]int{}}
		lp := &lazyPages{t: t, todo: append([]Range(nil), plan...), got: map[[2]uint64]int{}}
		var toPeer, toLocal []byte
		f := NewFetcher(plan, func(b []byte) { toPeer = append(toPeer, b...) }, func(b []byte) { toLocal = append(toLocal, b...) })
		f.ChunkPages, f.InFlight, f.Window = uint64(1+rng.Intn(300)), 1+rng.Intn(5), uint64(1+rng.Intn(8))<<20
		started := false
		cut := func(b *[]byte) []byte {
			n := min(len(*b), 1+rng.Intn(3*PageSize))
			if rng.Intn(3) == 0 {
				n = len(*b)
			}
			p := (*b)[:n]
			*b = (*b)[n:]
			return p
		}
		for step := 0; !lp.status; step++ {
			if step > 2_000_000 {
				t.Fatalf("seed %d: no end: %d pages left, fetcher holds %d bytes", seed, lp.remaining(), f.Held())
			}
			if !started && rng.Intn(20) == 0 {
				started = true
				f.Start()
			}
			if q := lp.ask(rng); len(q) > 0 {
				for len(q) > 0 {
					if err := f.Local(cut(&q)); err != nil {
						t.Fatalf("seed %d: %v", seed, err)
					}
				}
			}
			// The link delivers some of what is on its way, each way.
			if len(toPeer) > 0 {
				srv.take(cut(&toPeer))
			}
			if len(srv.out) > 0 {
				if err := f.Peer(cut(&srv.out)); err != nil {
					t.Fatalf("seed %d: %v", seed, err)
				}
			}
			if len(toLocal) > 0 {
				lp.take(cut(&toLocal))
			}
		}
		for _, r := range plan {
			for k := uint64(0); k < r.Pages; k++ {
				key := [2]uint64{r.ID, r.Addr + k*PageSize}
				if lp.got[key] != 1 {
					t.Fatalf("seed %d: page %#x of %#x reached lazy-pages %d times", seed, key[1], key[0], lp.got[key])
				}
				if srv.sent[key] != 1 {
					t.Fatalf("seed %d: the page server sent page %#x of %#x %d times", seed, key[1], key[0], srv.sent[key])
				}
			}
		}
		if !started {
			continue
		}
		if f.Fetched == 0 || f.Served == 0 || f.Served+f.Passed != total {
			t.Fatalf("seed %d: fetched %d, served %d, passed %d of %d pages", seed, f.Fetched, f.Served, f.Passed, total)
		}
		if f.Held() != 0 {
			t.Fatalf("seed %d: %d bytes still held after every page went", seed, f.Held())
		}
	}
}

func TestFetcherRefusesWhatNobodyAsked(t *testing.T) {
	f := NewFetcher(nil, func([]byte) {}, func([]byte) {})
	if err := f.Peer(make([]byte, HeaderLen)); err == nil {
		t.Fatal("an answer nobody asked for was taken")
	}
	f = NewFetcher(nil, func([]byte) {}, func([]byte) {})
	if err := f.Local(Header{Cmd: CmdAdd, Pages: 1}.Append(nil)); err == nil {
		t.Fatal("lazy-pages sending pages was taken")
	}
	// An answer for other pages than asked.
	plan := []Range{{1, 0x1000, 4}}
	f = NewFetcher(plan, func([]byte) {}, func([]byte) {})
	f.Start()
	if err := f.Peer(Header{Cmd: FlagPresent<<CmdBits | CmdAddF, Pages: 1, Addr: 0x2000, ID: 1}.Append(nil)); err == nil {
		t.Fatal("an answer at another address was taken")
	}
}

func TestFetcherBeforeStartOnlyPasses(t *testing.T) {
	plan := []Range{{1, 0x1000, 8}}
	var toPeer []byte
	f := NewFetcher(plan, func(b []byte) { toPeer = append(toPeer, b...) }, func([]byte) {})
	if err := f.Local(Header{Cmd: CmdGet, Pages: 8, Addr: 0x1000, ID: 1}.Append(nil)); err != nil {
		t.Fatal(err)
	}
	if len(toPeer) != HeaderLen {
		t.Fatalf("sent %d bytes to the page server, want the one request passed on", len(toPeer))
	}
	if h := ParseHeader(toPeer); h.Pages != 8 || h.Addr != 0x1000 {
		t.Fatalf("passed on %+v", h)
	}
	f.Start() // every page is claimed: nothing to fetch ahead
	if len(toPeer) != HeaderLen {
		t.Fatalf("fetched ahead pages lazy-pages had asked for")
	}
}
