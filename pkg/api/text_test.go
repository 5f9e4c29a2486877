package api

import (
	"strings"
	"testing"
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
	if len(long) > MaxPeerText+16 || !strings.HasSuffix(long, "(cut)") {
		t.Errorf("a long text is kept at %d bytes (%q...)", len(long), long[len(long)-10:])
	}
}

func TestKnownCodes(t *testing.T) {
	if !CodeAborted.Known() || !CodeInDoubt.Known() {
		t.Error("a code of the set is not known")
	}
	if Code("evil\x1b[2J").Known() || Code("").Known() {
		t.Error("a code outside the set is known")
	}
}
