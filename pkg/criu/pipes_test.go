//go:build linux

package criu

import (
	"os"
	"path/filepath"
	"testing"
)

func TestEnsurePipeMaxSize(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pipe-max-size")
	defer func(old string) { pipeMaxSizePath = old }(pipeMaxSizePath)
	pipeMaxSizePath = path

	os.WriteFile(path, []byte("1048576\n"), 0o644)
	if was, err := EnsurePipeMaxSize(LazyPipeSize); err != nil || was != 1048576 {
		t.Fatalf("EnsurePipeMaxSize = %d, %v", was, err)
	}
	if b, _ := os.ReadFile(path); string(b) != "4194304" {
		t.Errorf("fs.pipe-max-size = %q after raising", b)
	}
	os.WriteFile(path, []byte("8388608\n"), 0o644)
	if was, err := EnsurePipeMaxSize(LazyPipeSize); err != nil || was != 8388608 {
		t.Fatalf("EnsurePipeMaxSize = %d, %v", was, err)
	}
	if b, _ := os.ReadFile(path); string(b) != "8388608\n" {
		t.Errorf("a larger limit was changed: %q", b)
	}
	os.WriteFile(path, []byte("nonsense"), 0o644)
	if _, err := EnsurePipeMaxSize(LazyPipeSize); err == nil {
		t.Error("no error for an unreadable value")
	}
}
