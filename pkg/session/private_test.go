//go:build linux

package session

import (
	"context"
	"errors"
	"io/fs"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/migrate/migratetest"
)

// TestSessionFilesPrivate: what a migration leaves in its session
// directories (a failed one's are kept a while) is root's alone, on both
// sides, though CRIU (and the fake, as it) writes its images and logs
// 0644 (issue 13, item 7): files 0600, directories 0700.
func TestSessionFilesPrivate(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	root := t.TempDir()
	fake := migratetest.New(t, migratetest.Config{Hook: migratetest.FailAt(migratetest.StepPostRestore, errors.New("injected failure"))})
	a := newRuleDaemon(t, "A", filepath.Join(root, "a"), fake)
	b := newRuleDaemon(t, "B", filepath.Join(root, "b"), fake)
	pid := migratetest.StartTree(t)
	if _, err := a.m.Migrate(context.Background(), api.Caller{}, api.MigrateRequest{PID: pid, To: b.addr(), Mode: api.ModeCopy}, nil); err == nil {
		t.Fatal("the migration succeeded though its restore failed")
	}
	waitRule(t, "both settled", 10*time.Second, func() bool { return a.settled() && b.settled() })
	for _, d := range []*ruleDaemon{a, b} {
		dirs, _ := filepath.Glob(filepath.Join(d.state, "sessions", "*"))
		if len(dirs) != 1 {
			t.Fatalf("%s keeps %d session directories, want the failed one", d.name, len(dirs))
		}
		checkPrivate(t, d.name, dirs[0])
	}
}

// checkPrivate fails for anything under dir that group or others may
// use: files must be 0600, directories 0700.
func checkPrivate(t *testing.T, who, dir string) {
	t.Helper()
	n := 0
	filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			t.Errorf("%s: %v", who, err)
			return nil
		}
		info, err := e.Info()
		if err != nil {
			return nil
		}
		want := fs.FileMode(0o600)
		if e.IsDir() {
			want = 0o700
		}
		if info.Mode().Perm() != want {
			t.Errorf("%s: %s is %v, want %v", who, path, info.Mode().Perm(), want)
		}
		n++
		return nil
	})
	if n < 3 {
		t.Errorf("%s: only %d entries in %s: images expected", who, n, dir)
	}
}
