//go:build linux

package session

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/migrate/migratetest"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/wire"
	"github.com/phaul/phaul/test/faultproxy"
)

// ruleCell is two daemons, a fake CRIU, a fault proxy and a process, for
// the tests below.
type ruleCell struct {
	t    *testing.T
	fake *migratetest.CRIU
	a, b *ruleDaemon
	px   *faultproxy.Proxy
	pid  int
	c    copies
}

func newRuleCell(t *testing.T, argv ...string) *ruleCell {
	t.Helper()
	root := t.TempDir()
	fake := migratetest.New(t, migratetest.Config{})
	a := newRuleDaemon(t, "A", filepath.Join(root, "a"), fake)
	b := newRuleDaemon(t, "B", filepath.Join(root, "b"), fake)
	px, err := faultproxy.New("127.0.0.1:0", b.addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(px.Close)
	pid := migratetest.StartTree(t, argv...)
	info, _ := proc.Stat(pid)
	return &ruleCell{t: t, fake: fake, a: a, b: b, px: px, pid: pid, c: copies{src: pid, start: info.StartTime, fake: fake}}
}

// migrate starts a migration of the cell's process on a goroutine.
func (c *ruleCell) migrate(mode string) <-chan error {
	done := make(chan error, 1)
	m, pid, to := c.a.m, c.pid, c.px.Addr()
	go func() {
		_, err := m.Migrate(context.Background(), api.Caller{}, api.MigrateRequest{PID: pid, To: to, Mode: mode}, nil)
		done <- err
	}()
	return done
}

// session is the source's one session (running or in doubt).
func (c *ruleCell) session() api.Session {
	c.t.Helper()
	var list []api.Session
	waitRule(c.t, "the source's session", 10*time.Second, func() bool {
		list = c.a.m.Sessions()
		return len(list) == 1
	})
	return list[0]
}

// TestOnePIDOneMigration: while a migration holds a tree (here frozen at
// post-dump), a second migration of its root, or of a child of it, is
// refused at once, naming the migration that holds it; once the first is
// over, the pids are free again.
func TestOnePIDOneMigration(t *testing.T) {
	c := newRuleCell(t, "sh", "-c", "sleep 600 & wait")
	var child int
	waitRule(t, "the tree's child", 5*time.Second, func() bool {
		kids, _ := proc.Children(c.pid)
		if len(kids) == 1 {
			child = kids[0]
		}
		return child != 0
	})
	frozen, release := make(chan struct{}), make(chan struct{})
	c.fake.SetHook(func(ctx context.Context, s migratetest.Step, dir string) error {
		if s == migratetest.StepPostDump {
			close(frozen)
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		return nil
	})
	first := c.migrate(api.ModeCopy)
	<-frozen
	holder := c.session().ID
	for _, pid := range []int{c.pid, child} {
		start := time.Now()
		_, err := c.a.m.Migrate(context.Background(), api.Caller{}, api.MigrateRequest{PID: pid, To: c.b.addr()}, nil)
		if api.CodeOf(err) != api.CodeConflict || !strings.Contains(err.Error(), holder) {
			t.Errorf("a second migration of pid %d while migration %s holds it: %v; want a conflict naming it", pid, holder, err)
		}
		if took := time.Since(start); took > time.Second {
			t.Errorf("the refusal took %v", took)
		}
	}
	close(release)
	if err := <-first; err != nil {
		t.Fatalf("the first migration: %v", err)
	}
	c.a.m.mu.Lock()
	held := len(c.a.m.held)
	c.a.m.mu.Unlock()
	if held != 0 {
		t.Errorf("%d pids still held after the migration ended", held)
	}
}

// TestInDoubtHoldsThePID: a source in doubt (its destination went silent
// after the commit was asked) keeps its tree stopped and held: migrating
// it again is refused, naming the migration in doubt, until the
// destination answers (committed: the copy here goes, and the pids are
// free).
func TestInDoubtHoldsThePID(t *testing.T) {
	c := newRuleCell(t)
	c.px.Arm(&faultproxy.Rule{Dir: faultproxy.ToDest, Type: wire.TypeCommit, Nth: 1, Action: faultproxy.Pass,
		Hook: func() { c.px.Silence(faultproxy.ToSource) }})
	// Meanwhile the list never loses the migration, not even while it
	// goes from its session to its resolver.
	stop, gaps := make(chan struct{}), make(chan int, 1)
	go func() {
		seen, gap := false, 0
		for {
			select {
			case <-stop:
				gaps <- gap
				return
			default:
			}
			n := len(c.a.m.Sessions())
			if n > 0 {
				seen = true
			} else if seen {
				gap++
			}
		}
	}()
	done := c.migrate(api.ModeCopy)
	s := waitInDoubt(t, c.a)
	time.Sleep(100 * time.Millisecond)
	close(stop)
	if gap := <-gaps; gap > 0 {
		t.Errorf("the list was empty %d times between the migration's start and its being in doubt", gap)
	}
	if src, _ := c.c.running(); src {
		t.Fatal("the source's copy runs while its migration is in doubt")
	}
	_, err := c.a.m.Migrate(context.Background(), api.Caller{}, api.MigrateRequest{PID: c.pid, To: c.b.addr()}, nil)
	if api.CodeOf(err) != api.CodeConflict || !strings.Contains(err.Error(), s.ID) || !strings.Contains(err.Error(), "in doubt") {
		t.Errorf("migrating a pid in doubt: %v; want refused, naming migration %s in doubt", err, s.ID)
	}
	c.px.Heal(faultproxy.ToSource)
	if err := <-done; err != nil {
		t.Fatalf("the migration, once the destination answered: %v", err)
	}
	waitRule(t, "the source settled, its pids free", 10*time.Second, func() bool {
		c.a.m.mu.Lock()
		defer c.a.m.mu.Unlock()
		return len(c.a.m.held) == 0 && len(c.a.m.resolvers) == 0
	})
}

// TestResolveByOperator: a destination that lost its state after it
// committed cannot say how the migration ended; the source says so (in
// doubt, exit 4 for phaulctl, a note in the list), keeps its copy stopped,
// and an operator settles it. An order given while the destination can
// answer is refused, and the destination's answer settles it.
func TestResolveByOperator(t *testing.T) {
	t.Run("the destination has no record", func(t *testing.T) {
		c := newRuleCell(t)
		c.px.Arm(&faultproxy.Rule{Dir: faultproxy.ToSource, Type: wire.TypeCommitted, Nth: 1, Action: faultproxy.Drop, Hook: func() {
			// Committed there; then its daemon dies with its state.
			c.b.crash()
			os.RemoveAll(filepath.Join(c.b.state, "sessions"))
			os.MkdirAll(filepath.Join(c.b.state, "sessions"), 0o700)
			c.b = c.b.restart()
			c.px.SetTarget(c.b.addr())
		}})
		err := <-c.migrate(api.ModeCopy)
		if api.CodeOf(err) != api.CodeInDoubt || !strings.Contains(err.Error(), "phaulctl resolve") {
			t.Fatalf("Migrate: %v; want in doubt, saying how to resolve it", err)
		}
		s := c.session()
		if s.Phase != "in-doubt" || !strings.Contains(s.Note, "no record") {
			t.Errorf("listed as %q, %q; want in doubt, with a note that the destination has no record", s.Phase, s.Note)
		}
		if _, err := c.a.m.Resolve(context.Background(), s.ID[:8], "explode"); api.CodeOf(err) != api.CodeInvalid {
			t.Errorf("an unknown action: %v", err)
		}
		if _, err := c.a.m.Resolve(context.Background(), s.ID[:8], ResolveKill); err != nil {
			t.Fatalf("resolve --kill: %v", err)
		}
		waitRule(t, "one copy, the destination's", 10*time.Second, func() bool {
			src, dst := c.c.running()
			return !src && len(dst) == 1 && c.a.settled()
		})
		hist, _ := c.a.m.History(1)
		if len(hist) != 1 || hist[0].Outcome != api.OutcomeKilled {
			t.Errorf("history: %+v; want one entry, %s", hist, api.OutcomeKilled)
		}
	})
	t.Run("the destination cannot be reached", func(t *testing.T) {
		c := newRuleCell(t)
		c.px.Arm(&faultproxy.Rule{Dir: faultproxy.ToSource, Type: wire.TypeCommitted, Nth: 1, Action: faultproxy.Drop, Hook: func() {
			c.b.crash() // committed, and gone: no daemon listens
		}})
		done := c.migrate(api.ModeCopy)
		s := waitInDoubt(t, c.a)
		// Within the peer timeout the destination may still decide:
		// nobody guesses.
		if _, err := c.a.m.Resolve(context.Background(), s.ID[:8], ResolveKill); api.CodeOf(err) != api.CodeUnavailable || !strings.Contains(err.Error(), "still be deciding") {
			t.Fatalf("resolve at once while the destination cannot be reached: %v; want refused until it must have decided", err)
		}
		time.Sleep(c.a.m.cfg.PeerTimeout)
		if _, err := c.a.m.Resolve(context.Background(), s.ID[:8], ResolveKill); err != nil {
			t.Fatalf("resolve --kill once the destination must have decided: %v", err)
		}
		<-done
		waitRule(t, "one copy, the destination's", 10*time.Second, func() bool {
			src, dst, one := c.c.one()
			return !src && len(dst) == 1 && one && c.a.settled()
		})
	})
	t.Run("the destination answers", func(t *testing.T) {
		c := newRuleCell(t)
		c.px.Arm(&faultproxy.Rule{Dir: faultproxy.ToSource, Type: wire.TypeCommitted, Nth: 1, Action: faultproxy.Drop, Hook: func() {
			c.b.crash() // committed, and gone for a while
		}})
		done := c.migrate(api.ModeCopy)
		s := waitInDoubt(t, c.a)
		// The order and the resolver's own next query race: either
		// way the destination's answer settles it, and the order is
		// refused, saying what it answered.
		c.b = c.b.restart()
		c.px.SetTarget(c.b.addr())
		// The restarted destination may not answer the very first query
		// (seen: the connection closed before its hello), which is
		// refused as "cannot be reached, ask again": an operator asks
		// again, and so does this test, for a few seconds.
		var err error
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			_, err = c.a.m.Resolve(context.Background(), s.ID[:8], ResolveResume)
			if api.CodeOf(err) != api.CodeUnavailable || time.Now().After(deadline) {
				break
			}
		}
		// If the resolver's own query settled it first, the session is
		// gone by the time the order comes: not found, and committed.
		if api.CodeOf(err) != api.CodeNotFound && (api.CodeOf(err) != api.CodeConflict || !strings.Contains(err.Error(), "committed")) {
			t.Fatalf("resolve --resume while the destination can say it committed: %v; want refused, saying so", err)
		}
		if err := <-done; err != nil {
			t.Fatalf("Migrate: %v; want the destination's commit", err)
		}
		waitRule(t, "one copy, the destination's", 10*time.Second, func() bool {
			src, dst := c.c.running()
			return !src && len(dst) == 1 && c.a.settled()
		})
	})
}

// TestShutdownInDoubt: phauld stopping with a migration in doubt leaves it
// in doubt (its record keeps the tree stopped for the next start); a
// second Shutdown (the stop timeout's) only waits; an order that comes
// meanwhile is told so, not that the migration was settled.
func TestShutdownInDoubt(t *testing.T) {
	c := newRuleCell(t)
	c.px.Arm(&faultproxy.Rule{Dir: faultproxy.ToSource, Type: wire.TypeCommitted, Nth: 1, Action: faultproxy.Drop, Hook: func() {
		c.b.crash()
	}})
	done := c.migrate(api.ModeCopy)
	s := waitInDoubt(t, c.a)
	c.a.m.mu.Lock()
	r := c.a.m.resolvers[mustID(t, s.ID)]
	c.a.m.mu.Unlock()
	// The first gives up at once (its deadline has passed), with the
	// resolver still ending; the second comes then.
	expired, cancel := context.WithTimeout(context.Background(), 0)
	c.a.m.Shutdown(expired)
	cancel()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.a.m.Shutdown(ctx); err != nil {
		t.Fatalf("the second Shutdown: %v", err)
	}
	<-done
	if r == nil || r.outcome != "" {
		t.Fatalf("the resolver %v ended with outcome %q; want it stopped, unsettled", r, r.outcome)
	}
	if _, err := c.a.m.Resolve(context.Background(), s.ID[:8], ResolveResume); err == nil {
		t.Fatal("resolve after Shutdown succeeded")
	}
	if src, _ := c.c.running(); src {
		t.Fatal("the stopped source copy runs after a Shutdown in doubt")
	}
}

// mustID parses a session id.
func mustID(t *testing.T, s string) wire.SessionID {
	t.Helper()
	id, err := wire.ParseSessionID(s)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestCommittedNotSeenRunning: a copy that is gone (or stays stopped)
// when the destination commits and resumes it: committed all the same (the
// record says so), but the result says it was not seen running there, and
// nothing says it runs.
func TestCommittedNotSeenRunning(t *testing.T) {
	c := newRuleCell(t)
	c.px.Arm(&faultproxy.Rule{Dir: faultproxy.ToDest, Type: wire.TypeCommit, Nth: 1, Action: faultproxy.Pass, Hook: func() {
		r := c.fake.Restored()
		syscall.Kill(r[len(r)-1].PID, syscall.SIGKILL)
	}})
	res, err := c.a.m.Migrate(context.Background(), api.Caller{}, api.MigrateRequest{PID: c.pid, To: c.px.Addr(), Mode: api.ModeCopy}, nil)
	if err != nil {
		t.Fatalf("Migrate: %v; want committed", err)
	}
	if res.NotRunning == "" {
		t.Fatalf("committed with the copy gone, and the result says nothing: %+v", res)
	}
	hist, _ := c.a.m.History(1)
	if len(hist) != 1 || hist[0].Outcome != api.OutcomeCommitted {
		t.Errorf("history %+v; want committed", hist)
	}
}

// TestSlowPlacementBlocksNothing: moving the restored tree into its scope
// (a call to systemd) may hang; it runs off the session loop, bounded, so
// the destination keeps answering its peer (whose timeout here is far
// shorter than the hang) and the migration commits, the tree left where
// it is.
func TestSlowPlacementBlocksNothing(t *testing.T) {
	for _, mode := range []string{api.ModeCopy, api.ModeLazy} {
		t.Run(mode, func(t *testing.T) {
			c := newRuleCell(t)
			hung := make(chan struct{}, 1)
			c.b.m.cfg.Place = func(ctx context.Context, id string, pids []int) error {
				select {
				case hung <- struct{}{}:
				default:
				}
				<-ctx.Done() // systemd never answers
				return ctx.Err()
			}
			start := time.Now()
			done := c.migrate(mode)
			var err error
			doubted := false
			for finished := false; !finished; {
				select {
				case err = <-done:
					finished = true
				case <-time.After(10 * time.Millisecond):
					for _, s := range c.a.m.Sessions() {
						// A destination that stopped answering would
						// leave the source in doubt.
						doubted = doubted || s.Phase == "in-doubt"
					}
				}
			}
			if err != nil || doubted {
				t.Fatalf("a migration whose placement hangs: %v (the source was in doubt: %v)", err, doubted)
			}
			select {
			case <-hung:
			default:
				t.Fatal("the placement was not asked")
			}
			took := time.Since(start)
			if took > placeBound+5*time.Second {
				t.Errorf("the migration took %v", took)
			}
			waitRule(t, "one copy, the destination's", 10*time.Second, func() bool {
				src, dst := c.c.running()
				return !src && len(dst) == 1
			})
		})
	}
}

// placeBound is how long a placement may take before the tree goes on
// without it (migrate's placeTimeout).
const placeBound = 2 * time.Second

// TestNotSeenNotResumed: when a rollback cannot see the source tree run
// (here: it was killed while CRIU held it), the caller is not told it was
// resumed, but that it is in doubt, and why.
func TestNotSeenNotResumed(t *testing.T) {
	c := newRuleCell(t)
	c.fake.SetHook(func(ctx context.Context, s migratetest.Step, dir string) error {
		if s == migratetest.StepDumpEnd && strings.HasPrefix(dir, c.a.state) {
			syscall.Kill(c.pid, syscall.SIGKILL) // gone while frozen
			for deadline := time.Now().Add(5 * time.Second); proc.Running(c.pid) && time.Now().Before(deadline); {
				time.Sleep(5 * time.Millisecond)
			}
			return errors.New("injected: the dump failed after post-dump")
		}
		return nil
	})
	err := <-c.migrate(api.ModeCopy)
	if api.CodeOf(err) != api.CodeInDoubt || strings.Contains(err.Error(), "resumed here") || !strings.Contains(err.Error(), "not seen running") {
		t.Fatalf("a rollback whose tree is gone: %v; want in doubt, saying it was not seen running", err)
	}
}

// TestConcurrentMigrationsOnePasses: several migrations of one pid asked
// at the same moment, to a destination that would take each: one runs, the
// others are refused at once, before they dial (the destination sees one
// migration).
func TestConcurrentMigrationsOnePasses(t *testing.T) {
	c := newRuleCell(t)
	const n = 4
	errs := make(chan error, n)
	took := make(chan time.Duration, n)
	gate := make(chan struct{})
	for i := 0; i < n; i++ {
		go func() {
			<-gate
			start := time.Now()
			_, err := c.a.m.Migrate(context.Background(), api.Caller{}, api.MigrateRequest{PID: c.pid, To: c.px.Addr(), Mode: api.ModeCopy}, nil)
			if api.CodeOf(err) == api.CodeConflict {
				took <- time.Since(start)
			}
			errs <- err
		}()
	}
	close(gate)
	ran, refused := 0, 0
	for i := 0; i < n; i++ {
		switch err := <-errs; {
		case err == nil:
			ran++
		case api.CodeOf(err) == api.CodeConflict:
			refused++
		default:
			t.Errorf("a concurrent migration: %v; want it run, or refused as a conflict", err)
		}
	}
	if ran != 1 || refused != n-1 {
		t.Fatalf("%d of %d concurrent migrations of one pid ran, %d were refused; want 1 and %d", ran, n, refused, n-1)
	}
	for i := 0; i < refused; i++ {
		if d := <-took; d > time.Second {
			t.Errorf("a refusal took %v", d)
		}
	}
	// The destination records its end after the source has its answer.
	in := 0
	for deadline := time.Now().Add(30 * time.Second); in == 0 && time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		hist, err := c.b.m.History(0)
		if err != nil {
			t.Fatal(err)
		}
		in = 0
		for _, e := range hist {
			if e.Direction == api.DirectionIn {
				in++
			}
		}
	}
	if in != 1 {
		t.Errorf("the destination saw %d migrations; want the one", in)
	}
}

// TestArrivingCopyIsHeld: a restored copy belongs to its migration on the
// destination until that migration is settled: migrating it away from
// there meanwhile is refused, naming the migration.
func TestArrivingCopyIsHeld(t *testing.T) {
	c := newRuleCell(t)
	var got error
	var copyPID int
	c.fake.SetHook(func(ctx context.Context, s migratetest.Step, dir string) error {
		if s == migratetest.StepRestoreEnd && strings.HasPrefix(dir, c.b.state) {
			r := c.fake.Restored()
			copyPID = r[len(r)-1].PID
			_, got = c.b.m.Migrate(ctx, api.Caller{}, api.MigrateRequest{PID: copyPID, To: c.a.addr(), Mode: api.ModeCopy}, nil)
		}
		return nil
	})
	if err := <-c.migrate(api.ModeCopy); err != nil {
		t.Fatalf("the migration: %v", err)
	}
	if copyPID == 0 {
		t.Fatal("the restore's end was not reached")
	}
	if api.CodeOf(got) != api.CodeConflict || !strings.Contains(got.Error(), "is the copy migration") {
		t.Fatalf("migrating the copy (pid %d) away while it arrives: %v; want a conflict naming its migration", copyPID, got)
	}
	waitRule(t, "the destination to let the copy go", 10*time.Second, func() bool {
		c.b.m.mu.Lock()
		defer c.b.m.mu.Unlock()
		return len(c.b.m.held) == 0
	})
}

// TestAuthorizeOnRecordedIdentity: the permission check is asked about the
// identity the migration records (pid and start time) and the whole tree,
// once its pids are held; a refusal lets them go.
func TestAuthorizeOnRecordedIdentity(t *testing.T) {
	c := newRuleCell(t, "sh", "-c", "sleep 600 & wait")
	want, _ := proc.Stat(c.pid)
	var got proc.Info
	var gotPIDs []int
	var heldThen int
	c.a.m.cfg.Authorize = func(caller api.Caller, root proc.Info, pids []int) error {
		got, gotPIDs = root, pids
		c.a.m.mu.Lock()
		heldThen = len(c.a.m.held)
		c.a.m.mu.Unlock()
		return api.Errorf(api.CodePermission, "refused for the test")
	}
	waitRule(t, "the tree's child", 5*time.Second, func() bool {
		kids, _ := proc.Children(c.pid)
		return len(kids) == 1
	})
	_, err := c.a.m.Migrate(context.Background(), api.Caller{UID: 1000}, api.MigrateRequest{PID: c.pid, To: c.b.addr()}, nil)
	if api.CodeOf(err) != api.CodePermission {
		t.Fatalf("Migrate: %v; want the refusal", err)
	}
	if got.PID != want.PID || got.StartTime != want.StartTime || len(gotPIDs) != 2 {
		t.Errorf("asked about %+v and pids %v; want pid %d started at %d, and its tree of 2", got, gotPIDs, want.PID, want.StartTime)
	}
	if heldThen != 2 {
		t.Errorf("%d pids held when the check was asked, want the tree's 2", heldThen)
	}
	c.a.m.mu.Lock()
	left := len(c.a.m.held)
	c.a.m.mu.Unlock()
	if left != 0 {
		t.Errorf("%d pids still held after the refusal", left)
	}
}

// waitInDoubt waits until d's one session is in doubt, and returns it.
func waitInDoubt(t *testing.T, d *ruleDaemon) api.Session {
	t.Helper()
	var s api.Session
	waitRule(t, "the source in doubt", 20*time.Second, func() bool {
		list := d.m.Sessions()
		if len(list) == 1 && list[0].Phase == "in-doubt" {
			s = list[0]
			return true
		}
		return false
	})
	return s
}
