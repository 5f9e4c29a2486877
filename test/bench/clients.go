//go:build linux

package main

import (
	"context"
	"fmt"
	"os"
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

// The pause of a service with connected clients, against the same service
// with none: redis-server from Debian, in its own pid and network
// namespace with a veth to its host's bridge (harness.Lab: hosts are
// network namespaces on one segment), migrated back and forth between
// phauld A and B (mutual TLS) while N clients on a third host each keep
// one connection and send INCR every 20 ms. Its namespace and its N
// connections move with it. For each N and mode, in rotating order:
//
//   - frozen: phaul's own figure, from the freeze to the copy running on
//     the destination (the network is locked exactly as long);
//   - client wait: the longest any client waited for one reply, over all
//     clients (what they saw of the migration), N >= 1 only.

// clientsRow is one client count in one mode.
type clientsRow struct {
	clients     int
	mode        string
	frozen      []float64
	clientWait  []float64
	connections []float64
}

func runClients(c config, counts []int) error {
	lab, err := harness.NewLab("br0")
	if err != nil {
		return err
	}
	defer lab.Close()
	tlsDir := filepath.Join(c.work, "lab-tls")
	if err := os.MkdirAll(tlsDir, 0o755); err != nil {
		return err
	}
	ca := filepath.Join(tlsDir, "ca")
	if err := pki.Init(ca, []string{harness.LabHostAddr("A")}); err != nil {
		return err
	}
	var ds [2]*harness.Daemon
	for i, host := range []string{"A", "B"} {
		d, err := harness.StartDaemon(harness.DaemonConfig{
			Name: "lab-" + host, Addr: harness.LabHostAddr(host) + ":24100",
			Dir: filepath.Join(c.work, "lab-"+host), Phauld: filepath.Join(c.bin, "phauld"),
			Phaulctl: filepath.Join(c.bin, "phaulctl"), CA: ca,
			Wrap: []string{"nsenter", "--net=" + lab.Path(host)},
		})
		if err != nil {
			return err
		}
		defer d.Stop(time.Minute)
		ds[i] = d
	}
	data := filepath.Join(c.work, "redis")
	if err := os.MkdirAll(data, 0o755); err != nil {
		return err
	}
	svc, err := lab.StartRedis(data, c.work)
	if err != nil {
		return err
	}
	defer svc.Stop()

	rows := map[string]*clientsRow{}
	var order []string
	for _, mode := range []string{api.ModeCopy, api.ModeLazy} {
		for _, n := range counts {
			k := fmt.Sprintf("%d %s", n, mode)
			rows[k] = &clientsRow{clients: n, mode: mode}
			order = append(order, k)
		}
	}
	pid, at := svc.PID, 0 // where the service runs: ds[at]
	for i := 0; i < c.runs; i++ {
		for j := range order {
			r := rows[order[(i+j)%len(order)]]
			var clients []*harness.RedisClient
			halt := func() {
				for _, rc := range clients {
					rc.Halt()
				}
			}
			for k := 0; k < r.clients; k++ {
				rc, err := lab.StartRedisClient(fmt.Sprintf("k%d-%d-%d", i, j, k), 20*time.Millisecond) // a key of its own, from 0
				if err != nil {
					halt()
					return fmt.Errorf("client %d: %w", k+1, err)
				}
				clients = append(clients, rc)
			}
			time.Sleep(300 * time.Millisecond)
			for _, rc := range clients {
				rc.ResetGap()
			}
			src, dst := ds[at], ds[1-at]
			res, err := client.New(src.Socket).Migrate(context.Background(), api.MigrateRequest{PID: pid, To: dst.Addr, Mode: r.mode}, nil)
			if err != nil {
				halt()
				return fmt.Errorf("%d clients, %s, %s to %s: %w", r.clients, r.mode, src.Name, dst.Name, err)
			}
			pid, at = res.DestPID, 1-at
			time.Sleep(300 * time.Millisecond)
			var wait time.Duration
			for k, rc := range clients {
				_, gap, err := rc.State()
				if err != nil {
					halt()
					return fmt.Errorf("%d clients, %s: client %d: %w", r.clients, r.mode, k+1, err)
				}
				wait = max(wait, gap)
			}
			halt()
			conns := 0
			if res.Network != nil {
				conns = res.Network.TCPConnections
			}
			fmt.Fprintf(os.Stderr, "  %3d clients %-5s run %d: frozen %5d ms, longest client wait %7.1f ms, %3d connections carried\n",
				r.clients, r.mode, i+1, res.FrozenMS, ms(wait), conns)
			r.frozen = append(r.frozen, float64(res.FrozenMS))
			r.clientWait = append(r.clientWait, ms(wait))
			r.connections = append(r.connections, float64(conns))
		}
	}

	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "service\tmode\tclients\tconnections carried\tfrozen ms\tlongest client wait ms\tfrozen / none\t")
	for _, k := range order {
		r := rows[k]
		none := rows[fmt.Sprintf("%d %s", counts[0], r.mode)]
		wait, ratio := "-", ""
		if r.clients > 0 {
			wait = fmt.Sprintf("%.0f", median(r.clientWait))
		}
		if r != none {
			ratio = fmt.Sprintf("%.2f", median(r.frozen)/median(none.frozen))
		}
		fmt.Fprintf(tw, "redis\t%s\t%d\t%.0f\t%.0f\t%s\t%s\t\n", r.mode, r.clients, median(r.connections), median(r.frozen), wait, ratio)
	}
	tw.Flush()
	fmt.Printf("\nmedians of %d runs each, in rotating order, migrated back and forth between two network namespaces.\n"+
		"frozen: phaul's figure, the freeze until the copy runs on the destination (the network is locked as long).\n"+
		"longest client wait: the longest any client waited for one reply. frozen / none: against %d clients.\n", c.runs, counts[0])
	return nil
}

// parseCounts reads -clients: a comma-separated list of client counts,
// the first the baseline.
func parseCounts(name, s string) ([]int, error) {
	var counts []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 0 {
			return nil, fmt.Errorf("-%s: %q is not a count", name, f)
		}
		counts = append(counts, n)
	}
	return counts, nil
}
