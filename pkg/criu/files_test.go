//go:build linux

package criu

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/checkpoint-restore/go-criu/v7/magic"
)

// PathFiles reads images the peer sent: whatever their bytes, it returns
// an error or a list, never panics, and never reads an entry over its
// bound.
func FuzzPathFiles(f *testing.F) {
	m := magic.LoadMagic()
	head := binary.LittleEndian.AppendUint32(nil, uint32(m.ByName["IMG_COMMON"]))
	head = binary.LittleEndian.AppendUint32(head, uint32(m.ByName["FILES"]))
	f.Add(head)
	f.Add(append(append([]byte(nil), head...), 5, 0, 0, 0, 8, 1, 16, 1, 26))
	f.Add(append(append([]byte(nil), head...), 0xff, 0xff, 0xff, 0xff))
	f.Add([]byte("not an image"))
	f.Fuzz(func(t *testing.T, b []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "files.img"), b, 0o600); err != nil {
			t.Fatal(err)
		}
		files, err := PathFiles(dir)
		if err == nil && len(files) > len(b) {
			t.Fatalf("%d files from %d bytes", len(files), len(b))
		}
	})
}

// An image truncated mid-entry, with an entry over the bound or of
// another kind is an error; no images at all is no files.
func TestPathFilesBounds(t *testing.T) {
	m := magic.LoadMagic()
	head := binary.LittleEndian.AppendUint32(nil, uint32(m.ByName["IMG_COMMON"]))
	head = binary.LittleEndian.AppendUint32(head, uint32(m.ByName["FILES"]))
	for name, b := range map[string][]byte{
		"truncated size":  append(append([]byte(nil), head...), 1, 0),
		"truncated entry": append(append([]byte(nil), head...), 10, 0, 0, 0, 1),
		"over the bound":  binary.LittleEndian.AppendUint32(append([]byte(nil), head...), maxFileEntry+1),
		"other magic":     []byte{1, 2, 3, 4, 5, 6, 7, 8},
	} {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "files.img"), b, 0o600)
		if _, err := PathFiles(dir); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if files, err := PathFiles(t.TempDir()); err != nil || len(files) != 0 {
		t.Errorf("no images: %v, %v; want none, no error", files, err)
	}
}
