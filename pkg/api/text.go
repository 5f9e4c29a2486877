package api

import (
	"strings"
	"unicode"
	"unicode/utf8"
)

// MaxPeerText bounds a message that came from the peer daemon (an error
// it reports): what is longer is cut, and says so.
const MaxPeerText = 2048

// Known reports whether c is one of the codes above: the set is closed,
// and a code from the wire outside it is refused.
func (c Code) Known() bool {
	switch c {
	case CodeInvalid, CodeNotFound, CodePermission, CodeUnavailable, CodePrecondition,
		CodeAborted, CodeInDoubt, CodeConflict, CodeCanceled, CodeInternal:
		return true
	}
	return false
}

// Clean makes text from elsewhere (the peer daemon, a record on disk)
// safe to store and print on a terminal: control characters (escape
// sequences included, and C1 controls), invalid UTF-8 and Unicode's
// bidirectional overrides are shown escaped, \x1b for instance; tabs and
// newlines become spaces. At most MaxPeerText bytes are kept.
func Clean(s string) string {
	clean := true
	for _, r := range s {
		if r == utf8.RuneError || unsafeRune(r) {
			clean = false
			break
		}
	}
	if clean && len(s) <= MaxPeerText {
		return s
	}
	// What Clean returns is clean and at most MaxPeerText bytes, so
	// that cleaning it again changes nothing (a message decoded, stored
	// and decoded again stays the same).
	const cut = "…(cut)"
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		var piece string
		switch {
		case r == utf8.RuneError && n <= 1:
			piece = `\x` + hex2(s[i])
		case r == '\t' || r == '\n' || r == '\r':
			piece = " "
		case unsafeRune(r) && r < 0x100:
			piece = `\x` + hex2(byte(r))
		case unsafeRune(r):
			piece = `\u` + hex2(byte(r>>8)) + hex2(byte(r))
		default:
			piece = s[i : i+n]
		}
		// Room is kept for the cut mark unless this is the input's
		// last piece and it fits.
		last := i+n == len(s)
		if b.Len()+len(piece) > MaxPeerText-len(cut) && (!last || b.Len()+len(piece) > MaxPeerText) {
			b.WriteString(cut)
			break
		}
		b.WriteString(piece)
		i += n
	}
	return b.String()
}

// unsafeRune: a rune a terminal may act on rather than show.
func unsafeRune(r rune) bool {
	if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
		return true
	}
	// Bidirectional embeddings, overrides and isolates reorder what
	// follows them on screen.
	if (r >= 0x202a && r <= 0x202e) || (r >= 0x2066 && r <= 0x2069) || r == 0x200e || r == 0x200f {
		return true
	}
	return unicode.Is(unicode.Cc, r)
}

func hex2(c byte) string {
	const digits = "0123456789abcdef"
	return string([]byte{digits[c>>4], digits[c&0xf]})
}
