//go:build linux

package integration

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/proc"
)

// A root tree holds DIR/d/f open; on the destination DIR/d is a symlink
// (B runs in a mount namespace of its own, with a tmpfs over DIR that
// has d -> t and a file t/f of the same size and mode). CRIU would
// reopen DIR/d/f there through the symlink and give the process another
// file; phaul refuses, naming the symlink, and the process runs on at
// the source with its own file. Under /dev the source's list of files
// in Prepare leaves the file out, so it is the check of the images that
// refuses, after the dump, before CRIU restores anything; elsewhere the
// check before the freeze does.
func TestSymlinkedPathRefused(t *testing.T) {
	integration(t)
	for _, c := range []struct {
		name, base   string
		afterTheDump bool
		srcA, srcB   string
	}{
		{"images, after the dump", "/dev/shm", true, "127.0.0.1:19001", "127.0.0.2:19002"},
		{"prepare, before the freeze", "", false, "127.0.0.1:19003", "127.0.0.2:19004"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir, err := os.MkdirTemp(c.base, "pc-paths-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			file := filepath.Join(dir, "d", "f")
			if err := os.Mkdir(filepath.Join(dir, "d"), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(file, []byte("source\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			a := startDaemon(t, "A", c.srcA, daemonOpts{})
			b := startDaemon(t, "B", c.srcB, daemonOpts{wrap: []string{"unshare", "--mount", "--propagation", "private", "--",
				"sh", "-c", `mount -t tmpfs -o mode=0755 none "$0" && mkdir "$0/t" && printf 'other!\n' >"$0/t/f" && chmod 644 "$0/t/f" && ln -s t "$0/d" && exec "$@"`, dir}})
			// Were the check missing, a copy would run on B: it goes too.
			t.Cleanup(func() { killCopies(file) })
			_, init := startNSInit(t, "unshare", "--pid", "--fork", "--", "setsid", "sh", "-c", `exec 3<"$1"; while :; do sleep 0.1; done`, "sh", file)
			waitFor(t, "the process to hold "+file, 10*time.Second, func() bool {
				l, _ := os.Readlink("/proc/" + strconv.Itoa(init) + "/fd/3")
				return l == file
			})
			before, _ := proc.Stat(init)
			want := "file " + file + ": a symlink on this host (" + filepath.Join(dir, "d") + "), which the source did not have"
			if !c.afterTheDump {
				refusedBeforeFreeze(t, a, b, init, want)
				return
			}
			r := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(init), "--to", b.addr)
			if r.code == 0 || !strings.Contains(r.stderr, want) {
				t.Fatalf("migrate: exit %d: %s %s; want it refused, saying %q", r.code, r.stdout, r.stderr, want)
			}
			t.Logf("refused: %s", strings.TrimSpace(r.stderr))
			// Refused after the dump (the check of the images), before
			// CRIU's restore ran on B.
			if logs, _ := filepath.Glob(filepath.Join(a.state, "sessions", "*", "dump.log")); len(logs) == 0 {
				t.Errorf("no dump log on A: the refusal came before the dump, not from the images")
			}
			if logs, _ := filepath.Glob(filepath.Join(b.state, "sessions", "*", "restore.log")); len(logs) != 0 {
				t.Errorf("CRIU's restore ran on B: %v", logs)
			}
			waitFor(t, "the process to run again on A", 10*time.Second, func() bool {
				info, err := proc.Stat(init)
				return err == nil && !info.Stopped()
			})
			if info, err := proc.Stat(init); err != nil || info.StartTime != before.StartTime {
				t.Errorf("pid %d after the refusal: %+v, %v; want the same process", init, info, err)
			}
			if l, err := os.Readlink("/proc/" + strconv.Itoa(init) + "/fd/3"); l != file {
				t.Errorf("its fd 3 after the refusal: %q, %v; want %s", l, err, file)
			}
			if got, err := os.ReadFile("/proc/" + strconv.Itoa(init) + "/fd/3"); string(got) != "source\n" {
				t.Errorf("its fd 3 reads %q, %v; want its own file's content", got, err)
			}
		})
	}
}

// killCopies kills the processes whose command line names path (unique
// to a test): the copies of its workload a migration restored.
func killCopies(path string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline"); err == nil && strings.Contains(string(b), path) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}
