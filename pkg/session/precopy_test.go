package session

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/migrate/migratetest"
	"github.com/phaul/phaul/pkg/proc"
)

// TestPrecopyMigration moves a tree in mode precopy through the fake CRIU:
// the rounds read its real memory and send it ahead, the destination
// holds no more than its --precopy-cap (the source keeps under it), the
// copy arrives with all its memory, and nothing of the pages held ahead
// is left on the destination.
func TestPrecopyMigration(t *testing.T) {
	for _, c := range []struct {
		name     string
		cap      int64
		compress string
	}{{"no cap", 0, ""}, {"cap of 4 pages", 4 * 4096, ""}, {"zstd", 0, api.CompressZstd}} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			fake := migratetest.New(t, migratetest.Config{Memory: 1 << 20, Framed: true})
			a := newRuleDaemon(t, "A", filepath.Join(root, "a"), fake)
			b := newRuleDaemon(t, "B", filepath.Join(root, "b"), fake, func(cfg *Config) { cfg.PrecopyCap = c.cap })
			pid := migratetest.StartTree(t)
			info, _ := proc.Stat(pid)
			cp := copies{src: pid, start: info.StartTime, fake: fake}
			res, err := a.m.Migrate(context.Background(), api.Caller{}, api.MigrateRequest{PID: pid, To: b.addr(), Mode: api.ModePrecopy, Compress: c.compress}, nil)
			if err != nil {
				t.Fatal(err)
			}
			p := res.Precopy
			if res.Mode != api.ModePrecopy || p == nil || p.Method != api.PrecopyContent || len(p.Rounds) == 0 || p.Rounds[0].Sent == 0 {
				t.Fatalf("mode %q, pre-copy %+v: want rounds that sent the tree's memory", res.Mode, p)
			}
			t.Logf("rounds %+v (%s), held %d bytes, %d bytes on the wire", p.Rounds, p.Stop, p.HeldBytes, res.Bytes)
			if c.cap > 0 && (p.HeldBytes > c.cap || p.HeldBytes == 0) {
				t.Errorf("held %d bytes ahead, the destination's cap is %d", p.HeldBytes, c.cap)
			}
			if c.cap == 0 && p.HeldBytes <= 4*4096 {
				t.Errorf("held %d bytes ahead without a cap: want the tree's memory", p.HeldBytes)
			}
			waitRule(t, "one copy, on the destination, intact", 20*time.Second, func() bool {
				src, dst, ok := cp.one()
				return ok && !src && len(dst) == 1 && fake.Intact(dst[0])
			})
			held, _ := filepath.Glob(filepath.Join(b.state, "sessions", "*", "precopy.pages"))
			for _, h := range held {
				if _, err := os.Stat(h); err == nil {
					t.Errorf("the pages held ahead are left: %s", h)
				}
			}
		})
	}
}
