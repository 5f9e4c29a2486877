//go:build linux

package session

import (
	"os"
	"sort"
	"strconv"
	"sync"

	"github.com/phaul/phaul/pkg/proc"
)

// dumpGate keeps two CRIU dumps from working in the same directory at
// once. CRIU's parasite, dumping a task whose /proc belongs to another pid
// namespace (a pid-namespace init that did not remount /proc), mounts a
// private procfs on "proc.crtools" in the task's working directory and
// removes it again. Two such dumps of tasks sharing a working directory
// and mount namespace collide on that name, and one fails ("Can't create
// a directory (-17)"). The gate serialises dumps per (mount namespace,
// working directory); dumps elsewhere run in parallel.
type dumpGate struct {
	mu   sync.Mutex
	held map[string]bool
}

func newDumpGate() *dumpGate { return &dumpGate{held: map[string]bool{}} }

// tryAcquire takes every key, or none if one is held.
func (g *dumpGate) tryAcquire(keys []string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, k := range keys {
		if g.held[k] {
			return false
		}
	}
	for _, k := range keys {
		g.held[k] = true
	}
	return true
}

func (g *dumpGate) release(keys []string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, k := range keys {
		delete(g.held, k)
	}
}

// dumpKeys are the gate keys of the tree rooted at pid: the mount
// namespace and working directory of each of its tasks.
func dumpKeys(pid int) []string {
	pids, err := proc.Tree(pid)
	if err != nil {
		pids = []int{pid}
	}
	set := map[string]bool{}
	for _, p := range pids {
		dir := "/proc/" + strconv.Itoa(p)
		mnt, err1 := os.Readlink(dir + "/ns/mnt")
		cwd, err2 := os.Readlink(dir + "/cwd")
		if err1 != nil || err2 != nil {
			continue
		}
		set[mnt+"\x00"+cwd] = true
	}
	keys := make([]string, 0, len(set))
	for k := range set {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
