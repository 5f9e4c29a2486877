//go:build linux

package criu

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	criucore "github.com/checkpoint-restore/go-criu/v7/crit/images/criu-core"
	"github.com/checkpoint-restore/go-criu/v7/magic"
	"google.golang.org/protobuf/proto"
)

// taskStopped is CRIU's TASK_STOPPED (compel's COMPEL_TASK_STOPPED): the
// task was stopped by a job-control signal when CRIU froze it.
const taskStopped = 3

// maxCoreEntry bounds a core image's entry: registers, signal masks and
// the like, a few kilobytes.
const maxCoreEntry = 1 << 20

// StoppedTasks lists the tasks of the dump in dir that were stopped (by
// SIGSTOP or SIGTSTP) when CRIU froze them, by their pid in the images:
// their pid in their own pid namespace, which a restore gives them back.
// CRIU keeps such a task stopped when it rolls a dump back, but with
// leave_stopped every task ends stopped, and whoever resumes the tree
// must leave these alone. It returns nil, and no error, if dir holds no
// core images (the dump had not written them).
func StoppedTasks(dir string) (map[int]bool, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "core-*.img"))
	if err != nil {
		return nil, err
	}
	if len(paths) == 0 {
		return nil, nil // no dump here (yet)
	}
	m := magic.LoadMagic()
	common, core := uint32(m.ByName["IMG_COMMON"]), uint32(m.ByName["CORE"])
	stopped := map[int]bool{}
	for _, path := range paths {
		pid, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(filepath.Base(path), "core-"), ".img"))
		if err != nil {
			continue
		}
		e := &criucore.CoreEntry{}
		if err := readEntry(path, common, core, e); err != nil {
			return nil, err
		}
		if e.GetTc().GetTaskState() == taskStopped {
			stopped[pid] = true
		}
	}
	return stopped, nil
}

// readEntry decodes the first entry of a CRIU image: two magics, a payload
// size, then the protobuf payload. Unlike go-criu's reader it checks every
// length before slicing.
func readEntry(path string, primary, secondary uint32, e proto.Message) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if len(b) < 12 {
		return fmt.Errorf("%s: short image", path)
	}
	if binary.LittleEndian.Uint32(b[0:]) != primary || binary.LittleEndian.Uint32(b[4:]) != secondary {
		return fmt.Errorf("%s: not the CRIU image expected", path)
	}
	n := binary.LittleEndian.Uint32(b[8:])
	if n > maxCoreEntry || uint64(n) > uint64(len(b)-12) {
		return fmt.Errorf("%s: entry of %d bytes exceeds the image", path, n)
	}
	if err := proto.Unmarshal(b[12:12+int(n)], e); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}
