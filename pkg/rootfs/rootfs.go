//go:build linux

// Package rootfs syncs a container's root filesystem with rsync (Debian's,
// for its delta transfer) carried over phaul's own link: no ssh, no other
// port. The source's rsync runs `phauld rsync-pipe SOCKET` as its remote
// shell; the pipe hands the remote command and then the byte stream to
// the source's session over SOCKET, which relays them to the destination,
// where the session runs its own receiving rsync server into the bundle
// it made.
package rootfs

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/phaul/phaul/pkg/transport"
)

// PipeCommand is the first argument that makes phauld run as rsync's
// remote shell (PipeMain).
const PipeCommand = "rsync-pipe"

// PipeMain is `phauld rsync-pipe SOCKET HOST CMD...`, run by the source's
// rsync: it sends CMD (the server command rsync wants run) as one JSON
// line on SOCKET, then copies its stdin to SOCKET and SOCKET to its
// stdout until the destination's end is over. It returns the exit code.
func PipeMain(args []string) int {
	if len(args) < 3 {
		fmt.Fprintf(os.Stderr, "phauld %s: want SOCKET HOST COMMAND... (rsync runs this for phauld)\n", PipeCommand)
		return 2
	}
	c, err := transport.DialUnixPath(args[0], 10*time.Second)
	if err != nil {
		fmt.Fprintf(os.Stderr, "phauld %s: %v\n", PipeCommand, err)
		return 1
	}
	defer c.Close()
	line, _ := json.Marshal(args[2:])
	if _, err := c.Write(append(line, '\n')); err != nil {
		return 1
	}
	// As a remote shell does: it ends when the remote side has (rsync
	// waits for it to, before it closes our stdin).
	go func() {
		io.Copy(c, os.Stdin)
		c.(*net.UnixConn).CloseWrite()
	}()
	io.Copy(os.Stdout, c)
	return 0
}

// Command is the source's rsync of src (a directory) to the
// destination's bundle, through exe's pipe on socket: archive mode with
// hard links and numeric ids, deleting what src no longer has.
func Command(exe, socket, src string) *exec.Cmd {
	shell := quote(exe) + " " + PipeCommand + " " + quote(socket)
	return exec.Command("rsync", "-aH", "--numeric-ids", "--delete", "--stats", "-e", shell,
		strings.TrimSuffix(src, "/")+"/", "phaul:/rootfs/")
}

// ServerCommand is the destination's receiving rsync server into dir,
// with the options the source's rsync asked for (checked by
// wire.RsyncServerArgs).
func ServerCommand(opts []string, dir string) *exec.Cmd {
	args := append([]string{"--server"}, opts...)
	return exec.Command("rsync", append(args, ".", strings.TrimSuffix(dir, "/")+"/")...)
}

// quote quotes s for rsync's -e, which splits on spaces but keeps quoted
// strings whole.
func quote(s string) string {
	if !strings.ContainsAny(s, " \t'\"") {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'"'"'`) + "'"
}
