//go:build linux

package migrate

import (
	"net"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/proc"
)

// A CRIU helper left in a session's directory is killed, stopped or not;
// anything else working there is left alone.
func TestKillHelpersKillsStoppedOnes(t *testing.T) {
	dir := t.TempDir()
	exited := map[*exec.Cmd]chan struct{}{}
	start := func(name string) *exec.Cmd {
		cmd := exec.Command("bash", "-c", `exec -a "$0" sleep 600`, name)
		cmd.Dir = dir
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		ch := make(chan struct{})
		exited[cmd] = ch
		go func() { cmd.Wait(); close(ch) }()
		t.Cleanup(func() { cmd.Process.Kill(); <-ch })
		return cmd
	}
	running := start("criu lazy-pages")
	stopped := start("criu page-server")
	other := start("not-a-helper")
	// Until bash has exec'ed, the command lines are bash's.
	deadline := time.Now().Add(5 * time.Second)
	for len(proc.WorkingIn(dir)) != 3 || !isHelper(proc.WorkingIn(dir)[stopped.Process.Pid]) {
		if time.Now().After(deadline) {
			t.Fatalf("the processes did not start: %v", proc.WorkingIn(dir))
		}
		time.Sleep(10 * time.Millisecond)
	}
	stopped.Process.Signal(syscall.SIGSTOP)
	for !stateIs(stopped.Process.Pid, 'T') {
		if time.Now().After(deadline) {
			t.Fatal("the helper did not stop")
		}
		time.Sleep(10 * time.Millisecond)
	}
	KillHelpers(zap.NewNop(), dir, "killed")
	for _, c := range []*exec.Cmd{running, stopped} {
		select {
		case <-exited[c]:
		case <-time.After(5 * time.Second):
			t.Errorf("helper %v (pid %d) was not killed", c.Args, c.Process.Pid)
		}
	}
	select {
	case <-exited[other]:
		t.Error("a process that is no CRIU helper was killed")
	case <-time.After(200 * time.Millisecond):
	}
}

func isHelper(cmdline string) bool { return len(cmdline) > 0 && cmdline[:4] == "criu" }

func stateIs(pid int, s byte) bool {
	info, err := proc.Stat(pid)
	return err == nil && info.State == s
}

// peerUID finds who owns the other end of a loopback connection.
func TestPeerUID(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := peerUID(s); got != os.Geteuid() {
		t.Errorf("peerUID = %d, want %d (this process)", got, os.Geteuid())
	}
	if os.Geteuid() != 0 {
		return
	}
	// Another user's connection is told apart (the container bridge
	// refuses it).
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	other := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
		"bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/"+port+"; sleep 5")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { other.Process.Kill(); other.Wait() }()
	s2, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if got := peerUID(s2); got != 65534 {
		t.Errorf("peerUID of nobody's connection = %d, want 65534", got)
	}
}
