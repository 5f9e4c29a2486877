//go:build linux

package integration

import (
	"bufio"
	"bytes"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// rssKiB is pid's resident memory in KiB (VmRSS).
func rssKiB(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n
			}
		}
	}
	return 0
}

// TestImagesBoundedMemory migrates a process holding a deleted 1 GiB file
// in a tmpfs: CRIU puts its contents in the images, which phauld streams
// to the destination over mutual TLS with the same flow control as pages.
// The source phauld's resident memory must stay within 64 MiB of its idle
// size all along (a plain build: the race detector's shadow memory would
// swamp the figure), and the file arrive intact.
func TestImagesBoundedMemory(t *testing.T) {
	integration(t)
	// The file lives twice in /dev/shm (the source's, the restored
	// copy's), and once in the destination's images.
	for dir, need := range map[string]uint64{"/dev/shm": 2200 << 20, t.TempDir(): 1100 << 20} {
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil {
			t.Fatal(err)
		}
		if free := st.Bavail * uint64(st.Bsize); free < need {
			t.Fatalf("this test needs %d MiB free in %s; there are %d MiB", need>>20, dir, free>>20)
		}
	}
	a := startDaemon(t, "A", "127.0.0.1:17541", daemonOpts{phauld: bins.phauldPlain})
	b := startDaemon(t, "B", "127.0.0.2:17542", daemonOpts{phauld: bins.phauldPlain})
	w := startWorkload(t, workloadOpts{memMiB: 16, extra: []string{"--ghost", "1024:/dev/shm"}})
	before := w.report(w.pid, w.status)
	if before.GhostSum == "" || before.GhostSum != before.GhostExpect {
		t.Fatalf("the workload's deleted file: %q, want %q", before.GhostSum, before.GhostExpect)
	}
	time.Sleep(300 * time.Millisecond)
	idle := rssKiB(a.PID())
	var peak int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
				peak = max(peak, rssKiB(a.PID()))
			}
		}
	}()
	start := time.Now()
	res := a.migrate(t, w.pid, b)
	close(stop)
	<-sampled
	w.track(res.DestPID)
	t.Logf("1 GiB deleted file: %.1f s, %d bytes over the link; source phauld resident %d KiB idle, %d KiB at the peak (+%.1f MiB)",
		time.Since(start).Seconds(), res.Bytes, idle, peak, float64(peak-idle)/1024)
	if res.Bytes < 1<<30 {
		t.Errorf("only %d bytes crossed: the file's contents did not travel in the images", res.Bytes)
	}
	if grew := peak - idle; grew > 64<<10 {
		t.Errorf("the source phauld grew by %d KiB during the migration (from %d KiB): more than 64 MiB", grew, idle)
	}
	checkIntact(t, "after the migration", w.report(res.DestPID, w.status), before, w.memMiB, w.seed)
}
