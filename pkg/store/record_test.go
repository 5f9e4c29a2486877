//go:build linux

package store

import (
	"os"
	"path/filepath"
	"testing"
)

func TestRecordSaveLoad(t *testing.T) {
	dir := t.TempDir()
	r := &Record{ID: "x", Role: RoleDest, State: Restored, PID: 42, StartTime: 7}
	if err := r.Save(dir); err != nil {
		t.Fatal(err)
	}
	got, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != Restored || got.PID != 42 || got.StartTime != 7 || got.Created.IsZero() {
		t.Fatalf("loaded %+v", got)
	}
	if _, err := os.Stat(filepath.Join(dir, RecordName+".tmp")); !os.IsNotExist(err) {
		t.Fatalf("temporary record left behind: %v", err)
	}
	if fi, _ := os.Stat(filepath.Join(dir, RecordName)); fi.Mode().Perm() != 0o600 {
		t.Fatalf("record mode %v, want 0600", fi.Mode().Perm())
	}
}
