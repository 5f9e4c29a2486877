//go:build linux

package transport

import "golang.org/x/sys/unix"

// maxIovecs bounds one writev.
const maxIovecs = 64

// write writes b to the non-blocking fd until it is all written or the
// socket would block, and returns how much it wrote. EINTR is retried;
// EAGAIN is not an error.
func write(fd int, b []byte) (int, error) {
	off := 0
	for off < len(b) {
		n, err := unix.Write(fd, b[off:])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return off, nil
		case err != nil:
			return off, err
		}
		off += n
	}
	return off, nil
}

// queue is bytes waiting for a non-blocking socket, as the buffers they
// were handed over in (never copied into one).
type queue struct {
	bufs [][]byte
	// own[i] is bufs[i]'s whole buffer when the queue made it (pushCopy),
	// to be used again once written; nil for a buffer handed over (push).
	own     [][]byte
	spare   [][]byte // written buffers of pushCopy's, kept for reuse
	head    int      // bufs[:head] are written (nil)
	n       int
	scratch [][]byte // the iovecs of a write cut short by a limit
}

// maxSpare bounds the buffers a queue keeps for reuse (2 MiB).
const maxSpare = 8

func (q *queue) push(b []byte) {
	q.bufs = append(q.bufs, b)
	q.own = append(q.own, nil)
	q.n += len(b)
}

// copyChunk is the size of the buffers pushCopy packs copies into.
const copyChunk = 256 << 10

// pushCopy queues a copy of b (whose owner reuses it), packed into the
// last buffer when it has room.
func (q *queue) pushCopy(b []byte) {
	if n := len(q.bufs); n > q.head {
		if last := q.bufs[n-1]; cap(last)-len(last) >= len(b) {
			q.bufs[n-1] = append(last, b...)
			q.n += len(b)
			return
		}
	}
	var c []byte
	if n := len(q.spare); n > 0 && len(b) <= copyChunk {
		// A fresh 256 KiB buffer for every 256 KiB sent made zeroing
		// and the garbage collector a fifth of a busy source's time.
		c, q.spare = q.spare[n-1][:len(b)], q.spare[:n-1]
	} else {
		c = make([]byte, len(b), max(copyChunk, len(b)))
	}
	copy(c, b)
	q.bufs = append(q.bufs, c)
	q.own = append(q.own, c[:cap(c)])
	q.n += len(b)
}

func (q *queue) len() int { return q.n }

// writeTo writes what is queued to fd, with writev, until all is written,
// limit bytes are (limit < 0: no limit), or the socket would block, and
// returns how much it wrote.
func (q *queue) writeTo(fd int, limit int) (int, error) {
	total := 0
	for q.n > 0 && (limit < 0 || total < limit) {
		live := q.bufs[q.head:]
		iov := live[:min(len(live), maxIovecs)]
		if limit >= 0 {
			iov = q.cut(iov, limit-total)
		}
		n, err := unix.Writev(fd, iov)
		if limit >= 0 {
			clear(q.scratch) // hold no buffer past its write
		}
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return total, nil
		case err != nil:
			return total, err
		}
		total += n
		q.n -= n
		for n > 0 {
			h := q.head
			if n >= len(q.bufs[h]) {
				n -= len(q.bufs[h])
				if b := q.own[h]; b != nil && cap(b) == copyChunk && len(q.spare) < maxSpare {
					q.spare = append(q.spare, b)
				}
				q.bufs[h], q.own[h] = nil, nil
				q.head++
			} else {
				q.bufs[h] = q.bufs[h][n:]
				n = 0
			}
		}
		if q.head == len(q.bufs) {
			// Empty: start again at the front, in the same arrays.
			q.bufs, q.own, q.head = q.bufs[:0], q.own[:0], 0
		} else if q.head >= 64 && q.head >= len(q.bufs)/2 {
			// A stream that never empties: move the live ones to the
			// front, so that the arrays do not grow without end.
			k := copy(q.bufs, q.bufs[q.head:])
			copy(q.own, q.own[q.head:])
			clear(q.bufs[k:])
			clear(q.own[k:])
			q.bufs, q.own, q.head = q.bufs[:k], q.own[:k], 0
		}
	}
	return total, nil
}

// cut returns the leading buffers of iov that hold at most limit (> 0)
// bytes, the last one cut short if need be, in q's scratch space.
func (q *queue) cut(iov [][]byte, limit int) [][]byte {
	q.scratch = q.scratch[:0]
	for _, b := range iov {
		if limit <= 0 {
			break
		}
		if len(b) > limit {
			b = b[:limit]
		}
		q.scratch = append(q.scratch, b)
		limit -= len(b)
	}
	return q.scratch
}
