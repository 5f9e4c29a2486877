//go:build linux

package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/client"
	"github.com/phaul/phaul/test/harness"
)

// A container's root filesystem synced with rsync: a busybox container
// whose rootfs holds 200 MiB of pseudo-random files and which keeps
// rewriting 10 MiB more of them (10 files, every 0.1 s), migrated in copy mode from phauld A
// to a phauld B that does not share the storage (B runs in a mount
// namespace of its own where the bundle's directory is hidden), against
// the same migration to a B that shares it (the baseline: nothing synced).
// For each: the first pass (while it runs) and the frozen pass, in bytes
// and time, and the whole frozen time.

const (
	rootfsMiB  = 200
	changedMiB = 10
)

type ctrRow struct {
	name                         string
	bytes1, ms1, bytes2, ms2, fz []float64
}

func runContainers(c config) error {
	for _, tool := range []string{"runc", "rsync", "busybox"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s is missing (make deps installs it)", tool)
		}
	}
	dir := filepath.Join(c.work, "ctr")
	parent := filepath.Join(dir, "storage")
	bundle := filepath.Join(parent, "bundle")
	// It rewrites its 10 hot files of 1 MiB every 0.1 s with other
	// contents (copies of its data files, in rotation): whatever pass 1
	// saw of them has changed by the freeze, which comes at least the
	// dump's time (about 0.5 s) after pass 1 read them.
	init := fmt.Sprintf(`mkdir -p /hot; i=0; while :; do k=0; while [ $k -lt %d ]; do cp /data/f$(( (i+k) %% %d )) /hot/h$k; k=$((k+1)); done; i=$((i+1)); sleep 0.1; done`,
		changedMiB, rootfsMiB)
	if err := harness.MakeBundle(harness.BundleConfig{Dir: bundle, Args: []string{"/bin/sh", "-c", init}, CgroupsPath: "/phaul-bench/ctr"}); err != nil {
		return err
	}
	defer removeBenchCgroups()
	data := filepath.Join(bundle, "rootfs", "data")
	if err := os.MkdirAll(data, 0o755); err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for i := 0; i < rootfsMiB; i++ {
		rand.Read(buf)
		if err := os.WriteFile(filepath.Join(data, fmt.Sprintf("f%d", i)), buf, 0o644); err != nil {
			return err
		}
	}
	rootA, rootB := filepath.Join(dir, "runc-a"), filepath.Join(dir, "runc-b")
	start := func(name, addr, root string, wrap []string) (*harness.Daemon, error) {
		return harness.StartDaemon(harness.DaemonConfig{Name: name, Addr: addr, Dir: filepath.Join(dir, name),
			Phauld: filepath.Join(c.bin, "phauld"), Phaulctl: filepath.Join(c.bin, "phaulctl"), Insecure: true, Wrap: wrap,
			Flags: []string{"--runc-root", root, "--containers-dir", filepath.Join(dir, name, "containers")}})
	}
	a, err := start("ctr-A", "127.0.0.1:24200", rootA, nil)
	if err != nil {
		return err
	}
	defer a.Stop(time.Minute)
	shared, err := start("ctr-B-shared", "127.0.0.2:24201", rootB, nil)
	if err != nil {
		return err
	}
	defer shared.Stop(time.Minute)
	hidden, err := start("ctr-B-unshared", "127.0.0.2:24202", rootB,
		[]string{"unshare", "--mount", "--propagation", "private", "--", "sh", "-c", `mount -t tmpfs none "$0" && exec "$@"`, parent})
	if err != nil {
		return err
	}
	defer hidden.Stop(time.Minute)

	rows := []*ctrRow{{name: "shared storage (baseline)"}, {name: "synced with rsync"}}
	dests := []*harness.Daemon{shared, hidden}
	const id = "phaul-bench"
	for i := 0; i < c.runs; i++ {
		for j := range rows {
			k := (i + j) % len(rows)
			r, b := rows[k], dests[k]
			if err := harness.RunContainer(rootA, bundle, id); err != nil {
				return err
			}
			time.Sleep(time.Second) // it writes its hot file at least once
			res, err := client.New(a.Socket).Migrate(context.Background(), api.MigrateRequest{Container: id, To: b.Addr, Mode: api.ModeCopy}, nil)
			harness.DeleteContainer(rootA, id)
			harness.DeleteContainer(rootB, id)
			os.RemoveAll(filepath.Join(b.Dir, "containers", id))
			if err != nil {
				return fmt.Errorf("%s: %w", r.name, err)
			}
			var s api.RootfsSync
			if res.Rootfs != nil {
				s = *res.Rootfs
			}
			fmt.Fprintf(os.Stderr, "  container, %-26s run %d: frozen %5d ms; rootfs %7.1f MiB in %5d ms while it ran, %6.1f MiB in %5d ms frozen\n",
				r.name, i+1, res.FrozenMS, float64(s.Bytes)/(1<<20), s.MS, float64(s.FrozenBytes)/(1<<20), s.FrozenMS)
			r.bytes1 = append(r.bytes1, float64(s.Bytes))
			r.ms1 = append(r.ms1, float64(s.MS))
			r.bytes2 = append(r.bytes2, float64(s.FrozenBytes))
			r.ms2 = append(r.ms2, float64(s.FrozenMS))
			r.fz = append(r.fz, float64(res.FrozenMS))
		}
	}
	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "container rootfs\tfirst pass MiB\tfirst pass ms\tfrozen pass MiB\tfrozen pass ms\tfrozen ms\tfrozen / shared\t")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%.1f\t%.0f\t%.1f\t%.0f\t%.0f\t%.2f\t\n", r.name, median(r.bytes1)/(1<<20), median(r.ms1),
			median(r.bytes2)/(1<<20), median(r.ms2), median(r.fz), median(r.fz)/median(rows[0].fz))
	}
	tw.Flush()
	fmt.Printf("\nmedians of %d runs each, in rotating order: a busybox container with %d MiB of files in its rootfs, rewriting %d MiB\n"+
		"more every 0.1 s, moved in copy mode; MiB: what crossed the link both ways for rsync.\n", c.runs, rootfsMiB, changedMiB)
	return nil
}

func removeBenchCgroups() {
	ents, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range ents {
		for _, p := range []string{"phaul-bench/ctr", "phaul-bench", "phaul"} {
			os.Remove(filepath.Join("/sys/fs/cgroup", e.Name(), p))
		}
	}
}
