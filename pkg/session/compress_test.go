//go:build linux

package session

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/migrate/migratetest"
	"github.com/phaul/phaul/pkg/proc"
)

// TestCompressedMigration moves a process whose memory and images are half
// zeros with --compress zstd, in copy and lazy mode, through the fake
// CRIU: its memory arrives intact, one copy runs, on the destination, and
// the result shows that the page stream and the images shrank on the wire.
func TestCompressedMigration(t *testing.T) {
	for _, mode := range []string{api.ModeCopy, api.ModeLazy} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			fake := migratetest.New(t, migratetest.Config{Memory: 4 << 20, ImageSize: 1 << 20, Chunk: 256 << 10, Compressible: true})
			a := newRuleDaemon(t, "A", filepath.Join(root, "a"), fake)
			b := newRuleDaemon(t, "B", filepath.Join(root, "b"), fake)
			pid := migratetest.StartTree(t)
			info, _ := proc.Stat(pid)
			c := copies{src: pid, start: info.StartTime, fake: fake}
			res, err := a.m.Migrate(context.Background(), api.Caller{}, api.MigrateRequest{PID: pid, To: b.addr(), Mode: mode, Compress: api.CompressZstd}, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: pages %d as %d, images %d as %d, %d bytes in all", mode, res.PageBytes, res.PageWireBytes, res.FileBytes, res.FileWireBytes, res.Bytes)
			if res.Compress != api.CompressZstd {
				t.Errorf("result compress %q", res.Compress)
			}
			if res.PageBytes < 4<<20 || res.PageWireBytes <= 0 || res.PageWireBytes > res.PageBytes*6/10 {
				t.Errorf("pages %d as %d on the wire: want the 4 MiB, about half of it", res.PageBytes, res.PageWireBytes)
			}
			if res.FileBytes < 1<<20 || res.FileWireBytes <= 0 || res.FileWireBytes > res.FileBytes*6/10 {
				t.Errorf("images %d as %d on the wire: want the 1 MiB, about half of it", res.FileBytes, res.FileWireBytes)
			}
			if res.Bytes > (res.PageBytes+res.FileBytes)*7/10 {
				t.Errorf("%d bytes crossed for %d of pages and images: not compressed", res.Bytes, res.PageBytes+res.FileBytes)
			}
			waitRule(t, "one copy, on the destination, intact", 20*time.Second, func() bool {
				src, dst, ok := c.one()
				return ok && !src && len(dst) == 1 && fake.Intact(dst[0])
			})
		})
	}
}

// TestUncompressedByDefault: without --compress, nothing is compressed and
// the result says nothing of it.
func TestUncompressedByDefault(t *testing.T) {
	root := t.TempDir()
	fake := migratetest.New(t, migratetest.Config{Memory: 1 << 20, Compressible: true})
	a := newRuleDaemon(t, "A", filepath.Join(root, "a"), fake)
	b := newRuleDaemon(t, "B", filepath.Join(root, "b"), fake)
	pid := migratetest.StartTree(t)
	res, err := a.m.Migrate(context.Background(), api.Caller{}, api.MigrateRequest{PID: pid, To: b.addr(), Mode: api.ModeCopy}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Compress != "" || res.PageWireBytes != 0 || res.Bytes < res.PageBytes {
		t.Errorf("uncompressed: compress %q, page wire %d, %d bytes for %d of pages", res.Compress, res.PageWireBytes, res.Bytes, res.PageBytes)
	}
}
