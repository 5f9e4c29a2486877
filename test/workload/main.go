// Command workload is the process phaul's tests and demo migrate.
//
// It holds --mem MiB of pseudo-random memory (test/pattern, seeded by
// --seed), ticks a counter every --tick, and keeps the longest gap it saw
// between two ticks (the pause a migration caused). On SIGUSR1 it writes its
// state as JSON to --status: the counter, a random token chosen at start (so
// a restarted process cannot pass for the old one), the checksum of its
// memory now and at start, and its pid as the host sees it. With
// --children N it starts N copies of itself as its children (a process
// tree); child i writes to STATUS.child<i>.
//
// It opens no files between reports, so CRIU can dump it at any moment, and
// it is meant to run as the init of its own pid namespace:
//
//	unshare -p -f -- setsid workload --mem 64 --status /tmp/w.json
//
// It is built with containermaxprocs=0: from Go 1.25 the runtime keeps
// its cgroup's CPU limit files open to follow them, and a restore on
// another host, where that cgroup does not exist, could not reopen them.
//
//go:debug containermaxprocs=0
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/phaul/phaul/test/pattern"
	"github.com/phaul/phaul/test/report"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "workload:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("workload", flag.ContinueOnError)
	memMiB := fs.Int("mem", 64, "MiB of pseudo-random memory to hold")
	seed := fs.Uint64("seed", 1, "seed of the memory contents")
	tick := fs.Duration("tick", 10*time.Millisecond, "counter period")
	status := fs.String("status", "", "file to write the state to on SIGUSR1 (required)")
	children := fs.Int("children", 0, "number of child processes to start")
	child := fs.Int("child", -1, "internal: index of this child")
	marker := fs.String("marker", "", "a string written all over the memory (for capture tests)")
	hold := fs.String("hold", "", "a file to keep open for the whole run")
	listen := fs.String("listen", "", "a TCP address to listen on for the whole run")
	dirty := fs.Int("dirty", 0, "MiB of memory to rewrite every tick (keeps pages dirty)")
	ioURing := fs.Bool("io-uring", false, "hold an io_uring instance for the whole run")
	mptcp := fs.String("mptcp-listen", "", "a TCP address to listen on with Go's default listener (MPTCP since Go 1.24)")
	dgram := fs.String("unix-dgram", "", "a Unix datagram socket to connect to and send a number to every 50 ms")
	unixPeer := fs.String("unix-connect", "", "a Unix stream socket to connect to and hold for the whole run")
	ghost := fs.String("ghost", "", "MIB:DIR: a file of MIB MiB of pseudo-random bytes in DIR (a tmpfs), kept open and deleted: its contents live only in the process")
	textMiB := fs.Int("text", 0, "MiB of compressible memory to hold besides: every other page zeros, the rest lines of text")
	churn := fs.Int("churn", 0, "MiB of memory to rewrite with new contents every tick, round the --churn-span region (pages that change between a pre-copy round and the freeze)")
	churnSpan := fs.Int("churn-span", 0, "MiB of the region --churn rewrites (default: 4 times --churn)")
	becomeRoot := fs.Bool("become-root", false, "set every uid to root's first (a setuid-root copy run by another user: a tree that turns root's after phauld checked it)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *becomeRoot {
		if err := syscall.Setresuid(0, 0, 0); err != nil {
			return fmt.Errorf("become root: %w", err)
		}
	}
	if *status == "" {
		return fmt.Errorf("--status is required")
	}

	mem := make([]byte, *memMiB<<20)
	pattern.Fill(mem, *seed)
	if *marker != "" {
		m := []byte(*marker)
		for off := 0; off+len(m) <= len(mem); off += 4096 {
			copy(mem[off:], m)
		}
	}
	expect := pattern.Sum(mem)

	var token [8]byte
	if _, err := rand.Read(token[:]); err != nil {
		return err
	}
	w := &worker{
		mem:    mem,
		status: *status,
		st: report.Report{
			Token:  fmt.Sprintf("%x", token),
			Expect: strconv.FormatUint(expect, 16),
			MemMiB: *memMiB,
			Seed:   *seed,
			Child:  *child,
		},
		dirtyBytes: *dirty << 20,
	}
	if *hold != "" {
		f, err := os.OpenFile(*hold, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return err
		}
		defer f.Close()
	}
	if *churn > 0 {
		span := *churnSpan
		if span == 0 {
			span = 4 * *churn
		}
		w.churn = make([]byte, span<<20)
		w.churnGen = make([]uint64, len(w.churn)/4096)
		w.churnBytes = *churn << 20
		for i := range w.churnGen {
			w.writeChurn(i)
		}
	}
	if *textMiB > 0 {
		w.text = textMemory(*textMiB<<20, *seed)
		w.st.TextExpect = strconv.FormatUint(pattern.Sum(w.text), 16)
	}
	if *ghost != "" {
		f, err := ghostFile(*ghost, *seed)
		if err != nil {
			return err
		}
		defer f.Close()
		w.ghost = f
	}
	if *ioURing {
		// io_uring_setup(4 entries, struct io_uring_params)
		var params [120]byte
		fd, _, errno := syscall.Syscall(425, 4, uintptr(unsafe.Pointer(&params)), 0)
		if errno != 0 {
			return fmt.Errorf("io_uring_setup: %w", errno)
		}
		defer syscall.Close(int(fd))
	}
	if *mptcp != "" {
		l, err := net.Listen("tcp", *mptcp)
		if err != nil {
			return err
		}
		defer l.Close()
	}
	if *dgram != "" {
		c, err := net.Dial("unixgram", *dgram)
		if err != nil {
			return err
		}
		defer c.Close()
		go func() {
			for i := 1; ; i++ {
				fmt.Fprintf(c, "%d", i) // a peer gone for a moment loses some
				time.Sleep(50 * time.Millisecond)
			}
		}()
	}
	if *unixPeer != "" {
		c, err := net.Dial("unix", *unixPeer)
		if err != nil {
			return err
		}
		defer c.Close()
	}
	if *listen != "" {
		// Plain TCP: Go's default listener is MPTCP, which CRIU cannot
		// dump (phauld refuses it).
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		l, err := lc.Listen(context.Background(), "tcp", *listen)
		if err != nil {
			return err
		}
		defer l.Close()
	}

	// Children are re-executions of this binary: Go cannot fork without exec.
	for i := 0; i < *children; i++ {
		cargs := []string{
			"--mem", strconv.Itoa(*memMiB),
			"--seed", strconv.FormatUint(*seed+uint64(i)+1, 10),
			"--tick", tick.String(),
			"--status", fmt.Sprintf("%s.child%d", *status, i),
			"--child", strconv.Itoa(i),
		}
		cmd := exec.Command("/proc/self/exe", cargs...)
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("start child %d: %w", i, err)
		}
		// Reap it if it ever ends; the workload itself never waits on it.
		go cmd.Wait()
	}

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1)
	if err := w.report(); err != nil {
		return err
	}
	t := time.NewTicker(*tick)
	defer t.Stop()
	// Gaps are measured on the wall clock: CRIU restores a tree into a
	// time namespace whose monotonic clock goes on from the dump, so a
	// monotonic gap would hide the pause.
	last := time.Now().Round(0)
	for {
		select {
		case now := <-t.C:
			now = time.Now().Round(0)
			w.mu.Lock()
			gap := now.Sub(last).Nanoseconds()
			if gap > w.st.MaxGapNS {
				w.st.MaxGapNS = gap
			}
			if gap > w.st.GapNS {
				w.st.GapNS = gap
			}
			w.st.Counter++
			w.dirty()
			w.rewriteChurn()
			w.mu.Unlock()
			last = now
		case <-sigs:
			if err := w.report(); err != nil {
				fmt.Fprintln(os.Stderr, "workload: report:", err)
			}
			// The report (a checksum of all the memory: 0.3 s for 1 GiB)
			// ran in this goroutine: that wait is not a pause, and would
			// otherwise be the first gap after the report's reset.
			last = time.Now().Round(0)
		}
	}
}

type worker struct {
	// ghost is the deleted file it holds (--ghost), if any.
	ghost *os.File
	// text is the compressible memory (--text), if any.
	text       []byte
	mu         sync.Mutex
	mem        []byte
	status     string
	st         report.Report
	dirtyBytes int
	dirtyOff   int
	// churn is rewritten churnBytes a tick, page by page: page i holds
	// its generation churnGen[i] (kept apart) all over.
	churn      []byte
	churnGen   []uint64
	churnBytes int
	churnNext  int
}

// writeChurn gives churn page i its next generation.
func (w *worker) writeChurn(i int) {
	w.churnGen[i]++
	p := w.churn[i*4096 : (i+1)*4096]
	for off := 0; off < len(p); off += 16 {
		binary.LittleEndian.PutUint64(p[off:], w.churnGen[i])
		binary.LittleEndian.PutUint64(p[off+8:], uint64(i))
	}
}

func (w *worker) rewriteChurn() {
	for n := 0; n < w.churnBytes && len(w.churnGen) > 0; n += 4096 {
		w.writeChurn(w.churnNext)
		w.churnNext = (w.churnNext + 1) % len(w.churnGen)
	}
}

// churnBad counts the churn pages that do not hold what their generation
// says: a page restored older (or newer) than the rest of the memory.
func (w *worker) churnBad() int {
	bad := 0
	for i, g := range w.churnGen {
		p := w.churn[i*4096 : (i+1)*4096]
		for off := 0; off < len(p); off += 16 {
			if binary.LittleEndian.Uint64(p[off:]) != g || binary.LittleEndian.Uint64(p[off+8:]) != uint64(i) {
				bad++
				break
			}
		}
	}
	return bad
}

// dirty rewrites dirtyBytes of memory with the same values, so the pages
// are written (dirty for the kernel) but the checksum stays the same.
func (w *worker) dirty() {
	for n := 0; n < w.dirtyBytes; n += 4096 {
		if w.dirtyOff >= len(w.mem) {
			w.dirtyOff = 0
		}
		w.mem[w.dirtyOff] ^= 0xff
		w.mem[w.dirtyOff] ^= 0xff
		w.dirtyOff += 4096
	}
}

func (w *worker) report() error {
	w.mu.Lock()
	w.st.Seq++
	w.st.Sum = strconv.FormatUint(pattern.Sum(w.mem), 16)
	if w.text != nil {
		w.st.TextSum = strconv.FormatUint(pattern.Sum(w.text), 16)
	}
	w.st.HostPID, w.st.NSPID = pids()
	if w.churn != nil {
		w.st.ChurnPages, w.st.ChurnBad = len(w.churnGen), w.churnBad()
	}
	if w.ghost != nil {
		if err := w.sumGhost(); err != nil {
			w.mu.Unlock()
			return err
		}
	}
	w.st.Written = time.Now().UTC().Format(time.RFC3339Nano)
	b, err := json.Marshal(w.st)
	w.st.GapNS = 0
	w.mu.Unlock()
	if err != nil {
		return err
	}
	tmp := w.status + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, w.status); err != nil {
		return err
	}
	// A line on stdout too: under systemd it goes to the journal, which
	// shows where the process's output went after a migration.
	fmt.Printf("report %d: counter %d, host pid %d\n", w.st.Seq, w.st.Counter, w.st.HostPID)
	return nil
}

// pids returns this process's pid in the pid namespace of the /proc mount
// (the host's, since the workload does not remount /proc) and in its own
// namespace, from the NSpid line of /proc/self/status.
func pids() (host, ns int) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, 0
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "NSpid:") {
			continue
		}
		f := strings.Fields(strings.TrimPrefix(line, "NSpid:"))
		if len(f) == 0 {
			return 0, 0
		}
		host, _ = strconv.Atoi(f[0])
		ns, _ = strconv.Atoi(f[len(f)-1])
		return host, ns
	}
	return 0, 0
}

// textMemory is size bytes as a process's memory often is: every other
// page zeros, the rest numbered lines of text (the seed in each).
func textMemory(size int, seed uint64) []byte {
	b := make([]byte, size)
	line := 0
	for page := 0; page+4096 <= size; page += 8192 {
		for off := page; off < page+4096; {
			s := fmt.Sprintf("line %d of the workload's text, seed %d: the quick brown fox\n", line, seed)
			off += copy(b[off:page+4096], s)
			line++
		}
	}
	return b
}

// ghostSeed makes the ghost file's contents differ from the memory's.
const ghostSeed = 1 << 40

// ghostFile makes the --ghost file: MIB MiB of pseudo-random bytes in DIR,
// open, then deleted.
func ghostFile(spec string, seed uint64) (*os.File, error) {
	mib, dir, ok := strings.Cut(spec, ":")
	n, err := strconv.Atoi(mib)
	if !ok || err != nil || n <= 0 {
		return nil, fmt.Errorf("--ghost %q: want MIB:DIR", spec)
	}
	f, err := os.CreateTemp(dir, "workload-ghost-")
	if err != nil {
		return nil, err
	}
	buf := make([]byte, 1<<20)
	for i := 0; i < n; i++ {
		pattern.Fill(buf, seed+ghostSeed+uint64(i))
		if _, err := f.Write(buf); err != nil {
			f.Close()
			return nil, err
		}
	}
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// sumGhost checks the ghost file through the descriptor the process holds:
// GhostSum is its checksum, GhostExpect what it was made with.
func (w *worker) sumGhost() error {
	st, err := w.ghost.Stat()
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	var got, want uint64
	for i := int64(0); i < st.Size()>>20; i++ {
		if _, err := w.ghost.ReadAt(buf, i<<20); err != nil {
			return err
		}
		got = got*31 + pattern.Sum(buf)
		want = want*31 + pattern.Expected(len(buf), w.st.Seed+ghostSeed+uint64(i))
	}
	w.st.GhostSum, w.st.GhostExpect = strconv.FormatUint(got, 16), strconv.FormatUint(want, 16)
	return nil
}
