//go:build linux

package migratetest

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/phaul/phaul/pkg/proc"
)

// core is the fake core image, core-<pid>.img: what a restore needs to
// start the process again and to check its memory.
type core struct {
	PID  int      `json:"pid"`
	Exe  string   `json:"exe"`
	Argv []string `json:"argv"`
	// Tree is every pid the dump froze, root first.
	Tree []int `json:"tree"`
	// Stopped are the tasks job control had stopped when the dump froze
	// them, by their pid in their own pid namespace (as CRIU's
	// TASK_STOPPED): a rollback leaves them stopped.
	Stopped []int `json:"stopped,omitempty"`
	// RootStopped: the root is one of them.
	RootStopped bool `json:"root_stopped,omitempty"`
	// Memory is the size of the fake memory, SHA256 its checksum.
	Memory int    `json:"memory"`
	SHA256 string `json:"sha256"`
	Lazy   bool   `json:"lazy,omitempty"`
	// Images are the checksums of the other image files, by name.
	Images map[string]string `json:"images"`
}

// PagesImage is the file a page server writes the page stream into (and
// a dump without a page socket writes its memory into).
const PagesImage = "pages-1.img"

func coreName(pid int) string { return "core-" + strconv.Itoa(pid) + ".img" }

// pattern is size deterministic bytes drawn from seed.
func pattern(seed uint64, size int) []byte {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	b := make([]byte, size)
	rand.NewChaCha8(key).Read(b)
	return b
}

// memory is the fake memory of the tree rooted at pid.
func memory(pid, size int, compressible bool) []byte {
	b := pattern(uint64(pid), size)
	if compressible {
		// Every other page zero, as a process's memory often is.
		for off := 4096; off < size; off += 8192 {
			clear(b[off:min(off+4096, size)])
		}
	}
	return b
}

func checksum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// describe reads what a restore will need of pid: its program and argv.
func describe(pid int) (exe string, argv []string, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return "", nil, err
	}
	for _, a := range bytes.Split(bytes.TrimSuffix(b, []byte{0}), []byte{0}) {
		argv = append(argv, string(a))
	}
	if len(argv) == 0 || argv[0] == "" {
		return "", nil, fmt.Errorf("pid %d has no command line", pid)
	}
	exe, err = os.Readlink("/proc/" + strconv.Itoa(pid) + "/exe")
	if err != nil || strings.HasSuffix(exe, " (deleted)") {
		exe = argv[0]
	}
	return exe, argv, nil
}

// writeImages writes the images of a frozen tree into dir, and returns its
// core and memory.
func (c *CRIU) writeImages(dir string, tree []*proc.Process, stopped map[int]bool, lazy bool) (core, []byte, error) {
	root := tree[0].PID
	exe, argv, err := describe(root)
	if err != nil {
		return core{}, nil, err
	}
	mem := memory(root, c.cfg.Memory, c.cfg.Compressible)
	co := core{PID: root, Exe: exe, Argv: argv, Memory: len(mem), SHA256: checksum(mem), Lazy: lazy,
		RootStopped: stopped[root], Images: map[string]string{}}
	for _, p := range tree {
		co.Tree = append(co.Tree, p.PID)
		if stopped[p.PID] {
			ns, err := proc.NSPid(p.PID)
			if err != nil {
				return core{}, nil, err
			}
			co.Stopped = append(co.Stopped, ns)
		}
	}
	mm := pattern(uint64(root)<<1|1<<63, c.cfg.ImageSize)
	if c.cfg.Compressible {
		clear(mm[len(mm)/2:])
	}
	mmName := "mm-" + strconv.Itoa(root) + ".img"
	co.Images[mmName] = checksum(mm)
	if err := writeFile(filepath.Join(dir, mmName), mm); err != nil {
		return core{}, nil, err
	}
	b, err := json.Marshal(co)
	if err != nil {
		return core{}, nil, err
	}
	if err := writeFile(filepath.Join(dir, coreName(root)), b); err != nil {
		return core{}, nil, err
	}
	return co, mem, nil
}

// readCore reads and checks the images in dir: the core image of the
// tree's root (the lowest pid, if several), and the files it lists.
func readCore(dir string) (core, error) {
	names, err := filepath.Glob(filepath.Join(dir, "core-*.img"))
	if err != nil {
		return core{}, err
	}
	if len(names) == 0 {
		return core{}, errors.New("no core image: nothing to restore")
	}
	// The lowest pid first: shorter names, then by name.
	sort.Slice(names, func(i, j int) bool {
		return len(names[i]) < len(names[j]) || len(names[i]) == len(names[j]) && names[i] < names[j]
	})
	b, err := os.ReadFile(names[0])
	if err != nil {
		return core{}, err
	}
	var co core
	if err := json.Unmarshal(b, &co); err != nil || co.PID <= 0 || len(co.Argv) == 0 || co.Exe == "" {
		return core{}, fmt.Errorf("corrupt core image %s", filepath.Base(names[0]))
	}
	for name, sum := range co.Images {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return core{}, fmt.Errorf("image %s: %w", name, err)
		}
		if checksum(b) != sum {
			return core{}, fmt.Errorf("image %s corrupt", name)
		}
	}
	return co, nil
}

// frozen is a tree a fake dump froze.
type frozen struct {
	tree []*proc.Process
	// stopped are the pids job control had stopped before the freeze.
	stopped map[int]bool
}

// freeze stops every process of the tree rooted at pid, as CRIU's freezer
// does, and waits until each is stopped. It notes which were stopped
// already.
func freeze(pid int) (*frozen, error) {
	tree, err := proc.OpenTree(pid, 0)
	if err != nil {
		return nil, err
	}
	f := &frozen{tree: tree, stopped: map[int]bool{}}
	for _, p := range tree {
		if info, err := proc.Stat(p.PID); err == nil && info.State == 'T' {
			f.stopped[p.PID] = true
		}
	}
	if err := proc.SignalAll(tree, syscall.SIGSTOP); err != nil {
		proc.CloseAll(tree)
		return nil, err
	}
	for _, p := range tree {
		if err := waitState(p.PID, 'T', 5*time.Second); err != nil {
			f.resume()
			proc.CloseAll(tree)
			return nil, err
		}
	}
	return f, nil
}

// resume lets a frozen tree run again, but for the tasks job control had
// stopped, and waits until it does.
func (f *frozen) resume() {
	var run []*proc.Process
	for _, p := range f.tree {
		if !f.stopped[p.PID] {
			run = append(run, p)
		}
	}
	proc.SignalAll(run, syscall.SIGCONT)
	waitResumed(run, 2*time.Second)
}

// Stopped lists the tasks of the dump in dir that job control had stopped
// when the fake dump froze them, by their pid in their own pid namespace,
// as criu.StoppedTasks does: nil if dir holds no dump.
func (c *CRIU) Stopped(dir string) (map[int]bool, error) {
	names, err := filepath.Glob(filepath.Join(dir, "core-*.img"))
	if err != nil || len(names) == 0 {
		return nil, err
	}
	stopped := map[int]bool{}
	for _, name := range names {
		b, err := os.ReadFile(name)
		if err != nil {
			return nil, err
		}
		var co core
		if err := json.Unmarshal(b, &co); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		for _, pid := range co.Stopped {
			stopped[pid] = true
		}
	}
	return stopped, nil
}

// killTree kills a dumped tree, as CRIU does after a dump that does not
// leave it stopped.
func killTree(tree []*proc.Process) {
	proc.SignalAll(tree, syscall.SIGKILL)
	proc.WaitExited(tree, 5*time.Second)
}

// writeFile writes an image file.
func writeFile(path string, b []byte) error {
	return os.WriteFile(path, b, 0o644) // as CRIU writes its images
}

// Taken is none: the fake restore keeps the tree it was given, on the
// pids it has.
func (c *CRIU) Taken(ids []int) []int { return nil }

// With Config.Framed the fake's page stream is framed as CRIU's page
// server protocol frames it (criu/page-xfer.c): one add of present pages
// (PS_IOV_ADD_F with PE_PRESENT, a 32-byte header), then the pages, so
// that a relay that reads the protocol (a pre-copy source's) reads it as
// it reads CRIU's.
const (
	psHeaderLen = 32
	psAddF      = 6
	pePresent   = 1 << 2
	fakeVaddr   = 0x7f0000000000
	fakeID      = 1<<8 | 1 // pid 1, a task's memory
)

// pageAdd is the header of an add of n bytes of pages.
func pageAdd(n int) []byte {
	b := binary.LittleEndian.AppendUint32(nil, pePresent<<16|psAddF)
	b = append(b, 0, 0, 0, 0)
	b = binary.LittleEndian.AppendUint64(b, uint64(n/4096))
	b = binary.LittleEndian.AppendUint64(b, fakeVaddr)
	return binary.LittleEndian.AppendUint64(b, fakeID)
}

// pagesOfAdd are the pages of a stream that pageAdd began.
func pagesOfAdd(b []byte) ([]byte, error) {
	if len(b) < psHeaderLen || !bytes.Equal(b[:psHeaderLen], pageAdd(len(b)-psHeaderLen)) {
		return nil, fmt.Errorf("a page stream of %d bytes that is not one add of its pages", len(b))
	}
	return b[psHeaderLen:], nil
}
