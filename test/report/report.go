// Package report is what the test workload (test/workload) says about
// itself on SIGUSR1, and how tests, benchmarks and the soak ask for it.
package report

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/phaul/phaul/test/pattern"
)

// Report is the workload's state, as it writes it (JSON) to its status
// file.
type Report struct {
	// Token is random, chosen at start: a restarted process cannot pass
	// for the old one.
	Token   string `json:"token"`
	Seq     uint64 `json:"seq"`
	Counter uint64 `json:"counter"`
	// Sum is the checksum of its memory now, Expect at start.
	Sum     string `json:"sum"`
	Expect  string `json:"expect"`
	HostPID int    `json:"host_pid"`
	NSPID   int    `json:"ns_pid"`
	// MaxGapNS is the longest gap between two ticks since start; GapNS
	// since the report before (the pause a migration caused).
	MaxGapNS int64  `json:"max_gap_ns"`
	GapNS    int64  `json:"gap_ns"`
	MemMiB   int    `json:"mem_mib"`
	Seed     uint64 `json:"seed"`
	Child    int    `json:"child"`
	Written  string `json:"written"`
	// GhostSum is the checksum of the deleted file the workload holds
	// (--ghost), read through its descriptor; GhostExpect what it was
	// made with.
	GhostSum    string `json:"ghost_sum,omitempty"`
	GhostExpect string `json:"ghost_expect,omitempty"`
	// TextSum is the checksum of the compressible memory the workload
	// holds besides (--text), TextExpect what it was made with.
	TextSum    string `json:"text_sum,omitempty"`
	TextExpect string `json:"text_expect,omitempty"`
	// ChurnPages are the pages the workload rewrites with new contents
	// (--churn), ChurnBad those that hold another generation than it
	// recorded for them.
	ChurnPages int `json:"churn_pages,omitempty"`
	ChurnBad   int `json:"churn_bad,omitempty"`
}

// Read reads the report in path.
func Read(path string) (Report, error) {
	var r Report
	b, err := os.ReadFile(path)
	if err != nil {
		return r, err
	}
	err = json.Unmarshal(b, &r)
	return r, err
}

// Ask signals the workload (signal sends SIGUSR1 to it) and waits up to
// timeout for a new report in path.
func Ask(path string, signal func() error, timeout time.Duration) (Report, error) {
	before, _ := Read(path)
	if err := signal(); err != nil {
		return Report{}, err
	}
	deadline := time.Now().Add(timeout)
	for {
		if r, err := Read(path); err == nil && r.Seq > before.Seq {
			return r, nil
		}
		if time.Now().After(deadline) {
			return Report{}, fmt.Errorf("no new report in %s within %v", path, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// AskPID is Ask for the workload process pid on this host.
func AskPID(path string, pid int, timeout time.Duration) (Report, error) {
	return Ask(path, func() error {
		if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
			return fmt.Errorf("signal workload pid %d: %w", pid, err)
		}
		return nil
	}, timeout)
}

// ExpectedSum is the checksum a workload of memMiB MiB seeded by seed
// holds.
func ExpectedSum(memMiB int, seed uint64) string {
	return strconv.FormatUint(pattern.Expected(memMiB<<20, seed), 16)
}

// Intact says what is wrong with r, a report of the process that reported
// before, started with memMiB and seed: another process (token), memory
// changed, or a counter that did not go on; "" if nothing.
func Intact(r, before Report, memMiB int, seed uint64) string {
	if r.Token != before.Token {
		return fmt.Sprintf("token %s, was %s: this is not the same process", r.Token, before.Token)
	}
	want := ExpectedSum(memMiB, seed)
	if r.Sum != want || r.Expect != want {
		return fmt.Sprintf("memory checksum %s (at start %s), want %s", r.Sum, r.Expect, want)
	}
	if r.Counter <= before.Counter {
		return fmt.Sprintf("counter %d, was %d before: it did not go on", r.Counter, before.Counter)
	}
	if r.GhostSum != r.GhostExpect {
		return fmt.Sprintf("the deleted file it holds has checksum %s, want %s", r.GhostSum, r.GhostExpect)
	}
	if r.TextSum != r.TextExpect || r.TextExpect != before.TextExpect {
		return fmt.Sprintf("its compressible memory has checksum %s, want %s (before: %s)", r.TextSum, r.TextExpect, before.TextExpect)
	}
	if r.ChurnBad != 0 || r.ChurnPages != before.ChurnPages {
		return fmt.Sprintf("%d of the %d pages it rewrites hold another generation than it recorded (before: %d pages)", r.ChurnBad, r.ChurnPages, before.ChurnPages)
	}
	return ""
}
