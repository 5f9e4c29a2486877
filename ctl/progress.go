package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/api"
)

// progress shows a migration's progress events: on a terminal, one line
// redrawn in place (phase, a bar, bytes and pages moved, rate, estimate);
// elsewhere, a plain line per phase and every few seconds within one.
type progress struct {
	w     io.Writer
	tty   bool
	width int
	now   func() time.Time

	phase     string
	netShown  bool      // the network line was written
	drawn     bool      // a terminal line is on screen
	lastLine  time.Time // when the last plain line was written
	rate      float64   // bytes per second, smoothed
	lastBytes int64
	lastMS    int64
}

// plainEvery is how often a plain line repeats within a phase.
const plainEvery = 2 * time.Second

func newProgress(w io.Writer) *progress {
	p := &progress{w: w, width: 80, now: time.Now}
	if f, ok := w.(*os.File); ok {
		if _, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS); err == nil {
			p.tty = true
			if ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ); err == nil && ws.Col >= 40 {
				p.width = int(ws.Col)
			}
		}
	}
	return p
}

// event takes one progress event.
func (p *progress) event(ev api.Event) {
	if ev.Event != api.EventProgress || ev.Phase == "" {
		return
	}
	if ev.ElapsedMS > p.lastMS && ev.Bytes >= p.lastBytes {
		inst := float64(ev.Bytes-p.lastBytes) / (float64(ev.ElapsedMS-p.lastMS) / 1000)
		if p.rate == 0 || ev.Phase != p.phase {
			p.rate = inst
		} else {
			p.rate = 0.5*p.rate + 0.5*inst
		}
	}
	p.lastBytes, p.lastMS = ev.Bytes, ev.ElapsedMS
	if n := ev.Network; n != nil && !p.netShown {
		// Once, above the moving line: what moves of the namespace.
		p.done()
		fmt.Fprintf(p.w, "network: moving the namespace: interfaces %s, addresses %s, %d TCP connections",
			listOrNone(n.Interfaces), listOrNone(n.Addresses), n.TCPConnections)
		if n.TCPInFlight > 0 {
			fmt.Fprintf(p.w, " (%d not yet accepted stay behind)", n.TCPInFlight)
		}
		fmt.Fprintln(p.w)
		p.netShown = true
	}
	changed := ev.Phase != p.phase
	p.phase = ev.Phase
	if p.tty {
		fmt.Fprintf(p.w, "\r\x1b[K%s", p.line(ev, p.width-1))
		p.drawn = true
		return
	}
	if changed || p.now().Sub(p.lastLine) >= plainEvery {
		fmt.Fprintln(p.w, p.line(ev, 0))
		p.lastLine = p.now()
	}
}

// done ends the display before the result is printed.
func (p *progress) done() {
	if p.drawn {
		fmt.Fprint(p.w, "\r\x1b[K")
		p.drawn = false
	}
}

// line renders ev; width > 0 fits it (and its bar) to a terminal.
func (p *progress) line(ev api.Event, width int) string {
	var parts []string
	final := ev.Phase == "done"
	moved := bytesHuman(ev.Bytes)
	if ev.MemBytes > 0 && ev.Bytes > 0 && ev.Bytes < ev.MemBytes && !final {
		// An estimate (the tree's resident memory) only while it holds.
		moved += " of ~" + bytesHuman(ev.MemBytes)
	}
	if final {
		moved += " moved"
	}
	if ev.Bytes > 0 {
		parts = append(parts, moved)
	}
	if ev.Pages > 0 {
		parts = append(parts, fmt.Sprintf("%d pages", ev.Pages))
	}
	if n := ev.Network; n != nil && n.LockedMS > 0 {
		parts = append(parts, "network locked "+ms(n.LockedMS))
	}
	if final {
		// The totals: no rate of the moment, no time left.
		if ev.ElapsedMS > 0 {
			parts = append(parts, "in "+ms(ev.ElapsedMS))
			if ev.Bytes > 0 {
				parts = append(parts, bytesHuman(int64(float64(ev.Bytes)/(float64(ev.ElapsedMS)/1000)))+"/s on average")
			}
		}
	} else if p.rate > 0 && ev.Bytes > 0 {
		parts = append(parts, bytesHuman(int64(p.rate))+"/s")
		if left := ev.MemBytes - ev.Bytes; ev.MemBytes > 0 && left > 0 && ev.Phase != "done" {
			parts = append(parts, "about "+(time.Duration(float64(left)/p.rate*float64(time.Second))).Round(100*time.Millisecond).String()+" left")
		}
	}
	text := strings.Join(parts, ", ")
	if width <= 0 {
		if text == "" {
			return ev.Phase + "..."
		}
		return ev.Phase + ": " + text
	}
	head := fmt.Sprintf("%-10s ", ev.Phase)
	bar := ""
	if ev.MemBytes > 0 && !final {
		n := width - len(head) - len(text) - 3
		if n > 40 {
			n = 40
		}
		if n >= 10 {
			done := int(float64(n) * float64(ev.Bytes) / float64(ev.MemBytes))
			done = max(0, min(done, n))
			bar = "[" + strings.Repeat("#", done) + strings.Repeat(".", n-done) + "] "
		}
	}
	out := head + bar + text
	if len(out) > width {
		out = out[:width]
	}
	return out
}
