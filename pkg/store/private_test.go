//go:build linux

package store

import (
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestPrivate(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	sub := filepath.Join(dir, "cpuinfo")
	os.Mkdir(sub, 0o755)
	outside := filepath.Join(t.TempDir(), "outside")
	os.WriteFile(outside, nil, 0o644)
	for name, mode := range map[string]os.FileMode{"core-1.img": 0o644, "dump.log": 0o666, "cpuinfo/cpuinfo.img": 0o644, "hook.sh": 0o755, "rec.json": 0o600, "ro.img": 0o444} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, mode); err != nil {
			t.Fatal(err)
		}
	}
	os.Symlink(outside, filepath.Join(dir, "link"))
	l, err := net.Listen("unix", filepath.Join(dir, "lazy-pages.socket"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	os.Chmod(filepath.Join(dir, "lazy-pages.socket"), 0o777)
	if err := Private(dir); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]os.FileMode{".": 0o700, "cpuinfo": 0o700, "core-1.img": 0o600, "dump.log": 0o600, "cpuinfo/cpuinfo.img": 0o600, "hook.sh": 0o700, "rec.json": 0o600, "ro.img": 0o400, "lazy-pages.socket": 0o600} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.Mode().Perm() != want {
			t.Errorf("%s: %v, %v; want %v", name, fi.Mode().Perm(), err, want)
		}
	}
	if fi, _ := os.Stat(outside); fi.Mode().Perm() != 0o644 {
		t.Errorf("a link's target was changed: %v", fi.Mode().Perm())
	}
	if err := Private(filepath.Join(dir, "none")); err != nil {
		t.Errorf("a directory that is gone: %v", err)
	}
}
