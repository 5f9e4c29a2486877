//go:build linux

package control

import (
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/proc"
)

// TestCanMigrateFrozen: at the freeze every task of the tree, threads
// included, must run as the caller by all four of its uids, and not be
// undumpable; root is not asked.
func TestCanMigrateFrozen(t *testing.T) {
	p := Policy{GroupID: 4242, Group: "phaul"}
	self, err := proc.Stat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if err := p.CanMigrateFrozen(api.Caller{UID: os.Getuid(), GID: 4242}, self); err != nil {
		t.Errorf("the caller's own frozen tree refused: %v", err)
	}
	if err := p.CanMigrateFrozen(api.Caller{UID: 0}, proc.Info{PID: 1}); err != nil {
		t.Errorf("root refused: %v", err)
	}
	err = p.CanMigrateFrozen(api.Caller{UID: 54322, GID: 4242}, self)
	if api.CodeOf(err) != api.CodePermission || !strings.Contains(err.Error(), "owned by uid "+itoa(os.Getuid())) {
		t.Errorf("another uid's tree at the freeze: %v; want refused, naming its owner", err)
	}
	gone := self
	gone.StartTime++
	if err := p.CanMigrateFrozen(api.Caller{UID: 54322, GID: 4242}, gone); api.CodeOf(err) != api.CodeNotFound {
		t.Errorf("a reused pid at the freeze: %v; want not_found", err)
	}

	const m = 1000
	const g, sup = 1000, 27
	task := func(pid, tid int, real, eff, saved, fs, owner int) proc.TaskCred {
		return proc.TaskCred{PID: pid, TID: tid, UIDs: [4]int{real, eff, saved, fs}, GIDs: [4]int{g, g, g, g}, Owner: owner}
	}
	withGIDs := func(c proc.TaskCred, gids ...int) proc.TaskCred {
		copy(c.GIDs[:], gids)
		return c
	}
	for _, c := range []struct {
		tasks []proc.TaskCred
		says  string // "" allowed
	}{
		{[]proc.TaskCred{task(10, 10, m, m, m, m, m), task(10, 11, m, m, m, m, m), task(12, 12, m, m, m, m, m)}, ""},
		{[]proc.TaskCred{task(10, 10, m, m, m, m, m), task(12, 12, m, 0, 0, 0, 0)}, "pid 12 is owned by uid 0, not by uid 1000 who asked (its effective uid is 0)"},
		{[]proc.TaskCred{task(10, 10, m, m, m, m, m), task(10, 11, 0, 0, 0, 0, 0)}, "thread 11 of pid 10 is owned by uid 0"},
		{[]proc.TaskCred{task(10, 10, m, m, 0, m, m)}, "its saved uid is 0"},
		{[]proc.TaskCred{task(10, 10, m, m, m, 0, m)}, "its filesystem uid is 0"},
		{[]proc.TaskCred{task(10, 10, m, m, m, m, 0)}, "the kernel gives it to uid 0"},
		{[]proc.TaskCred{task(10, 10, 2000, 2000, 2000, 2000, 2000)}, "owned by uid 2000"},
		{nil, "no tasks"},
		{[]proc.TaskCred{withGIDs(task(10, 10, m, m, m, m, m), sup, sup, sup, sup)}, ""},
		{[]proc.TaskCred{withGIDs(task(10, 10, m, m, m, m, m), g, 42, 42, 42)}, "pid 10 runs with group 42 (its effective gid)"},
		{[]proc.TaskCred{task(10, 10, m, m, m, m, m), withGIDs(task(10, 11, m, m, m, m, m), g, g, 0)}, "thread 11 of pid 10 runs with group 0 (its saved gid)"},
	} {
		err := ownedBy(api.Caller{UID: m, GID: g, Groups: []int{sup}}, c.tasks)
		if c.says == "" && err != nil || c.says != "" && (err == nil || !strings.Contains(err.Error(), c.says)) {
			t.Errorf("ownedBy(%v) = %v; want %q", c.tasks, err, c.says)
		}
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
