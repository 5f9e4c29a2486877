//go:build linux

package migrate

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// Limits on the image files a destination accepts. CRIU's non-page images
// are small (kilobytes per task); the largest legitimate ones are ghost
// files and tmpfs contents.
const (
	maxImageFile  = 1 << 30
	maxImageTotal = 4 << 30
	maxImageFiles = 100_000
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

// sendFiles queues the named files of dir on c, each as FileBegin, FileData
// chunks and FileEnd with its SHA-256. It returns the bytes of file data.
func sendFiles(c *transport.Conn, dir string, names []string) (int64, error) {
	var total int64
	for _, n := range names {
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			return total, err
		}
		if len(b) > maxImageFile {
			return total, fmt.Errorf("image %s is %d bytes, over the %d-byte limit", n, len(b), maxImageFile)
		}
		if err := c.Send(&wire.FileBegin{Name: n, Size: int64(len(b))}); err != nil {
			return total, err
		}
		for off := 0; off < len(b); off += wire.DataChunk {
			chunk := b[off:min(len(b), off+wire.DataChunk)]
			frame := make([]byte, 0, wire.HeaderLen+len(chunk))
			frame = wire.AppendHeader(frame, wire.TypeFileData, len(chunk))
			c.Queue(append(frame, chunk...))
		}
		sum := sha256.Sum256(b)
		if err := c.Send(&wire.FileEnd{SHA256: hex.EncodeToString(sum[:])}); err != nil {
			return total, err
		}
		total += int64(len(b))
	}
	return total, nil
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

// protocolErr is a peer breaking the protocol: it ends the session.
func protocolErr(format string, args ...any) error {
	return api.Errorf(api.CodeAborted, "protocol error: "+format, args...)
}
