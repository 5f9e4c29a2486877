//go:build linux

// Package criutest writes small CRIU image sets for tests: the file
// images a restore reads its files' paths from, made with go-criu's own
// protobuf types, so that a check of those paths can run without CRIU.
package criutest

import (
	"encoding/binary"
	"os"
	"path/filepath"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/fdinfo"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/fown"
	fsimg "github.com/checkpoint-restore/go-criu/v7/crit/images/fs"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/regfile"
	remap "github.com/checkpoint-restore/go-criu/v7/crit/images/remap-file-path"
	"github.com/checkpoint-restore/go-criu/v7/magic"
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

// write writes an image: its two magics, then each entry as its size
// and its protobuf payload.
func write(path string, primary, secondary uint32, entries []proto.Message) error {
	b := binary.LittleEndian.AppendUint32(nil, primary)
	b = binary.LittleEndian.AppendUint32(b, secondary)
	for _, e := range entries {
		p, err := proto.Marshal(e)
		if err != nil {
			return err
		}
		b = binary.LittleEndian.AppendUint32(b, uint32(len(p)))
		b = append(b, p...)
	}
	return os.WriteFile(path, b, 0o600)
}
