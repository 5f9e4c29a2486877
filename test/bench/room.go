//go:build linux

package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/client"
	"github.com/phaul/phaul/test/harness"
)

// Room for the service: over the shaped link, a TCP stream from host A to
// host B stands for the service's own traffic. Its throughput alone, and
// while a process moves A -> B in copy mode with no limit and at
// --bwlimit, shows what the limit leaves it.

const roomLimit = "40M"

// inNetNS runs fn on a thread in the named network namespace: sockets fn
// makes stay in it. The thread goes back to this process's namespace; if
// it cannot, it is left locked, and Go ends it with the goroutine.
func inNetNS(name string, fn func() error) error {
	runtime.LockOSThread()
	self, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer self.Close()
	ns, err := os.Open("/run/netns/" + name)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer ns.Close()
	if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("setns %s: %w", name, err)
	}
	ferr := fn()
	if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("back from %s: %w", name, err)
	}
	runtime.UnlockOSThread()
	return ferr
}

// serviceStream is the service's traffic: a sender in nsA writing as fast
// as it can to a sink in nsB, which counts what arrives.
type serviceStream struct {
	got  atomic.Int64
	stop atomic.Bool
	l    net.Listener
	c    net.Conn
}

func startServiceStream(nsA, nsB, addr string) (*serviceStream, error) {
	s := &serviceStream{}
	if err := inNetNS(nsB, func() (err error) { s.l, err = net.Listen("tcp", addr); return err }); err != nil {
		return nil, err
	}
	go func() {
		c, err := s.l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 256<<10)
		for {
			n, err := c.Read(buf)
			s.got.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	if err := inNetNS(nsA, func() (err error) { s.c, err = net.Dial("tcp", addr); return err }); err != nil {
		s.l.Close()
		return nil, err
	}
	go func() {
		buf := make([]byte, 64<<10)
		for !s.stop.Load() {
			if _, err := s.c.Write(buf); err != nil {
				return
			}
		}
	}()
	return s, nil
}

func (s *serviceStream) close() {
	s.stop.Store(true)
	s.c.Close()
	s.l.Close()
}

// rate is the stream's MB/s while fn runs.
func (s *serviceStream) rate(fn func() error) (float64, time.Duration, error) {
	n0, t0 := s.got.Load(), time.Now()
	err := fn()
	d := time.Since(t0)
	return float64(s.got.Load()-n0) / 1e6 / d.Seconds(), d, err
}

func runRoom(c config, workload, nsA, nsB string, pair [2]*harness.Daemon) error {
	s, err := startServiceStream(nsA, nsB, "10.214.0.2:24150")
	if err != nil {
		return err
	}
	defer s.close()
	alone, _, _ := s.rate(func() error { time.Sleep(2 * time.Second); return nil })
	fmt.Printf("the service's stream alone: %.0f MB/s\n", alone)
	limit, err := strconv.ParseInt(roomLimit[:len(roomLimit)-1], 10, 64)
	if err != nil {
		return err
	}
	for _, bw := range []int64{0, limit << 20} {
		dir, err := os.MkdirTemp(c.work, "w-")
		if err != nil {
			return err
		}
		w, err := harness.StartWorkload(harness.WorkloadConfig{Bin: workload, Dir: dir, MemMiB: 1, Seed: 1, NetNS: nsA,
			Extra: []string{"--text", strconv.Itoa(shapedTextMiB)}})
		if err != nil {
			return err
		}
		var res api.Result
		during, took, err := s.rate(func() (err error) {
			res, err = client.New(pair[0].Socket).Migrate(context.Background(),
				api.MigrateRequest{PID: w.PID, To: pair[1].Addr, Mode: api.ModeCopy, BWLimit: bw}, nil)
			return err
		})
		if err == nil {
			w.Track(res.DestPID)
		}
		w.Kill()
		if err != nil {
			return fmt.Errorf("migrate at bwlimit %d: %w", bw, err)
		}
		what := "no limit"
		if bw > 0 {
			what = "--bwlimit " + roomLimit
		}
		fmt.Printf("migration with %-14s: %5.1f MB in %5.0f ms (frozen %5d ms, %5.0f MB/s); the service's stream meanwhile %5.0f MB/s (%.0f%% of alone)\n",
			what, float64(res.Bytes)/1e6, float64(took.Milliseconds()), res.FrozenMS, float64(res.Bytes)/1e6/took.Seconds(), during, 100*during/alone)
	}
	return nil
}
