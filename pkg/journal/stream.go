//go:build linux

package journal

import (
	"fmt"
	"net"
	"os"
)

// StreamPath is journald's socket for stdout streams: what systemd
// connects a service's stdout and stderr to.
const StreamPath = "/run/systemd/journal/stdout"

// HasStreams reports whether journald accepts stdout streams here.
func HasStreams() bool {
	fi, err := os.Stat(StreamPath)
	return err == nil && fi.Mode().Type() == os.ModeSocket
}

// NewStream opens a stdout stream to journald, as systemd does for a
// service, and returns its socket: what is written to it becomes journal
// entries with SYSLOG_IDENTIFIER=identifier and the given syslog priority;
// lines may start with a <N> priority prefix.
func NewStream(identifier string, priority int) (*os.File, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: StreamPath, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("journal stream: %w", err)
	}
	defer c.Close()
	// The stream protocol's header: identifier, unit id (empty), priority,
	// level prefix, and forwarding to syslog, kmsg and console (off).
	header := fmt.Sprintf("%s\n\n%d\n1\n0\n0\n0\n", identifier, priority)
	if _, err := c.Write([]byte(header)); err != nil {
		return nil, fmt.Errorf("journal stream: %w", err)
	}
	if err := c.CloseRead(); err != nil {
		return nil, fmt.Errorf("journal stream: %w", err)
	}
	f, err := c.File()
	if err != nil {
		return nil, fmt.Errorf("journal stream: %w", err)
	}
	return f, nil
}
