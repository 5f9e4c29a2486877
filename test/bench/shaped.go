//go:build linux

package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/client"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/test/harness"
)

// A slow link: two network namespaces standing for two hosts, joined by a
// veth pair shaped to 1 Gbit/s each way (tbf), a phauld in each (mutual
// TLS). A workload holding compressible memory (every other page zeros,
// the rest text; 1 MiB pseudo-random besides) moves from A to B in copy,
// lazy and pre-copy mode, each without compression (the baseline) and
// with --compress zstd. For each: the pause the process saw, the total, the
// bytes on the wire, and the CPU time both phauld spent.

const (
	shapedRate    = "1gbit"
	shapedTextMiB = 255
)

type shapedMode struct {
	name, mode, compress string
}

var shapedModes = []shapedMode{
	{"copy", api.ModeCopy, ""},
	{"copy zstd", api.ModeCopy, api.CompressZstd},
	{"lazy", api.ModeLazy, ""},
	{"lazy zstd", api.ModeLazy, api.CompressZstd},
	{"precopy", api.ModePrecopy, ""},
	{"precopy zstd", api.ModePrecopy, api.CompressZstd},
}

type shapedRow struct {
	m                         shapedMode
	pause, total, wire, cpuMS []float64
}

func sh(args ...string) error {
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// cpuMS is the CPU time (user and system) pid has used, in milliseconds.
func cpuMS(pid int) float64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	u, _ := strconv.ParseFloat(f[11], 64)
	s, _ := strconv.ParseFloat(f[12], 64)
	return (u + s) * 10 // USER_HZ is 100
}

func runShaped(c config, workload string) error {
	if _, err := exec.LookPath("tc"); err != nil {
		return fmt.Errorf("tc is missing (iproute2)")
	}
	suffix := strconv.Itoa(os.Getpid())
	nsA, nsB := "phaul-bench-a-"+suffix, "phaul-bench-b-"+suffix
	cleanup, err := harness.ShapedLink(nsA, nsB, "10.214.0.1/24", "10.214.0.2/24", shapedRate, "256kb")
	if err != nil {
		return err
	}
	defer cleanup()
	ca := filepath.Join(c.work, "shaped-ca")
	if err := pki.Init(ca, []string{"10.214.0.1"}); err != nil {
		return err
	}
	var pair [2]*harness.Daemon
	for i, x := range []struct{ ns, addr string }{{nsA, "10.214.0.1:24101"}, {nsB, "10.214.0.2:24102"}} {
		d, err := harness.StartDaemon(harness.DaemonConfig{
			Name: fmt.Sprintf("shaped-%c", 'A'+i), Addr: x.addr, Dir: filepath.Join(c.work, fmt.Sprintf("shaped-%c", 'A'+i)),
			Phauld: filepath.Join(c.bin, "phauld"), Phaulctl: filepath.Join(c.bin, "phaulctl"), CA: ca,
			Wrap: []string{"nsenter", "--net=/run/netns/" + x.ns, "--"},
		})
		if err != nil {
			return err
		}
		defer d.Stop(time.Minute)
		pair[i] = d
	}
	if c.precopyOnly {
		fmt.Println("\nPre-copy (memory sent ahead while the process runs) against copy mode and bare CRIU:")
		return runPrecopy(c, workload, nsA, nsB, pair)
	}
	if c.shapedOnly != "" {
		var keep []shapedMode
		for _, m := range shapedModes {
			if contains(strings.Split(c.shapedOnly, ","), m.name) || contains(strings.Split(c.shapedOnly, ","), m.mode) {
				keep = append(keep, m)
			}
		}
		shapedModes = keep
	}
	rows := map[string]*shapedRow{}
	for _, m := range shapedModes {
		rows[m.name] = &shapedRow{m: m}
	}
	for i := 0; i < c.runs; i++ {
		for j := range shapedModes {
			m := shapedModes[(i+j)%len(shapedModes)]
			pause, total, wire, cpu, err := runShapedOnce(c, workload, nsA, pair, m)
			if err != nil {
				return fmt.Errorf("shaped %s: %w", m.name, err)
			}
			fmt.Fprintf(os.Stderr, "  shaped %-10s run %d: pause %7.1f ms, total %7.1f ms, %6.1f MB on the wire, phauld CPU %6.0f ms\n",
				m.name, i+1, pause, total, wire/1e6, cpu)
			r := rows[m.name]
			r.pause, r.total, r.wire, r.cpuMS = append(r.pause, pause), append(r.total, total), append(r.wire, wire), append(r.cpuMS, cpu)
		}
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "mode\tpause ms\ttotal ms\twire MB\tphauld CPU ms\tpause / uncompressed\ttotal / uncompressed\t")
	for _, m := range shapedModes {
		r := rows[m.name]
		base := rows[m.mode]
		ratios := "\t\t"
		if m.compress != "" && base != nil {
			ratios = fmt.Sprintf("%.2f\t%.2f\t", median(r.pause)/median(base.pause), median(r.total)/median(base.total))
		}
		fmt.Fprintf(tw, "%s\t%.0f\t%.0f\t%.1f\t%.0f\t%s\n", m.name, median(r.pause), median(r.total), median(r.wire)/1e6, median(r.cpuMS), ratios)
	}
	tw.Flush()
	fmt.Printf("medians of %d runs each, in rotating order, over a veth shaped to %s each way (tbf), mutual TLS;\n"+
		"the process holds %d MiB of text and zero pages and 1 MiB of pseudo-random memory.\n"+
		"wire MB: what crossed both connections. phauld CPU: both daemons, user and system.\n", c.runs, shapedRate, shapedTextMiB)
	fmt.Println("\nRoom for the service's own traffic on the same link (--bwlimit):")
	if err := runRoom(c, workload, nsA, nsB, pair); err != nil {
		return err
	}
	if !c.precopy {
		return nil
	}
	fmt.Println("\nPre-copy (memory sent ahead while the process runs) against copy mode and bare CRIU:")
	return runPrecopy(c, workload, nsA, nsB, pair)
}

func runShapedOnce(c config, bin, ns string, pair [2]*harness.Daemon, m shapedMode) (pause, total, wire, cpu float64, err error) {
	dir, err := os.MkdirTemp(c.work, "w-")
	if err != nil {
		return 0, 0, 0, 0, err
	}
	w, err := harness.StartWorkload(harness.WorkloadConfig{Bin: bin, Dir: dir, MemMiB: 1, Seed: 1, NetNS: ns,
		Extra: []string{"--text", strconv.Itoa(shapedTextMiB)}})
	if err != nil {
		return 0, 0, 0, 0, err
	}
	defer w.Kill()
	if _, err := w.Report(w.PID); err != nil {
		return 0, 0, 0, 0, err
	}
	a, b := pair[0], pair[1]
	cpu0 := cpuMS(a.PID()) + cpuMS(b.PID())
	res, err := client.New(a.Socket).Migrate(context.Background(), api.MigrateRequest{PID: w.PID, To: b.Addr, Mode: m.mode, Compress: m.compress}, nil)
	if err != nil {
		return 0, 0, 0, 0, err
	}
	defer kill(res.DestPID)
	w.Track(res.DestPID)
	if res.Compress != m.compress {
		return 0, 0, 0, 0, fmt.Errorf("compressed %q, asked %q", res.Compress, m.compress)
	}
	if m.mode == api.ModeLazy {
		time.Sleep(100 * time.Millisecond) // its last pages were in at the commit
	}
	cpu = cpuMS(a.PID()) + cpuMS(b.PID()) - cpu0
	if os.Getenv("PHAUL_BENCH_VERBOSE") != "" {
		fmt.Fprintf(os.Stderr, "    phases %v, page bytes %d as %d\n", res.PhasesMS, res.PageBytes, res.PageWireBytes)
	}
	r, err := w.Report(res.DestPID)
	if err != nil {
		return 0, 0, 0, 0, err
	}
	if r.Sum != r.Expect || r.TextSum != r.TextExpect || r.TextExpect == "" {
		return 0, 0, 0, 0, fmt.Errorf("memory checksums %s/%s and %s/%s after migration", r.Sum, r.Expect, r.TextSum, r.TextExpect)
	}
	return float64(r.GapNS) / 1e6, float64(res.TotalMS), float64(res.Bytes), cpu, nil
}
