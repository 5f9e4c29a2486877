//go:build linux

package proc

import "testing"

func TestIsCRIU(t *testing.T) {
	for _, c := range []struct {
		cmdline string
		want    bool
	}{
		{"/usr/sbin/criu\x00swrk\x003\x00", true},
		{"criu\x00dump\x00-t\x001\x00", true},
		// make criu's wrapper: the loader, its options, then CRIU.
		{"/usr/local/lib/phaul-criu/4.2.1-1/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\x00--library-path\x00/usr/local/lib/phaul-criu/4.2.1-1/usr/lib/x86_64-linux-gnu\x00/usr/local/lib/phaul-criu/4.2.1-1/usr/sbin/criu\x00swrk\x003\x00", true},
		// The same, once CRIU has retitled itself for an RPC client.
		{"/usr/local/lib/phaul-criu/4.2.1-1/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\x00--library-path\x00/usr/local/lib/phaul-criu/4.2.1-1/usr/lib/x86_64-linux-gnu\x00criu: restore --rpc\x00\x00\x00\x00", true},
		{"criu: dump --rpc\x00\x00", true},
		// Taken for CRIU, which only delays a sweep: the safe side.
		{"/usr/bin/sleep\x00criu\x00", true},
		{"/bin/sh\x00-c\x00echo\x00x\x00criu\x00", false},
		{"/usr/bin/vim\x00criu.txt\x00", false},
		{"", false},
	} {
		if got := IsCRIU([]byte(c.cmdline)); got != c.want {
			t.Errorf("IsCRIU(%q) = %v, want %v", c.cmdline, got, c.want)
		}
	}
}
