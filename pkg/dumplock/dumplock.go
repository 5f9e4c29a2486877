//go:build linux

// Package dumplock keeps two CRIU dumps from working in the same directory
// at once, across sessions and across every phauld on a host.
package dumplock

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/proc"
)

// DefaultDir holds the lock files. It is the same for
// every phauld on a host, so that daemons sharing a host (tests, the
// demo) also keep out of each other's way.
const DefaultDir = "/run/lock/phauld"

// Gate keeps two CRIU dumps from working in the same directory at
// once. CRIU's parasite, dumping a task whose /proc belongs to another pid
// namespace (a pid-namespace init that did not remount /proc), mounts a
// private procfs on "proc.crtools" in the task's working directory and
// removes it again. Two such dumps of tasks sharing a working directory
// collide on that name, and one fails ("Can't create a directory (-17)").
// The gate serialises dumps per working directory (by device and inode,
// whatever mount namespace sees it) with a lock file each, held with
// flock: across sessions and across daemons. Dumps elsewhere run in
// parallel.
type Gate struct {
	dir string
}

// New returns a gate whose lock files are in dir.
func New(dir string) *Gate { return &Gate{dir: dir} }

// Locks are the lock files one dump holds.
type Locks []*os.File

// TryAcquire takes every key, or none if one is held elsewhere.
func (g *Gate) TryAcquire(keys []string) (Locks, bool, error) {
	if err := os.MkdirAll(g.dir, 0o700); err != nil {
		return nil, false, fmt.Errorf("dump gate: %w", err)
	}
	var held Locks
	for _, k := range keys {
		f, err := g.lock(filepath.Join(g.dir, k+".lock"))
		if err != nil || f == nil {
			held.Release()
			return nil, false, err
		}
		held = append(held, f)
	}
	return held, true, nil
}

// lock takes one lock file: nil if another holds it.
func (g *Gate) lock(path string) (*os.File, error) {
	for {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("dump gate: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, nil
			}
			return nil, fmt.Errorf("dump gate: lock %s: %w", path, err)
		}
		// The holder before us unlinks the file before it unlocks: if
		// ours is not the file at path any more, take the new one.
		var mine, now unix.Stat_t
		if unix.Fstat(int(f.Fd()), &mine) == nil && unix.Stat(path, &now) == nil && mine.Ino == now.Ino && mine.Dev == now.Dev {
			return f, nil
		}
		f.Close()
	}
}

// Release lets other dumps in these directories go on.
func (l Locks) Release() {
	for _, f := range l {
		os.Remove(f.Name()) // before the unlock: see lock
		f.Close()
	}
}

// Keys are the gate keys of the tree rooted at pid: the working
// directory of each of its tasks, as device and inode.
func Keys(pid int) []string {
	pids, err := proc.Tree(pid)
	if err != nil {
		pids = []int{pid}
	}
	set := map[string]bool{}
	for _, p := range pids {
		var st syscall.Stat_t
		if err := syscall.Stat("/proc/"+strconv.Itoa(p)+"/cwd", &st); err != nil {
			continue
		}
		set[fmt.Sprintf("cwd-%d-%d", st.Dev, st.Ino)] = true
	}
	keys := make([]string, 0, len(set))
	for k := range set {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
