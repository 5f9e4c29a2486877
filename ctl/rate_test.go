package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/phaul/phaul/pkg/api"
)

func TestParseRate(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
	}{
		{"8M", 8 << 20}, {"8m", 8 << 20}, {"8MiB", 8 << 20}, {"8MB/s", 8 << 20},
		{"1.5G", 3 << 29}, {"512K", 512 << 10}, {"2097152", 2 << 20}, {"2097152B", 2 << 20},
		{"100mbit", 12_500_000}, {"1gbit", 125_000_000}, {"800kbit", 100_000}, {" 4M ", 4 << 20},
	} {
		got, err := parseRate(c.in)
		if err != nil || got != c.want {
			t.Errorf("parseRate(%q) = %d, %v; want %d", c.in, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "fast", "-1M", "0", "M", "8X", "NaN", "inf", "1e30G"} {
		if n, err := parseRate(bad); err == nil {
			t.Errorf("parseRate(%q) = %d, want an error", bad, n)
		}
	}
}

func TestBWLimitFlag(t *testing.T) {
	var req api.MigrateRequest
	f := (*rateFlag)(&req.BWLimit)
	if err := f.Set("100mbit"); err != nil || req.BWLimit != 12_500_000 {
		t.Fatalf("--bwlimit 100mbit: %d, %v", req.BWLimit, err)
	}
	if err := f.Set("lots"); err == nil || !strings.Contains(err.Error(), "8M is 8 MiB/s") {
		t.Fatalf("--bwlimit lots: %v, want an error that shows the form", err)
	}
	var out bytes.Buffer
	c := &cli{stdout: &out}
	c.printFigures(api.Result{ID: "abc", Mode: api.ModeCopy, BWLimit: 8 << 20})
	if !strings.Contains(out.String(), "sent at most 8.0 MiB/s (67 Mbit/s) (--bwlimit)") {
		t.Fatalf("figures do not show the limit:\n%s", out.String())
	}
	out.Reset()
	c.printFigures(api.Result{ID: "abc", Mode: api.ModeCopy})
	if strings.Contains(out.String(), "bwlimit") {
		t.Fatalf("figures show a limit that was not set:\n%s", out.String())
	}
}

func TestCompressFigures(t *testing.T) {
	var out bytes.Buffer
	c := &cli{stdout: &out}
	c.printFigures(api.Result{ID: "abc", Mode: api.ModeCopy, Compress: api.CompressZstd,
		PageBytes: 512 << 20, PageWireBytes: 300 << 20, FileBytes: 2 << 20, FileWireBytes: 1 << 20})
	if !strings.Contains(out.String(), "compressed with zstd: pages 512.0 MiB as 300.0 MiB, images 2.0 MiB as 1.0 MiB") {
		t.Fatalf("figures do not show the compression:\n%s", out.String())
	}
	out.Reset()
	c.printFigures(api.Result{ID: "abc", Mode: api.ModeCopy})
	if strings.Contains(out.String(), "compressed") {
		t.Fatalf("figures show a compression that was not used:\n%s", out.String())
	}
}
