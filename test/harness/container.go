//go:build linux

package harness

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// BundleConfig says what MakeBundle makes.
type BundleConfig struct {
	// Dir is the bundle; its root filesystem goes in Dir/rootfs.
	Dir string
	// Args is the container's init (in busybox's world: /bin/sh, ...).
	Args []string
	// CgroupsPath is its cgroup (its own, so that tests find and remove
	// it).
	CgroupsPath string
	// Binds are host paths bind-mounted at the same path inside.
	Binds []string
}

// MakeBundle makes an OCI bundle with a busybox root filesystem (Debian's
// busybox-static, every applet linked in /bin) from `runc spec`, its init
// on no terminal.
func MakeBundle(c BundleConfig) error {
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		return errors.New("busybox is missing (make deps installs busybox-static)")
	}
	bin := filepath.Join(c.Dir, "rootfs", "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return err
	}
	for _, d := range []string{"proc", "sys", "dev", "tmp", "etc"} {
		if err := os.MkdirAll(filepath.Join(c.Dir, "rootfs", d), 0o755); err != nil {
			return err
		}
	}
	b, err := os.ReadFile(busybox)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(bin, "busybox"), b, 0o755); err != nil {
		return err
	}
	out, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		return fmt.Errorf("busybox --list: %w", err)
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet != "busybox" {
			os.Symlink("busybox", filepath.Join(bin, applet))
		}
	}
	if err := os.Remove(filepath.Join(c.Dir, "config.json")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if out, err := exec.Command("runc", "spec", "--bundle", c.Dir).CombinedOutput(); err != nil {
		return fmt.Errorf("runc spec: %v: %s", err, out)
	}
	path := filepath.Join(c.Dir, "config.json")
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var cfg map[string]any
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return err
	}
	process := cfg["process"].(map[string]any)
	process["terminal"] = false
	process["args"] = c.Args
	cfg["root"].(map[string]any)["readonly"] = false
	linux := cfg["linux"].(map[string]any)
	if c.CgroupsPath != "" {
		linux["cgroupsPath"] = c.CgroupsPath
	}
	mounts, _ := cfg["mounts"].([]any)
	for _, p := range c.Binds {
		mounts = append(mounts, map[string]any{"destination": p, "type": "bind", "source": p, "options": []string{"rbind", "rw"}})
		if err := os.MkdirAll(filepath.Join(c.Dir, "rootfs", p), 0o755); err != nil {
			return err
		}
	}
	cfg["mounts"] = mounts
	raw, err = json.MarshalIndent(cfg, "", "\t")
	if err != nil {
		return err
	}
	return os.WriteFile(path, raw, 0o644)
}

// RunContainer starts the bundle as container id under the runc state
// root, detached, its stdio on /dev/null (CRIU cannot carry a descriptor
// on one of our files).
func RunContainer(root, bundle, id string) error { return RunContainerIn(nil, root, bundle, id) }

// RunContainerIn is RunContainer with runc run under wrap (nsenter into a
// network namespace, say).
func RunContainerIn(wrap []string, root, bundle, id string) error {
	logPath := filepath.Join(bundle, "runc-run.log")
	args := append(wrap, "runc", "--root", root, "--log", logPath, "run", "--detach", "--bundle", bundle, id)
	cmd := exec.Command(args[0], args[1:]...)
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer null.Close()
	cmd.Stdin, cmd.Stdout, cmd.Stderr = null, null, null
	if err := cmd.Run(); err != nil {
		b, _ := os.ReadFile(logPath)
		return fmt.Errorf("runc run %s: %v: %s", id, err, b)
	}
	return nil
}

// DeleteContainer forgets container id under root, killing it if it runs
// (what a test leaves behind).
func DeleteContainer(root, id string) {
	exec.Command("runc", "--root", root, "delete", "--force", id).Run()
}
