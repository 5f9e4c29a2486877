//go:build linux

package migratetest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/migrate"
)

// LazyPages is a fake `criu lazy-pages` daemon: it implements
// migrate.LazyPages. It says it listens at once; once a lazy restore in its
// directory has started its process, it fetches that process's memory
// from the lazy dump over its page socket, a chunk at a time ("GET
// <offset> <length>", answered with the bytes), checks it, sends "CLOSE"
// and exits. It exits well, too, if the restored process exits first, as
// CRIU's does.
type LazyPages struct {
	c   *CRIU
	dir string
	log string
	ps  pageConn
	// statusR/statusW: its status pipe, a byte when it listens; exitFd an
	// eventfd, readable once it has exited.
	statusR, statusW int
	exitFd           int

	start    chan lazyRestore
	kill     chan struct{}
	killOnce sync.Once
	done     chan struct{}
	ctx      context.Context
	cancel   context.CancelFunc

	mu        sync.Mutex
	ready     bool
	fdsClosed bool
	err       error
	copied    uint64
	total     uint64
	counted   bool
	closeOnce sync.Once
}

var _ migrate.LazyPages = (*LazyPages)(nil)

// lazyRestore is a restored process whose memory lazy-pages fetches.
type lazyRestore struct {
	k  *child
	co core
}

// StartLazyPages starts a fake lazy-pages daemon for the images in dir,
// fetching pages over ps, a connected stream socket (it takes its own
// copy: the caller closes ps).
func (c *CRIU) StartLazyPages(dir string, ps *os.File) (migrate.LazyPages, error) {
	conn, err := dupConn(ps)
	if err != nil {
		return nil, fmt.Errorf("criu lazy-pages: page socket: %w", err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		conn.Close()
		return nil, fmt.Errorf("criu lazy-pages: %w", err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		conn.Close()
		unix.Close(p[0])
		unix.Close(p[1])
		return nil, fmt.Errorf("criu lazy-pages: %w", err)
	}
	lp := &LazyPages{
		c: c, dir: dir, log: filepath.Join(dir, criu.LazyPagesLog), ps: conn,
		statusR: p[0], statusW: p[1], exitFd: efd,
		start: make(chan lazyRestore, 1), kill: make(chan struct{}), done: make(chan struct{}),
	}
	lp.ctx, lp.cancel = context.WithCancel(c.ctx)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		conn.Close()
		unix.Close(p[0])
		unix.Close(p[1])
		unix.Close(efd)
		return nil, errors.New("criu lazy-pages: fake CRIU closed")
	}
	c.lazy[dir] = lp
	c.daemons = append(c.daemons, lp)
	c.goroutine(lp.run)
	return lp, nil
}

// lazyPages is the last lazy-pages daemon started for dir.
func (c *CRIU) lazyPages(dir string) *LazyPages {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lazy[dir]
}

// StatusFd becomes readable when the daemon listens (or has exited).
func (lp *LazyPages) StatusFd() int { return lp.statusR }

// Ready reports whether the daemon said it listens, reading its status
// pipe without blocking.
func (lp *LazyPages) Ready() bool {
	var b [1]byte
	n, err := unix.Read(lp.statusR, b[:])
	return err == nil && n == 1
}

// ExitFd becomes readable when the daemon has exited (an eventfd, where
// CRIU's is a pidfd).
func (lp *LazyPages) ExitFd() int { return lp.exitFd }

// Result waits for the daemon to exit: nil if it fetched every page (or
// its process exited first), else a *criu.Error.
func (lp *LazyPages) Result() error {
	<-lp.done
	return lp.err
}

// Kill makes the daemon exit as if killed, if it has not exited yet.
func (lp *LazyPages) Kill() {
	select {
	case <-lp.done:
		return
	default:
	}
	lp.killOnce.Do(func() {
		close(lp.kill)
		lp.cancel()
		lp.ps.Close()
	})
}

// Close releases the daemon's descriptors. A second Close does nothing.
func (lp *LazyPages) Close() {
	lp.closeOnce.Do(func() {
		lp.mu.Lock()
		defer lp.mu.Unlock()
		lp.fdsClosed = true
		unix.Close(lp.statusR)
		unix.Close(lp.exitFd)
	})
}

// Transferred is how many pages (of 4 KiB) the daemon brought in, of how
// many; ok once its process's memory is complete or the process exited.
func (lp *LazyPages) Transferred() (copied, total uint64, ok bool) {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	return lp.copied, lp.total, lp.counted
}

// listening reports whether a restore can connect to the daemon.
func (lp *LazyPages) listening() bool {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	select {
	case <-lp.done:
		return false
	default:
		return lp.ready
	}
}

// restored tells the daemon that a restore started k, whose memory it
// must fetch.
func (lp *LazyPages) restored(k *child, co core) {
	select {
	case lp.start <- lazyRestore{k: k, co: co}:
	default:
	}
}

func (lp *LazyPages) killed() bool {
	select {
	case <-lp.kill:
		return true
	default:
		return false
	}
}

func (lp *LazyPages) logf(format string, args ...any) {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	appendLog(lp.log, fmt.Sprintf(format, args...))
}

func (lp *LazyPages) run() {
	err := lp.serve()
	if err != nil && lp.killed() {
		err = errKilled
	}
	var res error
	switch {
	case errors.Is(err, errKilled):
		res = lp.failure("signal: killed")
	case err != nil:
		lp.logf("Error (fake-criu/lazy-pages): %v", err)
		res = lp.failure("exit status 1")
	}
	lp.ps.Close()
	unix.Close(lp.statusW)
	lp.mu.Lock()
	lp.err = res
	if !lp.fdsClosed {
		var one [8]byte
		binary.NativeEndian.PutUint64(one[:], 1)
		unix.Write(lp.exitFd, one[:])
	}
	lp.mu.Unlock()
	close(lp.done)
}

func (lp *LazyPages) failure(msg string) error {
	return &criu.Error{Op: "lazy-pages", Msg: msg, Log: lp.log, Lines: criu.ErrorLines(lp.log, 4)}
}

func (lp *LazyPages) serve() error {
	step := func(s Step) error {
		if lp.killed() {
			return errKilled
		}
		return lp.c.runHook(lp.ctx, lp.kill, nil, s, lp.dir, lp.logf)
	}
	if err := step(StepLazyPagesStart); err != nil {
		return err
	}
	lp.mu.Lock()
	lp.ready = true
	lp.mu.Unlock()
	lp.logf("listening")
	unix.Write(lp.statusW, []byte{0})
	var rs lazyRestore
	select {
	case rs = <-lp.start:
	case <-lp.kill:
		return errKilled
	}
	size := rs.co.Memory
	total := pages(size)
	lp.count(0, total, false)
	mem := make([]byte, size)
	for off := 0; off < size; {
		if rs.k.hasExited() {
			lp.logf("the restored process %d exited", rs.k.pid)
			lp.count(pages(off), total, true)
			return nil
		}
		if err := step(StepLazyFetch); err != nil {
			return err
		}
		n := min(lp.c.cfg.Chunk, size-off)
		if _, err := fmt.Fprintf(lp.ps, "GET %d %d\n", off, n); err != nil {
			return fmt.Errorf("ask for pages: %w", err)
		}
		if _, err := io.ReadFull(lp.ps, mem[off:off+n]); err != nil {
			return fmt.Errorf("read pages: %w", err)
		}
		off += n
		lp.count(pages(off), total, false)
	}
	if checksum(mem) != rs.co.SHA256 {
		return errors.New("pages corrupt")
	}
	if _, err := io.WriteString(lp.ps, "CLOSE\n"); err != nil {
		return fmt.Errorf("close the transfer: %w", err)
	}
	lp.c.setIntact(rs.k.pid)
	lp.count(total, total, true)
	lp.logf("uffd: %d-1: UFFD transferred pages: (%d/%d)", rs.k.pid, total, total)
	return nil
}

func (lp *LazyPages) count(copied, total uint64, done bool) {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	lp.copied, lp.total, lp.counted = copied, total, done
}

// pages is how many 4 KiB pages hold n bytes.
func pages(n int) uint64 { return uint64((n + 4095) / 4096) }
