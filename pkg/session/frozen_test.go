//go:build linux

package session

import (
	"context"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/migrate/migratetest"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/wire"
	"github.com/phaul/phaul/test/faultproxy"
)

// TestFrozenTreeChecked: a member's migration asks its permission again
// on the frozen tree, before anything of it leaves (issue 13, item 4). A
// refusal there aborts the migration with the check's reason, no page
// (copy) and no image (lazy) reaches the destination, and the tree runs
// here again; a tree that passes migrates. Root's migrations are not
// asked.
func TestFrozenTreeChecked(t *testing.T) {
	for _, c := range []struct {
		mode   string
		caller int
		refuse bool
	}{
		{api.ModeCopy, 4242, true},
		{api.ModeLazy, 4242, true},
		{api.ModeCopy, 4242, false},
		{api.ModeCopy, 0, true}, // root: not asked, migrates
	} {
		name := c.mode + map[bool]string{true: "/refused", false: "/passes"}[c.refuse]
		if c.caller == 0 {
			name = c.mode + "/root"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			fake := migratetest.New(t, migratetest.Config{})
			var mu sync.Mutex
			var asked []bool // whether the tree was stopped at each check
			var a *ruleDaemon
			check := func(cfg *Config) {
				cfg.AuthorizeFrozen = func(caller api.Caller, tree proc.Info) error {
					info, err := proc.Stat(tree.PID)
					mu.Lock()
					asked = append(asked, err == nil && info.Stopped())
					mu.Unlock()
					// The session says who asked (a member cancels its own).
					if list := a.m.Sessions(); len(list) != 1 || list[0].CallerUID == nil || *list[0].CallerUID != c.caller {
						t.Errorf("sessions during the dump: %+v; want one, asked for by uid %d", list, c.caller)
					}
					if caller.UID != c.caller {
						t.Errorf("asked for uid %d, want %d", caller.UID, c.caller)
					}
					if c.refuse {
						return api.Errorf(api.CodePermission, "at the freeze, pid %d is owned by uid 0", tree.PID)
					}
					return nil
				}
			}
			a = newRuleDaemon(t, "A", filepath.Join(root, "a"), fake, check)
			b := newRuleDaemon(t, "B", filepath.Join(root, "b"), fake)
			px, err := faultproxy.New("127.0.0.1:0", b.addr())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(px.Close)
			// What leaves first: pages in copy mode, images in lazy mode.
			first := &faultproxy.Rule{Dir: faultproxy.ToDest, Type: wire.TypePageData, Nth: 1, Action: faultproxy.Pass}
			if c.mode == api.ModeLazy {
				first.Type = wire.TypeFileBegin
			}
			px.Arm(first)
			pid := migratetest.StartTree(t)
			info, _ := proc.Stat(pid)
			cp := copies{src: pid, start: info.StartTime, fake: fake}
			res, err := a.m.Migrate(context.Background(), api.Caller{UID: c.caller, GID: c.caller}, api.MigrateRequest{PID: pid, To: px.Addr(), Mode: c.mode}, nil)
			mu.Lock()
			checks := append([]bool(nil), asked...)
			mu.Unlock()
			if c.caller == 0 {
				if err != nil || len(checks) != 0 {
					t.Fatalf("root's migration: %v, checks %v; want migrated, not asked", err, checks)
				}
				return
			}
			if len(checks) != 1 || !checks[0] {
				t.Errorf("checks at the freeze %v; want one, with the tree stopped", checks)
			}
			if !c.refuse {
				if err != nil || res.DestPID == 0 {
					t.Fatalf("migration of a tree that passes the check: %+v, %v", res, err)
				}
				return
			}
			// Rolled back (the process runs here: exit 3), with the reason.
			if api.CodeOf(err) != api.CodeAborted || !strings.Contains(err.Error(), "owned by uid 0") || !strings.Contains(err.Error(), "nothing of the tree was sent") {
				t.Fatalf("migration refused at the freeze: %v; want aborted, with the check's reason", err)
			}
			select {
			case <-first.Fired():
				t.Errorf("%s reached the destination though the frozen tree was refused", first.Type)
			default:
			}
			if r := fake.Restored(); len(r) != 0 {
				t.Errorf("restored %v", r)
			}
			waitRule(t, "the source tree running again, both settled", 10*time.Second, func() bool {
				src, _, one := cp.one()
				return src && one && a.settled() && b.settled()
			})
		})
	}
}
