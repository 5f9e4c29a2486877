//go:build linux

package integration

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
)

// TestSocketActivation starts both daemons through systemd-socket-activate
// (real LISTEN_FDS): neither runs until its first connection. A's first
// connection is phaulctl on the control socket; B's is the migration from
// A. Both must serve on the sockets they were given, not on their flags.
func TestSocketActivation(t *testing.T) {
	integration(t)
	if _, err := exec.LookPath("systemd-socket-activate"); err != nil {
		t.Fatal("systemd-socket-activate not found (package systemd)")
	}
	a := startDaemon(t, "A", "127.0.0.1:17131", daemonOpts{activated: true})
	b := startDaemon(t, "B", "127.0.0.2:17132", daemonOpts{activated: true})
	time.Sleep(200 * time.Millisecond)
	for _, d := range []*daemon{a, b} {
		if strings.Contains(d.log(), "phauld ready") {
			t.Fatalf("phauld %s started before its first connection", d.name)
		}
	}

	r := a.phaulctl(t, "status", "--json")
	if r.code != 0 {
		t.Fatalf("status through the activated socket: exit %d: %s", r.code, r.stderr)
	}
	var st api.Status
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.Listen) != 1 || st.Listen[0] != a.addr || st.Control != a.Socket {
		t.Errorf("activated daemon serves %v and %s; want %s and %s", st.Listen, st.Control, a.addr, a.Socket)
	}
	if !strings.Contains(a.log(), "socket-activated") {
		t.Error("A's log does not say it was socket-activated")
	}

	w := startWorkload(t, workloadOpts{memMiB: 64})
	before := w.report(w.pid, w.status)
	res := a.migrate(t, w.pid, b)
	w.track(res.DestPID)
	waitRunning(t, res.DestPID)
	checkIntact(t, "after migrating into an activated daemon", w.report(res.DestPID, w.status), before, w.memMiB, w.seed)
	if !strings.Contains(b.log(), "Communication attempt on fd 3") || !strings.Contains(b.log(), "socket-activated") {
		t.Error("B was not started by the migration connection on its activated TCP socket")
	}
}
