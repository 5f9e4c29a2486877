//go:build linux

package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/client"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/test/harness"
)

// Pre-copy against copy mode and bare CRIU's stop-and-copy, side by side:
// on the shaped link (1 Gbit/s between the two namespaces of runShaped)
// and on loopback. The workload holds pseudo-random memory and rewrites
// part of it with new contents every 10 ms (--churn MiB a tick round a
// region of --churn-span MiB): the pages that change between a round and
// the freeze.

type precopyCase struct {
	name               string
	shaped             bool
	memMiB, churn, spn int
	modes              []string
}

const modeBareShaped = "bare copy"

var precopyCases = []precopyCase{
	{"shaped, 512 MiB, rewrites 1 MiB / 10 ms of 8 MiB", true, 512, 1, 8, []string{modeBareShaped, api.ModeCopy, api.ModePrecopy}},
	{"shaped, 1 GiB, rewrites 32 MiB / 10 ms", true, 1024, 32, 32, []string{api.ModeCopy, api.ModePrecopy}},
	{"loopback, 512 MiB, rewrites 1 MiB / 10 ms of 8 MiB", false, 512, 1, 8, []string{api.ModeCopy, api.ModePrecopy}},
}

type precopyRow struct {
	pause, total, wire     []float64
	rounds, sentMB, reused []float64
	roundGap               []float64
}

func runPrecopy(c config, workload, nsA, nsB string, shaped [2]*harness.Daemon) error {
	ca := filepath.Join(c.work, "precopy-ca")
	if err := pki.Init(ca, []string{"127.0.0.1", "127.0.0.2"}); err != nil {
		return err
	}
	var local [2]*harness.Daemon
	for i, addr := range []string{"127.0.0.1:24111", "127.0.0.2:24112"} {
		d, err := harness.StartDaemon(harness.DaemonConfig{
			Name: fmt.Sprintf("precopy-%c", 'A'+i), Addr: addr, Dir: filepath.Join(c.work, fmt.Sprintf("precopy-%c", 'A'+i)),
			Phauld: filepath.Join(c.bin, "phauld"), Phaulctl: filepath.Join(c.bin, "phaulctl"), CA: ca,
		})
		if err != nil {
			return err
		}
		defer d.Stop(time.Minute)
		local[i] = d
	}
	for _, pc := range precopyCases {
		if c.precopyCase != "" && !strings.Contains(pc.name, c.precopyCase) {
			continue
		}
		rows := map[string]*precopyRow{}
		for _, m := range pc.modes {
			rows[m] = &precopyRow{}
		}
		for i := 0; i < c.runs; i++ {
			for j := range pc.modes {
				mode := pc.modes[(i+j)%len(pc.modes)]
				pair, ns := local, ""
				if pc.shaped {
					pair, ns = shaped, nsA
				}
				var x precopyMeasure
				var err error
				if mode == modeBareShaped {
					x, err = runBareShaped(c, workload, pc, nsA, nsB, i)
				} else {
					x, err = runPrecopyOnce(c, workload, pc, ns, pair, mode, false)
				}
				if err != nil {
					return fmt.Errorf("%s, %s: %w", pc.name, mode, err)
				}
				fmt.Fprintf(os.Stderr, "  %s, %-9s run %d: pause %7.1f ms, total %7.1f ms, %7.1f MB on the wire, rounds %.0f (%.0f MB ahead), %.0f pages reused\n",
					pc.name, mode, i+1, x.pause, x.total, x.wire/1e6, x.rounds, x.sentMB, x.reused)
				r := rows[mode]
				r.pause, r.total, r.wire = append(r.pause, x.pause), append(r.total, x.total), append(r.wire, x.wire)
				r.rounds, r.sentMB, r.reused = append(r.rounds, x.rounds), append(r.sentMB, x.sentMB), append(r.reused, x.reused)
			}
		}
		// One more pre-copy run, for the gap in the rounds only: asking
		// the process for reports meanwhile would hide the pause (a
		// report running when the freeze comes restarts its clock).
		pair, ns := local, ""
		if pc.shaped {
			pair, ns = shaped, nsA
		}
		x, err := runPrecopyOnce(c, workload, pc, ns, pair, api.ModePrecopy, true)
		if err != nil {
			return fmt.Errorf("%s, precopy (sampled): %w", pc.name, err)
		}
		fmt.Fprintf(os.Stderr, "  %s, precopy, sampled during the rounds: longest tick gap %.0f ms\n", pc.name, x.roundGap)
		rows[api.ModePrecopy].roundGap = []float64{x.roundGap}
		fmt.Printf("\n%s:\n", pc.name)
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "mode\tpause ms\ttotal ms\twire MB\trounds\tMB ahead\tpages reused\tgap in rounds ms\tpause / copy\ttotal / copy\tpause / bare\t")
		gap := func(r *precopyRow) string {
			if len(r.roundGap) == 0 {
				return ""
			}
			return fmt.Sprintf("%.0f", median(r.roundGap))
		}
		cp := rows[api.ModeCopy]
		bare := rows[modeBareShaped]
		for _, m := range pc.modes {
			r := rows[m]
			ratio := func(base *precopyRow, v, b []float64) string {
				if base == nil || median(b) == 0 {
					return ""
				}
				return fmt.Sprintf("%.2f", median(v)/median(b))
			}
			vsBare := ""
			if bare != nil {
				vsBare = ratio(bare, r.pause, bare.pause)
			}
			fmt.Fprintf(tw, "%s\t%.0f\t%.0f\t%.1f\t%.0f\t%.0f\t%.0f\t%s\t%s\t%s\t%s\t\n", m, median(r.pause), median(r.total), median(r.wire)/1e6,
				median(r.rounds), median(r.sentMB), median(r.reused), gap(r), ratio(cp, r.pause, cp.pause), ratio(cp, r.total, cp.total), vsBare)
		}
		tw.Flush()
	}
	fmt.Printf("medians of %d runs each, in rotating order; pause: the longest gap the process saw in its 10 ms ticks;\n"+
		"gap in rounds: the longest it saw while the rounds read its memory (one more run, asked for\n"+
		"reports meanwhile: its pause is not counted); wire MB: what crossed both\n"+
		"connections (bare copy: the pages only); mutual TLS.\n", c.runs)
	return nil
}

type precopyMeasure struct {
	pause, total, wire     float64
	rounds, sentMB, reused float64
	// roundGap is the longest tick gap the process saw during the rounds.
	roundGap float64
}

func startChurn(c config, bin string, pc precopyCase, ns string) (*harness.Workload, error) {
	dir, err := os.MkdirTemp(c.work, "w-")
	if err != nil {
		return nil, err
	}
	w, err := harness.StartWorkload(harness.WorkloadConfig{Bin: bin, Dir: dir, MemMiB: pc.memMiB, Seed: 1, NetNS: ns,
		Extra: []string{"--churn", strconv.Itoa(pc.churn), "--churn-span", strconv.Itoa(pc.spn)}})
	if err != nil {
		return nil, err
	}
	if _, err := w.Report(w.PID); err != nil {
		w.Kill()
		return nil, err
	}
	return w, nil
}

// churnPause reads the pause from the workload now running as pid, and
// checks all its memory: the checksum, and every rewritten page.
func churnPause(w *harness.Workload, pid int) (float64, error) {
	time.Sleep(50 * time.Millisecond)
	r, err := w.Report(pid)
	if err != nil {
		return 0, err
	}
	if r.Sum != r.Expect || r.ChurnBad != 0 || r.ChurnPages == 0 {
		return 0, fmt.Errorf("after migration: checksum %s, want %s; %d of %d rewritten pages wrong", r.Sum, r.Expect, r.ChurnBad, r.ChurnPages)
	}
	return float64(r.GapNS) / 1e6, nil
}

// runPrecopyOnce migrates a new workload once in mode; with sample, it
// asks the process for reports while the rounds run, and keeps the
// longest tick gap they show (roundGap), not the pause.
func runPrecopyOnce(c config, bin string, pc precopyCase, ns string, pair [2]*harness.Daemon, mode string, sample bool) (precopyMeasure, error) {
	w, err := startChurn(c, bin, pc, ns)
	if err != nil {
		return precopyMeasure{}, err
	}
	defer w.Kill()
	a, b := pair[0], pair[1]
	// While the rounds read its memory the process runs: the longest
	// tick gap it reports meanwhile is what reading it cost it.
	var inRounds atomic.Bool
	stopSampling := make(chan struct{})
	sampled := make(chan float64, 1)
	go func() {
		var worst float64
		defer func() { sampled <- worst }()
		for {
			select {
			case <-stopSampling:
				return
			case <-time.After(300 * time.Millisecond):
			}
			if !sample || !inRounds.Load() {
				continue
			}
			if r, err := w.Report(w.PID); err == nil && inRounds.Load() {
				worst = max(worst, float64(r.GapNS)/1e6)
			}
		}
	}()
	onEvent := func(e api.Event) { inRounds.Store(e.Phase == "precopy") }
	res, err := client.New(a.Socket).Migrate(context.Background(), api.MigrateRequest{PID: w.PID, To: b.Addr, Mode: mode}, onEvent)
	inRounds.Store(false)
	close(stopSampling)
	roundGap := <-sampled
	if err != nil {
		return precopyMeasure{}, err
	}
	defer kill(res.DestPID)
	w.Track(res.DestPID)
	pause, err := churnPause(w, res.DestPID)
	if err != nil {
		return precopyMeasure{}, err
	}
	x := precopyMeasure{pause: pause, total: float64(res.TotalMS), wire: float64(res.Bytes), roundGap: roundGap}
	if p := res.Precopy; p != nil {
		x.rounds, x.reused = float64(len(p.Rounds)), float64(p.ReusedPages)
		for _, r := range p.Rounds {
			x.sentMB += float64(r.Sent) * 4096 / 1e6
		}
		if os.Getenv("PHAUL_BENCH_VERBOSE") != "" {
			fmt.Fprintf(os.Stderr, "    rounds %+v, stop: %s; freeze: %d pages, %d reused, %d bytes on the wire\n",
				p.Rounds, p.Stop, p.FreezePages, p.ReusedPages, res.PageWireBytes)
		}
	}
	if os.Getenv("PHAUL_BENCH_VERBOSE") != "" {
		fmt.Fprintf(os.Stderr, "    %s: phases %v, frozen %d ms\n", mode, res.PhasesMS, res.FrozenMS)
	}
	return x, nil
}

// runBareShaped is bare CRIU's stop-and-copy over the shaped link: a page
// server in B's namespace, the dump in A's (where the workload runs)
// streaming to it, the images copied, the restore in B's.
func runBareShaped(c config, bin string, pc precopyCase, nsA, nsB string, i int) (precopyMeasure, error) {
	w, err := startChurn(c, bin, pc, nsA)
	if err != nil {
		return precopyMeasure{}, err
	}
	defer w.Kill()
	src, dst, err := bareDirs(c, "bare-shaped", i)
	if err != nil {
		return precopyMeasure{}, err
	}
	defer os.RemoveAll(src)
	defer os.RemoveAll(dst)
	rpid, total, _, err := bareCopy(w.PID, src, dst, strconv.Itoa(24150+i%50), bareHosts{addr: "10.214.0.2", srcNS: nsA, destNS: nsB})
	if err != nil {
		return precopyMeasure{}, err
	}
	defer kill(rpid)
	w.Track(rpid)
	pause, err := churnPause(w, rpid)
	if err != nil {
		return precopyMeasure{}, err
	}
	var pages float64
	if fi, err := os.Stat(filepath.Join(dst, "pages-1.img")); err == nil {
		pages = float64(fi.Size())
	}
	return precopyMeasure{pause: pause, total: ms(total), wire: pages}, nil
}
