package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/phaul/phaul/pkg/api"
)

// printFigures shows CRIU's dump statistics, except in lazy mode, where
// CRIU leaves them at zero: there it shows what phauld measured.
func TestPrintFigures(t *testing.T) {
	var out bytes.Buffer
	c := &cli{stdout: &out}
	c.printFigures(api.Result{ID: "abc", Mode: api.ModeCopy, FrozenMS: 500,
		Dump:    &api.DumpStats{FreezingUS: 400, FrozenUS: 480000, MemdumpUS: 200000, MemwriteUS: 190000, PagesScanned: 66000, PagesWritten: 65900},
		Restore: &api.RestoreStats{RestoreUS: 150000, PagesRestored: 65900}})
	for _, want := range []string{"mode copy", "memdump 200 ms", "pages scanned 66000, written 65900", "restore: 150 ms"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("copy figures lack %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	c.printFigures(api.Result{ID: "abc", Mode: api.ModeLazy, FrozenMS: 139, LazyMS: 236,
		Dump: &api.DumpStats{FrozenUS: 139000, PagesLazy: 33506, PagesWritten: 37}})
	for _, want := range []string{"mode lazy", "last page arrived 236 ms", "pages lazy 33506", "no other dump figures"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("lazy figures lack %q:\n%s", want, out.String())
		}
	}
	if strings.Contains(out.String(), "memdump") {
		t.Errorf("lazy figures show CRIU's zeroed dump times:\n%s", out.String())
	}
}
