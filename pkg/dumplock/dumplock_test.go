//go:build linux

package dumplock

import (
	"os"
	"strings"
	"testing"
)

func TestGate(t *testing.T) {
	dir := t.TempDir()
	g, other := New(dir), New(dir) // two daemons
	ab, ok, err := g.TryAcquire([]string{"a", "b"})
	if err != nil || !ok {
		t.Fatalf("free keys refused: %v", err)
	}
	if _, ok, _ := other.TryAcquire([]string{"b", "c"}); ok {
		t.Fatal("a key held by another daemon granted")
	}
	if _, ok, _ := g.TryAcquire([]string{"a"}); ok {
		t.Fatal("a key held by another session of the same daemon granted")
	}
	c, ok, _ := other.TryAcquire([]string{"c"})
	if !ok {
		t.Fatal("a refused acquire left a key taken")
	}
	ab.Release()
	b, ok, _ := other.TryAcquire([]string{"b"})
	if !ok {
		t.Fatal("released key refused")
	}
	b.Release()
	c.Release()
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("lock files left after release: %v", left)
	}
	if keys := Keys(os.Getpid()); len(keys) != 1 || !strings.HasPrefix(keys[0], "cwd-") {
		t.Fatalf("Keys(self) = %q", keys)
	}
}
