//go:build linux

package runc

import (
	"errors"
	"os/exec"
	"slices"
	"testing"
)

func TestCommandError(t *testing.T) {
	stderr := []byte(`time="2026-12-02T02:54:01Z" level=error msg="container \"c1\" does not exist"` + "\n")
	err := CommandError("state", &exec.ExitError{}, stderr)
	if !errors.Is(err, ErrNotExist) || err.Error() != `runc state: container "c1" does not exist` {
		t.Errorf("got %v (not-exist %v)", err, errors.Is(err, ErrNotExist))
	}
	err = CommandError("checkpoint", &exec.ExitError{}, []byte("flag provided but not defined: -x\n"))
	if errors.Is(err, ErrNotExist) || err.Error() != "runc checkpoint: flag provided but not defined: -x" {
		t.Errorf("a plain line: %v", err)
	}
}

func TestValidID(t *testing.T) {
	for _, id := range []string{"c1", "phaul-t1-18300", "a.b_c+d"} {
		if !ValidID(id) {
			t.Errorf("%q refused", id)
		}
	}
	for _, id := range []string{"", ".", "..", "a/b", "a b", "x\n"} {
		if ValidID(id) {
			t.Errorf("%q accepted", id)
		}
	}
}

// A config.json is rewritten where phaul needs, and the rest kept.
func TestConfig(t *testing.T) {
	c, err := ParseConfig([]byte(`{"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "linux": {"cgroupsPath": "/x/y"},
		"mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
		           {"destination": "/data", "type": "none", "source": "/srv/data", "options": ["rbind", "rw"]},
		           {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Rootfs("/b"); got != "/b/rootfs" {
		t.Errorf("rootfs %q", got)
	}
	if got := c.BindSources(); !slices.Equal(got, []string{"/srv/data", "/etc/hosts"}) {
		t.Errorf("bind sources %v", got)
	}
	c.SetRootfs("/shared/rootfs")
	c.SetCgroupsPath("/phaul/c1")
	c.SetAnnotation("org.criu.config", "/b/criu.conf")
	b, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	again, err := ParseConfig(b)
	if err != nil {
		t.Fatal(err)
	}
	if again.Rootfs("/b") != "/shared/rootfs" || again.CgroupsPath() != "/phaul/c1" || again["ociVersion"] != "1.0.2" ||
		again["annotations"].(map[string]any)["org.criu.config"] != "/b/criu.conf" {
		t.Errorf("rewritten: %s", b)
	}
	if _, err := ParseConfig([]byte("null")); err == nil {
		t.Error("null accepted")
	}
}

// The commands say what runc needs to hear: global options first, the id
// last, a lazy checkpoint its status descriptor.
func TestCommands(t *testing.T) {
	r := &Runc{Path: "/usr/sbin/runc", Root: "/run/r", CRIU: "/usr/local/sbin/criu"}
	cmd := r.CheckpointCommand(t.Context(), "c1", CheckpointOptions{ImagePath: "/i", WorkPath: "/w", PageServer: "127.0.0.1:7",
		LeaveRunning: true, TCPEstablished: true, LazyPages: true, StatusFd: 3})
	want := []string{"/usr/sbin/runc", "--root", "/run/r", "--criu", "/usr/local/sbin/criu", "checkpoint", "--image-path", "/i", "--work-path", "/w",
		"--page-server", "127.0.0.1:7", "--leave-running", "--tcp-established", "--lazy-pages", "--status-fd", "3", "c1"}
	if !slices.Equal(cmd.Args, want) {
		t.Errorf("checkpoint: %q\nwant %q", cmd.Args, want)
	}
	cmd = r.RestoreCommand(t.Context(), "c1", RestoreOptions{Bundle: "/b", ImagePath: "/i", WorkPath: "/i", LazyPages: true})
	want = []string{"/usr/sbin/runc", "--root", "/run/r", "--criu", "/usr/local/sbin/criu", "restore", "--detach", "--bundle", "/b",
		"--image-path", "/i", "--work-path", "/i", "--lazy-pages", "c1"}
	if !slices.Equal(cmd.Args, want) {
		t.Errorf("restore: %q\nwant %q", cmd.Args, want)
	}
}
