//go:build linux

package session

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/migrate"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/store"
	"github.com/phaul/phaul/pkg/wire"
)

// sessionDir makes a session directory holding rec, last updated ago.
func sessionDir(t *testing.T, m *Manager, rec *store.Record, ago time.Duration) (wire.SessionID, string) {
	t.Helper()
	id := newID(t)
	dir := m.sessionDir(id)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	rec.ID = id.String()
	if err := rec.Save(dir); err != nil {
		t.Fatal(err)
	}
	if ago > 0 {
		// save stamps the time; back-date the file's record by hand.
		old := *rec
		old.Updated = time.Now().Add(-ago)
		b, err := json.Marshal(&old)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, store.RecordName), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return id, dir
}

func TestCleanOld(t *testing.T) {
	m, _ := newTestManager(t, time.Second)
	week := 7 * 24 * time.Hour
	_, oldAborted := sessionDir(t, m, &store.Record{Role: store.RoleSource, State: store.Aborted}, 8*24*time.Hour)
	_, newAborted := sessionDir(t, m, &store.Record{Role: store.RoleSource, State: store.Aborted}, time.Hour)
	_, oldInDoubt := sessionDir(t, m, &store.Record{Role: store.RoleSource, State: store.CommitSent}, 30*24*time.Hour)
	_, oldCommitted := sessionDir(t, m, &store.Record{Role: store.RoleDest, State: store.Committed}, 8*24*time.Hour)
	_, newCommitted := sessionDir(t, m, &store.Record{Role: store.RoleDest, State: store.Committed}, time.Hour)
	m.CleanOld(week)
	for dir, keep := range map[string]bool{
		oldAborted: false, newAborted: true, oldInDoubt: true, oldCommitted: false, newCommitted: true,
	} {
		_, err := os.Stat(dir)
		if kept := err == nil; kept != keep {
			rec, _ := store.Load(dir)
			t.Errorf("%+v: kept %v, want %v", rec, kept, keep)
		}
	}
}

// stoppedChild starts a sleeping child and stops it, as CRIU leaves a
// tree with leave_stopped.
func stoppedChild(t *testing.T) (*exec.Cmd, proc.Info) {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	cmd.Process.Signal(syscall.SIGSTOP)
	deadline := time.Now().Add(5 * time.Second)
	for {
		info, err := proc.Stat(cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		if info.State == 'T' {
			return cmd, info
		}
		if time.Now().After(deadline) {
			t.Fatal("child did not stop")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// state waits up to wait for pid to leave the stopped state, and returns
// its state ('X' if it is gone).
func state(t *testing.T, pid int, wait time.Duration) byte {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		info, err := proc.Stat(pid)
		if err != nil {
			return 'X'
		}
		if info.State != 'T' || time.Now().After(deadline) {
			return info.State
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRecoverByRecord restarts a "daemon" over records left by a crash and
// checks it acts as the commit rule says: resume a source tree that never
// had its commit asked, discard a destination copy never committed, make
// sure a committed copy runs.
func TestRecoverByRecord(t *testing.T) {
	m, _ := newTestManager(t, time.Second)
	srcCmd, srcInfo := stoppedChild(t)
	dstCmd, dstInfo := stoppedChild(t)
	okCmd, okInfo := stoppedChild(t)
	_, srcDir := sessionDir(t, m, &store.Record{Role: store.RoleSource, State: store.Dumping, PID: srcInfo.PID, StartTime: srcInfo.StartTime}, 0)
	_, dstDir := sessionDir(t, m, &store.Record{Role: store.RoleDest, State: store.Restored, PID: dstInfo.PID, StartTime: dstInfo.StartTime}, 0)
	_, okDir := sessionDir(t, m, &store.Record{Role: store.RoleDest, State: store.Committed, PID: okInfo.PID, StartTime: okInfo.StartTime}, 0)

	if err := m.Recover(); err != nil {
		t.Fatal(err)
	}
	if s := state(t, srcCmd.Process.Pid, 5*time.Second); s == 'T' || s == 'X' {
		t.Errorf("source tree state %c after recovery, want running", s)
	}
	if err := dstCmd.Wait(); err == nil {
		t.Error("uncommitted destination copy survived recovery")
	}
	if s := state(t, okCmd.Process.Pid, 5*time.Second); s == 'T' || s == 'X' {
		t.Errorf("committed copy state %c after recovery, want running", s)
	}
	for dir, want := range map[string]string{srcDir: store.Aborted, dstDir: store.Aborted, okDir: store.Committed} {
		deadline := time.Now().Add(5 * time.Second)
		for {
			rec, err := store.Load(dir)
			if err == nil && rec.State == want {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("record in %s: %+v, %v; want state %s", dir, rec, err, want)
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// TestRecoverKeepsJobStopped: a source interrupted mid-dump, before CRIU
// wrote images saying which tasks job control had stopped: recovery goes
// by the record (what /proc said before the dump), and resumes the others
// only.
func TestRecoverKeepsJobStopped(t *testing.T) {
	m, _ := newTestManager(t, time.Second)
	root := exec.Command("sh", "-c", "sleep 600 & wait")
	if err := root.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if tree, err := proc.Tree(root.Process.Pid); err == nil {
			for _, p := range tree {
				syscall.Kill(p, syscall.SIGKILL)
			}
		}
		root.Wait()
	})
	var child int
	for deadline := time.Now().Add(5 * time.Second); child == 0; {
		if kids, _ := proc.Children(root.Process.Pid); len(kids) == 1 {
			child = kids[0]
		} else if time.Now().After(deadline) {
			t.Fatal("the tree's child did not start")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Job control stopped the child; then the dump started.
	syscall.Kill(child, syscall.SIGSTOP)
	for deadline := time.Now().Add(5 * time.Second); ; {
		if info, err := proc.Stat(child); err == nil && info.State == 'T' {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the child did not stop")
		}
		time.Sleep(5 * time.Millisecond)
	}
	rec := &store.Record{Role: store.RoleSource, State: store.Dumping, PID: root.Process.Pid, Stopped: proc.JobStopped(root.Process.Pid)}
	info, _ := proc.Stat(root.Process.Pid)
	rec.StartTime = info.StartTime
	if len(rec.Stopped) != 1 {
		t.Fatalf("JobStopped = %v; want the child", rec.Stopped)
	}
	// CRIU froze the rest, and the daemon died before any image.
	syscall.Kill(root.Process.Pid, syscall.SIGSTOP)
	sessionDir(t, m, rec, 0)
	if err := m.Recover(); err != nil {
		t.Fatal(err)
	}
	if s := state(t, root.Process.Pid, 5*time.Second); s == 'T' || s == 'X' {
		t.Errorf("the root is %c after recovery; want it running", s)
	}
	time.Sleep(100 * time.Millisecond)
	if info, err := proc.Stat(child); err != nil || info.State != 'T' {
		t.Errorf("the child job control had stopped is %c after recovery (%v); want it still stopped", info.State, err)
	}
}

// TestRecoverIsBounded: a record whose tree a CRIU of the previous run
// still traces (it may hold it for a minute) must not hold up the start:
// Recover returns at once, and the tree is held meanwhile, so that no
// migration can take it.
func TestRecoverIsBounded(t *testing.T) {
	m, _ := newTestManager(t, time.Second)
	traced := exec.Command("sleep", "60")
	traced.SysProcAttr = &syscall.SysProcAttr{Ptrace: true}
	if err := traced.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { traced.Process.Kill(); traced.Wait() })
	for deadline := time.Now().Add(5 * time.Second); ; {
		if info, err := proc.Stat(traced.Process.Pid); err == nil && info.State == 't' {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the traced child did not stop in its tracer's hands")
		}
		time.Sleep(5 * time.Millisecond)
	}
	info, _ := proc.Stat(traced.Process.Pid)
	sessionDir(t, m, &store.Record{Role: store.RoleSource, State: store.Dumping, PID: info.PID, StartTime: info.StartTime}, 0)
	start := time.Now()
	if err := m.Recover(); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("Recover took %v with a traced tree", took)
	}
	_, err := m.Migrate(context.Background(), api.Caller{}, api.MigrateRequest{PID: info.PID, To: "127.0.0.1:1"}, nil)
	if api.CodeOf(err) != api.CodeConflict || !strings.Contains(err.Error(), "settling it from its record") {
		t.Fatalf("migrating a tree being recovered: %v; want a conflict naming the recovery", err)
	}
}

// TestRecoverNeverSignalsAnotherProcess checks that a record whose pid now
// belongs to another process (same pid, other start time) is left alone.
func TestRecoverNeverSignalsAnotherProcess(t *testing.T) {
	m, err := NewManager(Config{Log: zaptest.NewLogger(t), CRIU: migrate.FromClient(criu.New("/nonexistent")), StateDir: t.TempDir(), Insecure: true})
	if err != nil {
		t.Fatal(err)
	}
	cmd, info := stoppedChild(t)
	sessionDir(t, m, &store.Record{Role: store.RoleDest, State: store.Restored, PID: info.PID, StartTime: info.StartTime + 1}, 0)
	if err := m.Recover(); err != nil {
		t.Fatal(err)
	}
	if s := state(t, cmd.Process.Pid, 300*time.Millisecond); s != 'T' {
		t.Fatalf("a process that only shares the recorded pid was signalled (state %c)", s)
	}
}

// TestRecoverKillsLeftHelpers: a CRIU helper (here standing in: a process
// named like lazy-pages) left working in the directory of a session the
// previous run gave up is killed at recovery; anything else there is left
// alone.
func TestRecoverKillsLeftHelpers(t *testing.T) {
	m, _ := newTestManager(t, time.Second)
	_, dir := sessionDir(t, m, &store.Record{Role: store.RoleDest, State: store.Receiving}, 0)
	start := func(argv0 string) *exec.Cmd {
		cmd := &exec.Cmd{Path: "/bin/sleep", Args: []string{argv0, "600"}, Dir: dir}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	helper := start("criu lazy-pages --page-server")
	other := start("sleep")
	if err := m.Recover(); err != nil {
		t.Fatal(err)
	}
	if err := helper.Wait(); err == nil {
		t.Error("the left lazy-pages daemon survived recovery")
	}
	time.Sleep(100 * time.Millisecond)
	if s := state(t, other.Process.Pid, 0); s == 'X' || s == 'Z' {
		t.Error("recovery killed a process that is not a CRIU helper")
	}
}
