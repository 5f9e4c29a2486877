//go:build linux

package criu

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	criucore "github.com/checkpoint-restore/go-criu/v7/crit/images/criu-core"
	"github.com/checkpoint-restore/go-criu/v7/magic"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/pkg/pagestream"
)

// taskStopped is CRIU's TASK_STOPPED (compel's COMPEL_TASK_STOPPED): the
// task was stopped by a job-control signal when CRIU froze it.
const taskStopped = 3

// maxCoreEntry bounds a core image's entry: registers, signal masks and
// the like, a few kilobytes.
const maxCoreEntry = 1 << 20

// StoppedTasks lists the tasks of the dump in dir that were stopped (by
// SIGSTOP or SIGTSTP) when CRIU froze them, by their pid in the images:
// their pid in their own pid namespace, which a restore gives them back.
// CRIU keeps such a task stopped when it rolls a dump back, but with
// leave_stopped every task ends stopped, and whoever resumes the tree
// must leave these alone. It returns nil, and no error, if dir holds no
// core images (the dump had not written them).
func StoppedTasks(dir string) (map[int]bool, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "core-*.img"))
	if err != nil {
		return nil, err
	}
	if len(paths) == 0 {
		return nil, nil // no dump here (yet)
	}
	m := magic.LoadMagic()
	common, core := uint32(m.ByName["IMG_COMMON"]), uint32(m.ByName["CORE"])
	stopped := map[int]bool{}
	for _, path := range paths {
		pid, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(filepath.Base(path), "core-"), ".img"))
		if err != nil {
			continue
		}
		e := &criucore.CoreEntry{}
		if err := readEntry(path, common, core, e); err != nil {
			return nil, err
		}
		if e.GetTc().GetTaskState() == taskStopped {
			stopped[pid] = true
		}
	}
	return stopped, nil
}

// readEntry decodes the first entry of a CRIU image: two magics, a payload
// size, then the protobuf payload. Unlike go-criu's reader it checks every
// length before slicing.
func readEntry(path string, primary, secondary uint32, e proto.Message) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if len(b) < 12 {
		return fmt.Errorf("%s: short image", path)
	}
	if binary.LittleEndian.Uint32(b[0:]) != primary || binary.LittleEndian.Uint32(b[4:]) != secondary {
		return fmt.Errorf("%s: not the CRIU image expected", path)
	}
	n := binary.LittleEndian.Uint32(b[8:])
	if n > maxCoreEntry || uint64(n) > uint64(len(b)-12) {
		return fmt.Errorf("%s: entry of %d bytes exceeds the image", path, n)
	}
	if err := proto.Unmarshal(b[12:12+int(n)], e); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// peLazy marks a pagemap entry whose pages a lazy dump keeps for its page
// server (criu/include/pagemap.h PE_LAZY).
const peLazy = 1 << 1

// A pagemap image's bounds: an entry (about 20 bytes) per run of pages.
const (
	maxPagemapEntry   = 1 << 10
	maxPagemapEntries = 4 << 20
)

// LazyRanges lists the runs of pages a lazy dump in dir left to its page
// server: the lazy entries of each task's pagemap image, named as
// lazy-pages asks the page server for them: by the task's pid in the
// images (a get's id is that pid as it is, not encoded as a dump's adds
// are).
func LazyRanges(dir string) ([]pagestream.Range, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "pagemap-*.img"))
	if err != nil {
		return nil, err
	}
	m := magic.LoadMagic()
	common, pm := uint32(m.ByName["IMG_COMMON"]), uint32(m.ByName["PAGEMAP"])
	var out []pagestream.Range
	for _, path := range paths {
		pid, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(filepath.Base(path), "pagemap-"), ".img"))
		if err != nil || pid <= 0 {
			continue // pagemap-shmem-*: not a task's memory
		}
		ents, err := pagemapEntries(path, common, pm)
		if err != nil {
			return nil, err
		}
		for _, e := range ents {
			if e.flags&peLazy != 0 && e.pages > 0 {
				out = append(out, pagestream.Range{ID: uint64(pid), Addr: e.addr, Pages: e.pages})
			}
		}
	}
	return out, nil
}

// pagemapRun is one entry of a pagemap image.
type pagemapRun struct {
	addr, pages uint64
	flags       uint32
}

// pagemapEntries decodes a pagemap image: its head, then its entries.
// They are decoded by hand: CRIU 4 counts an entry's pages in a field
// (nr_pages, 5, 64 bits) that go-criu's types do not have yet, and leaves
// the old one (2, 32 bits) zero.
func pagemapEntries(path string, primary, secondary uint32) ([]pagemapRun, error) {
	var out []pagemapRun
	head := true
	err := eachEntry(path, primary, secondary, maxPagemapEntry, maxPagemapEntries, func(b []byte) error {
		if head {
			head = false // which pages image: not needed
			return nil
		}
		r, err := decodePagemapEntry(b)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		out = append(out, r)
		return nil
	})
	return out, err
}

// decodePagemapEntry decodes a pagemap_entry (images/pagemap.proto):
// vaddr 1, compat_nr_pages 2, in_parent 3, flags 4, nr_pages 5.
func decodePagemapEntry(b []byte) (pagemapRun, error) {
	var r pagemapRun
	var compat, long uint64
	var hasAddr, hasLong bool
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return r, fmt.Errorf("pagemap entry: %w", protowire.ParseError(n))
		}
		b = b[n:]
		if typ != protowire.VarintType {
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return r, fmt.Errorf("pagemap entry: %w", protowire.ParseError(n))
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeVarint(b)
		if n < 0 {
			return r, fmt.Errorf("pagemap entry: %w", protowire.ParseError(n))
		}
		b = b[n:]
		switch num {
		case 1:
			r.addr, hasAddr = v, true
		case 2:
			compat = v
		case 4:
			r.flags = uint32(v)
		case 5:
			long, hasLong = v, true
		}
	}
	if !hasAddr {
		return r, fmt.Errorf("pagemap entry without an address")
	}
	r.pages = compat
	if hasLong {
		r.pages = long
	}
	if r.addr%pagestream.PageSize != 0 || r.pages > 1<<52/pagestream.PageSize || r.addr+r.pages*pagestream.PageSize < r.addr {
		return r, fmt.Errorf("pagemap entry of %d pages at %#x", r.pages, r.addr)
	}
	return r, nil
}
