//go:build linux

package session

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/guard"
	"github.com/phaul/phaul/pkg/migrate"
	"github.com/phaul/phaul/pkg/migrate/migratetest"
	"github.com/phaul/phaul/pkg/precopy"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/wire"
	"github.com/phaul/phaul/test/faultproxy"
)

// The unit tier of the commit rule: two managers in this process, each
// with its own state directory, a fake CRIU (pkg/migrate/migratetest) on
// real processes, in-process guards, and a fault proxy between them. Each
// cell migrates a real process, strikes one fault at one point, and checks
// that exactly one copy ends up running, on the side the rule says; a
// watcher samples all the while and fails on any moment with two running
// copies after the commit (in copy mode, at any moment: no copy runs
// beside another there, ever). It needs neither root nor CRIU.

// rulePeerTimeout is the daemons' peer timeout in the unit tier.
const rulePeerTimeout = 600 * time.Millisecond

// ruleDaemon is one manager of a cell.
type ruleDaemon struct {
	t     *testing.T
	name  string
	state string
	fake  *migratetest.CRIU
	m     *Manager
	l     net.Listener
	// crashed: ended by crash (nothing of it may be stopped again).
	crashed bool
}

// newRuleDaemon starts a manager on state (recovering what is there) and
// serves it on a loopback port of its own.
func newRuleDaemon(t *testing.T, name, state string, fake *migratetest.CRIU, tweak ...func(*Config)) *ruleDaemon {
	t.Helper()
	asSource, asDest := migrate.HostCapabilities(true, "")
	cfg := Config{
		Log:              zaptest.NewLogger(t).Named(name),
		CRIU:             fake,
		Info:             criu.Info{Version: criu.Version{Major: 4, Minor: 2}, CPUInfo: []byte("fake cpuinfo")},
		AsSource:         asSource,
		AsDest:           asDest,
		StateDir:         state,
		HandshakeTimeout: 2 * time.Second,
		PeerTimeout:      rulePeerTimeout,
		InDoubtWait:      30 * time.Second,
		DumpLockDir:      filepath.Join(state, "locks"),
		Insecure:         true,
		Guard: func(dir string, pid int, start uint64) (migrate.Guard, error) {
			return guard.InProcess(dir, pid, start)
		},
	}
	for _, f := range tweak {
		f(&cfg)
	}
	m, err := NewManager(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Recover(); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go m.Serve(l)
	d := &ruleDaemon{t: t, name: name, state: state, fake: fake, m: m, l: l}
	t.Cleanup(d.stop)
	return d
}

func (d *ruleDaemon) addr() string { return d.l.Addr().String() }

func (d *ruleDaemon) stop() {
	if d.crashed {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := d.m.Shutdown(ctx); err != nil {
		d.t.Errorf("%s: shutdown: %v", d.name, err)
	}
}

// crash ends the daemon as a SIGKILL would: every session's descriptors
// close and nothing else happens; resolvers stop where they are.
func (d *ruleDaemon) crash() {
	m := d.m
	d.crashed = true
	m.mu.Lock()
	m.closeIntake()
	for _, r := range m.sessions {
		r.s.Crash()
	}
	for _, r := range m.resolvers {
		close(r.stop)
	}
	m.mu.Unlock()
	m.sessWG.Wait()
	m.connWG.Wait()
}

// restart is the daemon started again on its state directory, after a
// crash.
func (d *ruleDaemon) restart() *ruleDaemon {
	return newRuleDaemon(d.t, d.name, d.state, d.fake)
}

// settled reports whether the daemon has nothing in flight (its
// resolvers included).
func (d *ruleDaemon) settled() bool { return len(d.m.Sessions()) == 0 }

// gaveUp reports whether the daemon has no migration running: none, or
// only ones in doubt, waiting for the other side.
func (d *ruleDaemon) gaveUp() bool {
	for _, s := range d.m.Sessions() {
		if s.Phase != "in-doubt" {
			return false
		}
	}
	return true
}

// copies are the running copies of the process: the source's, and those
// the fake restored.
type copies struct {
	src   int
	start uint64
	fake  *migratetest.CRIU
}

func (c copies) running() (src bool, dst []int) {
	if info, err := proc.Stat(c.src); err == nil && info.StartTime == c.start && migratetest.Running(c.src) {
		src = true
	}
	for _, p := range c.fake.Restored() {
		if migratetest.Running(p.PID) {
			dst = append(dst, p.PID)
		}
	}
	return src, dst
}

// exist counts the copies that exist, running or not (a stopped copy left
// behind is one too): the source's, and the restored ones still children
// of this test.
func (c copies) exist() int {
	alive := func(pid int) (proc.Info, bool) {
		info, err := proc.Stat(pid)
		return info, err == nil && info.State != 'Z' && info.State != 'X'
	}
	n := 0
	if info, ok := alive(c.src); ok && info.StartTime == c.start {
		n++
	}
	for _, p := range c.fake.Restored() {
		if info, ok := alive(p.PID); ok && info.PPID == os.Getpid() {
			n++
		}
	}
	return n
}

// one reports whether exactly one copy exists, and runs: src says where.
func (c copies) one() (src bool, dst []int, ok bool) {
	src, dst = c.running()
	return src, dst, len(dst)+map[bool]int{true: 1}[src] == 1 && c.exist() == 1
}

// committed reports whether the destination recorded a commit (the
// commit point).
func committed(state string) bool {
	recs, _ := filepath.Glob(filepath.Join(state, "sessions", "*"))
	for _, dir := range recs {
		if rec, err := store.Load(dir); err == nil && rec.Role == store.RoleDest && rec.State == store.Committed {
			return true
		}
	}
	return false
}

// watch samples the copies until stop, and reports the first moment it
// saw two running: after the commit point, or at all (strict).
func watch(c copies, destState string, strict bool, stop <-chan struct{}) <-chan string {
	out := make(chan string, 1)
	go func() {
		defer close(out)
		after := false
		for {
			select {
			case <-stop:
				return
			default:
			}
			// Read first: the copies are sampled after it. Once seen, a
			// commit stays (the destination removes its record once the
			// source is done).
			after = after || committed(destState)
			src, dst := c.running()
			if n := len(dst) + map[bool]int{true: 1}[src]; n > 1 && (after || strict) {
				out <- fmt.Sprintf("two running copies (source %v, destination %v), commit recorded %v", src, dst, after)
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	return out
}

// watchCell runs watch for the test: stop ends it, and so does the test's
// end (a cell that fails early must not leave it sampling).
func watchCell(t *testing.T, c copies, destState string, strict bool) (seen <-chan string, stop func()) {
	ch := make(chan struct{})
	var once sync.Once
	stop = func() { once.Do(func() { close(ch) }) }
	t.Cleanup(stop)
	return watch(c, destState, strict, ch), stop
}

// rulePoint is where a fault strikes: the frame the proxy holds, or (for
// the restore) the fake CRIU's post-restore step.
type rulePoint struct {
	key     string
	dir     string
	typ     wire.Type
	restore bool
}

var rulePoints = []rulePoint{
	{key: "before-dump", dir: faultproxy.ToSource, typ: wire.TypeReady},
	{key: "pages", dir: faultproxy.ToDest, typ: wire.TypePageData},
	{key: "images", dir: faultproxy.ToDest, typ: wire.TypeFileBegin},
	{key: "restore", restore: true},
	{key: "restored", dir: faultproxy.ToSource, typ: wire.TypeRestored},
	{key: "commit-sent", dir: faultproxy.ToDest, typ: wire.TypeCommit},
	{key: "committed", dir: faultproxy.ToSource, typ: wire.TypeCommitted},
}

var ruleFaults = []string{"drop", "silent-dest", "silent-source", "cancel", "crash-dest", "crash-source"}

// ruleExpected is the commit rule, cell by cell, as the unit tier strikes
// it: the destination decides, and commits only on a Commit it received.
// (A silent side here keeps hearing its peer and keeps its own clock: it
// differs from a stopped daemon of the integration matrix.)
func ruleExpected(p, f string) string {
	switch p {
	case "committed":
		// Committed: nothing can undo it.
		return sideDest
	case "commit-sent":
		switch f {
		case "silent-dest", "cancel":
			// The Commit arrives; the destination commits, and the
			// source learns it (after the silence) or is refused the
			// cancel.
			return sideDest
		}
		// The Commit is lost (with the connections, held by a silenced
		// source until the destination gave up and said so, or lost
		// with the daemon that had it): the destination never commits.
		return sideSource
	}
	return sideSource
}

// TestCommitRule runs every cell of the unit tier, in both modes.
func TestCommitRule(t *testing.T) {
	for _, mode := range []string{api.ModeCopy, api.ModeLazy} {
		for _, p := range rulePoints {
			for _, f := range ruleFaults {
				t.Run(mode+"/"+p.key+"/"+f, func(t *testing.T) {
					t.Parallel()
					runRuleCell(t, mode, p, f, ruleExpected(p.key, f))
				})
			}
		}
	}
}

// ruleCompress runs a cell with --compress zstd on memory that
// compresses: the page stream then goes as page-data-z frames.
type ruleCompress bool

func runRuleCell(t *testing.T, mode string, p rulePoint, f, want string, compress ...ruleCompress) {
	root := t.TempDir()
	zstd := len(compress) > 0 && bool(compress[0])
	fake := migratetest.New(t, migratetest.Config{Memory: 2 << 20, Chunk: 256 << 10, Compressible: zstd, Framed: mode == api.ModePrecopy})
	if zstd && p.typ == wire.TypePageData {
		p.typ = wire.TypePageDataZ
	}
	a := newRuleDaemon(t, "A", filepath.Join(root, "a"), fake)
	b := newRuleDaemon(t, "B", filepath.Join(root, "b"), fake)
	px, err := faultproxy.New("127.0.0.1:0", b.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer px.Close()
	pid := migratetest.StartTree(t)
	info, _ := proc.Stat(pid)
	c := copies{src: pid, start: info.StartTime, fake: fake}
	seen, stop := watchCell(t, c, b.state, mode != api.ModeLazy)

	var cancelErr error
	var cancelled atomic.Bool
	inject := func() {
		switch f {
		case "drop":
			px.DropAll()
		case "silent-dest":
			px.Silence(faultproxy.ToSource)
		case "silent-source":
			px.Silence(faultproxy.ToDest)
		case "cancel":
			for _, s := range a.m.Sessions() {
				_, cancelErr = a.m.Cancel(s.ID[:8])
				cancelled.Store(true)
			}
		case "crash-dest":
			b.crash()
			b = b.restart()
			px.SetTarget(b.addr())
		case "crash-source":
			a.crash()
		}
	}
	fired := make(chan struct{})
	var rule *faultproxy.Rule
	if p.restore {
		// The fault strikes while the destination's CRIU restores.
		// inject runs before fired closes: the test goroutine reads
		// what it changed (a restarted b) only after fired.
		var once sync.Once
		dstate := b.state
		fake.SetHook(func(ctx context.Context, s migratetest.Step, dir string) error {
			if s == migratetest.StepPostRestore && strings.HasPrefix(dir, dstate) {
				once.Do(func() {
					inject()
					close(fired)
				})
			}
			return nil
		})
	} else {
		r := &faultproxy.Rule{Dir: p.dir, Type: p.typ, Nth: 1, Action: faultproxy.Pass, Hook: func() {
			inject()
		}}
		switch f {
		case "drop":
			r.Action, r.Hook = faultproxy.Drop, nil
		case "crash-source":
			r.Action = faultproxy.Swallow // lost with the daemon that stopped
		case "corrupt":
			// A compressed chunk that does not decode, in place of the
			// held one: never restored as memory.
			var bad []byte
			var err error
			if mode == api.ModePrecopy {
				// A reference to a page never sent ahead.
				var h [precopy.HashSize]byte
				bad, err = wire.Marshal(&wire.PageRefs{Data: precopy.AppendRefs(nil, precopy.TaskID(1), 0x1000, h[:])})
			} else {
				bad, err = wire.Marshal(&wire.PageDataZ{Data: []byte("\x28\xb5\x2f\xfd not the rest of a zstd frame")})
			}
			if err != nil {
				t.Fatal(err)
			}
			r.Action, r.Hook, r.Bytes = faultproxy.Inject, nil, bad
		}
		px.Arm(r)
		go func() {
			<-r.Fired()
			close(fired)
		}()
		rule = r
	}

	type outcome struct {
		res api.Result
		err error
		// running: the source copy ran when the error came back.
		running bool
	}
	done := make(chan outcome, 1)
	am := a.m
	go func() {
		req := api.MigrateRequest{PID: pid, To: px.Addr(), Mode: mode}
		if zstd {
			req.Compress = api.CompressZstd
		}
		res, err := am.Migrate(context.Background(), api.Caller{}, req, nil)
		src, _ := c.running()
		done <- outcome{res, err, src}
	}()
	select {
	case <-fired:
	case o := <-done:
		// The fault itself may end the migration before this looks.
		select {
		case <-fired:
			done <- o
		case <-time.After(2 * time.Second):
			t.Fatalf("the migration ended before the point: %+v, %v", o.res, o.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the point was not reached within 30 s")
	}
	if rule != nil {
		// A hook that failed (t.Fatal on the proxy's goroutine) never
		// lets the frame go: bounded, so the cell fails, not hangs.
		select {
		case <-rule.Done():
		case <-time.After(30 * time.Second):
			t.Fatal("the fault was not injected within 30 s")
		}
	}

	// Heal a silence once the other side has given up; start a crashed
	// source again once the destination has reacted.
	waitRule(t, "the fault to play out", 30*time.Second, func() bool {
		switch f {
		case "silent-dest":
			if a.gaveUp() {
				px.Heal(faultproxy.ToSource)
				return true
			}
			return false
		case "silent-source":
			if b.settled() {
				px.Heal(faultproxy.ToDest)
				return true
			}
			return false
		case "crash-source":
			if b.settled() {
				a = a.restart()
				return true
			}
			return false
		}
		return true
	})

	var o outcome
	if f != "crash-source" {
		select {
		case o = <-done:
		case <-time.After(60 * time.Second):
			t.Fatal("Migrate did not return within 60 s")
		}
	}
	// Settle: both done with the session, one running copy.
	var src bool
	var dst []int
	waitRule(t, "one running copy, both daemons settled", 60*time.Second, func() bool {
		select {
		case two, ok := <-seen:
			if ok {
				t.Fatalf("the watcher saw %s", two)
			}
		default:
		}
		if !a.settled() || !b.settled() {
			return false
		}
		var one bool
		src, dst, one = c.one()
		return one
	})
	stop()
	if two, ok := <-seen; ok {
		t.Errorf("the watcher saw %s", two)
	}
	got := sideDest
	if src {
		got = sideSource
	}
	if got != want {
		t.Fatalf("the process runs on the %s, the rule says the %s", got, want)
	}
	if got == sideDest && !fake.Intact(dst[0]) {
		t.Errorf("the destination's copy (pid %d) runs without all its memory", dst[0])
	}
	// Nothing sent ahead outlives the session, a destination's restart
	// included.
	if held, _ := filepath.Glob(filepath.Join(b.state, "sessions", "*", migrate.PrecopyStore)); len(held) > 0 {
		t.Errorf("pages sent ahead are left on the destination: %v", held)
	}
	if f == "crash-source" {
		return // the caller went with the daemon
	}
	// What the caller was told matches what happened, and was seen.
	if (o.err == nil) != (want == sideDest) {
		t.Errorf("Migrate returned %v, but the process runs on the %s", o.err, want)
	}
	if f == "corrupt" && mode == api.ModePrecopy && (o.err == nil || !strings.Contains(o.err.Error(), "never sent ahead")) {
		// Refused by the destination's check of the reference, not by
		// what the page server made of the stream after.
		t.Errorf("Migrate returned %v; want the destination's refusal of a reference to a page never sent ahead", o.err)
	}
	if o.err != nil && strings.Contains(o.err.Error(), "resumed here") && !o.running {
		t.Errorf("Migrate said %q while the source copy was not running", o.err)
	}
	if o.err != nil {
		if code := api.CodeOf(o.err); code != api.CodeAborted && code != api.CodeCanceled {
			t.Errorf("rolled back with code %s (%v); want aborted or canceled", code, o.err)
		}
	}
	if f == "cancel" {
		refused := p.key == "commit-sent" || p.key == "committed"
		if !cancelled.Load() && !p.restore {
			t.Error("no session was there to cancel")
		}
		if (cancelErr != nil) != refused {
			t.Errorf("cancel at %s: %v; want refused=%v", p.key, cancelErr, refused)
		}
	}
}

// TestCommitRulePrecopy runs cells of the rule in mode precopy: a fault
// while the rounds send the running tree's memory ahead, at the freeze
// (the page stream, with a reference to a page never sent in place of
// its first chunk), during the restore and at the commit: everything
// sent ahead is discarded, and the process ends where the rule says.
func TestCommitRulePrecopy(t *testing.T) {
	points := []rulePoint{{key: "round", dir: faultproxy.ToDest, typ: wire.TypePrecopyPages}}
	for _, p := range rulePoints {
		switch p.key {
		case "pages", "restore", "commit-sent":
			points = append(points, p)
		}
	}
	for _, p := range points {
		faults := []string{"drop", "cancel", "crash-dest", "crash-source"}
		if p.key == "pages" {
			faults = append(faults, "corrupt")
		}
		for _, f := range faults {
			t.Run(p.key+"/"+f, func(t *testing.T) {
				t.Parallel()
				want := ruleExpected(p.key, f)
				if f == "corrupt" {
					want = sideSource
				}
				runRuleCell(t, api.ModePrecopy, p, f, want)
			})
		}
	}
}

// TestCommitRuleCompressed runs cells of the rule with --compress zstd:
// lost, crashed and corrupt compressed streams end as the rule says, and
// a copy restored from them has all its memory.
func TestCommitRuleCompressed(t *testing.T) {
	for _, mode := range []string{api.ModeCopy, api.ModeLazy} {
		for _, p := range rulePoints {
			switch p.key {
			case "pages", "images", "restore", "commit-sent":
			default:
				continue
			}
			faults := []string{"drop", "crash-dest", "crash-source"}
			if p.key == "pages" {
				faults = append(faults, "corrupt")
			}
			for _, f := range faults {
				t.Run(mode+"/"+p.key+"/"+f, func(t *testing.T) {
					t.Parallel()
					want := ruleExpected(p.key, f)
					if f == "corrupt" {
						want = sideSource
					}
					runRuleCell(t, mode, p, f, want, true)
				})
			}
		}
	}
}

func waitRule(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Sides a process may end up on.
const (
	sideSource = "source"
	sideDest   = "destination"
)

// TestCommitRuleCRIUFails: wherever CRIU fails (the dump, the page server,
// the restore, lazy-pages, the CPU check), the process runs on the source,
// intact, and the caller is told it was rolled back.
func TestCommitRuleCRIUFails(t *testing.T) {
	for _, c := range []struct {
		mode string
		step migratetest.Step
	}{
		{api.ModeCopy, migratetest.StepCPUCheck},
		{api.ModeCopy, migratetest.StepDumpStart},
		{api.ModeCopy, migratetest.StepDumpPages},
		{api.ModeCopy, migratetest.StepPagesReceived},
		{api.ModeCopy, migratetest.StepRestoreStart},
		{api.ModeCopy, migratetest.StepPostRestore},
		{api.ModeCopy, migratetest.StepRestoreEnd},
		{api.ModeCopy, migratetest.StepDumpEnd},
		{api.ModeLazy, migratetest.StepCPUCheck},
		{api.ModeLazy, migratetest.StepDumpStart},
		{api.ModeLazy, migratetest.StepDumpPages},
		{api.ModeLazy, migratetest.StepLazyPagesStart},
		{api.ModeLazy, migratetest.StepRestoreStart},
		{api.ModeLazy, migratetest.StepPostRestore},
		{api.ModeLazy, migratetest.StepRestoreEnd},
		{api.ModeLazy, migratetest.StepLazyServe},
		{api.ModeLazy, migratetest.StepLazyFetch},
		{api.ModeLazy, migratetest.StepDumpEnd},
	} {
		t.Run(c.mode+"/"+string(c.step), func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			fake := migratetest.New(t, migratetest.Config{Hook: migratetest.FailAt(c.step, errors.New("injected failure"))})
			a := newRuleDaemon(t, "A", filepath.Join(root, "a"), fake)
			b := newRuleDaemon(t, "B", filepath.Join(root, "b"), fake)
			pid := migratetest.StartTree(t)
			info, _ := proc.Stat(pid)
			cp := copies{src: pid, start: info.StartTime, fake: fake}
			seen, stop := watchCell(t, cp, b.state, c.mode == api.ModeCopy)
			_, err := a.m.Migrate(context.Background(), api.Caller{}, api.MigrateRequest{PID: pid, To: b.addr(), Mode: c.mode}, nil)
			if err == nil {
				t.Fatal("the migration succeeded though CRIU failed")
			}
			// Touched (from the dump on) and rolled back: aborted, exit 3.
			want := api.CodeAborted
			if c.step == migratetest.StepCPUCheck {
				want = api.CodePrecondition
			}
			if code := api.CodeOf(err); code != want {
				t.Errorf("error code %s, want %s (%v)", code, want, err)
			}
			waitRule(t, "the source copy alone running", 10*time.Second, func() bool {
				src, _, one := cp.one()
				return src && one && a.settled() && b.settled()
			})
			stop()
			if two, ok := <-seen; ok {
				t.Errorf("the watcher saw %s", two)
			}
		})
	}
}

// ruleFaultNames are the faults' names in docs/reliability.md.
var ruleFaultNames = map[string]string{
	"drop": "dropped", "silent-dest": "destination silent", "silent-source": "source silent", "cancel": "cancel",
	"crash-dest": "destination crashed, restarted", "crash-source": "source crashed, restarted",
}

var rulePointNames = map[string]string{
	"before-dump": "before the dump", "pages": "during page transfer", "images": "during image transfer",
	"restore": "during restore", "restored": "after restore, before the commit is asked",
	"commit-sent": "commit asked, not yet received", "committed": "after the commit",
}

// ruleTable renders the unit tier's table as docs/reliability.md holds it.
func ruleTable() string {
	var b strings.Builder
	b.WriteString("| point \\ fault |")
	for _, f := range ruleFaults {
		b.WriteString(" " + ruleFaultNames[f] + " |")
	}
	b.WriteString("\n|---|")
	for range ruleFaults {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, p := range rulePoints {
		b.WriteString("| " + rulePointNames[p.key] + " |")
		for _, f := range ruleFaults {
			b.WriteString(" " + ruleExpected(p.key, f) + " |")
		}
		b.WriteString("\n")
	}
	return b.String()
}

// TestRuleDocMatches keeps docs/reliability.md's unit-tier table equal to
// the cells TestCommitRule runs.
func TestRuleDocMatches(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "reliability.md"))
	if err != nil {
		t.Fatal(err)
	}
	if table := ruleTable(); !strings.Contains(string(doc), table) {
		t.Errorf("docs/reliability.md does not hold the unit tier's table; it should contain:\n\n%s", table)
	}
}
