//go:build linux

package pidns

import (
	"encoding/binary"
	"os"
	"slices"
	"testing"
)

func TestTaken(t *testing.T) {
	self := os.Getpid()
	// 4194303 is the kernel's largest pid: free unless this host is full.
	got := Taken([]int{self, 4194303, 0, -1})
	if !slices.Equal(got, []int{self}) {
		t.Errorf("Taken = %v; want only this process, %d", got, self)
	}
}

func TestEnclosingOwnNamespace(t *testing.T) {
	if nested, init, inner, phaul := Enclosing(os.Getpid()); nested || init != 0 || inner != 0 || phaul {
		t.Errorf("Enclosing(self) = %v, %d, %d, %v; want not nested", nested, init, inner, phaul)
	}
}

func TestReadStatus(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], 3<<8) // exit status 3
	w.Write(b[:])
	w.Close()
	ws, ok := ReadStatus(r)
	if !ok || !ws.Exited() || ws.ExitStatus() != 3 {
		t.Errorf("ReadStatus = %v, %v; want exit status 3", ws, ok)
	}
	// A closed pipe, nothing written: the init died first.
	r2, w2, _ := os.Pipe()
	w2.Close()
	if _, ok := ReadStatus(r2); ok {
		t.Error("ReadStatus of an empty pipe says CRIU exited")
	}
}

func TestMainRefusesBadUse(t *testing.T) {
	for _, args := range [][]string{nil, {"--status-fd", "x", "--", "true"}, {"--status-fd", "5", "true"}} {
		if got := Main(args); got != 2 {
			t.Errorf("Main(%q) = %d; want 2 (usage)", args, got)
		}
	}
	// Not pid 1: refused before it mounts anything.
	if got := Main([]string{"--status-fd", "5", "--", "true"}); got != 2 {
		t.Errorf("Main outside a new pid namespace = %d; want 2", got)
	}
}
