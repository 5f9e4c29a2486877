//go:build linux

package criu

import (
	"github.com/phaul/phaul/pkg/api"
	"path/filepath"

	"github.com/checkpoint-restore/go-criu/v7/stats"
)

// ReadDumpStats reads the stats-dump file CRIU wrote into dir.
func ReadDumpStats(dir string) (api.DumpStats, error) {
	e, err := readStats(filepath.Join(dir, stats.StatsDump))
	if err != nil {
		return api.DumpStats{}, err
	}
	d := e.GetDump()
	return api.DumpStats{
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
func ReadRestoreStats(dir string) (api.RestoreStats, error) {
	e, err := readStats(filepath.Join(dir, stats.StatsRestore))
	if err != nil {
		return api.RestoreStats{}, err
	}
	r := e.GetRestore()
	return api.RestoreStats{
		PagesCompared:   r.GetPagesCompared(),
		PagesSkippedCOW: r.GetPagesSkippedCow(),
		PagesRestored:   r.GetPagesRestored(),
		ForkingUS:       r.GetForkingTime(),
		RestoreUS:       r.GetRestoreTime(),
	}, nil
}

// readStats decodes a CRIU statistics image.
func readStats(path string) (*stats.StatsEntry, error) {
	e := &stats.StatsEntry{}
	if err := readEntry(path, stats.ImgServiceMagic, stats.StatsMagic, e); err != nil {
		return nil, err
	}
	return e, nil
}
