//go:build linux

package criu

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"

	"github.com/checkpoint-restore/go-criu/v7/stats"
	"google.golang.org/protobuf/proto"
)

// DumpStats are CRIU's own figures for a dump (times in microseconds).
type DumpStats struct {
	FreezingUS         uint32 `json:"freezing_us"`
	FrozenUS           uint32 `json:"frozen_us"`
	MemdumpUS          uint32 `json:"memdump_us"`
	MemwriteUS         uint32 `json:"memwrite_us"`
	PagesScanned       uint64 `json:"pages_scanned"`
	PagesSkippedParent uint64 `json:"pages_skipped_parent"`
	PagesWritten       uint64 `json:"pages_written"`
	PagesLazy          uint64 `json:"pages_lazy"`
}

// RestoreStats are CRIU's own figures for a restore (times in
// microseconds).
type RestoreStats struct {
	PagesCompared   uint64 `json:"pages_compared"`
	PagesSkippedCOW uint64 `json:"pages_skipped_cow"`
	PagesRestored   uint64 `json:"pages_restored"`
	ForkingUS       uint32 `json:"forking_us"`
	RestoreUS       uint32 `json:"restore_us"`
}

// ReadDumpStats reads the stats-dump file CRIU wrote into dir.
func ReadDumpStats(dir string) (DumpStats, error) {
	e, err := readStats(filepath.Join(dir, stats.StatsDump))
	if err != nil {
		return DumpStats{}, err
	}
	d := e.GetDump()
	return DumpStats{
		FreezingUS:         d.GetFreezingTime(),
		FrozenUS:           d.GetFrozenTime(),
		MemdumpUS:          d.GetMemdumpTime(),
		MemwriteUS:         d.GetMemwriteTime(),
		PagesScanned:       d.GetPagesScanned(),
		PagesSkippedParent: d.GetPagesSkippedParent(),
		PagesWritten:       d.GetPagesWritten(),
		PagesLazy:          d.GetPagesLazy(),
	}, nil
}

// ReadRestoreStats reads the stats-restore file CRIU wrote into dir.
func ReadRestoreStats(dir string) (RestoreStats, error) {
	e, err := readStats(filepath.Join(dir, stats.StatsRestore))
	if err != nil {
		return RestoreStats{}, err
	}
	r := e.GetRestore()
	return RestoreStats{
		PagesCompared:   r.GetPagesCompared(),
		PagesSkippedCOW: r.GetPagesSkippedCow(),
		PagesRestored:   r.GetPagesRestored(),
		ForkingUS:       r.GetForkingTime(),
		RestoreUS:       r.GetRestoreTime(),
	}, nil
}

// readStats decodes a CRIU statistics image: two magics, a payload size,
// then the protobuf payload. Unlike go-criu's reader it checks every
// length before slicing.
func readStats(path string) (*stats.StatsEntry, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(b) < stats.PayloadOffset {
		return nil, fmt.Errorf("%s: short file", path)
	}
	if binary.LittleEndian.Uint32(b[stats.PrimaryMagicOffset:]) != stats.ImgServiceMagic ||
		binary.LittleEndian.Uint32(b[stats.SecondaryMagicOffset:]) != stats.StatsMagic {
		return nil, fmt.Errorf("%s: not a CRIU stats image", path)
	}
	n := binary.LittleEndian.Uint32(b[stats.SizeOffset:])
	if uint64(n) > uint64(len(b)-stats.PayloadOffset) {
		return nil, fmt.Errorf("%s: payload of %d bytes exceeds file", path, n)
	}
	e := &stats.StatsEntry{}
	if err := proto.Unmarshal(b[stats.PayloadOffset:stats.PayloadOffset+int(n)], e); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return e, nil
}
