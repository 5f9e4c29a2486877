//go:build linux

package migrate

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/criu/criutest"
	"github.com/phaul/phaul/pkg/wire"
)

// pathsHost is a directory standing for the destination's filesystem,
// searchable by all (t.TempDir's are not), owned by the test's user.
func pathsHost(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "pc-paths-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

func mkfile(t *testing.T, path string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("secret\n"), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // past the umask
		t.Fatal(err)
	}
}

// checkImages writes files as a dump's images, reads them back as the
// destination does, and checks them for caller.
func checkImages(t *testing.T, files []criu.PathFile, caller *wire.Caller, tasks ...int) error {
	t.Helper()
	images := t.TempDir()
	if err := criutest.WriteFiles(images, files); err != nil {
		t.Fatal(err)
	}
	got, err := criu.PathFiles(images)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(files) {
		t.Fatalf("read %d files from the images, wrote %d", len(got), len(files))
	}
	return checkImagePaths(got, caller, tasks)
}

const (
	regular = unix.S_IFREG | 0o644
	rdonly  = unix.O_RDONLY | unix.O_LARGEFILE
)

// A caller other than root: the test's user owns the files, so it is
// some other uid, in none of their groups unless given.
var member = &wire.Caller{UID: 4242, GID: 4242}

// The destination refuses, before CRIU runs, a file the images name that
// a symlink here redirects (in a directory of the path, or as the file
// itself), one of another type, one the caller may not open with the
// flags it was open with, and one behind a directory it may not search:
// each named with what is wrong and, for a caller other than root, its
// uid.
func TestImagePathsRefused(t *testing.T) {
	host := pathsHost(t)
	// The member's "d" is a symlink here, to a directory with a file of
	// the same size and mode as the one it had.
	mkfile(t, filepath.Join(host, "etc", "shadow"), 0o640)
	if err := os.Symlink(filepath.Join(host, "etc"), filepath.Join(host, "d")); err != nil {
		t.Fatal(err)
	}
	mkfile(t, filepath.Join(host, "real", "f"), 0o644)
	if err := os.Symlink(filepath.Join(host, "real", "f"), filepath.Join(host, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(host, "adir"), 0o755); err != nil {
		t.Fatal(err)
	}
	mkfile(t, filepath.Join(host, "private"), 0o600)
	mkfile(t, filepath.Join(host, "readonly"), 0o644)
	mkfile(t, filepath.Join(host, "closed", "f"), 0o644)
	if err := os.Chmod(filepath.Join(host, "closed"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		file criu.PathFile
		who  *wire.Caller
		want []string
	}{
		{"symlink in a directory", criu.PathFile{ID: 1, Path: filepath.Join(host, "d", "shadow"), Mode: unix.S_IFREG | 0o640, Flags: rdonly}, member,
			[]string{"file " + filepath.Join(host, "d", "shadow") + ": a symlink on this host (" + filepath.Join(host, "d") + "), which the source did not have", "asked by uid 4242"}},
		{"symlink as the file", criu.PathFile{ID: 1, Path: filepath.Join(host, "link"), Mode: regular, Flags: rdonly}, member,
			[]string{"a symlink on this host (" + filepath.Join(host, "link") + ")"}},
		{"symlink, root", criu.PathFile{ID: 1, Path: filepath.Join(host, "d", "shadow"), Mode: unix.S_IFREG | 0o640, Flags: rdonly}, &wire.Caller{},
			[]string{"a symlink on this host (" + filepath.Join(host, "d") + ")", "other files than it had"}},
		{"another type", criu.PathFile{ID: 1, Path: filepath.Join(host, "adir"), Mode: regular, Flags: rdonly}, member,
			[]string{"a directory on this host, where a regular file was expected"}},
		{"another type, root", criu.PathFile{ID: 1, Path: filepath.Join(host, "adir"), Mode: regular, Flags: rdonly}, nil,
			[]string{"a directory on this host, where a regular file was expected"}},
		{"not readable", criu.PathFile{ID: 1, Path: filepath.Join(host, "private"), Mode: unix.S_IFREG | 0o600, Flags: rdonly}, member,
			[]string{"not readable by uid 4242", "mode 0600"}},
		{"not writable, O_WRONLY", criu.PathFile{ID: 1, Path: filepath.Join(host, "readonly"), Mode: regular, Flags: unix.O_WRONLY}, member,
			[]string{"not writable by uid 4242"}},
		{"not writable, O_RDWR", criu.PathFile{ID: 1, Path: filepath.Join(host, "readonly"), Mode: regular, Flags: unix.O_RDWR | unix.O_LARGEFILE}, member,
			[]string{"not writable by uid 4242"}},
		{"directory not searchable", criu.PathFile{ID: 1, Path: filepath.Join(host, "closed", "f"), Mode: regular, Flags: rdonly}, member,
			[]string{"directory " + filepath.Join(host, "closed") + " is not searchable by uid 4242"}},
		{"another process's /proc", criu.PathFile{ID: 1, Path: "/proc/1/environ", Mode: unix.S_IFREG | 0o400, Flags: rdonly}, member,
			[]string{"a file of process 1, which is not in the migrated tree"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := checkImages(t, []criu.PathFile{c.file}, c.who, 7)
			if err == nil {
				t.Fatalf("%+v accepted for %+v", c.file, c.who)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q; want it to say %q", err, w)
				}
			}
			want := api.CodePermission
			if credOf(c.who) == nil {
				want = api.CodePrecondition
			}
			if api.CodeOf(err) != want {
				t.Errorf("code %s, want %s", api.CodeOf(err), want)
			}
		})
	}
}

// What a caller may open passes: a file it may read, one it may write
// (as its group), a working directory it may only search, a file that
// was deleted (CRIU makes it again from the images, where the path need
// not exist), its tree's own /proc files, a device open to all. Root's
// access is not checked (only the symlinks and types are).
func TestImagePathsAllowed(t *testing.T) {
	host := pathsHost(t)
	mkfile(t, filepath.Join(host, "pub", "r"), 0o644)
	mkfile(t, filepath.Join(host, "pub", "w"), 0o664)
	if err := os.Chown(filepath.Join(host, "pub", "w"), -1, os.Getgid()); err != nil {
		t.Fatal(err)
	}
	mkfile(t, filepath.Join(host, "home", "x"), 0o600)
	if err := os.Chmod(filepath.Join(host, "home"), 0o711); err != nil {
		t.Fatal(err)
	}
	inGroup := &wire.Caller{UID: 4242, GID: 4242, Groups: []uint32{uint32(os.Getgid())}}
	files := []criu.PathFile{
		{ID: 1, Path: filepath.Join(host, "pub", "r"), Mode: regular, Flags: rdonly},
		{ID: 2, Path: filepath.Join(host, "pub", "w"), Mode: unix.S_IFREG | 0o664, Flags: unix.O_RDWR},
		{ID: 3, Path: filepath.Join(host, "home"), Mode: unix.S_IFDIR | 0o711, Dir: true},
		{ID: 4, Path: filepath.Join(host, "gone", "deleted"), Mode: regular, Flags: rdonly, Remapped: true},
		{ID: 5, Path: "/proc/7/status", Mode: unix.S_IFREG | 0o444, Flags: rdonly},
		{ID: 6, Path: "/dev/null", Mode: unix.S_IFCHR | 0o666, Flags: unix.O_RDWR},
		{ID: 7, Path: "/", Mode: unix.S_IFDIR | 0o755, Dir: true},
	}
	if err := checkImages(t, files, inGroup, 1, 7); err != nil {
		t.Errorf("refused: %v", err)
	}
	// Root: a file nobody else may open, as it was open (read-write).
	root := append(files, criu.PathFile{ID: 8, Path: filepath.Join(host, "home", "x"), Mode: unix.S_IFREG | 0o600, Flags: unix.O_RDWR})
	for _, who := range []*wire.Caller{nil, {UID: 0, GID: 0}} {
		if err := checkImages(t, root, who, 7); err != nil {
			t.Errorf("refused for root (%+v): %v", who, err)
		}
	}
	// ... which the member is refused.
	if err := checkImages(t, root, inGroup, 7); err == nil || !strings.Contains(err.Error(), "file "+filepath.Join(host, "home", "x")+": not readable by uid 4242") {
		t.Errorf("the member, with root's file: %v; want it refused", err)
	}
}

// Before the freeze, the files the source listed are checked as far as
// Prepare tells: a symlink on the way is refused, for root too.
func TestPreparePathsRefused(t *testing.T) {
	host := pathsHost(t)
	mkfile(t, filepath.Join(host, "t", "f"), 0o644)
	if err := os.Symlink(filepath.Join(host, "t"), filepath.Join(host, "d")); err != nil {
		t.Fatal(err)
	}
	files := []wire.FileCheck{{Path: filepath.Join(host, "d", "f"), Mode: regular, Size: 7}}
	for _, who := range []*wire.Caller{{}, member} {
		err := checkPreparePaths(files, who)
		if err == nil || !strings.Contains(err.Error(), "a symlink on this host ("+filepath.Join(host, "d")+"), which the source did not have") {
			t.Errorf("caller %+v: %v; want the symlink refused", who, err)
		}
	}
	if err := checkPreparePaths([]wire.FileCheck{{Path: filepath.Join(host, "t", "f"), Mode: regular, Size: 7}}, member); err != nil {
		t.Errorf("the file itself: %v", err)
	}
}

// startHolder starts a process that holds files (fd 3 on) in dir, and
// kills it at the end.
func startHolder(t *testing.T, dir string, files ...*os.File) int {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	cmd.Dir, cmd.ExtraFiles = dir, files
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for _, f := range files {
		f.Close()
	}
	return cmd.Process.Pid
}

func openFile(t *testing.T, path string, flags int) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, flags, 0)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// After the restore, before the tree runs, what it holds is checked by
// the inodes themselves: a file the caller may not read or write as it
// is open is refused, whatever path led CRIU to it; the rest (a file it
// may read, a deleted file, its program, libraries, working directory)
// passes. Root is not checked.
func TestHeldFiles(t *testing.T) {
	host := pathsHost(t)
	mkfile(t, filepath.Join(host, "pub"), 0o644)
	mkfile(t, filepath.Join(host, "private"), 0o600)
	mkfile(t, filepath.Join(host, "gone"), 0o600)
	gone := openFile(t, filepath.Join(host, "gone"), os.O_RDONLY)
	os.Remove(filepath.Join(host, "gone"))
	ok := startHolder(t, host, openFile(t, filepath.Join(host, "pub"), os.O_RDONLY), gone)
	if err := checkHeld([]int{ok}, member, nil); err != nil {
		t.Errorf("a holder of what uid 4242 may open: %v", err)
	}
	bad := startHolder(t, host, openFile(t, filepath.Join(host, "private"), os.O_RDONLY), openFile(t, filepath.Join(host, "pub"), os.O_RDWR))
	err := checkHeld([]int{ok, bad}, member, nil)
	for _, w := range []string{"fd 3, " + filepath.Join(host, "private") + " (owner", "fd 4, " + filepath.Join(host, "pub"), "uid 4242 may not open"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("a holder of root's files: %v; want it refused, saying %q", err, w)
		}
	}
	if api.CodeOf(err) != api.CodePermission {
		t.Errorf("code %s, want %s", api.CodeOf(err), api.CodePermission)
	}
	if err := checkHeld([]int{bad}, &wire.Caller{}, nil); err != nil {
		t.Errorf("root: %v", err)
	}
}
