//go:build linux

// Package access says whether a user may open a path on this host as a
// restore would, without following any symlink: each component is opened
// with openat2 and RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS, and the
// user's rights are worked out from each one's owner, group and mode bits.
// POSIX ACLs and capabilities are not honoured: a file an ACL alone opens
// to the user is refused (the safe side).
package access

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// Cred is the user a path is checked for: uid, primary gid and
// supplementary groups.
type Cred struct {
	UID, GID uint32
	Groups   []uint32
}

// Need is what opening the file needs of its mode bits.
type Need int

const (
	// Read and Write are the file's r and w bits; Search its x bit
	// (a directory entered, not read).
	Read Need = 1 << iota
	Write
	Search
)

// NeedOf is what open(2) with flags needs: nothing for O_PATH, else read,
// write, or both by the access mode.
func NeedOf(flags uint32) Need {
	if flags&unix.O_PATH != 0 {
		return 0
	}
	switch flags & unix.O_ACCMODE {
	case unix.O_WRONLY:
		return Write
	case unix.O_RDWR:
		return Read | Write
	}
	return Read
}

// Check checks the file at path (absolute) on this host: no component of
// the path is a symlink, every directory on the way is one (and, for a
// cred, searchable by it), the file is of type typ (an S_IFMT value; 0:
// any) and, for a cred, it may be opened with need. A nil cred is root,
// whose rights are not checked. The error says what is wrong, naming the
// component at fault.
func Check(path string, typ uint32, need Need, c *Cred) error {
	return walk(path, typ, need, c, false)
}

// CheckParents is Check for a file the restorer makes itself (a deleted
// file CRIU makes again from its images): only the directories on the
// way that exist are checked; the file and any missing directory are
// not.
func CheckParents(path string, c *Cred) error {
	return walk(path, 0, 0, c, true)
}

func walk(path string, typ uint32, need Need, c *Cred, parentsOnly bool) error {
	if !strings.HasPrefix(path, "/") || strings.ContainsRune(path, 0) {
		return fmt.Errorf("not an absolute path")
	}
	parts := strings.Split(strings.Trim(path, "/"), "/")
	if path == "/" {
		parts = nil
	}
	for _, p := range parts {
		if p == "" || p == "." || p == ".." {
			return fmt.Errorf("not a clean path")
		}
	}
	if parentsOnly {
		if len(parts) == 0 {
			return nil
		}
		parts = parts[:len(parts)-1]
	}
	dir, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer func() { unix.Close(dir) }()
	at := "/"
	var st unix.Stat_t
	if err := unix.Fstat(dir, &st); err != nil {
		return err
	}
	for i, p := range parts {
		// dir is a directory, and the next component is looked up in it.
		if !May(&st, Search, c) {
			return fmt.Errorf("directory %s is not searchable by uid %d", at, c.UID)
		}
		next := strings.TrimSuffix(at, "/") + "/" + p
		fd, err := unix.Openat2(dir, p, &unix.OpenHow{
			Flags:   unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC,
			Resolve: unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
		})
		if err != nil {
			if parentsOnly && errors.Is(err, unix.ENOENT) {
				return nil // made by the restorer
			}
			if errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("missing on this host (%s: %v)", next, err)
			}
			return fmt.Errorf("open %s: %w", next, err)
		}
		unix.Close(dir)
		dir, at = fd, next
		if err := unix.Fstat(dir, &st); err != nil {
			return fmt.Errorf("stat %s: %w", at, err)
		}
		last := i == len(parts)-1 && !parentsOnly
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			return &SymlinkError{Path: at}
		}
		if !last && st.Mode&unix.S_IFMT != unix.S_IFDIR {
			return fmt.Errorf("%s is %s on this host, not a directory", at, typeName(st.Mode))
		}
	}
	if parentsOnly {
		return nil
	}
	if typ != 0 && st.Mode&unix.S_IFMT != typ&unix.S_IFMT {
		return fmt.Errorf("%s on this host, where %s was expected", typeName(st.Mode), typeName(typ))
	}
	for _, n := range []struct {
		need Need
		what string
	}{{Read, "readable"}, {Write, "writable"}, {Search, "searchable"}} {
		if need&n.need != 0 && !May(&st, n.need, c) {
			return fmt.Errorf("not %s by uid %d on this host (owner %d, group %d, mode %04o)", n.what, c.UID, st.Uid, st.Gid, st.Mode&0o7777)
		}
	}
	return nil
}

// SymlinkError is a path refused because a component of it is a symlink.
type SymlinkError struct {
	// Path is the symlink's own path.
	Path string
}

func (e *SymlinkError) Error() string { return "a symlink on this host (" + e.Path + ")" }

// May reports whether c may do what need says to a file of st, by its
// mode bits, as the kernel picks them: the owner's if c owns it, else the
// group's if c is in its group, else the others'.
func May(st *unix.Stat_t, need Need, c *Cred) bool {
	if c == nil || need == 0 {
		return true
	}
	var bits uint32
	switch {
	case c.UID == st.Uid:
		bits = st.Mode >> 6
	case c.inGroup(st.Gid):
		bits = st.Mode >> 3
	default:
		bits = st.Mode
	}
	bits &= 7
	want := uint32(0)
	if need&Read != 0 {
		want |= 4
	}
	if need&Write != 0 {
		want |= 2
	}
	if need&Search != 0 {
		want |= 1
	}
	return bits&want == want
}

func (c *Cred) inGroup(gid uint32) bool {
	if c.GID == gid {
		return true
	}
	for _, g := range c.Groups {
		if g == gid {
			return true
		}
	}
	return false
}

// typeName names a file type, from an st_mode.
func typeName(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "a regular file"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFLNK:
		return "a symlink"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFIFO:
		return "a fifo"
	case unix.S_IFSOCK:
		return "a socket"
	}
	return fmt.Sprintf("a file of type %o", mode&unix.S_IFMT)
}
