//go:build linux

package store

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
)

// Private takes from group and others every permission on dir and on
// what is under it: a session directory's images and logs hold the
// process's state, and CRIU writes them 0644 (phauld's umask is left
// alone: the programs phaulctl run starts, and the bundles and runc state
// that containers' users traverse, inherit or need it). Images become
// 0600, directories and sockets 0700 and 0600, and an action script
// phauld wrote 0700 keeps its owner's execute bit. Symbolic links are neither followed nor
// changed. What vanishes meanwhile is skipped; the first other failure is
// returned, after the rest was done.
func Private(dir string) error {
	var first error
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) && first == nil {
				first = err
			}
			return nil
		}
		if d.Type()&fs.ModeSymlink != 0 {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil // gone
		}
		perm := info.Mode().Perm()
		want := perm &^ 0o077
		if !d.IsDir() && !d.Type().IsRegular() {
			want &= 0o600 // a socket's execute bit means nothing
		}
		if want == perm {
			return nil
		}
		if err := os.Chmod(path, want); err != nil && !errors.Is(err, fs.ErrNotExist) && first == nil {
			first = err
		}
		return nil
	})
	if err != nil && first == nil {
		first = err
	}
	return first
}
