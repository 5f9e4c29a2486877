//go:build linux

package proc

import (
	"bufio"
	"bytes"
	"debug/elf"
	"encoding/hex"
	"os"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// File is a regular file a tree has open, mapped or runs, by path, as a
// restore will look for it: CRIU reopens each by its path and refuses it
// when its mode, or its size (unless only appended to), is not what it
// was, or when a mapped program's or library's ELF build-id differs.
type File struct {
	Path string
	Mode uint32
	// Size is its size, and CheckSize whether a restore checks it (not
	// for a file open only for appending: a log grows).
	Size      int64
	CheckSize bool
	// BuildID is the ELF build-id of a program or library it runs
	// (hex), if it has one.
	BuildID string
}

// Files lists the regular files the processes pids have open, map or
// run, each once, by path: not deleted ones (their content travels in
// the images), nor those under /proc, /sys and /dev. Run it as root.
func Files(pids []int) []File {
	byPath := map[string]*File{}
	add := func(path, via string, checkSize, exec bool) {
		if !strings.HasPrefix(path, "/") || strings.HasSuffix(path, " (deleted)") ||
			strings.HasPrefix(path, "/proc/") || strings.HasPrefix(path, "/sys/") || strings.HasPrefix(path, "/dev/") {
			return
		}
		var st unix.Stat_t
		if unix.Stat(via, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Nlink == 0 {
			return
		}
		f := byPath[path]
		if f == nil {
			f = &File{Path: path, Mode: st.Mode, Size: st.Size}
			byPath[path] = f
		}
		f.CheckSize = f.CheckSize || checkSize
		if exec && f.BuildID == "" {
			f.BuildID = BuildID(via)
		}
	}
	for _, pid := range pids {
		dir := "/proc/" + strconv.Itoa(pid)
		if exe, err := os.Readlink(dir + "/exe"); err == nil {
			add(exe, dir+"/exe", true, true)
		}
		ents, _ := os.ReadDir(dir + "/fd")
		for _, e := range ents {
			via := dir + "/fd/" + e.Name()
			path, err := os.Readlink(via)
			if err != nil {
				continue
			}
			add(path, via, !appendOnly(dir+"/fdinfo/"+e.Name()), false)
		}
		maps, err := os.ReadFile(dir + "/maps")
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(bytes.NewReader(maps))
		for sc.Scan() {
			// START-END PERMS OFFSET DEV INODE PATH
			f := strings.Fields(sc.Text())
			if len(f) < 6 || f[4] == "0" {
				continue
			}
			path := strings.Join(f[5:], " ")
			add(path, dir+"/map_files/"+f[0], true, strings.Contains(f[1], "x"))
		}
	}
	out := make([]File, 0, len(byPath))
	for _, f := range byPath {
		out = append(out, *f)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out
}

// appendOnly reports whether the descriptor whose fdinfo is at path is
// open write-only for appending (a log).
func appendOnly(fdinfo string) bool {
	b, err := os.ReadFile(fdinfo)
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "flags:"); ok {
			flags, err := strconv.ParseUint(strings.TrimSpace(v), 8, 64)
			return err == nil && flags&unix.O_ACCMODE == unix.O_WRONLY && flags&unix.O_APPEND != 0
		}
	}
	return false
}

// BuildID is the ELF build-id (hex) of the file at path, or "" if it is
// not an ELF file or has none.
func BuildID(path string) string {
	f, err := elf.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		b := make([]byte, p.Filesz)
		if _, err := p.ReadAt(b, 0); err != nil {
			continue
		}
		if id := noteBuildID(b, f.ByteOrder.Uint32); id != "" {
			return id
		}
	}
	return ""
}

// noteBuildID finds the GNU build-id note (type 3, name "GNU") in a note
// segment's contents.
func noteBuildID(b []byte, u32 func([]byte) uint32) string {
	align := func(n uint32) uint32 { return (n + 3) &^ 3 }
	for len(b) >= 12 {
		nameSz, descSz, typ := u32(b), u32(b[4:]), u32(b[8:])
		b = b[12:]
		if uint64(align(nameSz))+uint64(align(descSz)) > uint64(len(b)) {
			return ""
		}
		name, desc := b[:nameSz], b[align(nameSz):align(nameSz)+descSz]
		if typ == 3 && string(bytes.TrimRight(name, "\x00")) == "GNU" {
			return hex.EncodeToString(desc)
		}
		b = b[align(nameSz)+align(descSz):]
	}
	return ""
}
