//go:build linux

package proc

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// CapSysResource is CAP_SYS_RESOURCE's bit: CRIU needs it to dump a
// process of another user (it raises the process's limits).
const CapSysResource = 24

// statusField is the value of the line "name:" of /proc/PID/status.
func statusField(pid, name string) (string, error) {
	b, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+":"); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("pid %s: no %s in its status", pid, name)
}

// Groups are the groups of process pid: its real, effective, saved and
// filesystem gids and its supplementary groups (the Gid and Groups lines
// of its status).
func Groups(pid int) ([]int, error) {
	p := strconv.Itoa(pid)
	var groups []int
	for _, name := range []string{"Gid", "Groups"} {
		v, err := statusField(p, name)
		if err != nil {
			return nil, err
		}
		for _, f := range strings.Fields(v) {
			g, err := strconv.Atoi(f)
			if err != nil {
				return nil, fmt.Errorf("pid %d: %s %q", pid, name, v)
			}
			groups = append(groups, g)
		}
	}
	return groups, nil
}

// HasCap reports whether this process has capability bit in its
// effective set.
func HasCap(bit uint) bool {
	v, err := statusField("self", "CapEff")
	if err != nil {
		return false
	}
	caps, err := strconv.ParseUint(v, 16, 64)
	return err == nil && caps&(1<<bit) != 0
}

// UIDs are pid's real and effective user ids.
func UIDs(pid int) (real, effective int, err error) {
	v, err := statusField(strconv.Itoa(pid), "Uid")
	if err != nil {
		return 0, 0, err
	}
	f := strings.Fields(v)
	if len(f) < 2 {
		return 0, 0, fmt.Errorf("pid %d: Uid line %q", pid, v)
	}
	if real, err = strconv.Atoi(f[0]); err == nil {
		effective, err = strconv.Atoi(f[1])
	}
	return real, effective, err
}

// OtherUser finds in pids the first process with a user id other than
// root's (real or effective), and that id; pid 0 if there is none.
func OtherUser(pids []int) (pid, uid int) {
	for _, p := range pids {
		r, e, err := UIDs(p)
		if err != nil {
			continue
		}
		if r != 0 {
			return p, r
		}
		if e != 0 {
			return p, e
		}
	}
	return 0, 0
}

// TTY is a descriptor of a tree on a terminal: the process, the
// descriptor, the terminal's path, and its name as CRIU's external
// resource (tty[RDEV:DEV]).
type TTY struct {
	PID, FD   int
	Path, Key string
}

// Terminals lists the tree pids' descriptors on terminals whose master it
// does not hold (a user's terminal, the console), which stay on this
// host. A tree that holds a pty master itself (script, tmux) carries its
// own terminals: none is listed.
func Terminals(pids []int) ([]TTY, error) {
	var ttys []TTY
	for _, p := range pids {
		dir := "/proc/" + strconv.Itoa(p) + "/fd"
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range ents {
			target, err := os.Readlink(dir + "/" + e.Name())
			if err != nil {
				continue
			}
			if target == "/dev/ptmx" || target == "/dev/pts/ptmx" {
				return nil, nil // it holds a master: CRIU carries the pair
			}
			if !isTerminal(target) {
				continue
			}
			var st unix.Stat_t
			if err := unix.Stat(dir+"/"+e.Name(), &st); err != nil {
				return nil, fmt.Errorf("pid %d's terminal %s: %w", p, target, err)
			}
			fd, _ := strconv.Atoi(e.Name())
			ttys = append(ttys, TTY{PID: p, FD: fd, Path: target, Key: fmt.Sprintf("tty[%x:%x]", st.Rdev, st.Dev)})
		}
	}
	return ttys, nil
}

func isTerminal(path string) bool {
	if rest, ok := strings.CutPrefix(path, "/dev/pts/"); ok {
		_, err := strconv.Atoi(rest)
		return err == nil
	}
	return path == "/dev/console" || path == "/dev/tty" || strings.HasPrefix(path, "/dev/tty") && len(path) > len("/dev/tty")
}

// Unsupported finds in the tree pids a descriptor of a kind CRIU cannot
// dump (io_uring, perf events, userfaultfd, KVM), which it would find out
// with the tree frozen: the process, the descriptor and what it is, or
// pid 0.
func Unsupported(pids []int) (pid, fd int, what string) {
	kinds := []struct{ link, what string }{
		{"anon_inode:[io_uring]", "an io_uring instance"},
		{"anon_inode:[perf_event]", "a perf event"},
		{"anon_inode:[userfaultfd]", "a userfaultfd"},
		{"anon_inode:kvm-", "a KVM virtual machine"},
	}
	for _, p := range pids {
		dir := "/proc/" + strconv.Itoa(p) + "/fd"
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			target, err := os.Readlink(dir + "/" + e.Name())
			if err != nil {
				continue
			}
			for _, k := range kinds {
				if strings.HasPrefix(target, k.link) {
					n, _ := strconv.Atoi(e.Name())
					return p, n, k.what
				}
			}
		}
	}
	return 0, 0, ""
}

// TaskCred is who one task (a process or one of its threads) runs as.
type TaskCred struct {
	// PID is the process, TID the task (PID itself for its main thread).
	PID, TID int
	// UIDs are its real, effective, saved and filesystem user ids (the
	// Uid line of its status).
	UIDs [4]int
	// GIDs are its real, effective, saved and filesystem group ids (the
	// Gid line).
	GIDs [4]int
	// Owner is the owner of /proc/PID/task/TID: its effective uid, or
	// root's when the kernel holds it undumpable (it ran a setuid
	// program, even one that gave its privileges back: its memory may
	// hold what it read as root).
	Owner int
}

// TaskCreds lists every task of every process of pids, threads included,
// with who each runs as. Run it on a frozen tree for an answer that
// holds. A process that has exited since pids was listed is left out; a
// task that is there but cannot be read is an error.
func TaskCreds(pids []int) ([]TaskCred, error) {
	var out []TaskCred
	for _, pid := range pids {
		dir := "/proc/" + strconv.Itoa(pid) + "/task"
		tasks, err := os.ReadDir(dir)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return nil, fmt.Errorf("pid %d: %w", pid, err)
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			c, err := taskCred(dir+"/"+t.Name(), pid, tid)
			if errors.Is(err, os.ErrNotExist) {
				continue // the thread ended
			}
			if err != nil {
				return nil, err
			}
			out = append(out, c)
		}
	}
	return out, nil
}

func taskCred(dir string, pid, tid int) (TaskCred, error) {
	c := TaskCred{PID: pid, TID: tid}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		if err == unix.ENOENT || err == unix.ESRCH {
			return c, os.ErrNotExist
		}
		return c, fmt.Errorf("task %d of pid %d: %w", tid, pid, err)
	}
	c.Owner = int(st.Uid)
	b, err := os.ReadFile(dir + "/status")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH) {
			return c, os.ErrNotExist
		}
		return c, fmt.Errorf("task %d of pid %d: %w", tid, pid, err)
	}
	if c.UIDs, err = parseIDs(b, "Uid:"); err != nil {
		return c, fmt.Errorf("task %d of pid %d: %w", tid, pid, err)
	}
	if c.GIDs, err = parseIDs(b, "Gid:"); err != nil {
		return c, fmt.Errorf("task %d of pid %d: %w", tid, pid, err)
	}
	return c, nil
}

// parseIDs reads the four ids of a status file's line that starts with
// key (Uid: or Gid:).
func parseIDs(status []byte, key string) ([4]int, error) {
	var ids [4]int
	for _, line := range strings.Split(string(status), "\n") {
		v, ok := strings.CutPrefix(line, key)
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 4 {
			return ids, fmt.Errorf("%s line %q", key, v)
		}
		for i := range f {
			n, err := strconv.Atoi(f[i])
			if err != nil || n < 0 {
				return ids, fmt.Errorf("%s line %q", key, v)
			}
			ids[i] = n
		}
		return ids, nil
	}
	return ids, fmt.Errorf("no %s line in its status", key)
}
