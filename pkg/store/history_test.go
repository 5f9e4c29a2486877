//go:build linux

package store

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/phaul/phaul/pkg/api"
)

func TestHistory(t *testing.T) {
	dir := t.TempDir()
	h, err := OpenHistory(dir)
	if err != nil {
		t.Fatal(err)
	}
	if list, err := h.List(0); err != nil || len(list) != 0 {
		t.Fatalf("empty history: %v, %v", list, err)
	}
	for i := 0; i < 3; i++ {
		if err := h.Add(api.HistoryEntry{ID: fmt.Sprint("s", i), Direction: api.DirectionOut, Outcome: api.OutcomeCommitted}); err != nil {
			t.Fatal(err)
		}
	}
	// In doubt, then settled: the later entry wins.
	h.Add(api.HistoryEntry{ID: "s3", Direction: api.DirectionOut, Outcome: api.OutcomeInDoubt})
	h.Add(api.HistoryEntry{ID: "s3", Direction: api.DirectionOut, Outcome: api.OutcomeRolledBack})
	// The other end of s3, on the same host: a second entry.
	h.Add(api.HistoryEntry{ID: "s3", Direction: api.DirectionIn, Outcome: api.OutcomeRolledBack})

	// A torn last line (a crash mid-write) is skipped.
	f, _ := os.OpenFile(filepath.Join(dir, "history.jsonl"), os.O_WRONLY|os.O_APPEND, 0)
	f.WriteString(`{"id":"torn","direc`)
	f.Close()

	// Across a restart.
	h, err = OpenHistory(dir)
	if err != nil {
		t.Fatal(err)
	}
	list, err := h.List(0)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range list {
		got = append(got, e.ID+"/"+e.Direction+"/"+e.Outcome)
	}
	want := fmt.Sprint([]string{"s3/in/rolled-back", "s3/out/rolled-back", "s2/out/committed", "s1/out/committed", "s0/out/committed"})
	if fmt.Sprint(got) != want {
		t.Errorf("history = %v, want %v", got, want)
	}
	if two, _ := h.List(2); len(two) != 2 || two[0].ID != "s3" {
		t.Errorf("list(2) = %v", two)
	}
}

func TestHistoryTrimmed(t *testing.T) {
	dir := t.TempDir()
	h, err := OpenHistory(dir)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2*historyKeep+1; i++ {
		if err := h.Add(api.HistoryEntry{ID: fmt.Sprint(i), Direction: api.DirectionOut}); err != nil {
			t.Fatal(err)
		}
	}
	entries, _ := h.read()
	if len(entries) != historyKeep {
		t.Fatalf("%d entries after trimming, want %d", len(entries), historyKeep)
	}
	if last := entries[len(entries)-1].ID; last != fmt.Sprint(2*historyKeep) {
		t.Errorf("newest entry %s", last)
	}
}

// list never returns more than the history keeps, even before the file
// is trimmed (it is cut back only once it holds twice as many).
func TestHistoryListBound(t *testing.T) {
	h, err := OpenHistory(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < historyKeep+10; i++ {
		if err := h.Add(api.HistoryEntry{ID: fmt.Sprint(i), Direction: "out"}); err != nil {
			t.Fatal(err)
		}
	}
	for _, limit := range []int{0, -1, historyKeep + 5} {
		list, err := h.List(limit)
		if err != nil || len(list) != historyKeep {
			t.Fatalf("list(%d) = %d entries, %v; want %d", limit, len(list), err, historyKeep)
		}
	}
	if list, _ := h.List(3); len(list) != 3 || list[0].ID != fmt.Sprint(historyKeep+9) {
		t.Fatalf("list(3) = %+v; want the newest three, newest first", list)
	}
}
