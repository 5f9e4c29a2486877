//go:build linux

package criu

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// LazyPipeSize is the pipe size a lazy dump needs: CRIU keeps the pages it
// will serve in pipes, and with the kernel's default limit (1 MiB) its
// page pipes fail ("page-pipe: splice: -1: Bad file descriptor").
const LazyPipeSize = 4 << 20

// pipeMaxSizePath is the sysctl fs.pipe-max-size.
var pipeMaxSizePath = "/proc/sys/fs/pipe-max-size"

// EnsurePipeMaxSize raises fs.pipe-max-size to at least want, and returns
// what it was. It changes nothing if it is already large enough.
func EnsurePipeMaxSize(want int) (was int, err error) {
	b, err := os.ReadFile(pipeMaxSizePath)
	if err != nil {
		return 0, fmt.Errorf("read fs.pipe-max-size: %w", err)
	}
	was, err = strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("read fs.pipe-max-size: %w", err)
	}
	if was >= want {
		return was, nil
	}
	if err := os.WriteFile(pipeMaxSizePath, []byte(strconv.Itoa(want)), 0o644); err != nil {
		return was, fmt.Errorf("raise fs.pipe-max-size from %d to %d: %w", was, want, err)
	}
	return was, nil
}
