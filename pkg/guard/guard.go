//go:build linux

// Package guard is a restored copy's dead man's switch. From the moment a
// destination has restored a process until the commit, the copy must not
// outlive the daemon that holds it: in lazy mode it runs before the commit
// on memory that the lazy-pages daemon (which dies with phauld) brings in,
// and were phauld to die the source would resume its own copy while this
// one ran on, reading zeros where its pages never came. A guard is phauld
// re-executed as a small process of its own (`phauld copy-guard DIR PID
// START`); it holds one end of a socket pair whose other end only phauld
// holds. When that end closes without a release (phauld died, or gave the
// copy up), the guard reads the session's record: unless it says
// committed, it kills the copy and everything it forked.
package guard

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/store"
)

// Command is the first argument that makes phauld run as a guard (Main).
const Command = "copy-guard"

// release is what phauld writes when the copy is committed.
const release = "release\n"

// Guard is phauld's side of a running guard.
type Guard struct {
	fd     int
	closed bool
	cmd    *exec.Cmd
}

// Start starts a guard for the tree rooted at pid (which started at
// start), restored in the session directory dir: exe (phauld's own
// binary) re-executed as `exe Command DIR PID START`, its end of the
// socket pair as fd 3.
func Start(exe, dir string, pid int, start uint64) (*Guard, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("guard: %w", err)
	}
	theirs := os.NewFile(uintptr(fds[1]), "guard")
	defer theirs.Close()
	cmd := exec.Command(exe, Command, dir, strconv.Itoa(pid), strconv.FormatUint(start, 10))
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.Dir = "/"
	// Its output is phauld's (the journal, under systemd): what it does
	// is said there. Its own process group: a Ctrl-C meant for phauld
	// must not reach it. No parent-death signal: outliving phauld is
	// its whole purpose.
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		unix.Close(fds[0])
		return nil, fmt.Errorf("guard: start %s: %w", exe, err)
	}
	go cmd.Wait() // reaped when it ends before phauld
	return &Guard{fd: fds[0], cmd: cmd}, nil
}

// Fd becomes readable (end of stream) when the guard has ended.
func (g *Guard) Fd() int { return g.fd }

// Release tells the guard the copy is committed: it leaves it be and
// ends.
func (g *Guard) Release() {
	if g.closed {
		return
	}
	unix.Write(g.fd, []byte(release))
	g.Close()
}

// Close closes phauld's end: the guard kills the copy unless the record
// says committed, and ends.
func (g *Guard) Close() {
	if g.closed {
		return
	}
	g.closed = true
	unix.Close(g.fd)
}

// Main runs a guard process: args are DIR PID START, fd 3 its end of the
// socket pair. It returns the exit code.
func Main(args []string) int {
	if len(args) != 3 {
		fmt.Fprintf(os.Stderr, "phauld %s: want DIR PID START (phauld starts this itself)\n", Command)
		return 2
	}
	pid, err1 := strconv.Atoi(args[1])
	start, err2 := strconv.ParseUint(args[2], 10, 64)
	if err1 != nil || err2 != nil {
		fmt.Fprintf(os.Stderr, "phauld %s: bad pid or start time %q %q\n", Command, args[1], args[2])
		return 2
	}
	// Signals meant for phauld (a terminal's, a service manager's stop)
	// are not for the guard: it ends when phauld has decided, or died.
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGPIPE)
	killed, err := Watch(3, args[0], pid, start)
	switch {
	case err != nil:
		fmt.Fprintf(os.Stderr, "phauld %s: restored copy pid %d in %s: %v\n", Command, pid, args[0], err)
		return 1
	case killed:
		fmt.Fprintf(os.Stderr, "phauld %s: phauld ended before the commit of session %s: killed its restored copy (pid %d); the process belongs to the source\n",
			Command, dirName(args[0]), pid)
	}
	return 0
}

func dirName(dir string) string {
	for i := len(dir) - 1; i >= 0; i-- {
		if dir[i] == '/' {
			return dir[i+1:]
		}
	}
	return dir
}

// Watch is the guard's work on fd, its end of the socket pair: it waits
// until phauld releases the copy, or its end closes. Then, unless released
// or the record in dir says committed, it kills the tree rooted at pid
// (started at start) with everything it forked, and reports that it did.
func Watch(fd int, dir string, pid int, start uint64) (killed bool, err error) {
	defer unix.Close(fd)
	var got []byte
	buf := make([]byte, 64)
	for {
		n, err := unix.Read(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if n > 0 {
			got = append(got, buf[:n]...)
			if string(got) == release {
				return false, nil
			}
			if len(got) >= len(release) {
				break // not what phauld says: take it for its death
			}
			continue
		}
		break // end of stream or an error: phauld is gone
	}
	if rec, err := store.Load(dir); err == nil && rec.State == store.Committed {
		return false, nil // committed: the copy is the process now
	}
	return proc.StopAndKill(pid, start)
}

// InProcess runs a guard's Watch on a goroutine of this process, not a
// process of its own: it guards nothing against this process's death.
// The unit tier of the commit rule, which ends a daemon by closing its
// descriptors (migrate.Session.Crash), uses it.
func InProcess(dir string, pid int, start uint64) (*Guard, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("guard: %w", err)
	}
	go Watch(fds[1], dir, pid, start)
	return &Guard{fd: fds[0]}, nil
}
