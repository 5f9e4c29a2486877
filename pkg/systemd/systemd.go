// Package systemd is phauld's side of systemd: socket activation,
// sd_notify and the watchdog, and scopes for migrated processes. Only the
// daemon imports it.
package systemd

import (
	"fmt"
	"net"
	"os"
	"sort"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
)

// Activated returns the listening sockets systemd passed to this process,
// by name (FileDescriptorName=, or LISTEN_FD_n). It consumes LISTEN_FDS and
// friends from the environment, so call it once. Without socket activation
// it returns an empty map.
func Activated() (map[string][]net.Listener, error) {
	return activation.ListenersWithNames()
}

// Split sorts activated listeners by address family: TCP listeners take
// migrations, a Unix stream listener serves the control API. Names do not
// matter, so a unit may name its sockets freely. It fails on anything else,
// and on more than one control socket.
func Split(named map[string][]net.Listener) (migration []net.Listener, control net.Listener, err error) {
	names := make([]string, 0, len(named))
	for n := range named {
		names = append(names, n)
	}
	sort.Strings(names) // a stable order for logs and errors
	for _, n := range names {
		for _, l := range named[n] {
			switch l.(type) {
			case *net.TCPListener:
				migration = append(migration, l)
			case *net.UnixListener:
				if l.Addr().Network() != "unix" {
					return nil, nil, fmt.Errorf("activated socket %q (%s %s) is not a Unix stream socket",
						n, l.Addr().Network(), l.Addr())
				}
				if control != nil {
					return nil, nil, fmt.Errorf("two control sockets activated (%s and %s): phauld serves one",
						control.Addr(), l.Addr())
				}
				control = l
			default:
				return nil, nil, fmt.Errorf("activated socket %q (%s %s) is neither TCP nor a Unix stream socket",
					n, l.Addr().Network(), l.Addr())
			}
		}
	}
	return migration, control, nil
}

// Notify sends state to the service manager (READY=1, STATUS=..., ...).
// Outside systemd it does nothing.
func Notify(state string) error {
	_, err := daemon.SdNotify(false, state)
	return err
}

// Booted reports whether systemd is this system's service manager.
func Booted() bool {
	fi, err := os.Lstat("/run/systemd/system")
	return err == nil && fi.IsDir()
}

// WatchdogInterval is how often the service manager wants WATCHDOG=1, or
// 0 if it does not.
func WatchdogInterval() time.Duration {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		return 0
	}
	return d
}
