//go:build linux

package transport

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A socket deeper than a socket address holds is still listened on and
// reached, by its full path.
func TestUnixPathLong(t *testing.T) {
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 60))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "hook.sock")
	if len(path) <= maxSunPath {
		t.Fatalf("path of %d bytes is not long enough for the test", len(path))
	}
	ln, err := ListenUnixPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.WriteString(c, "ok")
			c.Close()
		}
	}()
	c, err := DialUnixPath(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b, _ := io.ReadAll(c)
	if string(b) != "ok" {
		t.Fatalf("read %q", b)
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("the socket is not at its path: %v", err)
	}
}
