//go:build linux

package migrate

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// Limits on the image files a destination accepts. CRIU's non-page images
// are small (kilobytes per task); the largest legitimate ones are ghost
// files and tmpfs contents.
const (
	maxImageFile  = 16 << 30
	maxImageTotal = 64 << 30
	maxImageFiles = 100_000
	// minFree is what a destination keeps free on the filesystem of
	// its state directory, whatever images arrive.
	minFree = 256 << 20
)

// imageFiles lists the files of a dump to ship: every regular file in dir
// except CRIU's logs and statistics and the session's record, by name.
func imageFiles(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range ents {
		n := e.Name()
		if !e.Type().IsRegular() || strings.HasSuffix(n, ".log") || strings.HasPrefix(n, "stats-") || strings.HasPrefix(n, store.RecordName) || n == criu.LazyDumpConf {
			continue
		}
		if !wire.ValidFileName(n) {
			return nil, fmt.Errorf("image file %q has a name the protocol does not allow", n)
		}
		names = append(names, n)
	}
	sort.Strings(names)
	return names, nil
}

// sender streams image files on an rpc conn, each as FileBegin, FileData
// chunks and FileEnd with its SHA-256, a chunk at a time: it never lets
// more than transport.HighWater wait in the conn's queue, and goes on as
// the conn drains. So a dump with large images (a tmpfs, deleted files)
// costs this daemon a bounded amount of memory, whatever their size.
type sender struct {
	c     *transport.Conn
	dir   string
	names []string
	next  int // index of the next file to open
	f     *os.File
	sum   hash.Hash
	// sent is the file data queued so far, all files; wire what it came
	// to on the wire (less, compressed).
	sent, wire int64
	buf        []byte
	// codec, if set, compresses chunks (FileDataZ) that shrink; zbuf is
	// reused for them when the conn copies what it sends.
	codec *transport.Codec
	zbuf  []byte
	// done runs once, when every file is queued (err nil) or sending
	// failed.
	done func(err error)
	over bool
	// pumping: pump is running. Queueing flushes, and a flush that
	// drains the conn calls pump (OnDrain): that inner call must not
	// step while the outer one is mid-step.
	pumping bool
}

func newSender(c *transport.Conn, dir string, names []string, done func(error)) *sender {
	return &sender{c: c, dir: dir, names: names, done: done}
}

// start begins sending; the rest follows as the conn drains.
func (s *sender) start() {
	s.c.OnDrain = s.pump
	s.pump()
}

// pump queues what it can without passing the high-water mark.
func (s *sender) pump() {
	if s.pumping {
		return
	}
	s.pumping = true
	defer func() { s.pumping = false }()
	for !s.over && !s.c.Closed() && s.c.OutLen() < transport.HighWater {
		if err := s.step(); err != nil {
			s.finish(err)
			return
		}
	}
}

// step queues the next piece: a file's beginning, a chunk of it, or its
// end; after the last file, it finishes.
func (s *sender) step() error {
	if s.f == nil {
		if s.next == len(s.names) {
			s.finish(nil)
			return nil
		}
		name := s.names[s.next]
		s.next++
		f, err := os.Open(filepath.Join(s.dir, name))
		if err != nil {
			return err
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return err
		}
		if st.Size() > maxImageFile {
			f.Close()
			return fmt.Errorf("image %s is %d bytes, over the %d-byte limit", name, st.Size(), maxImageFile)
		}
		s.f, s.sum = f, sha256.New()
		return s.c.Send(&wire.FileBegin{Name: name, Size: st.Size()})
	}
	// A plain link keeps the buffer it is given until the socket takes
	// it; a TLS link copies it into its records, so one buffer does.
	if s.buf == nil || !s.c.Link().Copies() {
		s.buf = make([]byte, wire.HeaderLen+wire.DataChunk)
	}
	n, err := io.ReadFull(s.f, s.buf[wire.HeaderLen:])
	if n > 0 {
		chunk := s.buf[wire.HeaderLen : wire.HeaderLen+n]
		s.sum.Write(chunk)
		s.sent += int64(n)
		if z := s.compress(chunk); z != nil {
			s.wire += int64(len(z) - wire.HeaderLen)
			s.c.Queue(z)
		} else {
			s.wire += int64(n)
			wire.PutHeader(s.buf, wire.TypeFileData, n)
			s.c.Queue(s.buf[:wire.HeaderLen+n])
		}
	}
	switch {
	case err == nil:
		return nil
	case err == io.EOF || err == io.ErrUnexpectedEOF:
		s.f.Close()
		s.f = nil
		return s.c.Send(&wire.FileEnd{SHA256: hex.EncodeToString(s.sum.Sum(nil))})
	default:
		return err
	}
}

// compress returns chunk as a whole FileDataZ frame, or nil (no codec, or
// it does not shrink).
func (s *sender) compress(chunk []byte) []byte {
	if s.codec == nil {
		return nil
	}
	var dst []byte
	if s.c.Link().Copies() {
		dst = s.zbuf[:0]
	}
	dst = append(dst, make([]byte, wire.HeaderLen)...)
	z := s.codec.Compress(dst, chunk)
	if z == nil {
		return nil
	}
	if s.c.Link().Copies() {
		s.zbuf = z
	}
	wire.PutHeader(z, wire.TypeFileDataZ, len(z)-wire.HeaderLen)
	return z
}

func (s *sender) finish(err error) {
	if s.over {
		return
	}
	s.over = true
	s.stop()
	s.done(err)
}

// stop stops sending (an aborted migration) and closes the file open.
func (s *sender) stop() {
	s.over = true
	if s.c.OnDrain != nil {
		s.c.OnDrain = nil
	}
	if s.f != nil {
		s.f.Close()
		s.f = nil
	}
}

// receiver writes the image files a source sends into the session's own
// directory. Each file is created new (never over an existing one, never
// through a link), mode 0600, and checked against the size and SHA-256 the
// source declared.
type receiver struct {
	dir   string
	cur   *os.File
	name  string
	size  int64
	got   int64
	sum   hash.Hash
	files int
	total int64
}

func (r *receiver) begin(m *wire.FileBegin) error {
	if r.cur != nil {
		return protocolErr("file %s begins before file %s ended", m.Name, r.name)
	}
	if !wire.ValidFileName(m.Name) {
		return protocolErr("image file name %q not allowed", m.Name)
	}
	if m.Size > maxImageFile || r.total+m.Size > maxImageTotal || r.files >= maxImageFiles {
		return api.Errorf(api.CodeInvalid, "image file %s (%d bytes) exceeds the destination's limits (%d bytes a file, %d in all, %d files)",
			m.Name, m.Size, maxImageFile, maxImageTotal, maxImageFiles)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(r.dir, &fs); err == nil {
		if free := int64(fs.Bavail) * fs.Bsize; m.Size > free-minFree {
			return api.Errorf(api.CodePrecondition, "no room for image file %s (%d bytes) on the destination: %d bytes free in %s, and %d must stay free",
				m.Name, m.Size, free, r.dir, minFree)
		}
	}
	fd, err := unix.Open(filepath.Join(r.dir, m.Name), unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create image %s: %w", m.Name, err)
	}
	r.cur = os.NewFile(uintptr(fd), m.Name)
	r.name, r.size, r.got = m.Name, m.Size, 0
	r.sum = sha256.New()
	return nil
}

func (r *receiver) data(b []byte) error {
	if r.cur == nil {
		return protocolErr("file data outside a file")
	}
	if r.got+int64(len(b)) > r.size {
		return protocolErr("image %s: more data than its declared %d bytes", r.name, r.size)
	}
	if _, err := r.cur.Write(b); err != nil {
		return fmt.Errorf("write image %s: %w", r.name, err)
	}
	r.sum.Write(b)
	r.got += int64(len(b))
	return nil
}

func (r *receiver) end(m *wire.FileEnd) error {
	if r.cur == nil {
		return protocolErr("file end outside a file")
	}
	err := r.cur.Close()
	r.cur = nil
	if err != nil {
		return fmt.Errorf("write image %s: %w", r.name, err)
	}
	if r.got != r.size {
		return protocolErr("image %s: %d bytes received, %d declared", r.name, r.got, r.size)
	}
	if got := hex.EncodeToString(r.sum.Sum(nil)); got != m.SHA256 {
		return api.Errorf(api.CodeAborted, "image %s arrived corrupted: SHA-256 %s, source sent %s", r.name, got, m.SHA256)
	}
	r.files++
	r.total += r.size
	return nil
}

// close closes a file left half-written by an aborted transfer.
func (r *receiver) close() {
	if r.cur != nil {
		r.cur.Close()
		r.cur = nil
	}
}

// checkFiles compares the files a tree uses with what this host has at
// their paths, as CRIU's restore will (it reopens each by its path): each
// must be there, a regular file of the same mode, of the same size where
// the restore checks it, and a program or library the same build. Every
// mismatch is listed (the first ten).
func checkFiles(files []wire.FileCheck) error {
	var bad []string
	for _, f := range files {
		var why string
		var st unix.Stat_t
		switch err := unix.Stat(f.Path, &st); {
		case err != nil:
			why = "missing here (" + err.Error() + ")"
		case st.Mode&unix.S_IFMT != unix.S_IFREG:
			why = "not a regular file here"
		case st.Mode != f.Mode:
			why = fmt.Sprintf("mode %o here, %o on the source", st.Mode&0o7777, f.Mode&0o7777)
		case f.CheckSize && st.Size != f.Size:
			why = fmt.Sprintf("%d bytes here, %d on the source", st.Size, f.Size)
		case f.BuildID != "":
			if id := proc.BuildID(f.Path); id != f.BuildID {
				why = fmt.Sprintf("another build here (build-id %s, %s on the source)", orNone(id), f.BuildID)
			}
		}
		if why != "" {
			bad = append(bad, f.Path+": "+why)
		}
	}
	if len(bad) == 0 {
		return nil
	}
	n, more := len(bad), ""
	if n > 10 {
		more = fmt.Sprintf("; and %d more", len(bad)-10)
		bad = bad[:10]
	}
	return api.Errorf(api.CodePrecondition, "%d of the files the process uses are not the same on the destination, and CRIU reopens each there by its path: %s%s. Make them the same there (the same packages, the same data, or storage both hosts share), or migrate to a host that has them",
		n, strings.Join(bad, "; "), more)
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// protocolErr is a peer breaking the protocol: it ends the session.
func protocolErr(format string, args ...any) error {
	return api.Errorf(api.CodeAborted, "protocol error: "+format, args...)
}
