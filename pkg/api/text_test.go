package api

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestClean(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"plain text, with ünïcode", "plain text, with ünïcode"},
		{"red \x1b[31mALERT\x1b[0m", `red \x1b[31mALERT\x1b[0m`},
		{"title \x1b]0;owned\x07", `title \x1b]0;owned\x07`},
		{"two\nlines\tand a tab", "two lines and a tab"},
		{"c1 \u009b31m", `c1 \x9b31m`},
		{"bidi \u202egnp.exe", `bidi \u202egnp.exe`},
		{"bad \xff utf-8", `bad \xff utf-8`},
		{"del \x7f", `del \x7f`},
	} {
		if got := Clean(c.in); got != c.want {
			t.Errorf("Clean(%q) = %q, want %q", c.in, got, c.want)
		}
	}
	long := Clean(strings.Repeat("a", 3*MaxPeerText))
	if len(long) > MaxPeerText || !strings.HasSuffix(long, "(cut)") {
		t.Errorf("a long text is kept at %d bytes (%q...)", len(long), long[len(long)-10:])
	}
	if s := strings.Repeat("é", MaxPeerText/2); Clean(s) != s {
		t.Errorf("a clean text of exactly %d bytes is changed", len(s))
	}
}

// TestCleanIsStable: cleaning what Clean returned changes nothing, cut
// or not, whatever was escaped where the cut falls (a message decoded,
// stored and decoded again stays the same).
func TestCleanIsStable(t *testing.T) {
	for _, s := range []string{
		strings.Repeat("\x1b", MaxPeerText),
		strings.Repeat("a", MaxPeerText-3) + "\x1b\x1b\x1b",
		strings.Repeat("a", MaxPeerText-7) + "\u202e" + "tail",
		strings.Repeat("\xff", MaxPeerText/3+1),
		strings.Repeat("é", MaxPeerText),
		strings.Repeat("a", MaxPeerText+1),
		"\ufffd plain",
		// Escaped bytes at the end: each grows fourfold, so the last
		// few input bytes are not the last piece of the output.
		strings.Repeat("a", MaxPeerText-10) + strings.Repeat("\x81", 4),
	} {
		once := Clean(s)
		if twice := Clean(once); twice != once || len(once) > MaxPeerText {
			t.Errorf("Clean is not stable on %.20q...: %d bytes, then %d", s, len(once), len(twice))
		}
	}
}

func FuzzClean(f *testing.F) {
	f.Add("red \x1b[31m")
	f.Fuzz(func(t *testing.T, s string) {
		once := Clean(s)
		if Clean(once) != once || len(once) > MaxPeerText {
			t.Fatalf("Clean(%q) = %q, not stable or too long", s, once)
		}
		if len(s) <= MaxPeerText && utf8.ValidString(s) && !strings.ContainsFunc(s, unsafeRune) && strings.ContainsRune(s, utf8.RuneError) == false && once != s {
			t.Fatalf("Clean changed a clean text %q into %q", s, once)
		}
	})
}

func TestKnownCodes(t *testing.T) {
	if !CodeAborted.Known() || !CodeInDoubt.Known() {
		t.Error("a code of the set is not known")
	}
	if Code("evil\x1b[2J").Known() || Code("").Known() {
		t.Error("a code outside the set is known")
	}
}
