//go:build linux

package migrate

import (
	"strings"
	"testing"
)

// TestPageServerLimit: no more page servers than the limit run at once; a
// slot given back (twice, harmlessly) lets the next one start; the
// refusal names the flag.
func TestPageServerLimit(t *testing.T) {
	l := &Limits{PageServers: 2}
	r1, err := l.takePageServer()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.takePageServer(); err != nil {
		t.Fatal(err)
	}
	_, err = l.takePageServer()
	if err == nil || !strings.Contains(err.Error(), "--max-page-servers") {
		t.Fatalf("third page server: %v, want a refusal naming --max-page-servers", err)
	}
	r1()
	r1()
	if _, err := l.takePageServer(); err != nil {
		t.Fatalf("after a release: %v", err)
	}
	if _, err := l.takePageServer(); err == nil {
		t.Fatal("a slot released twice was counted twice")
	}
	var none *Limits
	if _, err := none.takePageServer(); err != nil {
		t.Fatalf("no limits: %v", err)
	}
}

// TestDiskLimit: a session's writes are refused once they would pass its
// limit, the sessions' together once they would pass the total (until a
// session ends), and any once the filesystem would keep less free than
// asked; each refusal names its flag.
func TestDiskLimit(t *testing.T) {
	l := &Limits{SessionDisk: 10 << 20, TotalDisk: 15 << 20}
	a := disk{l: l, dir: t.TempDir()}
	b := disk{l: l, dir: t.TempDir()}
	if err := a.add(8 << 20); err != nil {
		t.Fatal(err)
	}
	if err := a.add(3 << 20); err == nil || !strings.Contains(err.Error(), "--max-session-disk") {
		t.Fatalf("past the session's limit: %v", err)
	}
	if err := b.add(6 << 20); err != nil {
		t.Fatal(err)
	}
	if err := b.add(2 << 20); err == nil || !strings.Contains(err.Error(), "--max-disk") {
		t.Fatalf("past the total: %v", err)
	}
	a.release()
	if err := b.add(2 << 20); err != nil {
		t.Fatalf("after the other session ended: %v", err)
	}

	full := disk{l: &Limits{MinFree: FreeSpace{Bytes: 1 << 60}}, dir: t.TempDir()}
	if err := full.add(1); err == nil || !strings.Contains(err.Error(), "--min-free-disk") {
		t.Fatalf("keeping an exabyte free: %v", err)
	}
	if err := full.checkFree(0); err == nil {
		t.Fatal("checkFree: no refusal")
	}
	ok := disk{l: &Limits{MinFree: FreeSpace{Percent: 0.0001}}, dir: t.TempDir()}
	if err := ok.checkFree(0); err != nil {
		t.Fatalf("keeping a millionth free: %v", err)
	}
}
