//go:build linux

package criu

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/fdinfo"
	fsimg "github.com/checkpoint-restore/go-criu/v7/crit/images/fs"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/regfile"
	remap "github.com/checkpoint-restore/go-criu/v7/crit/images/remap-file-path"
	"github.com/checkpoint-restore/go-criu/v7/magic"
	"google.golang.org/protobuf/proto"
)

// Bounds on the file images read: an entry is a path and a few numbers
// (a path is at most 4096 bytes), and a tree has at most a few hundred
// thousand open files.
const (
	maxFileEntry   = 64 << 10
	maxFileEntries = 1 << 20
)

// PathFile is a file CRIU's restore opens by its path: a descriptor, a
// mapping, a program, a working directory, as the images record it.
type PathFile struct {
	// ID is its id in the images (files.img).
	ID uint32
	// Path is the path CRIU opens, in the tree's mount namespace: for a
	// tree in its host's, the host's path.
	Path string
	// Mode is its st_mode on the source (type and permissions), Flags
	// the flags CRIU opens it with (the descriptor's open flags).
	Mode, Flags uint32
	// Remapped: it was deleted on the source, and CRIU opens something
	// else in its place: a file it makes anew from the images next to
	// Path (a ghost), a link the dump made to it (whose own entry is in
	// the list), or a dead task's /proc; never what is at Path.
	Remapped bool
	// Dir: a task's working directory or root (fs-*.img), which CRIU
	// only enters: it needs search permission, not read.
	Dir bool
}

// PathFiles lists the files the restore of the dump in dir opens by path
// (files.img's entries of type REG, and the old reg-files.img's), with
// their remaps and which are working directories. External files (passed
// in by the restorer) are left out: CRIU does not open them.
func PathFiles(dir string) ([]PathFile, error) {
	m := magic.LoadMagic()
	common := uint32(m.ByName["IMG_COMMON"])
	var out []PathFile
	add := func(r *regfile.RegFileEntry) {
		if r == nil || r.GetExt() {
			return
		}
		out = append(out, PathFile{ID: r.GetId(), Path: r.GetName(), Mode: r.GetMode(), Flags: r.GetFlags()})
	}
	err := readEntries(filepath.Join(dir, "files.img"), common, uint32(m.ByName["FILES"]),
		func() proto.Message { return &fdinfo.FileEntry{} },
		func(e proto.Message) {
			if f := e.(*fdinfo.FileEntry); f.GetType() == fdinfo.FdTypes_REG {
				add(f.GetReg())
			}
		})
	if err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	err = readEntries(filepath.Join(dir, "reg-files.img"), common, uint32(m.ByName["REG_FILES"]),
		func() proto.Message { return &regfile.RegFileEntry{} },
		func(e proto.Message) { add(e.(*regfile.RegFileEntry)) })
	if err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	remapped := map[uint32]bool{}
	err = readEntries(filepath.Join(dir, "remap-fpath.img"), common, uint32(m.ByName["REMAP_FPATH"]),
		func() proto.Message { return &remap.RemapFilePathEntry{} },
		func(e proto.Message) {
			remapped[e.(*remap.RemapFilePathEntry).GetOrigId()] = true
		})
	if err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	dirs := map[uint32]bool{}
	fsImages, err := filepath.Glob(filepath.Join(dir, "fs-*.img"))
	if err != nil {
		return nil, err
	}
	for _, path := range fsImages {
		err := readEntries(path, common, uint32(m.ByName["FS"]),
			func() proto.Message { return &fsimg.FsEntry{} },
			func(e proto.Message) {
				f := e.(*fsimg.FsEntry)
				dirs[f.GetCwdId()], dirs[f.GetRootId()] = true, true
			})
		if err != nil {
			return nil, err
		}
	}
	for i := range out {
		out[i].Remapped = remapped[out[i].ID]
		out[i].Dir = dirs[out[i].ID]
	}
	return out, nil
}

// readEntries decodes every entry of a CRIU image, as readEntry does the
// first, a bounded entry at a time (eachEntry, with the bounds of the
// file images).
func readEntries(path string, primary, secondary uint32, newEntry func() proto.Message, each func(proto.Message)) error {
	return eachEntry(path, primary, secondary, maxFileEntry, maxFileEntries, func(b []byte) error {
		e := newEntry()
		if err := proto.Unmarshal(b, e); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		each(e)
		return nil
	})
}

// eachEntry hands each entry's payload of a CRIU image (two magics, then
// entries: a 4-byte size and the payload) to each, which keeps nothing of
// it. Each length is checked before it is used; an entry over maxEntry
// bytes, or more than maxEntries entries, is an error.
func eachEntry(path string, primary, secondary uint32, maxEntry uint32, maxEntries int, each func([]byte) error) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	r := bufio.NewReader(f)
	var head [8]byte
	if _, err := io.ReadFull(r, head[:]); err != nil || binary.LittleEndian.Uint32(head[0:]) != primary || binary.LittleEndian.Uint32(head[4:]) != secondary {
		return fmt.Errorf("%s: not the CRIU image expected", path)
	}
	buf := make([]byte, maxEntry)
	for n := 0; ; n++ {
		var size [4]byte
		switch _, err := io.ReadFull(r, size[:]); {
		case err == io.EOF:
			return nil
		case err != nil:
			return fmt.Errorf("%s: truncated entry", path)
		}
		if n == maxEntries {
			return fmt.Errorf("%s: over %d entries", path, maxEntries)
		}
		sz := binary.LittleEndian.Uint32(size[:])
		if sz > maxEntry {
			return fmt.Errorf("%s: entry of %d bytes, over the %d-byte limit", path, sz, maxEntry)
		}
		if _, err := io.ReadFull(r, buf[:sz]); err != nil {
			return fmt.Errorf("%s: entry of %d bytes exceeds the image", path, sz)
		}
		if err := each(buf[:sz]); err != nil {
			return err
		}
	}
}
