//go:build linux

package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/journal"
	"github.com/phaul/phaul/pkg/proc"
)

// journald is a systemd-journald the test started: its sockets are the
// host's usual ones, its storage a tmpfs in a mount namespace of its own,
// so the test writes nothing to the host's journal files.
type journald struct {
	cmd *exec.Cmd
}

func startJournald(t *testing.T) *journald {
	t.Helper()
	if _, err := os.Stat("/run/systemd/journal"); err == nil {
		t.Fatal("/run/systemd/journal exists: another journald runs here; this test starts its own")
	}
	j := &journald{cmd: exec.Command("unshare", "--mount", "--propagation", "private", "--",
		"sh", "-c", "mkdir -p /var/log/journal && mount -t tmpfs tmpfs /var/log/journal && exec /lib/systemd/systemd-journald")}
	if err := j.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		j.cmd.Process.Kill()
		j.cmd.Wait()
		os.RemoveAll("/run/systemd/journal")
		os.RemoveAll("/run/log/journal")
	})
	waitFor(t, "journald's stdout socket", 10*time.Second, journal.HasStreams)
	return j
}

// query runs journalctl in journald's mount namespace (where its files
// are) and returns the entries as JSON objects.
func (j *journald) query(t *testing.T, args ...string) []map[string]any {
	t.Helper()
	cmd := exec.Command("nsenter", append([]string{"-t", strconv.Itoa(j.cmd.Process.Pid), "-m", "--",
		"journalctl", "--no-pager", "-o", "json"}, args...)...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("journalctl %v: %v", args, err)
	}
	var entries []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var e map[string]any
		if json.Unmarshal(sc.Bytes(), &e) == nil {
			entries = append(entries, e)
		}
	}
	return entries
}

// journalStderr connects a stream to journald for a daemon's stdout and
// stderr, as systemd does for a service, and returns it with the
// JOURNAL_STREAM value that tells the daemon so.
func journalStderr(t *testing.T, identifier string) (*os.File, string) {
	t.Helper()
	f, err := journal.NewStream(identifier, 6)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return f, fmt.Sprintf("%d:%d", st.Dev, st.Ino)
}

// TestJournal runs both daemons with stderr on the journal, as systemd
// starts them, and migrates a process whose own stdout is a journal
// stream: the daemons' lines for the migration are found with
// `journalctl PHAUL_SESSION=ID`, with their fields and priorities, and the
// process, migrated, writes to the journal again through a new stream.
func TestJournal(t *testing.T) {
	integration(t)
	j := startJournald(t)
	a := startDaemon(t, "A", "127.0.0.1:17501", daemonOpts{journal: true})
	b := startDaemon(t, "B", "127.0.0.2:17502", daemonOpts{journal: true})

	// The workload, started as systemd starts a service: stdout and
	// stderr on a journal stream.
	stream, _ := journalStderr(t, "workload")
	w := startWorkload(t, workloadOpts{memMiB: 16, stdout: stream})
	before := w.report(w.pid, w.status)
	res := a.migrate(t, w.pid, b)
	w.track(res.DestPID)
	waitRunning(t, res.DestPID)
	after := w.report(res.DestPID, w.status)
	checkIntact(t, "the journal-writing process", after, before, w.memMiB, w.seed)

	// Its output after the migration reached the journal, from the new
	// host pid.
	want := fmt.Sprintf("report %d: counter %d, host pid %d", after.Seq, after.Counter, res.DestPID)
	waitFor(t, "the migrated process's line in the journal", 10*time.Second, func() bool {
		for _, e := range j.query(t, "SYSLOG_IDENTIFIER=workload") {
			if e["MESSAGE"] == want {
				return true
			}
		}
		return false
	})
	// Its stdout is a socket connected to journald's stdout socket.
	peers, err := proc.UnixStreamPeers([]int{res.DestPID})
	if err != nil {
		t.Fatal(err)
	}
	connected := false
	for _, p := range peers {
		connected = connected || p == journal.StreamPath
	}
	if !connected {
		t.Errorf("the migrated process has no journal stream: %v", peers)
	}

	// The daemons' lines for this migration, by session.
	var entries []map[string]any
	waitFor(t, "the daemons' lines in the journal", 10*time.Second, func() bool {
		entries = j.query(t, "PHAUL_SESSION="+res.ID)
		return len(entries) > 0
	})
	phases := map[string]bool{}
	daemons := map[string]bool{}
	succeeded, dumpStats := 0, 0
	for _, e := range entries {
		if p, ok := e["PHAUL_PHASE"].(string); ok {
			phases[p] = true
		}
		if e["SYSLOG_IDENTIFIER"] != "phauld" {
			t.Errorf("entry with SYSLOG_IDENTIFIER %v", e["SYSLOG_IDENTIFIER"])
		}
		if pid, ok := e["PHAUL_PID"].(string); ok && pid != strconv.Itoa(w.pid) {
			t.Errorf("PHAUL_PID %s, want the source pid %d", pid, w.pid)
		}
		if _, ok := e["PHAUL_PEER"]; !ok {
			t.Errorf("entry without PHAUL_PEER: %v", e["MESSAGE"])
		}
		daemons[fmt.Sprint(e["_PID"])] = true
		if e["MESSAGE"] == "migration succeeded" {
			if e["PRIORITY"] != "6" {
				t.Errorf("'migration succeeded' at priority %v, want 6 (info)", e["PRIORITY"])
			}
			// The figures, as fields: the mode and CRIU's stats (the
			// dump's on the source).
			if e["PHAUL_MODE"] != res.Mode || e["PHAUL_RESTORE_US"] == nil {
				t.Errorf("'migration succeeded' lacks the figures: mode %v (want %s), restore_us %v",
					e["PHAUL_MODE"], res.Mode, e["PHAUL_RESTORE_US"])
			}
			if e["PHAUL_FROZEN_US"] != nil && e["PHAUL_PAGES_WRITTEN"] != nil && e["PHAUL_PAGES_LAZY"] != nil {
				dumpStats++
			}
			succeeded++
		}
	}
	for _, p := range []string{"prepare", "dump", "restore", "commit"} {
		if !phases[p] {
			t.Errorf("no line for phase %s among %d entries for session %s", p, len(entries), res.ID)
		}
	}
	if len(daemons) != 2 {
		t.Errorf("lines from %d daemons, want both", len(daemons))
	}
	if succeeded != 2 || dumpStats != 1 {
		t.Errorf("%d 'migration succeeded' entries, %d with the dump's stats; want one per daemon, the source's with them", succeeded, dumpStats)
	}
	if !strings.Contains(fmt.Sprint(j.query(t, "PHAUL_SESSION="+res.ID, "PRIORITY=6")), "phase done") {
		t.Error("journalctl cannot select the session's entries by priority")
	}
}

// TestJournalNoJournaldThere migrates a process that writes to the journal
// to a destination without journald: the destination refuses it in
// prepare, before the source freezes or dumps anything, saying what to
// do; the process runs on at the source, untouched.
func TestJournalNoJournaldThere(t *testing.T) {
	integration(t)
	startJournald(t)
	a := startDaemon(t, "A", "127.0.0.1:17511", daemonOpts{})
	// B sees no journald: an empty /run/systemd/journal in its own mount
	// namespace.
	b := startDaemon(t, "B", "127.0.0.2:17512", daemonOpts{wrap: []string{
		"unshare", "--mount", "--propagation", "private", "--",
		"sh", "-c", `mount -t tmpfs tmpfs /run/systemd/journal && exec "$0" "$@"`}})

	stream, _ := journalStderr(t, "workload")
	w := startWorkload(t, workloadOpts{memMiB: 16, stdout: stream})
	info := waitRunning(t, w.pid)
	before := w.report(w.pid, w.status)
	r := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(w.pid), "--to", b.addr)
	if r.code == 0 {
		t.Fatalf("migration to a host without journald succeeded: %s", r.stdout)
	}
	if !strings.Contains(r.stderr, "the destination has no journald") || !strings.Contains(r.stderr, "run systemd-journald there, or migrate elsewhere") {
		t.Errorf("phaulctl migrate exited %d and said:\n%s", r.code, r.stderr)
	}
	if got := waitRunning(t, w.pid); got.StartTime != info.StartTime {
		t.Fatal("the source process was replaced")
	}
	checkIntact(t, "the refused process", w.report(w.pid, w.status), before, w.memMiB, w.seed)
	// The source's prepare never finished: it froze and dumped nothing.
	if strings.Contains(a.log(), "phase done") {
		t.Errorf("A went past prepare for a migration the destination refused there:\n%s", a.log())
	}
}
