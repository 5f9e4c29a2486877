//go:build linux

package criu

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestErrorLines(t *testing.T) {
	log := `(00.000000) Version: 4.2.1 (gitid 0)
(00.001000) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.002000) Warn  (criu/kerndat.c:1290): Can't keep kdat cache on non-tempfs
(00.100000)     12: Error (criu/files-reg.c:2140): Can't open file tmp/x/data on restore: No such file or directory
(00.100100)     12: Error (criu/files-reg.c:2140): Can't open file tmp/x/data on restore: No such file or directory
(00.100200)     12: Error (criu/files.c:1227): Unable to open fd=7 id=0x9
(00.200000) Error (criu/cr-restore.c:1460): 12 exited, status=1
(00.300000) Error (criu/cr-restore.c:2400): Restoring FAILED.
`
	path := filepath.Join(t.TempDir(), "restore.log")
	if err := os.WriteFile(path, []byte(log), 0o600); err != nil {
		t.Fatal(err)
	}
	got := ErrorLines(path, 4)
	want := []string{
		"Can't open file tmp/x/data on restore: No such file or directory",
		"Unable to open fd=7 id=0x9",
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("ErrorLines = %q, want %q", got, want)
	}
	if got := ErrorLines(path, 1); len(got) != 1 {
		t.Fatalf("ErrorLines with max 1 = %q", got)
	}
	if got := ErrorLines(filepath.Join(t.TempDir(), "none"), 4); got != nil {
		t.Fatalf("ErrorLines of a missing log = %q", got)
	}

	e := &Error{Op: "restore", Lines: got, Log: path}
	if s := e.Error(); !strings.Contains(s, "criu restore failed: Can't open file") || !strings.Contains(s, path) {
		t.Errorf("Error() = %q", s)
	}
	e = &Error{Op: "dump", Msg: "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"}
	if s := e.Error(); s != "criu dump failed" {
		t.Errorf("noise-only Error() = %q, want no quoted noise", s)
	}
}

func TestHints(t *testing.T) {
	for line, want := range map[string]string{
		"Can't open file tmp/x/data on restore: No such file or directory": "/tmp/x/data open: it must exist on the destination",
		"Can't fork for 4242: File exists":                                 "pid 4242 is taken on the destination",
		"inet: Can't bind inet socket (id 5): Address already in use":      "listens on is taken",
		"Connected TCP socket, consider using --tcp-established option.":   "established TCP connections",
		"Something nobody has a hint for":                                  "",
	} {
		e := &Error{Op: "restore", Lines: []string{line}}
		if got := e.Hint(); (want == "") != (got == "") || !strings.Contains(got, want) {
			t.Errorf("Hint for %q = %q, want it to contain %q", line, got, want)
		}
	}
}
