//go:build linux

package criu

import (
	"bufio"
	"os"
	"regexp"
	"strings"
	"syscall"
)

// maxQuoted is how many of CRIU's log error lines an Error quotes.
const maxQuoted = 4

// Error is a failed CRIU request. Its message quotes the Error lines of
// CRIU's log, which say what went wrong far better than the RPC response.
type Error struct {
	// Op is the request: "dump", "restore", "page-server", ...
	Op string
	// Msg is CRIU's own error message from the RPC response, if any.
	Msg string
	// Errno is CRIU's errno for the failure, if it gave one.
	Errno syscall.Errno
	// Lines are the error lines of CRIU's log, noise removed.
	Lines []string
	// Log is the path of CRIU's full log.
	Log string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("criu ")
	b.WriteString(e.Op)
	b.WriteString(" failed")
	switch {
	case len(e.Lines) > 0:
		b.WriteString(": ")
		b.WriteString(strings.Join(e.Lines, "; "))
	case e.Msg != "" && !isNoise(e.Msg):
		b.WriteString(": ")
		b.WriteString(strings.TrimSpace(stripPrefix(e.Msg)))
	}
	if h := e.Hint(); h != "" {
		b.WriteString("; ")
		b.WriteString(h)
	}
	if e.Log != "" {
		b.WriteString(" (full log: ")
		b.WriteString(e.Log)
		b.WriteString(")")
	}
	return b.String()
}

// errorLine matches CRIU's log lines for errors, with or without the
// timestamp CRIU puts in front: "(00.012345) Error (criu/x.c:12): text".
var errorLine = regexp.MustCompile(`^(?:\([0-9. ]+\)\s*)?(?:\d+:\s*)?Error \(([^)]*)\):\s*(.*)$`)

// noise are error lines that say nothing about the cause: one CRIU logs on
// every run on machines where root lacks CAP_SYS_RESOURCE (VMs), and the
// generic lines that follow the real error.
var noise = []*regexp.Regexp{
	regexp.MustCompile(`Can't setup RLIMIT_NOFILE`),
	regexp.MustCompile(`^(Dumping|Restoring) FAILED\.?$`),
	regexp.MustCompile(`^\d+ (exited, status=\d+|killed by signal \d+.*)$`),
}

func isNoise(line string) bool {
	line = strings.TrimSpace(line)
	for _, n := range noise {
		if n.MatchString(line) {
			return true
		}
	}
	return false
}

func stripPrefix(line string) string {
	if m := errorLine.FindStringSubmatch(strings.TrimSpace(line)); m != nil {
		return m[2]
	}
	return line
}

// ErrorLines returns up to max distinct error lines from the CRIU log at
// path, without timestamps, source locations and known noise. It returns
// nil if the log cannot be read.
func ErrorLines(path string, max int) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var lines []string
	seen := map[string]bool{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		m := errorLine.FindStringSubmatch(sc.Text())
		if m == nil || isNoise(m[2]) {
			continue
		}
		text := strings.TrimSpace(m[2])
		if text == "" || seen[text] {
			continue
		}
		seen[text] = true
		lines = append(lines, text)
		if len(lines) == max {
			break
		}
	}
	return lines
}

// hints turn CRIU's most common failures into what to do about them. The
// first whose pattern matches a quoted line wins; $1 is its first group.
var hints = []struct {
	re   *regexp.Regexp
	hint string
}{
	{regexp.MustCompile(`Can't open file (sys/fs/cgroup/\S+) on restore`),
		"the process holds /$1 open, a file of its cgroup on the source (Go >= 1.25 programs do, to follow their CPU limit): run it with GODEBUG=containermaxprocs=0"},
	{regexp.MustCompile(`Can't open file (\S+) on restore`),
		"the process has /$1 open: it must exist on the destination, at the same path"},
	{regexp.MustCompile(`Can't fork for (\d+): File exists`),
		"pid $1 is taken on the destination: run the process as the init of its own pid namespace, or free the pid"},
	{regexp.MustCompile(`Unable to create a thread: -17`),
		"a thread id of the process is taken on the destination: run the process as the init of its own pid namespace"},
	{regexp.MustCompile(`Address already in use`),
		"an address the process listens on is taken on the destination: free it there, or give the process its own network namespace"},
	{regexp.MustCompile(`(?i)connected TCP socket|tcp-established`),
		"phaul cannot move established TCP connections yet: close them before migrating"},
	{regexp.MustCompile(`Can't dump half of stream unix connection`),
		"the process shares a Unix stream connection with a process outside its tree (e.g. a journal stream when systemd started it): migrate a tree that holds both ends"},
	{regexp.MustCompile(`session leader .* is outside`),
		"the process belongs to a terminal session outside its tree: start it with setsid"},
	{regexp.MustCompile(`Can't get rlimit .*Operation not permitted`),
		"root lacks CAP_SYS_RESOURCE on this host, so CRIU can dump only trees that run as root here"},
}

// Hint says what to do about the failure, or "" if phaul has no advice.
func (e *Error) Hint() string {
	for _, h := range hints {
		for _, line := range e.Lines {
			if m := h.re.FindStringSubmatchIndex(line); m != nil {
				return string(h.re.ExpandString(nil, h.hint, line, m))
			}
		}
	}
	return ""
}
