//go:build linux

package migratetest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/migrate"
	"github.com/phaul/phaul/pkg/proc"
)

// StartDump starts a fake dump of the tree rooted at o.PID (see the
// package documentation). With o.Notify it says migrate.FrozenNotify once
// the tree is stopped, before anything is written. Copy mode writes the memory to o.PageServer (or,
// without one, to pages-1.img in o.ImagesDir), waits for the page server's
// acknowledgement and end of stream, then stops at post-dump. Lazy mode
// stops at post-dump first, then serves the memory on o.PageServer until
// the lazy-pages daemon sends CLOSE or the connection ends.
func (c *CRIU) StartDump(o criu.Options) (migrate.Op, error) {
	if o.LazyPages {
		if o.PageServer == nil {
			return nil, errors.New("criu dump: a lazy dump without a page socket (listening on a port) is not faked")
		}
		// As pkg/criu does: the configuration file names the socket.
		if err := os.WriteFile(filepath.Join(o.ImagesDir, criu.LazyDumpConf), []byte("ps-socket 4\n"), 0o600); err != nil {
			return nil, fmt.Errorf("criu dump: %w", err)
		}
	}
	op, err := c.start("dump", o, false, (*request).dump)
	if err != nil {
		return nil, err
	}
	return op, nil
}

func (r *request) dump() error {
	o := r.opts
	if err := r.step(StepDumpStart, false); err != nil {
		return r.fail(err, nil)
	}
	f, err := freeze(o.PID)
	if err != nil {
		return r.fail(fmt.Errorf("can't freeze tree %d: %w", o.PID, err), nil)
	}
	defer proc.CloseAll(f.tree)
	undo := func() {
		r.logf("resuming the tree")
		f.resume()
	}
	if o.Notify {
		// As CRIU (>= 3.19) asks for external files once the tree is
		// seized, before anything is written.
		if err := r.notify(migrate.FrozenNotify, 0); err != nil {
			return r.fail(err, undo)
		}
	}
	lazy := o.LazyPages
	_, mem, err := r.c.writeImages(o.ImagesDir, f.tree, f.stopped, lazy)
	if err != nil {
		return r.fail(fmt.Errorf("write images: %w", err), undo)
	}
	if err := r.step(StepDumpPages, false); err != nil {
		return r.fail(err, undo)
	}
	if !lazy {
		if err := r.writePages(mem); err != nil {
			return r.fail(err, undo)
		}
	}
	if o.Notify {
		if err := r.step(StepPostDump, false); err != nil {
			return r.fail(err, undo)
		}
		if err := r.notify("post-dump", 0); err != nil {
			return r.fail(err, undo)
		}
	}
	if lazy {
		// From here CRIU talks to the page socket only: its RPC socket
		// closing is noticed at the response, after the pages.
		if err := r.step(StepLazyServe, true); err != nil {
			return r.fail(err, undo)
		}
		if err := r.serve(mem); err != nil {
			return r.fail(err, undo)
		}
	}
	if err := r.step(StepDumpEnd, true); err != nil {
		return r.fail(err, undo)
	}
	if !o.LeaveStopped {
		killTree(f.tree)
	}
	r.logf("Dumping finished successfully")
	// A response no one reads leaves the tree as the dump left it.
	return r.respond(event{})
}

// writePages streams the memory to the page server (copy mode), and waits
// for its acknowledgement: "OK <sha256 of what it got>", then the end of
// the stream, which the relay passes on once the page server has exited.
func (r *request) writePages(mem []byte) error {
	if r.ps == nil {
		return writeFile(filepath.Join(r.opts.ImagesDir, PagesImage), mem)
	}
	stream := mem
	if r.c.cfg.Framed {
		// As CRIU does: an add of present pages, then the pages.
		stream = append(pageAdd(len(mem)), mem...)
	}
	if _, err := r.ps.Write(stream); err != nil {
		return r.pageErr(err)
	}
	if err := r.ps.CloseWrite(); err != nil {
		return r.pageErr(err)
	}
	ack, err := io.ReadAll(io.LimitReader(r.ps, 4096))
	if err != nil {
		return r.pageErr(err)
	}
	if string(ack) != "OK "+checksum(mem)+"\n" {
		return fmt.Errorf("page transfer failed: the page server did not acknowledge the pages (got %q)", ack)
	}
	return nil
}

func (r *request) pageErr(err error) error {
	if r.killed() {
		return errKilled
	}
	return fmt.Errorf("page transfer failed: %w", err)
}

// serve is a lazy dump's page server. It answers "GET <offset> <length>"
// with the bytes of memory asked for, and ends well on "CLOSE" or on a
// clean end of stream (CRIU 4.2 takes one for a finished transfer), and
// fails on anything else (a reset: phauld aborting).
func (r *request) serve(mem []byte) error {
	br := bufio.NewReader(r.ps)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			if r.killed() {
				return errKilled
			}
			if errors.Is(err, io.EOF) {
				r.logf("page socket ended: the transfer is over")
				return nil
			}
			return fmt.Errorf("lazy page server: %w", err)
		}
		f := strings.Fields(line)
		switch {
		case len(f) == 1 && f[0] == "CLOSE":
			r.logf("lazy-pages closed the transfer")
			return nil
		case len(f) == 3 && f[0] == "GET":
			off, err1 := strconv.Atoi(f[1])
			n, err2 := strconv.Atoi(f[2])
			if err1 != nil || err2 != nil || off < 0 || n < 0 || off+n > len(mem) {
				return fmt.Errorf("lazy page server: bad request %q", line)
			}
			if _, err := r.ps.Write(mem[off : off+n]); err != nil {
				return r.pageErr(err)
			}
		default:
			return fmt.Errorf("lazy page server: bad request %q", line)
		}
	}
}
