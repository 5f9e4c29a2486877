//go:build linux

package transport

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/loop"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/wire"
)

// BenchmarkPageStream measures what phauld's relay costs: the same CRIU
// dump of the same process into the same CRIU page server, once with both
// CRIUs on the two ends of one loopback TCP connection ("direct"), once
// with each CRIU on a local socket pair and two session loops relaying over
// that TCP connection ("relay"), and once with the relays speaking mutual
// TLS ("tls"), in rotating order. It reports the median time from the dump
// request to CRIU's post-dump notification (the tree frozen and every page
// across) for each, and the ratios. The dump is then refused, so CRIU
// resumes the process for the next round.
//
// It needs root and CRIU (make bench runs it); the process is 256 MiB
// unless PHAUL_BENCH_MIB says otherwise.
func BenchmarkPageStream(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	if _, err := exec.LookPath("criu"); err != nil {
		b.Skip("needs criu")
	}
	size := 256
	if v, err := strconv.Atoi(os.Getenv("PHAUL_BENCH_MIB")); err == nil && v > 0 {
		size = v
	}
	pid := startBenchWorkload(b, size)
	cc := criu.New("criu")
	caDir := b.TempDir()
	if err := pki.Init(caDir, []string{"127.0.0.2"}); err != nil {
		b.Fatal(err)
	}
	id, err := pki.Load(caDir)
	if err != nil {
		b.Fatal(err)
	}

	modes := []string{"direct", "relay", "tls"}
	took := map[string][]float64{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for j := range modes {
			mode := modes[(i+j)%len(modes)]
			var tlsID *pki.Loaded
			if mode == "tls" {
				tlsID = id
			}
			d, err := streamOnce(b, cc, pid, mode != "direct", tlsID)
			if err != nil {
				b.Fatal(err)
			}
			took[mode] = append(took[mode], d)
		}
	}
	b.StopTimer()
	md, mr, mt := medianOf(took["direct"]), medianOf(took["relay"]), medianOf(took["tls"])
	b.ReportMetric(md, "direct-ms")
	b.ReportMetric(mr, "relay-ms")
	b.ReportMetric(mt, "tls-ms")
	b.ReportMetric(mr/md, "relay/direct")
	b.ReportMetric(mr/mt, "tls-throughput/plain")
	b.ReportMetric(float64(size<<20)/1e6/(mr/1000), "relay-MB/s")
	b.ReportMetric(float64(size<<20)/1e6/(mt/1000), "tls-MB/s")
}

func medianOf(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

func startBenchWorkload(b *testing.B, size int) int {
	dir := b.TempDir()
	bin := filepath.Join(dir, "workload")
	build := exec.Command("go", "build", "-o", bin, "github.com/phaul/phaul/test/workload")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("build workload: %v\n%s", err, out)
	}
	cmd := exec.Command("unshare", "-p", "-f", "--", "setsid", bin, "--mem", strconv.Itoa(size),
		"--status", filepath.Join(dir, "status.json"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	go cmd.Wait()
	var pid int
	b.Cleanup(func() {
		if tree, err := proc.OpenTree(pid, 0); err == nil {
			proc.SignalAll(tree, syscall.SIGKILL)
			proc.CloseAll(tree)
		}
		cmd.Process.Kill()
	})
	for i := 0; i < 600; i++ {
		kids, _ := proc.Children(cmd.Process.Pid)
		if _, err := os.Stat(filepath.Join(dir, "status.json")); err == nil && len(kids) == 1 {
			pid = kids[0]
			return pid
		}
		time.Sleep(50 * time.Millisecond)
	}
	b.Fatal("workload did not start")
	return 0
}

// tcpPair returns both ends of a loopback TCP connection from 127.0.0.1 to
// 127.0.0.2, as the daemons would have.
func tcpPair() (client, server net.Conn, err error) {
	l, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		return nil, nil, err
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}
	client, err = d.Dial("tcp", l.Addr().String())
	if err != nil {
		return nil, nil, err
	}
	server = <-accepted
	if server == nil {
		client.Close()
		return nil, nil, errors.New("accept failed")
	}
	return client, server, nil
}

// blockingFile hands a TCP connection to CRIU as a blocking file.
func blockingFile(c net.Conn) (*os.File, error) {
	f, err := c.(*net.TCPConn).File()
	c.Close()
	if err != nil {
		return nil, err
	}
	if err := unix.SetNonblock(int(f.Fd()), false); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// await blocks until op's next event.
func await(op *criu.Op) (criu.Event, error) {
	for {
		ev, err := op.Next()
		if !errors.Is(err, criu.ErrAgain) {
			return ev, err
		}
		unix.Poll([]unix.PollFd{{Fd: int32(op.Fd()), Events: unix.POLLIN}}, 1000)
	}
}

// streamOnce dumps pid into a page server once and returns the
// milliseconds from the dump request to post-dump.
func streamOnce(b *testing.B, cc *criu.Client, pid int, useRelay bool, tlsID *pki.Loaded) (float64, error) {
	// Fresh directories each round, removed at once: a gigabyte of pages
	// left behind per round would soon throttle the next rounds' writes.
	src, err := os.MkdirTemp("", "phaul-bench-src-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(src)
	dst, err := os.MkdirTemp("", "phaul-bench-dst-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dst)
	client, server, err := tcpPair()
	if err != nil {
		return 0, err
	}
	var dumpEnd, psEnd *os.File
	if useRelay {
		var stops []func()
		defer func() {
			for _, s := range stops {
				s()
			}
		}()
		cl, err := NewLink(client)
		if err != nil {
			return 0, err
		}
		sl, err := NewLink(server)
		if err != nil {
			return 0, err
		}
		if tlsID != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			done := make(chan error, 1)
			go func() { done <- sl.ServerTLS(ctx, tlsID.ServerConfig()) }()
			err := cl.ClientTLS(ctx, tlsID.ClientConfig("127.0.0.2"))
			if serr := <-done; err == nil {
				err = serr
			}
			cancel()
			if err != nil {
				return 0, err
			}
		}
		for _, side := range []struct {
			lk   *Link
			file **os.File
		}{{cl, &dumpEnd}, {sl, &psEnd}} {
			l, err := loop.New()
			if err != nil {
				return 0, err
			}
			mem, err := NewConn(l, "mem", side.lk, wire.Mem, 4<<20)
			if err != nil {
				return 0, err
			}
			local, theirs, err := newPageSocket()
			if err != nil {
				return 0, err
			}
			r, err := newRelay(l, local, mem)
			if err != nil {
				return 0, err
			}
			mem.OnMessage = r.FromPeer
			*side.file = theirs
			stops = append(stops, runLoopFor(b, l, r, mem))
		}
	} else {
		if dumpEnd, err = blockingFile(client); err != nil {
			return 0, err
		}
		if psEnd, err = blockingFile(server); err != nil {
			return 0, err
		}
	}
	ps, err := cc.StartPageServer(criu.Options{ImagesDir: dst, LogFile: "ps.log", LogLevel: 2, PageServer: psEnd})
	psEnd.Close()
	if err != nil {
		dumpEnd.Close()
		return 0, err
	}
	defer ps.Close()
	ev, err := await(ps)
	if err == nil {
		err = ev.Err
	}
	if err != nil {
		dumpEnd.Close()
		return 0, fmt.Errorf("page server: %w", err)
	}
	if err := ps.WaitPID(ev.PID); err != nil {
		dumpEnd.Close()
		return 0, err
	}

	start := time.Now()
	dump, err := cc.StartDump(criu.Options{ImagesDir: src, LogFile: "dump.log", LogLevel: 2, PID: pid,
		LeaveStopped: true, Notify: true, PageServer: dumpEnd})
	dumpEnd.Close()
	if err != nil {
		return 0, err
	}
	defer dump.Close()
	var took float64
	for {
		ev, err := await(dump)
		if err != nil {
			return 0, err
		}
		if ev.Notify == "post-dump" {
			took = float64(time.Since(start)) / 1e6
			// Refuse: CRIU resumes the process for the next round.
			if err := dump.Reply(false); err != nil {
				return 0, err
			}
			continue
		}
		if ev.Notify != "" {
			dump.Reply(true)
			continue
		}
		break // the dump's (refused) response
	}
	if ev, err := await(ps); err != nil || !ev.Status.Exited() || ev.Status.ExitStatus() != 0 {
		return 0, fmt.Errorf("page server ended badly: %v, status %v", err, ev.Status)
	}
	return took, nil
}

// runLoopFor runs l until the relay has ended, then releases everything.
func runLoopFor(b *testing.B, l *loop.Loop, r *Relay, mem *Conn) func() {
	done := make(chan struct{})
	stop := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := l.RunOnce(); err != nil {
				b.Error(err)
				return
			}
		}
	}()
	return func() {
		close(stop)
		l.Wake()
		<-done
		r.Close()
		mem.Close()
		l.Close()
	}
}
