//go:build linux

package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/client"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/test/harness"
)

// Lazy mode at scale, on loopback between phauld over mutual TLS: a
// process of pseudo-random memory at each size, moved by copy mode, by
// lazy mode with the destination fetching ahead of CRIU's lazy-pages
// (phauld's default) and by lazy mode without (--fetch-ahead 0, as before
// it): the pause, the frozen time's dump phase, when the last page
// arrived after the process resumed, and the rate of that background
// transfer against copy mode's.

const (
	lazyAhead   = "lazy"
	lazyNoAhead = "lazy, no fetch-ahead"
)

var lazyScaleModes = []string{api.ModeCopy, lazyAhead, lazyNoAhead}

type lazyMeasure struct {
	pause, frozen, dump, last, rate, fetched float64
}

func runLazyScale(c config, workload string, sizes []int) error {
	ca := filepath.Join(c.work, "lazy-ca")
	if err := pki.Init(ca, []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"}); err != nil {
		return err
	}
	// A is the source; B fetches ahead (the default), C does not.
	var ds [3]*harness.Daemon
	for i, addr := range []string{"127.0.0.1:24211", "127.0.0.2:24212", "127.0.0.3:24213"} {
		cfg := harness.DaemonConfig{
			Name: fmt.Sprintf("lazy-%c", 'A'+i), Addr: addr, Dir: filepath.Join(c.work, fmt.Sprintf("lazy-%c", 'A'+i)),
			Phauld: filepath.Join(c.bin, "phauld"), Phaulctl: filepath.Join(c.bin, "phaulctl"), CA: ca,
		}
		if i == 2 {
			cfg.Flags = []string{"--fetch-ahead", "0"}
		}
		d, err := harness.StartDaemon(cfg)
		if err != nil {
			return err
		}
		defer d.Stop(time.Minute)
		ds[i] = d
	}
	for _, size := range sizes {
		rows := map[string][]lazyMeasure{}
		for i := 0; i < c.runs; i++ {
			for j := range lazyScaleModes {
				mode := lazyScaleModes[(i+j)%len(lazyScaleModes)]
				to := ds[1]
				if mode == lazyNoAhead {
					to = ds[2]
				}
				x, err := runLazyOnce(c, workload, size, ds[0], to, mode)
				if err != nil {
					return fmt.Errorf("%d MiB, %s: %w", size, mode, err)
				}
				fmt.Fprintf(os.Stderr, "  %5d MiB, %-21s run %d: pause %6.1f ms, frozen %5.0f ms (dump %4.0f), last page %6.0f ms after resume, %5.0f MB/s, %.0f pages fetched ahead\n",
					size, mode, i+1, x.pause, x.frozen, x.dump, x.last, x.rate, x.fetched)
				rows[mode] = append(rows[mode], x)
			}
		}
		fmt.Printf("\nloopback, %d MiB:\n", size)
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "mode\tpause ms\tfrozen ms\tdump phase ms\tlast page ms\tMB/s\tfetched ahead\trate / copy\t")
		col := func(v []lazyMeasure, f func(lazyMeasure) float64) float64 {
			var xs []float64
			for _, x := range v {
				xs = append(xs, f(x))
			}
			return median(xs)
		}
		copyRate := col(rows[api.ModeCopy], func(x lazyMeasure) float64 { return x.rate })
		for _, m := range lazyScaleModes {
			r := rows[m]
			last := ""
			if m != api.ModeCopy {
				last = fmt.Sprintf("%.0f", col(r, func(x lazyMeasure) float64 { return x.last }))
			}
			rate := col(r, func(x lazyMeasure) float64 { return x.rate })
			fmt.Fprintf(tw, "%s\t%.0f\t%.0f\t%.0f\t%s\t%.0f\t%.0f\t%.2f\t\n", m,
				col(r, func(x lazyMeasure) float64 { return x.pause }), col(r, func(x lazyMeasure) float64 { return x.frozen }),
				col(r, func(x lazyMeasure) float64 { return x.dump }), last, rate,
				col(r, func(x lazyMeasure) float64 { return x.fetched }), rate/copyRate)
		}
		tw.Flush()
	}
	fmt.Printf("medians of %d runs each, in rotating order; pause: the longest gap the process saw in its\n"+
		"10 ms ticks; last page: when the last page arrived after the process resumed (lazy); MB/s:\n"+
		"the memory over the time it crossed (copy: its dump phase, as the table above counts it;\n"+
		"lazy: from the resume to the last page); mutual TLS.\n", c.runs)
	return nil
}

// runLazyOnce moves a new workload of size MiB from a to b in mode.
func runLazyOnce(c config, bin string, size int, a, b *harness.Daemon, mode string) (lazyMeasure, error) {
	dir, err := os.MkdirTemp(c.work, "w-")
	if err != nil {
		return lazyMeasure{}, err
	}
	w, err := harness.StartWorkload(harness.WorkloadConfig{Bin: bin, Dir: dir, MemMiB: size, Seed: 1})
	if err != nil {
		return lazyMeasure{}, err
	}
	defer w.Kill()
	if _, err := w.Report(w.PID); err != nil {
		return lazyMeasure{}, err
	}
	m := api.ModeCopy
	if mode != api.ModeCopy {
		m = api.ModeLazy
	}
	res, err := client.New(a.Socket).Migrate(context.Background(), api.MigrateRequest{PID: w.PID, To: b.Addr, Mode: m}, nil)
	if err != nil {
		return lazyMeasure{}, err
	}
	defer kill(res.DestPID)
	w.Track(res.DestPID)
	// Every page is in before the migration returns: the report reads
	// the whole memory without faulting a page across.
	time.Sleep(50 * time.Millisecond)
	r, err := w.Report(res.DestPID)
	if err != nil {
		return lazyMeasure{}, err
	}
	if r.Sum != r.Expect {
		return lazyMeasure{}, fmt.Errorf("after migration: checksum %s, want %s", r.Sum, r.Expect)
	}
	bytes := float64(size) * (1 << 20)
	x := lazyMeasure{pause: float64(r.GapNS) / 1e6, frozen: float64(res.FrozenMS), dump: float64(res.PhasesMS["dump"]),
		fetched: float64(res.FetchedAhead)}
	if m == api.ModeLazy {
		x.last = float64(res.LazyMS)
		x.rate = bytes / 1e6 / (max(x.last, 1) / 1e3)
	} else {
		// As the main table counts copy mode: the memory over its dump.
		x.rate = bytes / 1e6 / (max(x.dump, 1) / 1e3)
	}
	return x, nil
}
