package transport

import (
	"fmt"
	"time"
)

// MinRate is the lowest rate a Pacer may be given, in bytes a second. The
// peer counts only complete frames (up to 256 KiB) as a sign of life, and
// at this rate a whole frame crosses in a quarter of a second.
const MinRate = 1 << 20

// Pacer limits the bytes written to a migration's connections to a rate
// (phaulctl migrate --bwlimit): a token bucket that fills at the rate, up
// to a burst of a twentieth of a second's worth (at least 64 KiB). The
// connections that share one pace together. A Pacer belongs to one
// session's loop and is not safe for use by other goroutines.
type Pacer struct {
	rate   float64 // bytes a second
	burst  float64
	tokens float64
	last   time.Time
	now    func() time.Time
}

// minWrite is the least a throttled connection waits for, so that it
// writes in chunks and not a few bytes at each wake-up.
const minWrite = 16 << 10

// NewPacer returns a Pacer for rate bytes a second, its bucket full.
func NewPacer(rate int64) (*Pacer, error) {
	if rate < MinRate {
		return nil, fmt.Errorf("rate %d B/s is below the least phaul can pace, %d B/s (1 MiB/s)", rate, MinRate)
	}
	burst := max(float64(rate)/20, 64<<10)
	p := &Pacer{rate: float64(rate), burst: burst, tokens: burst, now: time.Now}
	p.last = p.now()
	return p, nil
}

// Rate is the pacer's rate in bytes a second.
func (p *Pacer) Rate() int64 { return int64(p.rate) }

func (p *Pacer) fill() {
	now := p.now()
	if d := now.Sub(p.last); d > 0 {
		p.tokens = min(p.burst, p.tokens+d.Seconds()*p.rate)
	}
	p.last = now
}

// Budget is how many bytes may be written now.
func (p *Pacer) Budget() int {
	p.fill()
	if p.tokens < 1 {
		return 0
	}
	return int(p.tokens)
}

// Spend takes n written bytes from the bucket.
func (p *Pacer) Spend(n int) { p.tokens -= float64(n) }

// Wait is how long until a chunk worth writing may go: minWrite bytes,
// or the whole burst if that is smaller.
func (p *Pacer) Wait() time.Duration {
	p.fill()
	want := min(p.burst, minWrite)
	if p.tokens >= want {
		return 0
	}
	return time.Duration((want - p.tokens) / p.rate * float64(time.Second))
}
