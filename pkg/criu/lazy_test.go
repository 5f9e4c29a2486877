package criu

import "testing"

// lazy-pages logs one line per process of the tree when its memory is
// complete (the pid is the one in the tree's namespace).
func TestParseTransferred(t *testing.T) {
	log := []byte(`(00.071244) uffd: 1-13: #PF at 0x7feeb539f000
(01.801000) uffd: 7-14: UFFD transferred pages: (33100/33120)
(01.809383) uffd: 1--13: UFFD transferred pages: (262766/262782)
(01.809704) page-xfer: Disconnect from the page server
`)
	copied, total, ok := parseTransferred(log)
	if !ok || copied != 33100+262766 || total != 33120+262782 {
		t.Fatalf("parseTransferred = %d, %d, %v; want the sum over both processes", copied, total, ok)
	}
	if _, _, ok := parseTransferred([]byte("(00.1) uffd: 1-13: #PF at 0x1000\n")); ok {
		t.Fatal("parseTransferred found counts in a log without any")
	}
}
