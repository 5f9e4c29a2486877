//go:build linux

package migrate

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/access"
	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/wire"
)

// CRIU restores as root and reopens each file of the tree by the path
// its images record, following symlinks and checking only the file's
// size and mode. So the destination checks those paths itself before
// the restore (docs/security.md, "Files on the destination"):
//
//   - for every caller, no component of a path is a symlink here (CRIU
//     records resolved paths: a symlink here that the source did not have
//     would give the process another file than the one it had), every
//     directory on the way is one, and the file is of the type it was;
//   - for a caller other than root, also every directory on the way is
//     searchable by the caller's uid, gid and groups, and the file may be
//     opened by them with the flags it was open with (by the mode bits:
//     ACLs are not honoured), so that the restored tree gets no access
//     here that its user does not have.

// credOf is the access check's identity of a migration's caller: nil for
// root, whose access is not checked.
func credOf(c *wire.Caller) *access.Cred {
	if c == nil || c.UID == 0 {
		return nil
	}
	return &access.Cred{UID: c.UID, GID: c.GID, Groups: c.Groups}
}

// checkImagePaths checks the files the restore of the images will open
// by path (criu.PathFiles of them), for the migration's caller; tasks are
// the tree's pids as the images record them (a /proc/PID path of the tree
// is its own, made by the restore). Every refusal is listed (the first
// ten).
func checkImagePaths(files []criu.PathFile, caller *wire.Caller, tasks []int) error {
	cred := credOf(caller)
	own := map[int]bool{}
	for _, t := range tasks {
		own[t] = true
	}
	seen := map[string]bool{}
	var bad []string
	for _, f := range files {
		key := fmt.Sprintf("%s\x00%o\x00%o\x00%t\x00%t", f.Path, f.Mode, f.Flags, f.Remapped, f.Dir)
		if seen[key] {
			continue
		}
		seen[key] = true
		if why := checkImagePath(f, cred, own); why != "" {
			bad = append(bad, "file "+f.Path+": "+why)
		}
	}
	return pathRefusal(bad, caller)
}

// checkImagePath is why the restore may not open f here, or "".
func checkImagePath(f criu.PathFile, cred *access.Cred, own map[int]bool) string {
	if !strings.HasPrefix(f.Path, "/") {
		if cred == nil {
			return "" // not a path of the host's tree (CRIU's own business)
		}
		return "not an absolute path"
	}
	if rest, ok := strings.CutPrefix(f.Path, "/proc/"); ok {
		first, _, _ := strings.Cut(rest, "/")
		if pid, err := strconv.Atoi(first); err == nil {
			// A task's /proc: CRIU opens it in the restored tree's.
			if cred != nil && !own[pid] {
				return fmt.Sprintf("a file of process %d, which is not in the migrated tree", pid)
			}
			return ""
		}
	}
	var err error
	switch {
	case f.Remapped:
		// Deleted on the source: CRIU opens a file it makes from the
		// images (or the link the dump made, listed on its own).
		err = access.CheckParents(f.Path, cred)
	case f.Dir:
		err = access.Check(f.Path, f.Mode, access.Search, cred)
	default:
		err = access.Check(f.Path, f.Mode, access.NeedOf(f.Flags), cred)
	}
	if err == nil {
		return ""
	}
	var sl *access.SymlinkError
	if errors.As(err, &sl) {
		return err.Error() + ", which the source did not have"
	}
	return err.Error()
}

// checkPreparePaths is the check of checkImagePaths that can be made
// before the freeze, on the files the source listed in Prepare (how
// each is opened is known only from the images): no symlink on the
// way, the same type, and for a caller other than root every directory
// on the way searchable.
func checkPreparePaths(files []wire.FileCheck, caller *wire.Caller) error {
	cred := credOf(caller)
	var bad []string
	for _, f := range files {
		if err := access.Check(f.Path, f.Mode, 0, cred); err != nil {
			why := err.Error()
			var sl *access.SymlinkError
			if errors.As(err, &sl) {
				why += ", which the source did not have"
			}
			bad = append(bad, "file "+f.Path+": "+why)
		}
	}
	return pathRefusal(bad, caller)
}

// pathRefusal words the refusal of the files bad (nil if none).
func pathRefusal(bad []string, caller *wire.Caller) error {
	if len(bad) == 0 {
		return nil
	}
	n, more := len(bad), ""
	if n > 10 {
		more = fmt.Sprintf("; and %d more", n-10)
		bad = bad[:10]
	}
	list := strings.Join(bad, "; ") + more
	if cred := credOf(caller); cred != nil {
		return api.Errorf(api.CodePermission, "%s; refused for a migration asked by uid %d: CRIU restores as root and reopens each file by its path, and the restored process must get no access its user does not have on the destination",
			list, cred.UID)
	}
	return api.Errorf(api.CodePrecondition, "%s; refused: CRIU, reopening each file by its path, would give the process other files than it had. Make the paths the same on the destination as on the source",
		list)
}

// checkHeld checks, for a caller other than root, what the restored tree
// (pids, stopped: it has not run) holds, by the inodes themselves: each
// regular file, directory and device it has open, maps, runs or is in
// must be one the caller may open so (a deleted file, made from the
// images, and the terminals given it here, ttys by their device number,
// aside). checkImagePaths checked the paths before CRIU opened them;
// this closes the window between the two, in which a user able to
// change a directory on the way (its own) could have put a symlink
// there.
func checkHeld(pids []int, caller *wire.Caller, ttys map[uint64]bool) error {
	cred := credOf(caller)
	if cred == nil {
		return nil
	}
	var bad []string
	for _, pid := range pids {
		held, err := proc.HeldFiles(pid)
		if err != nil {
			return api.Errorf(api.CodeAborted, "what restored pid %d holds: %v", pid, err)
		}
		for _, h := range held {
			st := &h.Stat
			switch st.Mode & unix.S_IFMT {
			case unix.S_IFREG:
				if st.Nlink == 0 {
					continue
				}
			case unix.S_IFCHR:
				if ttys[st.Rdev] {
					continue
				}
			case unix.S_IFDIR, unix.S_IFBLK:
			default:
				continue // pipes, sockets, anonymous inodes: made by CRIU
			}
			need := access.NeedOf(h.Flags)
			if h.Exec {
				need = access.Search
			}
			if !access.May(st, need, cred) {
				bad = append(bad, fmt.Sprintf("pid %d's %s, %s (owner %d, group %d, mode %04o)", pid, h.What, h.Path, st.Uid, st.Gid, st.Mode&0o7777))
			}
		}
	}
	if len(bad) == 0 {
		return nil
	}
	more := ""
	if len(bad) > 10 {
		more = fmt.Sprintf("; and %d more", len(bad)-10)
		bad = bad[:10]
	}
	return api.Errorf(api.CodePermission, "the restored process holds files uid %d may not open so on the destination, though their paths passed the check before the restore (did a path change meanwhile?): %s%s; refused, and the copy killed before it ran",
		cred.UID, strings.Join(bad, "; "), more)
}
