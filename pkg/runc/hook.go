//go:build linux

package runc

import (
	"bufio"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/phaul/phaul/pkg/transport"
)

// HookCommand is the first argument that makes phauld run as CRIU's
// action script for a container restore (HookMain).
const HookCommand = "criu-hook"

// Hooked are the actions of a restore that the hook asks phauld about;
// it answers every other one yes by itself.
var Hooked = map[string]bool{"setup-namespaces": true, "post-restore": true}

// HookMain is `phauld criu-hook SOCKET`, run by CRIU (that runc runs) at
// each step of a container's restore, the step in $CRTOOLS_SCRIPT_ACTION
// and the restored root in $CRTOOLS_INIT_PID. For the steps phauld must
// act on, it asks phauld's session on SOCKET ("ACTION PID\n") and exits
// 0 on "ok", 1 on anything else: a closed socket (phauld gone) included,
// which makes CRIU give the restore up and kill what it restored. It
// returns the exit code.
func HookMain(args []string) int {
	action := os.Getenv("CRTOOLS_SCRIPT_ACTION")
	if !Hooked[action] {
		return 0
	}
	if len(args) != 1 {
		fmt.Fprintf(os.Stderr, "phauld %s: want SOCKET (CRIU runs this for phauld)\n", HookCommand)
		return 2
	}
	c, err := transport.DialUnixPath(args[0], 10*time.Second)
	if err != nil {
		fmt.Fprintf(os.Stderr, "phauld %s: %v\n", HookCommand, err)
		return 1
	}
	defer c.Close()
	if _, err := fmt.Fprintf(c, "%s %s\n", action, os.Getenv("CRTOOLS_INIT_PID")); err != nil {
		return 1
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "ok" {
		fmt.Fprintf(os.Stderr, "phauld %s: %s refused\n", HookCommand, action)
		return 1
	}
	return 0
}
