//go:build linux

package precopy

import (
	"bytes"
	"encoding/binary"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// psHeader is one command of CRIU's page-server stream, as a dump writes
// it (criu/page-xfer.c).
func psHeader(cmd, flags uint32, nr, vaddr, id uint64) []byte {
	b := binary.LittleEndian.AppendUint32(nil, flags<<psCmdBits|cmd)
	b = append(b, 0, 0, 0, 0)
	b = binary.LittleEndian.AppendUint64(b, nr)
	b = binary.LittleEndian.AppendUint64(b, vaddr)
	return binary.LittleEndian.AppendUint64(b, id)
}

const (
	psIovOpen2 = 4
	psIovHole  = 2
	psIovClose = 0x1023
	peLazy     = 1 << 1
)

// frames is what a Diff wrote, as the relays carry it.
type frames struct {
	out [][2][]byte // {kind, payload}: "L" literal, "R" references
}

func (f *frames) Literal(b []byte) {
	f.out = append(f.out, [2][]byte{[]byte("L"), append([]byte(nil), b...)})
}

func (f *frames) Refs(id, addr uint64, hashes []byte) {
	f.out = append(f.out, [2][]byte{[]byte("R"), AppendRefs(nil, id, addr, hashes)})
}

// fill is the destination's relay: the stream CRIU's page server gets.
func (f *frames) fill(t *testing.T, s *Store) ([]byte, error) {
	var got []byte
	for _, fr := range f.out {
		if fr[0][0] == 'L' {
			got = append(got, fr[1]...)
			continue
		}
		var err error
		if got, err = s.Fill(got, fr[1]); err != nil {
			return got, err
		}
	}
	return got, nil
}

// memory is a recorded tree: each task's pages, by address.
type memory map[Key][]byte

func page(seed int64) []byte {
	p := make([]byte, PageSize)
	rand.New(rand.NewSource(seed)).Read(p)
	return p
}

// stream is the dump's page stream of mem's runs: an open per task, an
// add with the pages of each run, a lazy and a hole entry (no data), the
// close.
func stream(mem memory, runs [][3]uint64) []byte {
	var b []byte
	last := uint64(0)
	for _, r := range runs { // id, addr, pages
		if r[0] != last {
			b = append(b, psHeader(psIovOpen2, 0, 0, 0, r[0])...)
			last = r[0]
		}
		b = append(b, psHeader(psIovAddF, pePresent, r[2], r[1], r[0])...)
		for i := uint64(0); i < r[2]; i++ {
			b = append(b, mem[Key{r[0], r[1] + i*PageSize}]...)
		}
		b = append(b, psHeader(psIovAddF, peLazy, 3, r[1]+r[2]*PageSize, r[0])...)
		b = append(b, psHeader(psIovHole, 0, 1, r[1]+(r[2]+3)*PageSize, r[0])...)
	}
	return append(b, psHeader(psIovClose, 0, 0, 0, 0)...)
}

// setup records two tasks' memory, sends it ahead (all of it, in frames
// of up to 7 pages) into a store, and changes some of it after: what a
// round sent, and what the final dump finds.
func setup(t *testing.T) (mem memory, runs [][3]uint64, sent *Sent, store *Store, changed int) {
	h := Hasher{Seed: 42}
	mem = memory{}
	runs = [][3]uint64{{TaskID(100), 0x400000, 20}, {TaskID(100), 0x7f0000000000, 33}, {TaskID(101), 0x400000, 9}}
	seed := int64(1)
	for _, r := range runs {
		for i := uint64(0); i < r[2]; i++ {
			mem[Key{r[0], r[1] + i*PageSize}] = page(seed)
			seed++
		}
	}
	sent = NewSent(h)
	var err error
	store, err = CreateStore(filepath.Join(t.TempDir(), "precopy.pages"), h, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Remove() })
	for _, r := range runs {
		for i := uint64(0); i < r[2]; i += 7 {
			n := min(7, r[2]-i)
			var pages []byte
			for j := i; j < i+n; j++ {
				k := Key{r[0], r[1] + j*PageSize}
				pages = append(pages, mem[k]...)
				sent.pages[k] = h.Sum(mem[k])
			}
			if _, err := store.Put(AppendPages(nil, r[0], r[1]+i*PageSize, pages)); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Between the round and the freeze the tree writes: every fifth
	// page, and one byte of the last page of a run.
	for k := range mem {
		if (k.Addr/PageSize)%5 == 0 {
			mem[k] = page(int64(k.Addr) + 1000)
			changed++
		}
	}
	last := Key{runs[1][0], runs[1][1] + (runs[1][2]-1)*PageSize}
	if (last.Addr/PageSize)%5 != 0 {
		mem[last] = append([]byte(nil), mem[last]...)
		mem[last][PageSize-1] ^= 1
		changed++
	}
	return mem, runs, sent, store, changed
}

// TestDiffFill: the stream the destination's CRIU gets is, byte for
// byte, the stream the source's CRIU wrote, however it was cut into
// reads; unchanged pages crossed as references, changed ones whole.
func TestDiffFill(t *testing.T) {
	mem, runs, sent, store, changed := setup(t)
	want := stream(mem, runs)
	total := 0
	for _, r := range runs {
		total += int(r[2])
	}
	for _, cut := range []int{1, 7, 31, 32, 33, PageSize - 1, PageSize, PageSize + 5, 64 << 10, len(want)} {
		var f frames
		d := NewDiff(sent, &f)
		for b := want; len(b) > 0; {
			n := min(cut, len(b))
			if err := d.Write(b[:n]); err != nil {
				t.Fatal(err)
			}
			b = b[n:]
		}
		got, err := f.fill(t, store)
		if err != nil {
			t.Fatalf("cut %d: %v", cut, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("cut %d: the destination's stream differs from the source's (%d bytes, want %d)", cut, len(got), len(want))
		}
		if d.Pages != uint64(total) || d.Matched != uint64(total-changed) {
			t.Errorf("cut %d: %d pages, %d matched; want %d, %d", cut, d.Pages, d.Matched, total, total-changed)
		}
		var lit int
		for _, fr := range f.out {
			if fr[0][0] == 'L' {
				lit += len(fr[1])
			}
		}
		if max := len(want) - (total-changed)*PageSize; lit != max {
			t.Errorf("cut %d: %d literal bytes, want %d", cut, lit, max)
		}
	}
}

// A reference the destination cannot fill as the source meant fails:
// to a page never sent, with another hash, or to a page whose stored
// copy was damaged.
func TestFillRefusesBadReferences(t *testing.T) {
	_, runs, sent, store, _ := setup(t)
	k := Key{runs[0][0], runs[0][1] + PageSize}
	h := sent.pages[k]
	for name, frame := range map[string][]byte{
		"never sent":   AppendRefs(nil, k.ID, 0x900000, h[:]),
		"other task":   AppendRefs(nil, TaskID(999), k.Addr, h[:]),
		"other hash":   AppendRefs(nil, k.ID, k.Addr, append([]byte{h[0] ^ 1}, h[1:]...)),
		"past the run": AppendRefs(nil, k.ID, runs[0][1]+(runs[0][2]-1)*PageSize, append(h[:], h[:]...)),
		"short":        AppendRefs(nil, k.ID, k.Addr, h[:15]),
		"unaligned":    AppendRefs(nil, k.ID, k.Addr+1, h[:]),
		"no hashes":    AppendRefs(nil, k.ID, k.Addr, nil),
	} {
		if _, err := store.Fill(nil, frame); err == nil {
			t.Errorf("%s: filled", name)
		}
	}
	good := AppendRefs(nil, k.ID, k.Addr, h[:])
	if _, err := store.Fill(nil, good); err != nil {
		t.Fatalf("a good reference: %v", err)
	}
	// The stored copy damaged on disk.
	off := store.index[k]
	if _, err := store.f.WriteAt([]byte{0xff, 0xfe}, off+100); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Fill(nil, good); err == nil || !strings.Contains(err.Error(), "differs") {
		t.Errorf("a damaged stored page: %v, want it refused", err)
	}
}

// The store keeps a page once however often it is sent, and refuses
// what would grow it past its cap.
func TestStoreOverwritesAndCaps(t *testing.T) {
	h := Hasher{Seed: 7}
	s, err := CreateStore(filepath.Join(t.TempDir(), "p"), h, 4*PageSize)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Remove()
	id := TaskID(5)
	a := append(page(1), page(2)...)
	if _, err := s.Put(AppendPages(nil, id, 0x1000, a)); err != nil {
		t.Fatal(err)
	}
	b := append(page(3), page(4)...)
	grown, err := s.Put(AppendPages(nil, id, 0x2000, b)) // 0x2000 held, 0x3000 new
	if err != nil || grown != PageSize || s.Size() != 3*PageSize {
		t.Fatalf("overlapping put: grown %d, size %d, %v", grown, s.Size(), err)
	}
	got, err := s.Fill(nil, AppendRefs(AppendRefs(nil, id, 0x1000, nil)[:0], id, 0x1000, func() []byte {
		var hs []byte
		for _, p := range [][]byte{page(1), page(3), page(4)} {
			x := h.Sum(p)
			hs = append(hs, x[:]...)
		}
		return hs
	}()))
	if err != nil || !bytes.Equal(got, append(page(1), b...)) {
		t.Fatalf("fill after overwrite: %v", err)
	}
	if _, err := s.Put(AppendPages(nil, id, 0x8000, append(page(5), page(6)...))); err == nil {
		t.Error("a put past the cap was taken")
	}
	if _, err := s.Put(AppendPages(nil, id, 0x1000, page(9))); err != nil {
		t.Errorf("an overwrite at the cap: %v", err)
	}
	if fi, err := os.Stat(s.f.Name()); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("store file mode: %v %v", fi.Mode(), err)
	}
}

// TestRoundReadsRunningMemory reads this test's own memory for real (the
// kernel's process_vm_readv and pagemap): a buffer's pages are sent
// whole the first time; after one page changes, the next round sends
// that page and none of the rest.
func TestRoundReadsRunningMemory(t *testing.T) {
	const n = 256
	buf := make([]byte, n*PageSize+PageSize)
	start := (uintptr(unsafe.Pointer(&buf[0])) + PageSize - 1) &^ (PageSize - 1)
	off := int(start - uintptr(unsafe.Pointer(&buf[0])))
	mine := buf[off : off+n*PageSize]
	rand.New(rand.NewSource(3)).Read(mine)
	sent := NewSent(Hasher{Seed: 9})
	task := Task{PID: os.Getpid(), ID: TaskID(os.Getpid())}
	got := map[uint64][]byte{}
	send := func(id, addr uint64, pages []byte) error {
		for i := 0; i < len(pages)/PageSize; i++ {
			got[addr+uint64(i)*PageSize] = pages[i*PageSize : (i+1)*PageSize]
		}
		return nil
	}
	if _, err := sent.Round([]Task{task}, 0, nil, send); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		a := uint64(start) + uint64(i)*PageSize
		if !bytes.Equal(got[a], mine[i*PageSize:(i+1)*PageSize]) {
			t.Fatalf("round 1: page %d of the buffer not sent as it is", i)
		}
	}
	mine[17*PageSize+5] ^= 0xff
	got = map[uint64][]byte{}
	st, err := sent.Round([]Task{task}, 0, nil, send)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		a := uint64(start) + uint64(i)*PageSize
		if _, ok := got[a]; ok != (i == 17) {
			t.Errorf("round 2: page %d sent: %v", i, ok)
		}
	}
	if !bytes.Equal(got[uint64(start)+17*PageSize], mine[17*PageSize:18*PageSize]) {
		t.Error("round 2: the changed page sent wrong")
	}
	if st.Scanned < n || st.Sent == 0 {
		t.Errorf("round 2 stats: %+v", st)
	}
	// A task that exited since the tree was listed is skipped, not an
	// error: a running tree's short-lived children come and go.
	if _, err := NewSent(Hasher{}).Round([]Task{{PID: exitedPID(t), ID: TaskID(1)}}, 0, nil, send); err != nil {
		t.Errorf("a round with an exited task: %v", err)
	}
	// A cap: what would grow the destination's copy past it waits for
	// the dump.
	capped := NewSent(Hasher{Seed: 9})
	if _, err := capped.Round([]Task{task}, 10*PageSize, nil, func(uint64, uint64, []byte) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if capped.Bytes != 10*PageSize || capped.Len() != 10 {
		t.Errorf("capped round holds %d bytes in %d pages, want 10 pages", capped.Bytes, capped.Len())
	}
}

// exitedPID is the pid of a process that has exited and been reaped.
func exitedPID(t *testing.T) int {
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid
}

// With Once, a filled page's room goes back at once (the file's blocks
// shrink) and a second reference to it fails: the final dump names each
// page once.
func TestFillOnceGivesRoomBack(t *testing.T) {
	h := Hasher{Seed: 3}
	s, err := CreateStore(filepath.Join(t.TempDir(), "precopy.pages"), h, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Remove()
	s.Once = true
	id := TaskID(1)
	var pages, hashes []byte
	for i := int64(0); i < 64; i++ {
		p := page(i)
		pages = append(pages, p...)
		sum := h.Sum(p)
		hashes = append(hashes, sum[:]...)
	}
	if _, err := s.Put(AppendPages(nil, id, 0x10000, pages)); err != nil {
		t.Fatal(err)
	}
	blocks := func() int64 {
		var st unix.Stat_t
		if err := unix.Fstat(int(s.f.Fd()), &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks
	}
	before := blocks()
	got, err := s.Fill(nil, AppendRefs(nil, id, 0x10000, hashes))
	if err != nil || !bytes.Equal(got, pages) {
		t.Fatalf("fill: %v (%d bytes)", err, len(got))
	}
	if after := blocks(); after >= before {
		t.Errorf("the store holds %d blocks after the fill, %d before: want its room back", after, before)
	}
	if _, err := s.Fill(nil, AppendRefs(nil, id, 0x10000+PageSize, hashes[HashSize:2*HashSize])); err == nil {
		t.Error("a page filled once was filled again")
	}
}
