//go:build linux

package transport

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"
)

// maxSunPath is what a Unix socket address holds (sun_path, NUL-ended).
const maxSunPath = 107

// ListenUnixPath listens on a Unix socket at path, even when path is
// longer than a socket address holds (a deep --state-dir): then through
// /proc/self/fd of its directory, opened for the call.
func ListenUnixPath(path string) (*net.UnixListener, error) {
	addr, done, err := shortPath(path)
	if err != nil {
		return nil, err
	}
	defer done()
	return net.ListenUnix("unix", &net.UnixAddr{Name: addr, Net: "unix"})
}

// DialUnixPath connects to the Unix socket at path (see ListenUnixPath).
func DialUnixPath(path string, timeout time.Duration) (net.Conn, error) {
	addr, done, err := shortPath(path)
	if err != nil {
		return nil, err
	}
	defer done()
	return net.DialTimeout("unix", addr, timeout)
}

func shortPath(path string) (string, func(), error) {
	if len(path) <= maxSunPath {
		return path, func() {}, nil
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return "", nil, err
	}
	short := fmt.Sprintf("/proc/self/fd/%d/%s", d.Fd(), filepath.Base(path))
	if len(short) > maxSunPath {
		d.Close()
		return "", nil, fmt.Errorf("unix socket name %q too long", filepath.Base(path))
	}
	return short, func() { d.Close() }, nil
}
