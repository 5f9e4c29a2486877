package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
)

func TestProgressPlain(t *testing.T) {
	var out bytes.Buffer
	p := newProgress(&out)
	clock := time.Unix(0, 0)
	p.now = func() time.Time { return clock }
	const mib = 1 << 20
	ev := func(phase string, ms, bytes int64) api.Event {
		return api.Event{Event: api.EventProgress, Phase: phase, ElapsedMS: ms, Bytes: bytes, MemBytes: 256 * mib, Pages: bytes / 4096}
	}
	p.event(ev("prepare", 10, 0))
	p.event(ev("dump", 100, 0))
	clock = clock.Add(250 * time.Millisecond)
	p.event(ev("dump", 350, 50*mib)) // same phase, too soon: no line
	clock = clock.Add(2 * time.Second)
	p.event(ev("dump", 600, 100*mib))
	p.event(ev("restore", 700, 256*mib))
	p.event(ev("done", 1000, 300*mib)) // more than the estimate
	p.done()
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	want := []string{"prepare...", "dump...", "dump: 100.0 MiB of ~256.0 MiB, 25600 pages", "restore: 256.0 MiB, 65536 pages",
		"done: 300.0 MiB moved, 76800 pages, in 1.00 s, 300.0 MiB/s on average"}
	if len(lines) != len(want) {
		t.Fatalf("lines:\n%s", out.String())
	}
	for i := range want {
		if !strings.HasPrefix(lines[i], want[i]) {
			t.Errorf("line %d = %q, want it to start %q", i, lines[i], want[i])
		}
	}
	if !strings.Contains(lines[2], "MiB/s") || !strings.Contains(lines[2], "left") {
		t.Errorf("no rate or estimate in %q", lines[2])
	}
	if last := lines[len(lines)-1]; strings.Contains(last, "left") || strings.Contains(last, "~") {
		t.Errorf("the final line %q has an estimate; want the totals", last)
	}
	if strings.Contains(out.String(), "\r") {
		t.Error("carriage returns in plain output")
	}
}

func TestProgressTerminal(t *testing.T) {
	var out bytes.Buffer
	p := newProgress(&out)
	p.tty, p.width = true, 100
	p.event(api.Event{Event: api.EventProgress, Phase: "dump", ElapsedMS: 100, MemBytes: 1 << 30})
	p.event(api.Event{Event: api.EventProgress, Phase: "dump", ElapsedMS: 600, Bytes: 1 << 29, MemBytes: 1 << 30, Pages: 1 << 17})
	p.done()
	s := out.String()
	frames := strings.Split(s, "\r\x1b[K")
	if len(frames) != 4 || frames[3] != "" {
		t.Fatalf("want two redrawn lines and a clear, got %q", s)
	}
	line := frames[2]
	i, j := strings.Index(line, "["), strings.Index(line, "]")
	if i < 0 || j < i {
		t.Fatalf("no bar in %q", line)
	}
	bar := line[i+1 : j]
	if full, n := strings.Count(bar, "#"), len(bar); n < 10 || full < n/2-1 || full > n/2+1 {
		t.Errorf("bar %q: want it half full", bar)
	}
	if !strings.Contains(line, "512.0 MiB of ~1.0 GiB") || !strings.Contains(line, "about 500ms left") {
		t.Errorf("line %q: want the bytes and the estimate", line)
	}
	if len(line) > 99 {
		t.Errorf("line of %d columns on a 100-column terminal", len(line))
	}
}

// A migration that moves a network namespace says once what moves, and
// how long the network has been locked while it is.
func TestProgressNetwork(t *testing.T) {
	var out bytes.Buffer
	p := newProgress(&out)
	n := &api.Network{Interfaces: []string{"eth0"}, Addresses: []string{"10.77.0.50/24"}, TCPConnections: 3, TCPInFlight: 1}
	locked := *n
	locked.LockedMS = 420
	p.event(api.Event{Event: api.EventProgress, Phase: "prepare", ElapsedMS: 10, Network: n})
	p.event(api.Event{Event: api.EventProgress, Phase: "dump", ElapsedMS: 500, Network: &locked})
	p.done()
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	want := []string{
		"network: moving the namespace: interfaces eth0, addresses 10.77.0.50/24, 3 TCP connections (1 not yet accepted stay behind)",
		"prepare...",
		"dump: network locked 420 ms",
	}
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Errorf("got:\n%s\nwant:\n%s", out.String(), strings.Join(want, "\n"))
	}
}
