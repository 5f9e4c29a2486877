//go:build linux

// Command bench measures phaul against the bare CRIU pipelines on the same
// workloads, in alternating runs, and prints figures and ratios. It is what
// `make bench` runs (as root, with bin/phauld and bin/phaulctl built).
//
// Workloads: processes holding 256 MiB and 1 GiB of pseudo-random memory,
// and one holding 256 MiB that rewrites 32 MiB of it every 10 ms tick. For
// each it rotates through:
//
//   - bare copy: the CRIU pipeline scripted by hand, the fastest thing CRIU
//     offers for a copy migration: `criu page-server` on the destination
//     address, `criu dump --page-server --leave-stopped` straight to it,
//     copy the other images, `criu restore --restore-detached`, kill the
//     source;
//   - bare lazy: CRIU's post-copy by hand: `criu dump --lazy-pages
//     --leave-stopped` (it serves the pages over TCP), copy the images,
//     `criu lazy-pages --page-server` and `criu restore --lazy-pages` on
//     the destination, kill the source once the dump has served every
//     page;
//   - phaul copy and phaul lazy: `phaulctl migrate --mode copy|lazy`
//     between two phauld speaking mutual TLS (the default);
//   - phaul copy insecure: the same between two phauld --insecure, for
//     the cost of encryption.
//
// It reports the median pause the workload saw (the longest gap in its own
// ticking), the median total time, the memory throughput, the ratios to the
// bare pipeline of the same kind, phaul's own overhead per migration, the
// cost of encryption, an idle phauld's resident memory, and raw loopback
// TCP throughput as the ceiling.
//
// Then (clients.go) the pause of a service with connected clients against
// the same service with none: redis-server in its own network namespace,
// with 0, 1 and 100 clients each keeping one connection (-clients); and
// (container.go) a runc container whose 200 MiB root filesystem is synced
// with rsync, against the same container on shared storage (-container).
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/client"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/test/harness"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type config struct {
	bin  string
	runs int
	work string
	// shapedOnly limits the shaped-link modes (-shaped-modes).
	shapedOnly string
	// precopy runs the pre-copy cases after the shaped link's (-precopy).
	precopy bool
	// precopyOnly runs only them (-precopy-only).
	precopyOnly bool
	// precopyCase runs only the pre-copy cases whose names contain it.
	precopyCase string
}

// load is one workload: MiB of memory, MiB of it rewritten every tick.
type load struct {
	name         string
	memMiB       int
	dirtyMiB     int
	bareLazyOnly bool
}

var loads = []load{
	{name: "256 MiB", memMiB: 256},
	{name: "1 GiB", memMiB: 1024},
	{name: "256 MiB, dirtying 32 MiB/tick", memMiB: 256, dirtyMiB: 32},
}

// Modes of a run.
const (
	modeBareCopy       = "bare copy"
	modeBareLazy       = "bare lazy"
	modeCopy           = "phaul copy"
	modeLazy           = "phaul lazy"
	modeCopyInsecure   = "phaul copy insecure"
	pairTLS, pairNoTLS = "tls", "insecure"
)

var modes = []string{modeBareCopy, modeBareLazy, modeCopy, modeLazy, modeCopyInsecure}

// baseline is the bare pipeline a mode is compared with.
func baseline(mode string) string {
	if strings.Contains(mode, "lazy") {
		return modeBareLazy
	}
	return modeBareCopy
}

func run() error {
	var c config
	only := flag.String("loads", "", "run only the workloads whose names contain this (none: only the connected service)")
	onlyModes := flag.String("modes", "", "run only these modes (comma-separated, e.g. \"bare copy,phaul copy\"); the targets need them all")
	flag.IntVar(&c.runs, "runs", 5, "runs of each mode per workload")
	flag.StringVar(&c.bin, "bin", "bin", "directory with phauld and phaulctl")
	clientsFlag := flag.String("clients", "0,1,100", "client counts of the connected service, the first the baseline (\"\": skip it)")
	containers := flag.Bool("container", true, "measure a container's root filesystem synced with rsync, against shared storage")
	shaped := flag.Bool("shaped", true, "measure --compress zstd over a link shaped to 1 Gbit/s, against no compression")
	flag.BoolVar(&c.precopy, "precopy", true, "measure --mode precopy against copy and bare CRIU, on the shaped link and on loopback (with -shaped)")
	flag.StringVar(&c.precopyCase, "precopy-case", "", "run only the pre-copy cases whose names contain this (e.g. loopback)")
	flag.BoolVar(&c.precopyOnly, "precopy-only", false, "of the shaped link's measurements, run only pre-copy's")
	lazySizes := flag.String("lazy-sizes", "1024,4096", "measure lazy mode at these sizes (MiB) against copy mode, with and without fetching ahead (\"\": skip it)")
	lazyRuns := flag.Int("lazy-runs", 3, "runs of each mode per size, at scale")
	flag.StringVar(&c.shapedOnly, "shaped-modes", "", "run only these modes of the shaped link (comma-separated: copy, lazy, \"copy zstd\", ...)")
	flag.Parse()
	var counts []int
	if *clientsFlag != "" {
		var err error
		if counts, err = parseCounts("clients", *clientsFlag); err != nil {
			return err
		}
	}
	var sizes []int
	if *lazySizes != "" {
		var err error
		if sizes, err = parseCounts("lazy-sizes", *lazySizes); err != nil {
			return err
		}
	}
	var workload string // built below, before connected runs
	connected := func() error {
		if len(sizes) > 0 {
			fmt.Println("\nLazy mode at scale, fetching ahead of lazy-pages:")
			lc := c
			lc.runs = *lazyRuns
			if err := runLazyScale(lc, workload, sizes); err != nil {
				return err
			}
		}
		if len(counts) > 0 {
			fmt.Println("\nA service with connected clients:")
			if err := runClients(c, counts); err != nil {
				return err
			}
		}
		if *containers {
			fmt.Println("\nA container whose root filesystem is synced:")
			if err := runContainers(c); err != nil {
				return err
			}
		}
		if *shaped {
			fmt.Println("\nA slow link (1 Gbit/s), compressible memory, --compress zstd:")
			return runShaped(c, workload)
		}
		return nil
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (CRIU)")
	}
	if *onlyModes != "" {
		modes = strings.Split(*onlyModes, ",")
		for _, m := range modes {
			if baseline(m) != m && !contains(modes, baseline(m)) {
				return fmt.Errorf("-modes: %q needs its baseline %q", m, baseline(m))
			}
		}
	}
	var err error
	if c.work, err = os.MkdirTemp("", "phaul-bench-"); err != nil {
		return err
	}
	defer os.RemoveAll(c.work)
	workload = filepath.Join(c.work, "workload")
	if out, err := exec.Command("go", "build", "-o", workload, "./test/workload").CombinedOutput(); err != nil {
		return fmt.Errorf("build workload: %v\n%s", err, out)
	}

	// Two pairs of daemons: one over mutual TLS (the default), one with
	// --insecure, so that the cost of encryption shows as a ratio.
	tlsDir := filepath.Join(c.work, "tls")
	if err := pki.Init(filepath.Join(tlsDir, "ca"), []string{"127.0.0.1"}); err != nil {
		return err
	}
	pairs := map[string][2]*harness.Daemon{}
	for i, pair := range []string{pairTLS, pairNoTLS} {
		var ds [2]*harness.Daemon
		for j, host := range []string{"127.0.0.1", "127.0.0.2"} {
			d, err := harness.StartDaemon(harness.DaemonConfig{
				Name: fmt.Sprintf("%s-%c", pair, 'A'+j), Addr: fmt.Sprintf("%s:%d", host, 24001+10*i+j),
				Dir: filepath.Join(c.work, fmt.Sprintf("%s-%c", pair, 'A'+j)), Phauld: filepath.Join(c.bin, "phauld"),
				Phaulctl: filepath.Join(c.bin, "phaulctl"), Insecure: pair == pairNoTLS, CA: filepath.Join(tlsDir, "ca"),
			})
			if err != nil {
				return err
			}
			defer d.Stop(time.Minute)
			ds[j] = d
		}
		pairs[pair] = ds
	}
	time.Sleep(500 * time.Millisecond)
	idleRSS := rssMiB(pairs[pairTLS][0].PID())

	host, _ := os.Hostname()
	fmt.Printf("phaul bench on %s: %s, %d CPUs, %s RAM, kernel %s, %s\n", host, cpuModel(), numCPU(), memTotal(), kernel(), criuVersion())
	ceiling := loopbackMBps()
	fmt.Printf("loopback TCP, one stream (ceiling): %.0f MB/s\n\n", ceiling)

	type row struct {
		load               load
		mode               string
		pause, total, mbps []float64
		overhead           []float64
	}
	var table [][]*row
	for _, ld := range loads {
		if *only != "" && !strings.Contains(ld.name, *only) {
			continue
		}
		rows := map[string]*row{}
		for _, m := range modes {
			rows[m] = &row{load: ld, mode: m}
		}
		for i := 0; i < c.runs; i++ {
			// Rotate which goes first, so that drift in the machine's
			// load does not favour one.
			for j := range modes {
				mode := modes[(i+j)%len(modes)]
				var m measure
				var err error
				switch mode {
				case modeBareCopy:
					m, err = runBare(c, workload, ld, i)
				case modeBareLazy:
					m, err = runBareLazy(c, workload, ld, i)
				case modeCopy:
					m, err = runPhaul(c, workload, ld, api.ModeCopy, pairs[pairTLS])
				case modeLazy:
					m, err = runPhaul(c, workload, ld, api.ModeLazy, pairs[pairTLS])
				case modeCopyInsecure:
					m, err = runPhaul(c, workload, ld, api.ModeCopy, pairs[pairNoTLS])
				}
				if err != nil {
					return fmt.Errorf("%s, %s: %w", mode, ld.name, err)
				}
				fmt.Fprintf(os.Stderr, "  %-20s %-30s run %d: pause %7.1f ms, total %7.1f ms, %6.0f MB/s, overhead %5.1f ms\n",
					mode, ld.name, i+1, m.pause, m.total, m.mbps, m.overhead)
				r := rows[mode]
				r.pause = append(r.pause, m.pause)
				r.total = append(r.total, m.total)
				r.mbps = append(r.mbps, m.mbps)
				r.overhead = append(r.overhead, m.overhead)
			}
		}
		var line []*row
		for _, m := range modes {
			line = append(line, rows[m])
		}
		table = append(table, line)
	}

	if len(table) == 0 {
		return connected() // -loads matched none
	}
	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "workload\tmode\tpause ms\ttotal ms\tmem MB/s\tpause / bare\ttotal / bare\t")
	med := map[string]map[string]*row{}
	for _, line := range table {
		byMode := map[string]*row{}
		for _, r := range line {
			byMode[r.mode] = r
		}
		med[line[0].load.name] = byMode
		for _, r := range line {
			b := byMode[baseline(r.mode)]
			ratios := "\t\t"
			if r.mode != b.mode {
				ratios = fmt.Sprintf("%.2f\t%.2f\t", median(r.pause)/median(b.pause), median(r.total)/median(b.total))
			}
			fmt.Fprintf(tw, "%s\t%s\t%.0f\t%.0f\t%.0f\t%s\n", r.load.name, r.mode,
				median(r.pause), median(r.total), median(r.mbps), ratios)
		}
	}
	tw.Flush()
	fmt.Printf("\nmedians of %d runs each, in rotating order. pause: the longest gap in the process's own 10 ms ticking.\n"+
		"mem MB/s: memory moved per second of moving it (copy: the dump; lazy: from the dump's start until the last page was in).\n"+
		"pause / bare and total / bare: against the bare CRIU pipeline of the same kind (copy or lazy).\n", c.runs)

	// The targets, each from the figures above.
	if len(modes) < 5 {
		return connected()
	}
	fmt.Println("\ntargets:")
	check := func(ok bool, format string, args ...any) {
		mark := "met"
		if !ok {
			mark = "MISSED"
		}
		fmt.Printf("  %-6s %s\n", mark, fmt.Sprintf(format, args...))
	}
	for _, line := range table {
		name := line[0].load.name
		r := med[name]
		ratio := median(r[modeCopy].pause) / median(r[modeBareCopy].pause)
		check(ratio <= 1.15, "%s: copy pause %.2f x bare copy (target <= 1.15)", name, ratio)
		lz := median(r[modeLazy].pause)
		lratio := lz / median(r[modeBareLazy].pause)
		check(lratio <= 1.2, "%s: lazy pause %.0f ms, %.2f x bare lazy (target <= 1.2)", name, lz, lratio)
		if line[0].load.memMiB == 1024 && line[0].load.dirtyMiB == 0 {
			check(lz < 500, "%s: lazy pause %.0f ms (target < 500 ms)", name, lz)
		}
		enc := median(r[modeCopy].mbps) / median(r[modeCopyInsecure].mbps)
		check(enc >= 0.8, "%s: mem throughput with TLS %.0f%% of --insecure (target >= 80%%)", name, 100*enc)
		var all []float64
		for _, m := range []string{modeCopy, modeLazy, modeCopyInsecure} {
			all = append(all, r[m].overhead...)
		}
		ov := median(all)
		check(ov < 50, "%s: phaul's own time per migration %.1f ms, median (target < 50 ms)", name, ov)
	}
	check(idleRSS < 30, "idle phauld resident memory %.1f MiB (target < 30 MiB); after the runs: %.1f MiB",
		idleRSS, rssMiB(pairs[pairTLS][0].PID()))
	fmt.Println("\nphaul's own time: the total less CRIU's dump and restore, the lazy transfer and the commit (which\n" +
		"kills the source copy): connecting, the TLS and protocol handshakes, the version and CPU checks,\n" +
		"starting the destination's page server, shipping the images.")
	return connected()
}

type measure struct {
	pause, total float64 // milliseconds
	mbps         float64 // memory moved per second of moving it
	overhead     float64 // phaul's own milliseconds (0 for bare runs)
}

// startWorkload starts one workload of ld, the init of its own pid
// namespace, and makes it report once: what its start cost is no pause.
func startWorkload(c config, bin string, ld load) (*harness.Workload, error) {
	dir, err := os.MkdirTemp(c.work, "w-")
	if err != nil {
		return nil, err
	}
	w, err := harness.StartWorkload(harness.WorkloadConfig{Bin: bin, Dir: dir, MemMiB: ld.memMiB, Seed: 1,
		Extra: []string{"--dirty", strconv.Itoa(ld.dirtyMiB)}})
	if err != nil {
		return nil, err
	}
	if _, err := w.Report(w.PID); err != nil {
		w.Kill()
		return nil, err
	}
	return w, nil
}

func kill(pid int) {
	if tree, err := proc.OpenTree(pid, 0); err == nil {
		proc.SignalAll(tree, syscall.SIGKILL)
		proc.WaitExited(tree, 5*time.Second)
		proc.CloseAll(tree)
	}
}

// pauseAfter reads the pause the migration caused from the workload now
// running as pid, and checks its memory.
func pauseAfter(w *harness.Workload, pid int) (float64, error) {
	time.Sleep(50 * time.Millisecond)
	r, err := w.Report(pid)
	if err != nil {
		return 0, err
	}
	if r.Sum != r.Expect {
		return 0, fmt.Errorf("memory checksum %s after migration, want %s", r.Sum, r.Expect)
	}
	return float64(r.GapNS) / 1e6, nil
}

func runPhaul(c config, bin string, ld load, mode string, pair [2]*harness.Daemon) (measure, error) {
	w, err := startWorkload(c, bin, ld)
	if err != nil {
		return measure{}, err
	}
	defer w.Kill()
	a, b := pair[0], pair[1]
	res, err := client.New(a.Socket).Migrate(context.Background(), api.MigrateRequest{PID: w.PID, To: b.Addr, Mode: mode}, nil)
	if err != nil {
		return measure{}, err
	}
	defer kill(res.DestPID)
	if res.Mode != mode {
		return measure{}, fmt.Errorf("ran in mode %q, asked %q", res.Mode, mode)
	}
	pause, err := pauseAfter(w, res.DestPID)
	if err != nil {
		return measure{}, err
	}
	p := res.PhasesMS
	moving := float64(p["dump"])
	if mode == api.ModeLazy {
		moving = float64(p["dump"] + p["images"] + p["restore"] + p["lazy"])
	}
	// phaul's own time: connecting and the TLS handshake (before any
	// phase), the protocol handshake, the checks and the destination's
	// page server (prepare), and shipping the images: everything but
	// CRIU's dump and restore, the lazy transfer, and the commit (which
	// includes killing the source copy, as the bare pipeline does).
	own := float64(res.TotalMS - p["dump"] - p["restore"] - p["lazy"] - p["commit"])
	return measure{pause: pause, total: float64(res.TotalMS), mbps: mbps(ld, moving), overhead: own}, nil
}

// mbps is the workload's memory over ms milliseconds, in MB/s.
func mbps(ld load, ms float64) float64 {
	if ms <= 0 {
		return 0
	}
	return float64(ld.memMiB<<20) / 1e6 / (ms / 1000)
}

// bareDirs makes a source and a destination image directory for a bare
// run.
func bareDirs(c config, kind string, i int) (src, dst string, err error) {
	src = filepath.Join(c.work, fmt.Sprintf("%s-src-%d", kind, i))
	dst = filepath.Join(c.work, fmt.Sprintf("%s-dst-%d", kind, i))
	for _, d := range []string{src, dst} {
		os.RemoveAll(d)
		if err := os.MkdirAll(d, 0o700); err != nil {
			return "", "", err
		}
	}
	return src, dst, nil
}

// bareCommon are the options every bare CRIU command gets: the same the
// daemons use where they matter (no network lock for a process without
// sockets, cgroups left alone).
var bareCommon = []string{"--network-lock", "skip", "--manage-cgroups=ignore", "-v4"}

// runBare is the CRIU copy pipeline by hand, over TCP between the same two
// loopback addresses the daemons use.
func runBare(c config, bin string, ld load, i int) (measure, error) {
	w, err := startWorkload(c, bin, ld)
	if err != nil {
		return measure{}, err
	}
	defer w.Kill()
	src, dst, err := bareDirs(c, "bare", i)
	if err != nil {
		return measure{}, err
	}
	defer os.RemoveAll(src)
	defer os.RemoveAll(dst)
	rpid, total, dump, err := bareCopy(w.PID, src, dst, strconv.Itoa(24100+i%50), bareHosts{addr: "127.0.0.2"})
	if err != nil {
		return measure{}, err
	}
	defer kill(rpid)
	pause, err := pauseAfter(w, rpid)
	if err != nil {
		return measure{}, err
	}
	return measure{pause: pause, total: ms(total), mbps: mbps(ld, ms(dump))}, nil
}

// bareHosts says where the bare copy pipeline's steps run: the page
// server's address, and the network namespaces (by name; "": this one)
// of the dump and of the page server and the restore.
type bareHosts struct{ addr, srcNS, destNS string }

// bareCopy is CRIU's stop-and-copy by hand of the tree of pid: a page
// server in dst, the dump of the tree (left stopped) streaming its pages
// to it, the images copied, the restore. The source tree is killed once
// the copy is restored (on a failure it is resumed, then killed). It
// returns the restored root's pid, the total and the dump's time.
func bareCopy(pid int, src, dst, port string, h bareHosts) (rpid int, total, dump time.Duration, err error) {
	start := time.Now()
	// --daemon: criu returns once the page server listens.
	if err := criuIn(h.destNS, "page-server", "-D", dst, "--address", h.addr, "--port", port, "--daemon", "-o", "ps.log", "-v4"); err != nil {
		kill(pid)
		return 0, 0, 0, err
	}
	dumpStart := time.Now()
	if err := criuIn(h.srcNS, append([]string{"dump", "-t", strconv.Itoa(pid), "-D", src, "--page-server", "--address", h.addr,
		"--port", port, "--leave-stopped", "-o", "dump.log"}, bareCommon...)...); err != nil {
		kill(pid)
		return 0, 0, 0, err
	}
	dump = time.Since(dumpStart)
	if err := copyImages(src, dst); err != nil {
		kill(pid)
		return 0, 0, 0, err
	}
	pidfile := filepath.Join(dst, "restored.pid")
	if err := criuIn(h.destNS, append([]string{"restore", "-D", dst, "--restore-detached", "--pidfile", pidfile, "-o", "restore.log"}, bareCommon...)...); err != nil {
		syscall.Kill(pid, syscall.SIGCONT)
		kill(pid)
		return 0, 0, 0, err
	}
	kill(pid)
	total = time.Since(start)
	rpid, err = readPid(pidfile)
	return rpid, total, dump, err
}

// runBareLazy is CRIU's post-copy by hand: the dump serves the pages over
// TCP once its images are written; the destination's lazy-pages daemon
// fetches them for a restore that runs before they are in.
func runBareLazy(c config, bin string, ld load, i int) (measure, error) {
	w, err := startWorkload(c, bin, ld)
	if err != nil {
		return measure{}, err
	}
	defer w.Kill()
	src, dst, err := bareDirs(c, "lazy", i)
	if err != nil {
		return measure{}, err
	}
	defer os.RemoveAll(src)
	defer os.RemoveAll(dst)
	port := strconv.Itoa(24200 + i%50)

	start := time.Now()
	dump := exec.Command("criu", append([]string{"dump", "-t", strconv.Itoa(w.PID), "-D", src, "--lazy-pages",
		"--address", "127.0.0.1", "--port", port, "--leave-stopped", "-o", "dump.log"}, bareCommon...)...)
	var dumpOut bytes.Buffer
	dump.Stdout, dump.Stderr = &dumpOut, &dumpOut
	if err := dump.Start(); err != nil {
		kill(w.PID)
		return measure{}, err
	}
	dumped := make(chan error, 1)
	go func() { dumped <- dump.Wait() }()
	fail := func(err error) (measure, error) {
		dump.Process.Kill()
		<-dumped
		syscall.Kill(w.PID, syscall.SIGCONT)
		kill(w.PID)
		return measure{}, fmt.Errorf("%w\n%s", err, dumpOut.String())
	}
	// The images are written and the page server listens.
	if err := harness.WaitUntil(30*time.Second, func() bool {
		b, _ := os.ReadFile(filepath.Join(src, "dump.log"))
		return bytes.Contains(b, []byte("Starting lazy pages server")) && listening(port)
	}); err != nil {
		return fail(fmt.Errorf("lazy dump did not start serving: %w", err))
	}
	if err := copyImages(src, dst); err != nil {
		return fail(err)
	}
	lp := exec.Command("criu", "lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", port,
		"-D", dst, "-W", dst, "-o", "lazy-pages.log", "-v4")
	var lpOut bytes.Buffer
	lp.Stdout, lp.Stderr = &lpOut, &lpOut
	if err := lp.Start(); err != nil {
		return fail(err)
	}
	lpDone := make(chan error, 1)
	go func() { lpDone <- lp.Wait() }()
	if err := harness.WaitUntil(10*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(dst, "lazy-pages.socket"))
		return err == nil
	}); err != nil {
		lp.Process.Kill()
		return fail(fmt.Errorf("lazy-pages did not start: %w\n%s", err, lpOut.String()))
	}
	pidfile := filepath.Join(dst, "restored.pid")
	if err := criu(append([]string{"restore", "-D", dst, "-W", dst, "--lazy-pages", "--restore-detached", "--pidfile", pidfile, "-o", "restore.log"}, bareCommon...)...); err != nil {
		lp.Process.Kill()
		return fail(err)
	}
	rpid, err := readPid(pidfile)
	if err != nil {
		return fail(err)
	}
	defer kill(rpid)
	// Every page is in once lazy-pages exits; the dump then ends too.
	if err := <-lpDone; err != nil {
		return fail(fmt.Errorf("lazy-pages: %v\n%s", err, lpOut.String()))
	}
	if err := <-dumped; err != nil {
		return measure{}, fmt.Errorf("lazy dump: %v\n%s", err, dumpOut.String())
	}
	kill(w.PID)
	total := time.Since(start)
	pause, err := pauseAfter(w, rpid)
	if err != nil {
		return measure{}, err
	}
	return measure{pause: pause, total: ms(total), mbps: mbps(ld, ms(total))}, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func readPid(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// listening reports whether a TCP socket listens on port (from
// /proc/net/tcp: state 0A), without connecting to it.
func listening(port string) bool {
	n, _ := strconv.Atoi(port)
	b, _ := os.ReadFile("/proc/net/tcp")
	want := fmt.Sprintf(":%04X ", n)
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 3 && strings.HasSuffix(f[1]+" ", want) && f[3] == "0A" {
			return true
		}
	}
	return false
}

// rssMiB is a process's resident memory.
func rssMiB(pid int) float64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

func memTotal() string {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return fmt.Sprintf("%.0f GiB", kb/(1<<20))
		}
	}
	return "? GiB"
}

func criuVersion() string {
	out, err := exec.Command("criu", "--version").Output()
	if err != nil {
		return "criu ?"
	}
	if f := strings.Fields(string(out)); len(f) >= 2 {
		return "criu " + f[1]
	}
	return "criu ?"
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

func criu(args ...string) error { return criuIn("", args...) }

// criuIn runs criu in the named network namespace ("": this one).
func criuIn(ns string, args ...string) error {
	cmd := exec.Command("criu", args...)
	if ns != "" {
		cmd = exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns, "--", "criu"}, args...)...)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("criu %s: %v\n%s", args[0], err, out.String())
	}
	return nil
}

func copyImages(src, dst string) error {
	ents, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".log") || strings.HasPrefix(e.Name(), "stats-") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600); err != nil {
			return err
		}
	}
	return nil
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// loopbackMBps is one Go TCP stream's throughput from 127.0.0.1 to
// 127.0.0.2: the ceiling for moving pages on this machine.
func loopbackMBps() float64 {
	l, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		return 0
	}
	defer l.Close()
	const total = 2 << 30
	done := make(chan time.Duration)
	go func() {
		c, err := l.Accept()
		if err != nil {
			done <- 0
			return
		}
		start := time.Now()
		io.Copy(io.Discard, c)
		done <- time.Since(start)
	}()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}
	c, err := d.Dial("tcp", l.Addr().String())
	if err != nil {
		return 0
	}
	buf := make([]byte, 1<<20)
	for n := 0; n < total; n += len(buf) {
		c.Write(buf)
	}
	c.Close()
	el := <-done
	return float64(total) / 1e6 / el.Seconds()
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "model name") {
			if i := strings.Index(line, ":"); i >= 0 {
				return strings.TrimSpace(line[i+1:])
			}
		}
	}
	return "unknown CPU"
}

func numCPU() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(b), "processor\t:")
}

func kernel() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}
