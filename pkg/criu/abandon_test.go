package criu

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
)

// fakeCRIU writes a shell script standing in for criu swrk.
func fakeCRIU(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "criu")
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	f := strings.Fields(string(b))
	return len(f) > 2 && f[2] != "Z"
}

// A CRIU that ends when its RPC socket closes is left to end by itself.
func TestAbandonLetsCRIUEnd(t *testing.T) {
	c := New(fakeCRIU(t, `exec cat <&3 >/dev/null`))
	op, err := c.start("restore", nil, &rpc.CriuReq{Type: rpc.CriuReqType_RESTORE.Enum()})
	if err != nil {
		t.Fatal(err)
	}
	if op.Abandon(5 * time.Second) {
		t.Fatal("Abandon killed a CRIU that ended by itself")
	}
}

// A CRIU that does not end (as 4.2.1 can after an aborted restore) is
// killed, with the processes it forked.
func TestAbandonKillsHungCRIU(t *testing.T) {
	kidFile := filepath.Join(t.TempDir(), "kid")
	c := New(fakeCRIU(t, `trap '' TERM; sleep 1000 & echo $! > `+kidFile+`; wait`))
	op, err := c.start("restore", nil, &rpc.CriuReq{Type: rpc.CriuReqType_RESTORE.Enum()})
	if err != nil {
		t.Fatal(err)
	}
	var kid int
	for i := 0; i < 200 && kid == 0; i++ {
		b, _ := os.ReadFile(kidFile)
		kid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		time.Sleep(10 * time.Millisecond)
	}
	if kid == 0 {
		t.Fatal("the fake CRIU did not start its child")
	}
	t.Cleanup(func() { syscall.Kill(kid, syscall.SIGKILL) })
	start := time.Now()
	if !op.Abandon(200 * time.Millisecond) {
		t.Fatal("Abandon reports a hung CRIU as ended by itself")
	}
	select {
	case <-op.Exited():
	default:
		t.Fatalf("CRIU (pid %d) still runs after Abandon", op.Pid())
	}
	for i := 0; i < 100 && alive(kid); i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if alive(kid) {
		t.Fatalf("the process CRIU forked (pid %d) survived Abandon", kid)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("Abandon took %v", took)
	}
}
