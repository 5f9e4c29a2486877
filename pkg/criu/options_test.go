//go:build linux

package criu

import (
	"os"
	"testing"
)

// TestFdNumbers checks that the fd numbers CRIU is told match the order
// the swrk process inherits the files in (3: RPC socket, then files()).
func TestFdNumbers(t *testing.T) {
	ps, _ := os.Open(os.DevNull)
	a, _ := os.Open(os.DevNull)
	b, _ := os.Open(os.DevNull)
	defer ps.Close()
	defer a.Close()
	defer b.Close()
	o := Options{PageServer: ps, InheritFds: []InheritFd{{"socket:[1]", a}, {"socket:[2]", b}}, External: []string{"unix[1]"}, ExtUnixSk: true}
	r := o.rpcOpts()
	files := o.files()
	if r.GetPs().GetFd() != 4 || files[0] != ps {
		t.Fatalf("page server fd %d, files[0] %v", r.GetPs().GetFd(), files[0])
	}
	for i, in := range r.GetInheritFd() {
		if int(in.GetFd()) != 5+i || files[1+i] != o.InheritFds[i].File || in.GetKey() != o.InheritFds[i].Key {
			t.Errorf("inherit fd %d: %v", i, in)
		}
	}
	if !r.GetExtUnixSk() || len(r.GetExternal()) != 1 {
		t.Errorf("external: %v %v", r.GetExtUnixSk(), r.GetExternal())
	}
	o = Options{InheritFds: []InheritFd{{"socket:[1]", a}}}
	if got := o.rpcOpts().GetInheritFd()[0].GetFd(); got != 4 {
		t.Errorf("without a page server the first inherited fd is %d, want 4", got)
	}
}
