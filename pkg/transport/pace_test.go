//go:build linux

package transport

import (
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/loop"
	"github.com/phaul/phaul/pkg/wire"
)

func TestPacerRefusesTooSlow(t *testing.T) {
	if _, err := NewPacer(MinRate - 1); err == nil {
		t.Fatal("a rate below MinRate was taken")
	}
}

// TestPacerBucket runs a pacer on a fake clock: a full bucket first, then
// the rate, never more than the burst however long it idles.
func TestPacerBucket(t *testing.T) {
	now := time.Unix(1000, 0)
	p, err := NewPacer(2 << 20)
	if err != nil {
		t.Fatal(err)
	}
	p.now = func() time.Time { return now }
	p.last = now
	burst := int(p.burst)
	if got := p.Budget(); got != burst {
		t.Fatalf("budget at start %d, want the burst %d", got, burst)
	}
	p.Spend(burst)
	if got := p.Budget(); got != 0 {
		t.Fatalf("budget after spending it all %d, want 0", got)
	}
	want := time.Duration(float64(minWrite) / float64(2<<20) * float64(time.Second))
	if w := p.Wait(); w < want-time.Microsecond || w > want {
		t.Fatalf("wait %v for %d bytes at 2 MiB/s", w, minWrite)
	}
	now = now.Add(250 * time.Millisecond)
	if got, want := p.Budget(), burst; got != want {
		// 250 ms at 2 MiB/s is 512 KiB, more than the burst.
		t.Fatalf("budget after 250 ms idle %d, want the burst %d", got, want)
	}
	p.Spend(burst + 1<<20) // a write may overshoot; the debt is paid back
	now = now.Add(250 * time.Millisecond)
	if got := p.Budget(); got != 0 {
		t.Fatalf("budget %d while in debt", got)
	}
	now = now.Add(500 * time.Millisecond)
	if got := p.Budget(); got < burst-1 {
		t.Fatalf("budget %d once the debt is paid, want the burst %d", got, burst)
	}
}

// TestQueueWriteLimit writes a queue of several buffers a limited number
// of bytes at a time: never more than the limit, the bytes in order.
func TestQueueWriteLimit(t *testing.T) {
	lk, far := socketpair(t)
	defer lk.Close()
	defer far.Close()
	var q queue
	var want []byte
	for i := range 5 {
		b := make([]byte, 3000+i)
		for j := range b {
			b[j] = byte(i*7 + j)
		}
		want = append(want, b...)
		q.push(b)
	}
	var got []byte
	buf := make([]byte, 64<<10)
	for q.len() > 0 {
		n, err := q.writeTo(lk.Fd(), 1234)
		if err != nil {
			t.Fatal(err)
		}
		if n > 1234 || n == 0 {
			t.Fatalf("wrote %d with a limit of 1234", n)
		}
		m, err := io.ReadFull(far, buf[:n])
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, buf[:m]...)
	}
	if string(got) != string(want) {
		t.Fatal("bytes out of order or lost")
	}
	for _, b := range q.scratch {
		if b != nil {
			t.Fatal("the scratch iovecs hold a buffer after the write")
		}
	}
}

// drainTime queues total bytes on a conn (paced at rate, or not at all
// when rate is 0) and returns how long the far end took to read them all.
func drainTime(t *testing.T, rate int64, total int) time.Duration {
	t.Helper()
	lk, far := socketpair(t)
	defer far.Close()
	lp, err := loop.New()
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewConn(lp, "mem", lk, wire.Mem, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	c.OnMessage = func(wire.Message) error { return nil }
	if rate > 0 {
		p, err := NewPacer(rate)
		if err != nil {
			t.Fatal(err)
		}
		c.SetPacer(p)
	}
	var read atomic.Int64
	done := make(chan time.Time, 1)
	go func() {
		buf := make([]byte, 256<<10)
		for read.Load() < int64(total) {
			n, err := far.Read(buf)
			if err != nil {
				t.Error(err)
				break
			}
			read.Add(int64(n))
		}
		done <- time.Now()
	}()
	start := time.Now()
	stop := runLoop(t, lp)
	lp.Post(func() {
		for sent := 0; sent < total; sent += 64 << 10 {
			c.Queue(make([]byte, 64<<10))
		}
	})
	end := <-done
	lp.Post(c.Close)
	stop()
	return end.Sub(start)
}

// TestPacedConnKeepsToTheRate sends 3 MiB through a conn paced at
// 2 MiB/s: it takes about 1.5 s less the first burst, where the same
// bytes unpaced cross in a few milliseconds.
func TestPacedConnKeepsToTheRate(t *testing.T) {
	const total = 3 << 20
	free := drainTime(t, 0, total)
	paced := drainTime(t, 2<<20, total)
	t.Logf("3 MiB: unpaced %v, paced at 2 MiB/s %v", free, paced)
	if paced < 1300*time.Millisecond {
		t.Fatalf("paced at 2 MiB/s, 3 MiB took %v: faster than the rate", paced)
	}
	if paced > 3*time.Second {
		t.Fatalf("paced at 2 MiB/s, 3 MiB took %v: far slower than the rate", paced)
	}
	if free > 500*time.Millisecond {
		t.Fatalf("unpaced, 3 MiB took %v", free)
	}
}

// TestQueueReusesItsCopies: buffers pushCopy made are used again once
// written, and what crosses is still every byte, in order.
func TestQueueReusesItsCopies(t *testing.T) {
	lk, far := socketpair(t)
	defer lk.Close()
	defer far.Close()
	var q queue
	src := make([]byte, 96<<10)
	got := make([]byte, len(src))
	round := 0
	send := func() {
		for i := range src {
			src[i] = byte(i*13 + round)
		}
		round++
		for off := 0; off < len(src); off += 16 << 10 {
			q.pushCopy(src[off : off+16<<10]) // as TLS hands over records
		}
		for q.len() > 0 {
			if _, err := q.writeTo(lk.Fd(), -1); err != nil {
				t.Fatal(err)
			}
			if q.len() > 0 {
				t.Fatal("the socket pair took less than 96 KiB")
			}
		}
		if _, err := io.ReadFull(far, got); err != nil {
			t.Fatal(err)
		}
		if string(got) != string(src) {
			t.Fatalf("round %d: bytes changed on the way", round)
		}
	}
	send() // makes the first buffer
	if allocs := testing.AllocsPerRun(50, send); allocs > 0.5 {
		t.Fatalf("%.1f allocations per 96 KiB sent: the written buffers are not used again", allocs)
	}
	if len(q.spare) > maxSpare {
		t.Fatalf("%d spare buffers kept, at most %d", len(q.spare), maxSpare)
	}
}

// TestQueueNeverEmptyStaysSmall: a queue that is written from while it
// always holds something does not grow its arrays without end.
func TestQueueNeverEmptyStaysSmall(t *testing.T) {
	lk, far := socketpair(t)
	defer lk.Close()
	defer far.Close()
	var q queue
	buf := make([]byte, 4096)
	q.push(make([]byte, 1))
	for i := 0; i < 10000; i++ {
		q.push(make([]byte, 100))
		if _, err := q.writeTo(lk.Fd(), 100); err != nil { // leaves the last behind
			t.Fatal(err)
		}
		if _, err := io.ReadFull(far, buf[:100]); err != nil {
			t.Fatal(err)
		}
	}
	if q.len() != 1 || cap(q.bufs) > 256 {
		t.Fatalf("after 10000 pushes and writes: %d bytes queued, arrays of %d", q.len(), cap(q.bufs))
	}
}
