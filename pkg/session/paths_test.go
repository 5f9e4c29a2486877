//go:build linux

package session

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/criu/criutest"
	"github.com/phaul/phaul/pkg/migrate/migratetest"
	"github.com/phaul/phaul/pkg/proc"
)

// The destination checks the paths the images name before CRIU restores
// them, for the caller whose identity came in Prepare: a dump whose
// files.img names a file behind a symlink on the destination (for any
// caller), or a file the caller may not read (for a caller other than
// root), is refused after the images arrive and before any restore, and
// the source resumes its tree. In both modes.
func TestImagePathsRefusedRollBack(t *testing.T) {
	host, err := os.MkdirTemp("", "pc-paths-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(host) })
	os.Chmod(host, 0o755)
	target := filepath.Join(host, "etc", "shadow")
	os.MkdirAll(filepath.Dir(target), 0o755)
	if err := os.WriteFile(target, []byte("root's\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Symlink(filepath.Join(host, "etc"), filepath.Join(host, "d"))
	for _, c := range []struct {
		name   string
		caller api.Caller
		path   string
		want   string
	}{
		{"symlink", api.Caller{}, filepath.Join(host, "d", "shadow"),
			"file " + filepath.Join(host, "d", "shadow") + ": a symlink on this host (" + filepath.Join(host, "d") + "), which the source did not have"},
		{"member", api.Caller{UID: 4242, GID: 4242, Groups: []int{4243}}, target,
			"file " + target + ": not readable by uid 4242"},
	} {
		for _, mode := range []string{api.ModeCopy, api.ModeLazy} {
			t.Run(c.name+"/"+mode, func(t *testing.T) {
				root := t.TempDir()
				path := c.path
				fake := migratetest.New(t, migratetest.Config{Hook: func(_ context.Context, s migratetest.Step, dir string) error {
					if s != migratetest.StepPostDump {
						return nil
					}
					return criutest.WriteFiles(dir, []criu.PathFile{{ID: 1, Path: path, Mode: unix.S_IFREG | 0o600, Flags: unix.O_RDONLY}})
				}})
				a := newRuleDaemon(t, "A", filepath.Join(root, "a"), fake)
				b := newRuleDaemon(t, "B", filepath.Join(root, "b"), fake)
				pid := migratetest.StartTree(t)
				info, _ := proc.Stat(pid)
				cp := copies{src: pid, start: info.StartTime, fake: fake}
				_, err := a.m.Migrate(context.Background(), c.caller, api.MigrateRequest{PID: pid, To: b.addr(), Mode: mode}, nil)
				if err == nil || !strings.Contains(err.Error(), c.want) {
					t.Fatalf("migrate: %v; want it refused, saying %q", err, c.want)
				}
				// Touched (the tree was frozen) and rolled back.
				if code := api.CodeOf(err); code != api.CodeAborted {
					t.Errorf("code %s, want %s", code, api.CodeAborted)
				}
				t.Logf("refused: %v", err)
				if c.caller.UID != 0 && !strings.Contains(err.Error(), "asked by uid 4242") {
					t.Errorf("%v; want it to name the caller, uid 4242", err)
				}
				waitRule(t, "the source copy alone running", 10*time.Second, func() bool {
					src, _, one := cp.one()
					return src && one && a.settled() && b.settled()
				})
				if r := fake.Restored(); len(r) != 0 {
					t.Errorf("restores ran: %+v; want none", r)
				}
			})
		}
	}
}
