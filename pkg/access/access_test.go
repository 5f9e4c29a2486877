//go:build linux

package access

import (
	"testing"

	"golang.org/x/sys/unix"
)

// The rights are those of the first class the user is in, as the
// kernel's: an owner is refused what only its group or others may do.
func TestMayClasses(t *testing.T) {
	st := &unix.Stat_t{Uid: 1000, Gid: 100, Mode: unix.S_IFREG | 0o066}
	for _, c := range []struct {
		cred *Cred
		need Need
		want bool
	}{
		{&Cred{UID: 1000, GID: 100}, Read, false}, // owner: ---
		{&Cred{UID: 1001, GID: 100}, Read | Write, true},
		{&Cred{UID: 1001, GID: 5, Groups: []uint32{100}}, Write, true},
		{&Cred{UID: 1001, GID: 5}, Read | Write, true}, // others: rw-
		{&Cred{UID: 1001, GID: 5}, Search, false},
		{nil, Read | Write | Search, true}, // root
	} {
		if got := May(st, c.need, c.cred); got != c.want {
			t.Errorf("%+v, need %b: %v, want %v", c.cred, c.need, got, c.want)
		}
	}
	for flags, want := range map[uint32]Need{unix.O_RDONLY: Read, unix.O_WRONLY | unix.O_APPEND: Write, unix.O_RDWR: Read | Write, unix.O_PATH: 0} {
		if got := NeedOf(flags); got != want {
			t.Errorf("NeedOf(%#o) = %b, want %b", flags, got, want)
		}
	}
}

// A path that is not absolute or not clean is refused, whoever asks.
func TestCheckPathShape(t *testing.T) {
	for _, p := range []string{"etc/passwd", "/etc/../etc/passwd", "/etc//passwd", "/etc/./passwd", "/etc/pass\x00wd"} {
		if err := Check(p, 0, 0, nil); err == nil {
			t.Errorf("%q accepted", p)
		}
	}
	if err := Check("/", unix.S_IFDIR, Search, &Cred{UID: 4242, GID: 4242}); err != nil {
		t.Errorf("/: %v", err)
	}
}
