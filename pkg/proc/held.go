//go:build linux

package proc

import (
	"bufio"
	"bytes"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Held is a file a process has: a descriptor, a file mapping, its
// program, its working directory or root, as the kernel has it (by the
// inode, whatever its path now).
type Held struct {
	// What is which of them: "fd N", "mapping START-END", "exe", "cwd"
	// or "root"; Path is the path /proc shows for it.
	What, Path string
	Stat       unix.Stat_t
	// Flags are a descriptor's open flags; a mapping's are O_RDWR if it
	// is shared and writable (it writes the file), else O_RDONLY.
	Flags uint32
	// Exec: a program, a working directory or a root, which need the
	// x bit rather than open flags.
	Exec bool
}

// HeldFiles lists what process pid holds. Entries that vanish while it
// looks (a descriptor closed) are left out; a process that is gone is an
// error.
func HeldFiles(pid int) ([]Held, error) {
	dir := "/proc/" + strconv.Itoa(pid)
	var out []Held
	add := func(h Held, via string) {
		if err := unix.Stat(via, &h.Stat); err != nil {
			return
		}
		h.Path, _ = os.Readlink(via)
		out = append(out, h)
	}
	for _, x := range []string{"exe", "cwd", "root"} {
		add(Held{What: x, Exec: true}, dir+"/"+x)
	}
	ents, err := os.ReadDir(dir + "/fd")
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		flags, ok := fdFlags(dir + "/fdinfo/" + e.Name())
		if !ok {
			continue
		}
		add(Held{What: "fd " + e.Name(), Flags: flags}, dir+"/fd/"+e.Name())
	}
	maps, err := os.ReadFile(dir + "/maps")
	if err != nil {
		return nil, err
	}
	sc := bufio.NewScanner(bytes.NewReader(maps))
	for sc.Scan() {
		// START-END PERMS OFFSET DEV INODE PATH
		f := strings.Fields(sc.Text())
		if len(f) < 6 || f[4] == "0" {
			continue
		}
		flags := uint32(unix.O_RDONLY)
		if len(f[1]) == 4 && f[1][1] == 'w' && f[1][3] == 's' {
			flags = unix.O_RDWR
		}
		add(Held{What: "mapping " + f[0], Flags: flags}, dir+"/map_files/"+f[0])
	}
	return out, nil
}

// fdFlags are the open flags of the descriptor whose fdinfo is at path.
func fdFlags(fdinfo string) (uint32, bool) {
	b, err := os.ReadFile(fdinfo)
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "flags:"); ok {
			flags, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32)
			return uint32(flags), err == nil
		}
	}
	return 0, false
}
