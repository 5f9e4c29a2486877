//go:build linux

package criu

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// LazyPages is a running `criu lazy-pages` daemon: it takes the
// userfaultfds of a lazy restore in its directory and fills the restored
// tree's memory from a lazy dump's page server, on demand and in the
// background, then exits (0 once every page is in). It has no RPC form, so
// it runs from the command line.
type LazyPages struct {
	cmd    *exec.Cmd
	dir    string
	status *os.File // its --status-fd, read end: a byte when it listens
	pidfd  int
	exited chan struct{}
	err    error
}

// LazyPagesLog is its log file's name in the images directory.
const LazyPagesLog = "lazy-pages.log"

// StartLazyPages starts a lazy-pages daemon for the images in dir (which
// is also its working directory: the restore finds it there, by the Unix
// socket lazy-pages.socket). It fetches pages over ps, a connected stream
// socket to the dump's page server.
func (c *Client) StartLazyPages(dir string, ps *os.File) (*LazyPages, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("criu lazy-pages: %w", err)
	}
	defer w.Close()
	// The socket and the status pipe are fds 3 and 4 in the child.
	cmd := exec.Command(c.path, "lazy-pages", "--page-server", "--ps-socket", "3", "--status-fd", "4",
		"-D", dir, "-W", dir, "-o", LazyPagesLog, "-v"+strconv.Itoa(DefaultLogLevel))
	cmd.ExtraFiles = []*os.File{ps, w}
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = nil, nil
	// It dies with phauld (no thread of phauld ever exits, so the
	// parent-death signal means phauld's death): left alone it would wait
	// for a restore that never comes, or serve a copy no one will commit.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		r.Close()
		return nil, fmt.Errorf("criu lazy-pages: start %s: %w", c.path, err)
	}
	pidfd, err := unix.PidfdOpen(cmd.Process.Pid, 0)
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		r.Close()
		return nil, fmt.Errorf("criu lazy-pages: pidfd: %w", err)
	}
	if err := unix.SetNonblock(int(r.Fd()), true); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		r.Close()
		unix.Close(pidfd)
		return nil, fmt.Errorf("criu lazy-pages: %w", err)
	}
	lp := &LazyPages{cmd: cmd, dir: dir, status: r, pidfd: pidfd, exited: make(chan struct{})}
	go func() {
		lp.err = cmd.Wait()
		close(lp.exited)
	}()
	return lp, nil
}

// StatusFd becomes readable when the daemon listens for the restore (or
// has exited).
func (lp *LazyPages) StatusFd() int { return int(lp.status.Fd()) }

// Ready reports whether the daemon said it listens; it reads the status
// pipe without blocking.
func (lp *LazyPages) Ready() bool {
	var b [1]byte
	n, err := unix.Read(int(lp.status.Fd()), b[:])
	return err == nil && n == 1
}

// ExitFd becomes readable when the daemon has exited (a pidfd).
func (lp *LazyPages) ExitFd() int { return lp.pidfd }

// Result waits for the daemon to exit and returns nil if it brought every
// page in, else an error quoting its log.
func (lp *LazyPages) Result() error {
	<-lp.exited
	if lp.err == nil {
		return nil
	}
	e := &Error{Op: "lazy-pages", Msg: lp.err.Error(), Log: filepath.Join(lp.dir, LazyPagesLog)}
	e.Lines = ErrorLines(e.Log, maxQuoted)
	return e
}

// Kill stops the daemon (the restored tree's missing memory then never
// arrives: kill the tree too).
func (lp *LazyPages) Kill() {
	select {
	case <-lp.exited:
	default:
		lp.cmd.Process.Kill()
	}
}

// Close releases the daemon's descriptors; it must have exited (Kill and
// Result first).
func (lp *LazyPages) Close() {
	lp.status.Close()
	unix.Close(lp.pidfd)
}

// transferred matches the daemon's last word on pages: "UFFD transferred
// pages: (copied/total)".
var transferred = regexp.MustCompile(`uffd: (\d+)-+\d+: UFFD transferred pages: \((\d+)/(\d+)\)`)

// Transferred reads from the daemon's log how many pages it brought in,
// of how many, summed over the processes of the tree (it logs one line per
// process as that process's memory is complete).
func (lp *LazyPages) Transferred() (copied, total uint64, ok bool) {
	b, err := os.ReadFile(filepath.Join(lp.dir, LazyPagesLog))
	if err != nil {
		return 0, 0, false
	}
	return parseTransferred(b)
}

func parseTransferred(log []byte) (copied, total uint64, ok bool) {
	type counts struct{ copied, total uint64 }
	per := map[string]counts{}
	for _, m := range transferred.FindAllSubmatch(log, -1) {
		c, _ := strconv.ParseUint(string(m[2]), 10, 64)
		t, _ := strconv.ParseUint(string(m[3]), 10, 64)
		per[string(m[1])] = counts{c, t} // the last line of a process wins
	}
	for _, c := range per {
		copied += c.copied
		total += c.total
	}
	return copied, total, len(per) > 0
}
