//go:build linux

// Package criutest writes small CRIU image sets for tests: the file
// images a restore reads its files' paths from, and a task's pagemap,
// made with go-criu's own protobuf types, so that what reads them can be
// tested without CRIU.
package criutest

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/fdinfo"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/fown"
	fsimg "github.com/checkpoint-restore/go-criu/v7/crit/images/fs"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/pagemap"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/regfile"
	remap "github.com/checkpoint-restore/go-criu/v7/crit/images/remap-file-path"
	"github.com/checkpoint-restore/go-criu/v7/magic"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/pkg/criu"
)

// WriteFiles writes into dir the images of a dump whose tree has files
// open by path: files.img (one REG entry each, by its ID, path, mode and
// flags), remap-fpath.img (a ghost remap for each Remapped one) and
// fs-1.img (the first Dir one as the working directory and root).
func WriteFiles(dir string, files []criu.PathFile) error {
	m := magic.LoadMagic()
	common := uint32(m.ByName["IMG_COMMON"])
	var entries, remaps []proto.Message
	var fs *fsimg.FsEntry
	for _, f := range files {
		entries = append(entries, &fdinfo.FileEntry{
			Type: fdinfo.FdTypes_REG.Enum(),
			Id:   proto.Uint32(f.ID),
			Reg: &regfile.RegFileEntry{
				Id: proto.Uint32(f.ID), Flags: proto.Uint32(f.Flags), Pos: proto.Uint64(0),
				Fown: &fown.FownEntry{Uid: proto.Uint32(0), Euid: proto.Uint32(0), Signum: proto.Uint32(0), PidType: proto.Uint32(0), Pid: proto.Uint32(0)},
				Name: proto.String(f.Path), Mode: proto.Uint32(f.Mode),
			},
		})
		if f.Remapped {
			remaps = append(remaps, &remap.RemapFilePathEntry{OrigId: proto.Uint32(f.ID), RemapId: proto.Uint32(f.ID + 1000), RemapType: remap.RemapType_GHOST.Enum()})
		}
		if f.Dir && fs == nil {
			fs = &fsimg.FsEntry{CwdId: proto.Uint32(f.ID), RootId: proto.Uint32(f.ID)}
		}
	}
	if err := write(filepath.Join(dir, "files.img"), common, uint32(m.ByName["FILES"]), entries); err != nil {
		return err
	}
	if len(remaps) > 0 {
		if err := write(filepath.Join(dir, "remap-fpath.img"), common, uint32(m.ByName["REMAP_FPATH"]), remaps); err != nil {
			return err
		}
	}
	if fs != nil {
		return write(filepath.Join(dir, "fs-1.img"), common, uint32(m.ByName["FS"]), []proto.Message{fs})
	}
	return nil
}

// PagemapRun is one entry of a pagemap image.
type PagemapRun struct {
	Addr  uint64
	Pages uint64
	Flags uint32 // PE_PARENT 1, PE_LAZY 2, PE_PRESENT 4
	// Compat writes the count as CRIU 3 did (compat_nr_pages, 32 bits),
	// not as CRIU 4 does (nr_pages, 64 bits, the old field left 0).
	Compat bool
}

// WritePagemap writes into dir the pagemap image of the task pid (in the
// images): its head, then an entry a run, encoded by hand as CRIU does
// (images/pagemap.proto; go-criu's types lack CRIU 4's nr_pages).
func WritePagemap(dir string, pid int, runs []PagemapRun) error {
	m := magic.LoadMagic()
	entries := []proto.Message{&pagemap.PagemapHead{PagesId: proto.Uint32(uint32(pid))}}
	var raw [][]byte
	for _, r := range runs {
		b := protowire.AppendTag(nil, 1, protowire.VarintType)
		b = protowire.AppendVarint(b, r.Addr)
		b = protowire.AppendTag(b, 2, protowire.VarintType)
		if r.Compat {
			b = protowire.AppendVarint(b, r.Pages)
		} else {
			b = protowire.AppendVarint(b, 0)
		}
		b = protowire.AppendTag(b, 4, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(r.Flags))
		if !r.Compat {
			b = protowire.AppendTag(b, 5, protowire.VarintType)
			b = protowire.AppendVarint(b, r.Pages)
		}
		raw = append(raw, b)
	}
	return writeRaw(filepath.Join(dir, fmt.Sprintf("pagemap-%d.img", pid)), uint32(m.ByName["IMG_COMMON"]), uint32(m.ByName["PAGEMAP"]), entries, raw)
}

// write writes an image: its two magics, then each entry as its size
// and its protobuf payload.
func write(path string, primary, secondary uint32, entries []proto.Message) error {
	return writeRaw(path, primary, secondary, entries, nil)
}

// writeRaw is write, with entries encoded already after those to marshal.
func writeRaw(path string, primary, secondary uint32, entries []proto.Message, raw [][]byte) error {
	b := binary.LittleEndian.AppendUint32(nil, primary)
	b = binary.LittleEndian.AppendUint32(b, secondary)
	var all [][]byte
	for _, e := range entries {
		p, err := proto.Marshal(e)
		if err != nil {
			return err
		}
		all = append(all, p)
	}
	for _, p := range append(all, raw...) {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(p)))
		b = append(b, p...)
	}
	return os.WriteFile(path, b, 0o600)
}
