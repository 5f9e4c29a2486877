//go:build linux

package criu_test

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/criu/criutest"
	"github.com/phaul/phaul/pkg/pagestream"
)

func TestLazyRanges(t *testing.T) {
	dir := t.TempDir()
	const lazy, present = 2, 4
	if err := criutest.WritePagemap(dir, 1, []criutest.PagemapRun{
		{Addr: 0x400000, Pages: 3, Flags: present},                    // in the images
		{Addr: 0x7f0000000000, Pages: 1 << 33, Flags: lazy | present}, // left to the page server: 32 TiB, past 32 bits
		{Addr: 0x7f0000800000, Pages: 0, Flags: lazy},
	}); err != nil {
		t.Fatal(err)
	}
	// As CRIU 3 counted pages.
	if err := criutest.WritePagemap(dir, 7, []criutest.PagemapRun{{Addr: 0x10000, Pages: 5, Flags: lazy, Compat: true}}); err != nil {
		t.Fatal(err)
	}
	// Shared memory's pagemap is not a task's.
	if err := os.WriteFile(filepath.Join(dir, "pagemap-shmem-1234.img"), []byte("not read"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := criu.LazyRanges(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := []pagestream.Range{
		{ID: 1, Addr: 0x7f0000000000, Pages: 1 << 33},
		{ID: 7, Addr: 0x10000, Pages: 5},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("lazy ranges %+v, want %+v", got, want)
	}

	// A damaged image is an error, not a plan.
	b, err := os.ReadFile(filepath.Join(dir, "pagemap-7.img"))
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range [][]byte{b[:len(b)-1], b[:6], append([]byte{1, 2, 3, 4}, b[4:]...)} {
		if err := os.WriteFile(filepath.Join(dir, "pagemap-7.img"), bad, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := criu.LazyRanges(dir); err == nil {
			t.Errorf("a pagemap of %d bytes (damaged) was read", len(bad))
		}
	}

	// Runs past the end of the address space, or not page aligned.
	for _, run := range []criutest.PagemapRun{{Addr: 0xfffffffffffff000, Pages: 2, Flags: lazy}, {Addr: 0x1001, Pages: 1, Flags: lazy}} {
		dir := t.TempDir()
		if err := criutest.WritePagemap(dir, 1, []criutest.PagemapRun{run}); err != nil {
			t.Fatal(err)
		}
		if _, err := criu.LazyRanges(dir); err == nil {
			t.Errorf("a pagemap entry of %d pages at %#x was read", run.Pages, run.Addr)
		}
	}
}
