package migrate

import (
	"crypto/sha256"
	"sync"
)

// CPUChecks remembers the CPU checks this destination passed, by the
// source's cpuinfo image: the check (a CRIU run, tens of milliseconds)
// depends only on that image and this host's CPU and CRIU, none of which
// change while phauld runs, so a second migration from the same kind of
// host need not run it again. Failures are not remembered: they are
// checked anew each time.
type CPUChecks struct {
	mu     sync.Mutex
	passed map[[sha256.Size]byte]string
}

// NewCPUChecks returns an empty memory of CPU checks.
func NewCPUChecks() *CPUChecks {
	return &CPUChecks{passed: map[[sha256.Size]byte]string{}}
}

// lookup returns the remembered result ("ok" or "skipped") for image.
func (c *CPUChecks) lookup(image []byte) (string, bool) {
	if c == nil {
		return "", false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.passed[sha256.Sum256(image)]
	return r, ok
}

// remember records that image passed with result.
func (c *CPUChecks) remember(image []byte, result string) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.passed) >= 64 {
		clear(c.passed) // a bound, not a policy: there are few kinds of hosts
	}
	c.passed[sha256.Sum256(image)] = result
}
