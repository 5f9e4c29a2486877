//go:build linux

// Package migratetest is a fake CRIU for the unit tier of pkg/migrate: it
// implements migrate.CRIU on real processes, without root and without CRIU,
// so that the state machines run in plain `go test -race`.
//
// A dump stops the tree with SIGSTOP and writes small images naming its
// root (its argv and a checksum of its fake memory); its pages stream over
// the page socket like CRIU's. A restore starts a new process from the
// images, stopped. Each request talks over a socket pair as `criu swrk`
// does, one message a datagram, and reacts to its socket closing as CRIU
// does (a dump resumes its tree, a restore kills what it restored), so a
// test can crash a daemon by closing its descriptors.
//
// Tests of pkg/migrate that use it are in package migrate_test: this
// package imports migrate for the interfaces it implements.
package migratetest

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/migrate"
)

// Step is a point in a fake request where a Hook can make it fail or
// block.
type Step string

// The steps, in the order a migration meets them.
const (
	// StepCPUCheck: a cpuinfo check, before its response.
	StepCPUCheck Step = "cpuinfo-check"
	// StepPageServer: a page server, before its start response.
	StepPageServer Step = "page-server"
	// StepPagesReceived: a page server has read the page stream to its
	// end; before it writes pages-1.img, acknowledges and exits. Failing
	// here makes it exit with status 1, unacknowledged.
	StepPagesReceived Step = "pages-received"
	// StepDumpStart: a dump, before it freezes the tree.
	StepDumpStart Step = "dump-start"
	// StepDumpPages: a dump, tree frozen and images written, before the
	// pages go (copy) or before post-dump (lazy).
	StepDumpPages Step = "dump-pages"
	// StepPostDump: a dump, before its post-dump notification.
	StepPostDump Step = "post-dump"
	// StepLazyServe: a lazy dump, post-dump answered yes, before it
	// serves pages.
	StepLazyServe Step = "lazy-serve"
	// StepDumpEnd: a dump, done (post-dump answered yes; lazy: pages
	// served), before its final response. Failing here resumes the tree.
	StepDumpEnd Step = "dump-end"
	// StepLazyPagesStart: a lazy-pages daemon, before it says it listens.
	// Failing here makes it exit without ever being ready.
	StepLazyPagesStart Step = "lazy-pages-start"
	// StepRestoreStart: a restore, before it reads the images.
	StepRestoreStart Step = "restore-start"
	// StepPostRestore: a restore, its process started and stopped,
	// before its post-restore notification.
	StepPostRestore Step = "post-restore"
	// StepRestoreEnd: a restore, post-restore answered yes, before its
	// final response. Failing here kills the restored process.
	StepRestoreEnd Step = "restore-end"
	// StepLazyFetch: a lazy-pages daemon, before each chunk it asks for.
	StepLazyFetch Step = "lazy-fetch"
)

// Hook is called by the fake before each step of each request, with the
// request's images directory; it must be safe for concurrent use.
//
// An error fails the step the way CRIU fails there (a dump resumes its
// tree and answers with the error, a restore kills its process, ...). A
// *criu.Error or a syscall.Errno in the error sets the response's Errno
// (e.g. ENOTSUP for a CPU check CRIU cannot make).
//
// A hook may block, but must return once ctx is done: when the request's
// RPC socket closes at a step where CRIU would be talking to it (the
// request then reacts as CRIU does, once the hook has returned), when the
// request is killed (Op.Abandon), and when the fake closes (which waits
// for it). ErrWedge makes the request hang instead.
type Hook func(ctx context.Context, step Step, dir string) error

// ErrWedge, returned by a Hook, makes the request hang at that step, deaf
// to its socket, until it is killed: CRIU 4.2.1 can hang so after an
// aborted restore, and Op.Abandon must then kill it.
var ErrWedge = errors.New("migratetest: wedged")

// FailAt is a Hook that fails step, in every request, with err.
func FailAt(step Step, err error) Hook {
	return func(_ context.Context, s Step, _ string) error {
		if s == step {
			return err
		}
		return nil
	}
}

// Config sets up a fake CRIU. The zero value is a working one.
type Config struct {
	// Memory is the size of each dumped tree's fake memory, the pages a
	// migration moves: 1 MiB if 0.
	Memory int
	// ImageSize is the size of the image file a dump writes besides its
	// core image, so that image transfer moves some bytes: 64 KiB if 0.
	ImageSize int
	// Compressible makes every other page of the memory, and half of
	// the image file, zeros (otherwise they are pseudo-random).
	Compressible bool
	// Framed frames a copy dump's page stream as CRIU's page-server
	// protocol does (one add of present pages, then the pages), as a
	// pre-copy source's relay reads it; otherwise the stream is the
	// memory as it is.
	Framed bool
	// Chunk is how much memory a lazy-pages daemon asks for at a time:
	// 64 KiB if 0.
	Chunk int
	// Hook, if set, is called before each step (see SetHook).
	Hook Hook
}

// CRIU is a fake CRIU: it implements migrate.CRIU. One may serve both
// daemons of a test (their images directories tell their requests apart),
// or each may have its own: requests meet only through files and sockets.
type CRIU struct {
	t    testing.TB
	cfg  Config
	hook atomic.Pointer[Hook]
	// ctx ends with the fake: hooks still blocked see it done.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	closed   bool
	ops      []*Op
	lazy     map[string]*LazyPages // by images directory, the last one
	daemons  []*LazyPages
	children []*child
	restored []Process
	intact   map[int]bool
	killed   []Request
}

var _ migrate.CRIU = (*CRIU)(nil)

// New returns a fake CRIU that lives as long as the test: at its end every
// request still running is killed, every process a restore started is
// killed and reaped, and every goroutine of the fake is waited for (the
// test fails if one does not end).
func New(t testing.TB, cfg Config) *CRIU {
	if cfg.Memory <= 0 {
		cfg.Memory = 1 << 20
	}
	if cfg.ImageSize <= 0 {
		cfg.ImageSize = 64 << 10
	}
	if cfg.Chunk <= 0 {
		cfg.Chunk = 64 << 10
	}
	c := &CRIU{t: t, cfg: cfg, lazy: map[string]*LazyPages{}, intact: map[int]bool{}}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.SetHook(cfg.Hook)
	// Requests may still write into their images directories as the test
	// ends (a dump resuming its tree logs it): the fake must end before
	// the test's TempDirs go. testing removes them all in one cleanup,
	// registered at the test's first TempDir, and runs cleanups last
	// registered first: one TempDir before c.close orders them.
	t.TempDir()
	t.Cleanup(c.close)
	return c
}

// SetHook replaces the hook (nil: none) for the steps from now on.
func (c *CRIU) SetHook(h Hook) { c.hook.Store(&h) }

func (c *CRIU) callHook(ctx context.Context, s Step, dir string) error {
	if h := *c.hook.Load(); h != nil {
		return h(ctx, s, dir)
	}
	return nil
}

// Process is a process a fake restore started.
type Process struct {
	PID int
	// Dir is the images directory it was restored from.
	Dir string
	// Source is the root pid of the tree it was dumped from.
	Source int
	// Lazy: its memory was to come from a lazy-pages daemon.
	Lazy bool
}

// Restored lists the processes restores started, oldest first, whether or
// not they still run.
func (c *CRIU) Restored() []Process {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Process(nil), c.restored...)
}

// Intact reports whether the restored process pid has all of its memory,
// checked against the dump's checksum: at its restore (copy), or once its
// lazy-pages daemon fetched the last page.
func (c *CRIU) Intact(pid int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.intact[pid]
}

func (c *CRIU) setIntact(pid int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.intact[pid] = true
}

// Request names a fake request.
type Request struct {
	// Kind is "dump", "page-server", "restore" or "cpuinfo-check".
	Kind string
	Dir  string
	// PID is its fake CRIU pid (Op.Pid).
	PID int
}

// Killed lists the requests Op.Abandon had to kill, oldest first.
func (c *CRIU) Killed() []Request {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Request(nil), c.killed...)
}

// fakePIDs numbers fake CRIU processes, from 100001. No syscall ever sees
// one, so one may equal a real pid.
var fakePIDs atomic.Int64

func nextPID() int { return 100000 + int(fakePIDs.Add(1)) }

// close ends everything the fake started; it runs at the test's end.
func (c *CRIU) close() {
	c.mu.Lock()
	c.closed = true
	ops, kids, lazy := c.ops, c.children, c.daemons
	c.mu.Unlock()
	c.cancel()
	for _, op := range ops {
		op.req.terminate("signal: killed")
		op.Close()
	}
	for _, lp := range lazy {
		lp.Kill()
	}
	for _, k := range kids {
		k.kill()
	}
	done := make(chan struct{})
	go func() {
		c.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		c.t.Errorf("migratetest: fake CRIU goroutines still running 10 s after the test (a Hook that does not return when its ctx is done?)")
	}
	for _, lp := range lazy {
		lp.Close()
	}
}

// goroutine runs fn as one of the fake's goroutines, waited for at close.
func (c *CRIU) goroutine(fn func()) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		fn()
	}()
}
