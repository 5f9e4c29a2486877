//go:build linux

// Command bench measures phaul against the bare CRIU pipeline on the same
// workloads, in alternating runs, and prints figures and ratios. It is what
// `make bench` runs (as root, with bin/phauld and bin/phaulctl built).
//
// For each workload size it rotates through:
//
//   - bare: the CRIU pipeline scripted by hand, the fastest thing CRIU
//     offers for a copy migration: `criu page-server` on the destination
//     address, `criu dump --page-server --leave-stopped` straight to it,
//     copy the other images, `criu restore --restore-detached`, kill the
//     source;
//   - phaul insecure: `phaulctl migrate` between two phauld --insecure;
//   - phaul TLS: the same between two daemons speaking mutual TLS.
//
// It reports the median pause the workload saw (the longest gap in its own
// 10 ms ticking), the median total time, the dump phase (pages moved; for
// phaul, through its relay), the ratios to bare CRIU, the cost of
// encryption as TLS / insecure, and raw loopback TCP throughput as the
// ceiling.
package main

import (
	"bytes"
	"context"
	"encoding/json"
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
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type config struct {
	bin   string
	sizes []int
	runs  int
	work  string
}

func run() error {
	var c config
	sizes := flag.String("sizes", "256,1024", "workload sizes in MiB, comma-separated")
	flag.IntVar(&c.runs, "runs", 5, "runs of each mode per size")
	flag.StringVar(&c.bin, "bin", "bin", "directory with phauld and phaulctl")
	flag.Parse()
	for _, s := range strings.Split(*sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n <= 0 {
			return fmt.Errorf("bad size %q", s)
		}
		c.sizes = append(c.sizes, n)
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (CRIU)")
	}
	var err error
	if c.work, err = os.MkdirTemp("", "phaul-bench-"); err != nil {
		return err
	}
	defer os.RemoveAll(c.work)
	workload := filepath.Join(c.work, "workload")
	if out, err := exec.Command("go", "build", "-o", workload, "./test/workload").CombinedOutput(); err != nil {
		return fmt.Errorf("build workload: %v\n%s", err, out)
	}

	// Two pairs of daemons: one over mutual TLS (the default), one with
	// --insecure, so that the cost of encryption shows as a ratio.
	tlsDir := filepath.Join(c.work, "tls")
	if err := pki.Init(filepath.Join(tlsDir, "ca"), []string{"127.0.0.1"}); err != nil {
		return err
	}
	pairs := map[string][2]*daemon{}
	for i, mode := range []string{modeTLS, modeInsecure} {
		var flags [2][]string
		if mode == modeInsecure {
			flags = [2][]string{{"--insecure"}, {"--insecure"}}
		} else {
			for j, host := range []string{"127.0.0.1", "127.0.0.2"} {
				dir := filepath.Join(tlsDir, host)
				if err := pki.Issue(filepath.Join(tlsDir, "ca"), dir, []string{host}); err != nil {
					return err
				}
				flags[j] = []string{"--tls-dir", dir}
			}
		}
		a, err := startDaemon(c, mode+"-A", fmt.Sprintf("127.0.0.1:%d", 24001+10*i), flags[0])
		if err != nil {
			return err
		}
		defer a.stop()
		b, err := startDaemon(c, mode+"-B", fmt.Sprintf("127.0.0.2:%d", 24002+10*i), flags[1])
		if err != nil {
			return err
		}
		defer b.stop()
		pairs[mode] = [2]*daemon{a, b}
	}

	host, _ := os.Hostname()
	fmt.Printf("phaul bench on %s: %s, %d CPUs, kernel %s\n", host, cpuModel(), numCPU(), kernel())
	fmt.Printf("loopback TCP, one stream (ceiling): %.0f MB/s\n\n", loopbackMBps())

	type row struct {
		size                  int
		mode                  string
		pause, total, dumpPhs []float64
	}
	modes := []string{modeBare, modeInsecure, modeTLS}
	var table [][]*row
	for _, size := range c.sizes {
		rows := map[string]*row{}
		for _, m := range modes {
			rows[m] = &row{size: size, mode: m}
		}
		for i := 0; i < c.runs; i++ {
			// Rotate which goes first, so that drift in the machine's
			// load does not favour one.
			for j := range modes {
				mode := modes[(i+j)%len(modes)]
				var m measure
				var err error
				if mode == modeBare {
					m, err = runBare(c, workload, size, i)
				} else {
					m, err = runPhaul(c, workload, size, pairs[mode][0], pairs[mode][1])
				}
				if err != nil {
					return fmt.Errorf("%s, %d MiB: %w", mode, size, err)
				}
				fmt.Fprintf(os.Stderr, "  %-14s %5d MiB run %d: pause %7.1f ms, total %7.1f ms, dump %7.1f ms\n",
					mode, size, i+1, m.pause, m.total, m.dump)
				r := rows[mode]
				r.pause = append(r.pause, m.pause)
				r.total = append(r.total, m.total)
				r.dumpPhs = append(r.dumpPhs, m.dump)
			}
		}
		var line []*row
		for _, m := range modes {
			line = append(line, rows[m])
		}
		table = append(table, line)
	}

	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "workload\tmode\tpause ms\ttotal ms\tdump ms\tdump MB/s\tpause / bare\ttotal / bare\tpause / insecure\t")
	for _, line := range table {
		bare, insecure := line[0], line[1]
		for _, r := range line {
			mbps := float64(r.size<<20) / 1e6 / (median(r.dumpPhs) / 1000)
			vsInsecure := "-"
			if r.mode == modeTLS {
				vsInsecure = fmt.Sprintf("%.2f", median(r.pause)/median(insecure.pause))
			}
			fmt.Fprintf(tw, "%d MiB\t%s\t%.0f\t%.0f\t%.0f\t%.0f\t%.2f\t%.2f\t%s\t\n", r.size, r.mode,
				median(r.pause), median(r.total), median(r.dumpPhs), mbps,
				median(r.pause)/median(bare.pause), median(r.total)/median(bare.total), vsInsecure)
		}
	}
	tw.Flush()
	fmt.Printf("\nmedians of %d runs each, in rotating order. pause: the longest gap in the process's own 10 ms ticking.\n"+
		"dump: freezing and moving the pages (bare: criu dump to the page server over TCP; phaul: its dump phase,\n"+
		"pages through phauld's relay). %q runs mutual TLS; %q the same over plain TCP.\n", c.runs, modeTLS, modeInsecure)
	return nil
}

// Modes of a run.
const (
	modeBare     = "bare CRIU"
	modeInsecure = "phaul insecure"
	modeTLS      = "phaul TLS"
)

type measure struct {
	pause, total, dump float64 // milliseconds
	bytes              int64
}

// daemon is a phauld for the benchmark.
type daemon struct {
	addr, socket string
	cmd          *exec.Cmd
}

func startDaemon(c config, name, addr string, flags []string) (*daemon, error) {
	dir := filepath.Join(c.work, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	d := &daemon{addr: addr, socket: filepath.Join(dir, "ctl.sock")}
	logf, err := os.Create(filepath.Join(dir, "phauld.log"))
	if err != nil {
		return nil, err
	}
	d.cmd = exec.Command(filepath.Join(c.bin, "phauld"), append([]string{"--listen", addr, "--control", d.socket, "--state-dir", dir}, flags...)...)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if err := d.cmd.Start(); err != nil {
		return nil, err
	}
	for i := 0; i < 300; i++ {
		if _, err := client.New(d.socket).Status(context.Background()); err == nil {
			return d, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.stop()
	return nil, fmt.Errorf("phauld %s did not start (log: %s)", name, logf.Name())
}

func (d *daemon) stop() {
	d.cmd.Process.Signal(syscall.SIGTERM)
	d.cmd.Wait()
}

// workload is one started test process, the init of its own pid
// namespace.
type workload struct {
	status string
	holder *exec.Cmd
	pid    int
}

type report struct {
	Seq   uint64 `json:"seq"`
	GapNS int64  `json:"gap_ns"`
	Sum   string `json:"sum"`
	Want  string `json:"expect"`
}

func startWorkload(c config, bin string, size int) (*workload, error) {
	dir, err := os.MkdirTemp(c.work, "w-")
	if err != nil {
		return nil, err
	}
	w := &workload{status: filepath.Join(dir, "status.json")}
	w.holder = exec.Command("unshare", "-p", "-f", "--", "setsid", bin, "--mem", strconv.Itoa(size), "--status", w.status)
	w.holder.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := w.holder.Start(); err != nil {
		return nil, err
	}
	go w.holder.Wait()
	for i := 0; i < 600; i++ {
		kids, _ := proc.Children(w.holder.Process.Pid)
		if len(kids) == 1 {
			if _, err := os.Stat(w.status); err == nil {
				w.pid = kids[0]
				return w, nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil, fmt.Errorf("workload did not start")
}

// ask makes the process pid report, and returns the report.
func (w *workload) ask(pid int) (report, error) {
	var before report
	if b, err := os.ReadFile(w.status); err == nil {
		json.Unmarshal(b, &before)
	}
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		return report{}, err
	}
	for i := 0; i < 1000; i++ {
		var r report
		if b, err := os.ReadFile(w.status); err == nil && json.Unmarshal(b, &r) == nil && r.Seq > before.Seq {
			return r, nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	return report{}, fmt.Errorf("pid %d did not report", pid)
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
func pauseAfter(w *workload, pid int) (float64, error) {
	time.Sleep(50 * time.Millisecond)
	r, err := w.ask(pid)
	if err != nil {
		return 0, err
	}
	if r.Sum != r.Want {
		return 0, fmt.Errorf("memory checksum %s after migration, want %s", r.Sum, r.Want)
	}
	return float64(r.GapNS) / 1e6, nil
}

func runPhaul(c config, bin string, size int, a, b *daemon) (measure, error) {
	w, err := startWorkload(c, bin, size)
	if err != nil {
		return measure{}, err
	}
	defer w.holder.Process.Kill()
	if _, err := w.ask(w.pid); err != nil { // resets the gap
		kill(w.pid)
		return measure{}, err
	}
	res, err := client.New(a.socket).Migrate(context.Background(), api.MigrateRequest{PID: w.pid, To: b.addr}, nil)
	if err != nil {
		kill(w.pid)
		return measure{}, err
	}
	defer kill(res.DestPID)
	pause, err := pauseAfter(w, res.DestPID)
	if err != nil {
		return measure{}, err
	}
	return measure{pause: pause, total: float64(res.TotalMS), dump: float64(res.PhasesMS["dump"]), bytes: res.Bytes}, nil
}

// runBare is the CRIU pipeline by hand, over TCP between the same two
// loopback addresses the daemons use.
func runBare(c config, bin string, size, i int) (measure, error) {
	w, err := startWorkload(c, bin, size)
	if err != nil {
		return measure{}, err
	}
	defer w.holder.Process.Kill()
	if _, err := w.ask(w.pid); err != nil {
		kill(w.pid)
		return measure{}, err
	}
	src := filepath.Join(c.work, fmt.Sprintf("bare-src-%d-%d", size, i))
	dst := filepath.Join(c.work, fmt.Sprintf("bare-dst-%d-%d", size, i))
	for _, d := range []string{src, dst} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return measure{}, err
		}
		defer os.RemoveAll(d)
	}
	port := strconv.Itoa(24100 + i%50)
	common := []string{"--network-lock", "skip", "--manage-cgroups=ignore", "-v4"}

	start := time.Now()
	// --daemon: criu returns once the page server listens.
	if err := criu(append([]string{"page-server", "-D", dst, "--address", "127.0.0.2", "--port", port, "--daemon", "-o", "ps.log"}, "-v4")...); err != nil {
		kill(w.pid)
		return measure{}, err
	}
	dumpStart := time.Now()
	if err := criu(append([]string{"dump", "-t", strconv.Itoa(w.pid), "-D", src, "--page-server", "--address", "127.0.0.2",
		"--port", port, "--leave-stopped", "-o", "dump.log"}, common...)...); err != nil {
		kill(w.pid)
		return measure{}, err
	}
	dump := time.Since(dumpStart)
	if err := copyImages(src, dst); err != nil {
		kill(w.pid)
		return measure{}, err
	}
	pidfile := filepath.Join(dst, "restored.pid")
	if err := criu(append([]string{"restore", "-D", dst, "--restore-detached", "--pidfile", pidfile, "-o", "restore.log"}, common...)...); err != nil {
		syscall.Kill(w.pid, syscall.SIGCONT)
		kill(w.pid)
		return measure{}, err
	}
	kill(w.pid)
	total := time.Since(start)
	b, err := os.ReadFile(pidfile)
	if err != nil {
		return measure{}, err
	}
	rpid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	defer kill(rpid)
	pause, err := pauseAfter(w, rpid)
	if err != nil {
		return measure{}, err
	}
	return measure{pause: pause, total: ms(total), dump: ms(dump)}, nil
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

func criu(args ...string) error {
	cmd := exec.Command("criu", args...)
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
