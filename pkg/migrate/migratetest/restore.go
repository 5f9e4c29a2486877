//go:build linux

package migratetest

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/migrate"
)

// StartRestore starts a fake restore of the images in o.ImagesDir: it
// starts the dumped root's program again, with its argv, and stops it.
// Copy mode checks pages-1.img against the dump's checksum first; lazy
// mode needs a ready lazy-pages daemon in the same directory, which then
// fetches the memory. Inherited files are not used (the caller closes its
// copies, as with CRIU).
func (c *CRIU) StartRestore(o criu.Options) (migrate.Op, error) {
	op, err := c.start("restore", o, false, (*request).restore)
	if err != nil {
		return nil, err
	}
	return op, nil
}

func (r *request) restore() error {
	o := r.opts
	if err := r.step(StepRestoreStart, false); err != nil {
		return r.fail(err, nil)
	}
	co, err := readCore(o.ImagesDir)
	if err != nil {
		return r.fail(err, nil)
	}
	var lp *LazyPages
	if o.LazyPages {
		if lp = r.c.lazyPages(o.ImagesDir); lp == nil || !lp.listening() {
			return r.fail(errors.New("can't connect to the lazy-pages daemon"), nil)
		}
	} else {
		b, err := os.ReadFile(filepath.Join(o.ImagesDir, PagesImage))
		if err != nil {
			return r.fail(fmt.Errorf("pages: %w", err), nil)
		}
		if len(b) != co.Memory || checksum(b) != co.SHA256 {
			return r.fail(errors.New("pages corrupt"), nil)
		}
	}
	k, err := r.c.spawn(co.Exe, co.Argv)
	if err != nil {
		return r.fail(fmt.Errorf("can't fork for %d: %w", co.PID, err), nil)
	}
	r.restored = k
	undo := func() {
		r.logf("killing the restored tree")
		k.kill()
	}
	k.cmd.Process.Signal(syscall.SIGSTOP)
	if err := waitState(k.pid, 'T', 5*time.Second); err != nil {
		return r.fail(err, undo)
	}
	r.c.mu.Lock()
	r.c.restored = append(r.c.restored, Process{PID: k.pid, Dir: o.ImagesDir, Source: co.PID, Lazy: o.LazyPages})
	r.c.mu.Unlock()
	if lp != nil {
		// CRIU hands the tree's memory to lazy-pages while it restores.
		lp.restored(k, co)
	} else {
		r.c.setIntact(k.pid)
	}
	if err := r.step(StepPostRestore, false); err != nil {
		return r.fail(err, undo)
	}
	if o.Notify {
		if err := r.notify("post-restore", k.pid); err != nil {
			return r.fail(err, undo)
		}
	}
	// From here the restore is done: a closed socket goes unnoticed.
	if err := r.step(StepRestoreEnd, true); err != nil {
		return r.fail(err, undo)
	}
	if !o.LeaveStopped && !co.RootStopped {
		// (A task job control had stopped is restored stopped.)
		k.cmd.Process.Signal(syscall.SIGCONT)
	}
	r.logf("Restore finished successfully")
	return r.respond(event{PID: k.pid})
}

// StartPageServer starts a fake page server on o.PageServer: it reads the
// stream to its end into pages-1.img in o.ImagesDir, acknowledges it with
// its checksum, and exits; its first response carries its (fake) pid, and
// WaitPID's its exit status.
func (c *CRIU) StartPageServer(o criu.Options) (migrate.Op, error) {
	op, err := c.start("page-server", o, true, (*request).pageServer)
	if err != nil {
		return nil, err
	}
	return op, nil
}

func (r *request) pageServer() error {
	// The page server process ends: its socket closes.
	stop := func() { r.ps.Close() }
	if err := r.step(StepPageServer, false); err != nil {
		return r.fail(err, stop)
	}
	pid := nextPID()
	exit := make(chan int, 1)
	r.c.goroutine(func() { exit <- r.receive() })
	if err := r.respond(event{PID: pid}); err != nil {
		return r.fail(err, stop)
	}
	m, err := r.await()
	if err != nil {
		return r.fail(err, stop)
	}
	switch {
	case m.Type != "wait-pid":
		return r.fail(fmt.Errorf("unexpected %q request", m.Type), stop)
	case m.PID != pid:
		return r.fail(fmt.Errorf("waitpid %d: %w", m.PID, syscall.ECHILD), stop)
	}
	select {
	case code := <-exit:
		r.logf("page server %d exited with %d", pid, code)
		return r.respond(event{Status: code << 8})
	case <-r.closed:
		return r.fail(errClosed, stop)
	case <-r.kill:
		return errKilled
	}
}

// receive is the page server process: it returns its exit code.
func (r *request) receive() int {
	data, err := io.ReadAll(r.ps)
	if err == nil && r.c.cfg.Framed {
		data, err = pagesOfAdd(data)
	}
	if err != nil {
		r.logf("Error (fake-criu/page-server): read pages: %v", err)
		return 1
	}
	if err := r.step(StepPagesReceived, true); err != nil {
		r.logf("Error (fake-criu/page-server): %v", err)
		r.ps.Close()
		return 1
	}
	if err := writeFile(filepath.Join(r.opts.ImagesDir, PagesImage), data); err != nil {
		r.logf("Error (fake-criu/page-server): %v", err)
		r.ps.Close()
		return 1
	}
	_, err = fmt.Fprintf(r.ps, "OK %s\n", checksum(data))
	r.ps.Close()
	if err != nil {
		r.logf("Error (fake-criu/page-server): acknowledge: %v", err)
		return 1
	}
	return 0
}

// StartCPUInfoCheck starts a fake cpuinfo check: it passes if
// cpuinfo.img is in o.ImagesDir (and the hook lets it).
func (c *CRIU) StartCPUInfoCheck(o criu.Options) (migrate.Op, error) {
	op, err := c.start("cpuinfo-check", o, false, (*request).cpuCheck)
	if err != nil {
		return nil, err
	}
	return op, nil
}

func (r *request) cpuCheck() error {
	if err := r.step(StepCPUCheck, false); err != nil {
		return r.fail(err, nil)
	}
	if _, err := os.Stat(filepath.Join(r.opts.ImagesDir, "cpuinfo.img")); err != nil {
		return r.fail(fmt.Errorf("can't read the cpuinfo image: %w", err), nil)
	}
	return r.respond(event{})
}
