package precopy

import (
	"encoding/binary"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// HeadLen is a frame's head: the key of its first page (id, address), 16
// bytes, then pages (ahead) or hashes (references).
const HeadLen = 16

// AppendPages appends the payload of an ahead frame: n pages from addr
// of the task id.
func AppendPages(b []byte, id, addr uint64, pages []byte) []byte {
	b = binary.LittleEndian.AppendUint64(b, id)
	b = binary.LittleEndian.AppendUint64(b, addr)
	return append(b, pages...)
}

// AppendRefs appends the payload of a reference frame.
func AppendRefs(b []byte, id, addr uint64, hashes []byte) []byte {
	b = binary.LittleEndian.AppendUint64(b, id)
	b = binary.LittleEndian.AppendUint64(b, addr)
	return append(b, hashes...)
}

func splitFrame(b []byte, unit int, what string) (id, addr uint64, rest []byte, err error) {
	if len(b) <= HeadLen || (len(b)-HeadLen)%unit != 0 {
		return 0, 0, nil, fmt.Errorf("%s frame of %d bytes: want a 16-byte key and whole %d-byte units", what, len(b), unit)
	}
	id = binary.LittleEndian.Uint64(b)
	addr = binary.LittleEndian.Uint64(b[8:])
	if addr%PageSize != 0 {
		return 0, 0, nil, fmt.Errorf("%s frame at %#x: not page aligned", what, addr)
	}
	return id, addr, b[HeadLen:], nil
}

// Store is what the destination holds of the pages sent ahead: one file
// in the session's directory (mode 0600), a page per key, written over
// when a later round sends the page again, and an index in memory. The
// file goes with the session: discarded on any failure, removed once the
// restore has read what it needs.
type Store struct {
	h     Hasher
	f     *os.File
	index map[Key]int64
	size  int64
	// Cap bounds the file (0: none): a frame that would grow it past is
	// refused.
	Cap int64
	// Once gives a page's room back as soon as it is filled: the
	// destination's final dump names each page once, and the memory the
	// store's pages held in the page cache is then the first the page
	// server's images get. A page filled once is not held any more.
	Once bool
}

// CreateStore creates the store's file at path; it must not exist.
func CreateStore(path string, h Hasher, cap int64) (*Store, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("pre-copy store: %w", err)
	}
	return &Store{h: h, f: f, index: map[Key]int64{}, Cap: cap}, nil
}

// Put stores an ahead frame's pages. grown is how much the file grew.
func (s *Store) Put(frame []byte) (grown int64, err error) {
	id, addr, pages, err := splitFrame(frame, PageSize, "pre-copy")
	if err != nil {
		return 0, err
	}
	n := int64(len(pages) / PageSize)
	var fresh int64
	for i := int64(0); i < n; i++ {
		if _, ok := s.index[Key{id, addr + uint64(i)*PageSize}]; !ok {
			fresh++
		}
	}
	if s.Cap > 0 && s.size+fresh*PageSize > s.Cap {
		return 0, fmt.Errorf("pages sent ahead would take %d bytes, over the destination's pre-copy cap of %d", s.size+fresh*PageSize, s.Cap)
	}
	// Runs of pages new or held in a row are written at once.
	for i := int64(0); i < n; {
		key := Key{id, addr + uint64(i)*PageSize}
		off, ok := s.index[key]
		if !ok {
			off = s.size
		}
		j := i + 1
		for ; j < n; j++ {
			o, held := s.index[Key{id, addr + uint64(j)*PageSize}]
			next := off + (j-i)*PageSize
			if held != ok || (held && o != next) {
				break
			}
		}
		if _, err := s.f.WriteAt(pages[i*PageSize:j*PageSize], off); err != nil {
			return 0, fmt.Errorf("pre-copy store: %w", err)
		}
		if !ok {
			for k := i; k < j; k++ {
				s.index[Key{id, addr + uint64(k)*PageSize}] = off + (k-i)*PageSize
			}
			s.size += (j - i) * PageSize
		}
		i = j
	}
	return fresh * PageSize, nil
}

// Fill appends to dst the pages a reference frame names, each checked
// against its hash: a page not held, or held with other content, is an
// error.
func (s *Store) Fill(dst, frame []byte) ([]byte, error) {
	id, addr, hashes, err := splitFrame(frame, HashSize, "reference")
	if err != nil {
		return dst, err
	}
	n := len(hashes) / HashSize
	for i := 0; i < n; {
		key := Key{id, addr + uint64(i)*PageSize}
		off, ok := s.index[key]
		if !ok {
			return dst, fmt.Errorf("a reference to page %#x of %#x, which was never sent ahead", key.Addr, key.ID)
		}
		j := i + 1
		for ; j < n; j++ {
			if o, ok := s.index[Key{id, addr + uint64(j)*PageSize}]; !ok || o != off+int64(j-i)*PageSize {
				break
			}
		}
		start := len(dst)
		dst = append(dst, make([]byte, (j-i)*PageSize)...)
		if _, err := s.f.ReadAt(dst[start:], off); err != nil {
			return dst, fmt.Errorf("pre-copy store: %w", err)
		}
		for k := i; k < j; k++ {
			p := dst[start+(k-i)*PageSize : start+(k-i+1)*PageSize]
			if s.h.Sum(p) != Hash(hashes[k*HashSize:(k+1)*HashSize]) {
				return dst, fmt.Errorf("the page %#x of %#x held here differs from what the source has (a corrupt reference or store)", addr+uint64(k)*PageSize, id)
			}
		}
		if s.Once {
			for k := i; k < j; k++ {
				delete(s.index, Key{id, addr + uint64(k)*PageSize})
			}
			// Not fatal: the room comes back with the file at the end.
			unix.Fallocate(int(s.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, int64(j-i)*PageSize)
		}
		i = j
	}
	return dst, nil
}

// Size is the bytes held; Len the pages.
func (s *Store) Size() int64 { return s.size }
func (s *Store) Len() int    { return len(s.index) }

// Remove closes the store and removes its file.
func (s *Store) Remove() error {
	name := s.f.Name()
	s.f.Close()
	return os.Remove(name)
}
