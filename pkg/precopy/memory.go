//go:build linux

package precopy

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Task is one process of the tree as a round reads it: its pid here, and
// the id CRIU's dump streams its memory under (TaskID).
type Task struct {
	PID int
	ID  uint64
}

// region is a private mapping a dump takes pages of.
type region struct{ start, end uint64 }

// regions lists pid's private, readable mappings, but the kernel's own
// (vdso, vvar, vsyscall), which CRIU does not dump. Shared mappings go
// in CRIU's stream under another id: they are never sent ahead.
func regions(pid int) ([]region, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/maps")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []region
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		fields := bytes.Fields(line)
		if len(fields) < 5 {
			continue
		}
		perms := fields[1]
		if len(perms) < 4 || perms[0] != 'r' || perms[3] != 'p' {
			continue
		}
		if len(fields) >= 6 {
			switch string(fields[5]) {
			case "[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]":
				continue
			}
		}
		dash := bytes.IndexByte(fields[0], '-')
		if dash < 0 {
			continue
		}
		start, err1 := strconv.ParseUint(string(fields[0][:dash]), 16, 64)
		end, err2 := strconv.ParseUint(string(fields[0][dash+1:]), 16, 64)
		if err1 != nil || err2 != nil || end <= start {
			continue
		}
		out = append(out, region{start, end})
	}
	return out, sc.Err()
}

// pagemap bits (Documentation/admin-guide/mm/pagemap.rst).
const (
	pmPresent = 1 << 63
	pmSwapped = 1 << 62
	pmFile    = 1 << 61 // file-page or shared-anon
)

// RoundStats are a round's figures.
type RoundStats struct {
	Scanned, Sent uint64 // pages
	Took          time.Duration
}

// Round reads the tasks' memory while they run and hands each run of
// pages that is new or changed since the last round (by hash) to send,
// marking them sent. A dump takes a private mapping's anonymous pages
// (present or swapped, not the file's own): those are what a round
// reads. Reading does not change the tree's memory, and pages that are
// not there are not faulted in (the pagemap says which are). Pages that
// would grow what the destination holds past capBytes (0: no cap) are
// left to the final dump. stop, when closed, ends the round early.
//
// send gets id, the address of the first page and the pages; it may
// keep them (a round never reuses the slice) and blocks for flow control.
func (s *Sent) Round(tasks []Task, capBytes int64, stop <-chan struct{}, send func(id, addr uint64, pages []byte) error) (RoundStats, error) {
	t0 := time.Now()
	var st RoundStats
	for _, t := range tasks {
		if err := s.roundTask(t, capBytes, stop, send, &st); err != nil {
			return st, err
		}
	}
	st.Took = time.Since(t0)
	return st, nil
}

// chunkPages is how much of a mapping a round reads at once.
const chunkPages = 64

func (s *Sent) roundTask(t Task, capBytes int64, stop <-chan struct{}, send func(id, addr uint64, pages []byte) error, st *RoundStats) error {
	regs, err := regions(t.PID)
	if gone(err) {
		return nil // it exited since the tree was listed: nothing to send
	}
	if err != nil {
		return fmt.Errorf("pid %d: %w", t.PID, err)
	}
	pm, err := os.Open("/proc/" + strconv.Itoa(t.PID) + "/pagemap")
	if gone(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("pid %d: %w", t.PID, err)
	}
	defer pm.Close()
	ents := make([]byte, 8*chunkPages)
	buf := make([]byte, chunkPages*PageSize)
	for _, r := range regs {
		for a := r.start; a < r.end; a += chunkPages * PageSize {
			select {
			case <-stop:
				return errStopped
			default:
			}
			n := min(chunkPages, int((r.end-a)/PageSize))
			if _, err := pm.ReadAt(ents[:8*n], int64(a/PageSize*8)); err != nil {
				// The mapping went away while we read: the next round,
				// or the dump, sees what is there.
				break
			}
			// The pages a dump takes, read in as few calls as runs.
			var local []unix.Iovec
			var remote []unix.RemoteIovec
			want := 0
			for i := 0; i < n; i++ {
				e := binary.LittleEndian.Uint64(ents[8*i:])
				if e&(pmPresent|pmSwapped) == 0 || e&pmFile != 0 {
					continue
				}
				want++
				addr := a + uint64(i)*PageSize
				if k := len(remote) - 1; k >= 0 && uint64(remote[k].Base)+uint64(remote[k].Len) == addr {
					remote[k].Len += PageSize
					local[k].Len += PageSize
					continue
				}
				lv := unix.Iovec{Base: &buf[i*PageSize]}
				lv.SetLen(PageSize)
				local = append(local, lv)
				remote = append(remote, unix.RemoteIovec{Base: uintptr(addr), Len: PageSize})
			}
			if want == 0 {
				continue
			}
			st.Scanned += uint64(want)
			if err := readRemote(t.PID, local, remote); err != nil {
				continue // unmapped meanwhile: left to the dump
			}
			for k := range remote {
				start := uint64(remote[k].Base)
				off := int((start - a) / PageSize)
				cnt := remote[k].Len / PageSize
				if err := s.sendChanged(t.ID, start, buf[off*PageSize:(off+cnt)*PageSize], capBytes, send, st); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// sendChanged sends the pages of a run that the destination does not
// hold as they are now, in runs.
func (s *Sent) sendChanged(id, start uint64, pages []byte, capBytes int64, send func(id, addr uint64, pages []byte) error, st *RoundStats) error {
	cnt := len(pages) / PageSize
	for i := 0; i < cnt; {
		key := Key{id, start + uint64(i)*PageSize}
		p := pages[i*PageSize : (i+1)*PageSize]
		h := s.h.Sum(p)
		old, held := s.pages[key]
		if (held && old == h) || (!held && capBytes > 0 && s.Bytes+PageSize > capBytes) {
			i++
			continue
		}
		j := i
		var run []byte
		for j < cnt {
			k := Key{id, start + uint64(j)*PageSize}
			q := pages[j*PageSize : (j+1)*PageSize]
			hq := h
			if j != i {
				hq = s.h.Sum(q)
			}
			o, was := s.pages[k]
			if (was && o == hq) || (!was && capBytes > 0 && s.Bytes+PageSize > capBytes) {
				break
			}
			if !was {
				s.Bytes += PageSize
			}
			s.pages[k] = hq
			run = append(run, q...)
			j++
		}
		st.Sent += uint64(j - i)
		if err := send(id, key.Addr, run); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// gone reports whether err says the task has exited.
func gone(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH)
}

// errStopped ends a round that was told to stop.
var errStopped = fmt.Errorf("pre-copy round stopped")

// readRemote reads the runs of remote into local with process_vm_readv,
// all or nothing.
func readRemote(pid int, local []unix.Iovec, remote []unix.RemoteIovec) error {
	want := 0
	for _, v := range remote {
		want += v.Len
	}
	// The kernel takes at most IOV_MAX vectors a call; a chunk has fewer.
	n, err := unix.ProcessVMReadv(pid, local, remote, 0)
	if err != nil {
		return err
	}
	if n != want {
		return fmt.Errorf("read %d of %d bytes", n, want)
	}
	return nil
}
