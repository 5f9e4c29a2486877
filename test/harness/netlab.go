//go:build linux

package harness

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/phaul/phaul/pkg/proc"
)

// A Lab stands for hosts with network namespaces, for the tests and
// benchmarks of "a service keeps its clients". A namespace "lan" holds a
// bridge lan0, the segment; hosts A and B each have a bridge (br0 on A)
// enslaving their uplink to it, and their own address on it; a client
// host C has its uplink's address. A service runs on A as the init of its
// own pid and network namespace, with a veth (vsvc on A's br0, eth0
// inside; or a macvlan, see ServiceLink) and an address of its own,
// LabServiceAddr.
type Lab struct {
	Prefix string
	// ServiceLink, if set, gives the next service a macvlan on A's
	// interface of that name (see AddUplink) instead of a veth on br0.
	ServiceLink string
}

// LabServiceAddr is the service's own address, RedisPort redis's port.
const (
	LabServiceAddr = "10.77.0.50"
	RedisPort      = "6379"
)

// LabServiceAddr6 is the service's IPv6 address (on the segment's
// fd77::/64, as LabClientAddr6 is C's).
const (
	LabServiceAddr6 = "fd77::50"
	LabClientAddr6  = "fd77::30"
)

var labSeq atomic.Int32

// LabHostAddr is a host's address on the segment.
func LabHostAddr(host string) string {
	return map[string]string{"A": "10.77.0.11", "B": "10.77.0.12", "C": "10.77.0.30"}[host]
}

// Name is host's namespace, Path its file.
func (l *Lab) Name(host string) string { return l.Prefix + host }
func (l *Lab) Path(host string) string { return "/run/netns/" + l.Name(host) }

func run(args ...string) error {
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// NewLab makes the namespaces; bBridge names B's bridge. Close removes
// them, once everything in them was stopped; on an error, NewLab removes
// what it made.
func NewLab(bBridge string) (l *Lab, err error) {
	l = &Lab{Prefix: fmt.Sprintf("phaul-t%d-%d-", os.Getpid(), labSeq.Add(1))}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	var steps [][]string
	for _, h := range []string{"lan", "A", "B", "C"} {
		steps = append(steps, []string{"ip", "netns", "add", l.Name(h)}, []string{"ip", "-n", l.Name(h), "link", "set", "lo", "up"})
	}
	lan := l.Name("lan")
	steps = append(steps, []string{"ip", "-n", lan, "link", "add", "lan0", "type", "bridge"},
		[]string{"ip", "-n", lan, "link", "set", "lan0", "up"})
	for _, h := range []string{"A", "B", "C"} {
		steps = append(steps,
			[]string{"ip", "link", "add", "uplink", "netns", l.Name(h), "type", "veth", "peer", "name", h, "netns", lan},
			[]string{"ip", "-n", lan, "link", "set", h, "master", "lan0", "up"},
			[]string{"ip", "-n", l.Name(h), "link", "set", "uplink", "up"})
	}
	for _, h := range []string{"A", "B"} {
		br := "br0"
		if h == "B" {
			br = bBridge
		}
		n := l.Name(h)
		steps = append(steps, []string{"ip", "-n", n, "link", "add", br, "type", "bridge"},
			[]string{"ip", "-n", n, "link", "set", "uplink", "master", br},
			[]string{"ip", "-n", n, "link", "set", br, "up"},
			[]string{"ip", "-n", n, "addr", "add", LabHostAddr(h) + "/24", "dev", br})
	}
	steps = append(steps, []string{"ip", "-n", l.Name("C"), "addr", "add", LabHostAddr("C") + "/24", "dev", "uplink"},
		[]string{"ip", "-n", l.Name("C"), "addr", "add", LabClientAddr6 + "/64", "dev", "uplink", "nodad"})
	for _, s := range steps {
		if err := run(s...); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// Close removes the lab's namespaces (those that exist).
func (l *Lab) Close() {
	for _, h := range []string{"lan", "A", "B", "C"} {
		exec.Command("ip", "netns", "del", l.Name(h)).Run()
	}
}

// AddUplink gives host another link to the segment, name, on no bridge
// and with no address (for a macvlan to sit on).
func (l *Lab) AddUplink(host, name string) error {
	lan := l.Name("lan")
	port := host + "-" + name
	for _, s := range [][]string{
		{"ip", "link", "add", name, "netns", l.Name(host), "type", "veth", "peer", "name", port, "netns", lan},
		{"ip", "-n", lan, "link", "set", port, "master", "lan0", "up"},
		{"ip", "-n", l.Name(host), "link", "set", name, "up"},
	} {
		if err := run(s...); err != nil {
			return err
		}
	}
	return nil
}

// HasLink says whether host has a link called name.
func (l *Lab) HasLink(host, name string) bool {
	return exec.Command("ip", "-n", l.Name(host), "link", "show", name).Run() == nil
}

// InNS runs fn on a thread in host's network namespace: the sockets it
// makes are made there, and stay there.
func (l *Lab) InNS(host string, fn func()) error {
	var err error
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		home, e := netns.Get()
		if e != nil {
			err = e
			return
		}
		defer home.Close()
		target, e := netns.GetFromPath(l.Path(host))
		if e != nil {
			err = e
			return
		}
		defer target.Close()
		if err = netns.Set(target); err != nil {
			return
		}
		fn()
		if netns.Set(home) == nil {
			runtime.UnlockOSThread() // else the thread ends with the goroutine
		}
	}()
	<-done
	return err
}

// Dial connects from host's namespace.
func (l *Lab) Dial(host, addr string) (net.Conn, error) {
	var c net.Conn
	var err error
	if nerr := l.InNS(host, func() { c, err = net.DialTimeout("tcp", addr, 5*time.Second) }); nerr != nil {
		return nil, nerr
	}
	return c, err
}

// Service is a server the lab runs on A.
type Service struct {
	PID int
	Dir string
	cmd *exec.Cmd
}

// StartRedis starts redis-server as the service; its append-only file is
// in dataDir, its log redis.log in logDir.
func (l *Lab) StartRedis(dataDir, logDir string) (*Service, error) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		return nil, errors.New("redis-server is missing (make deps installs it)")
	}
	logPath := filepath.Join(logDir, "redis.log")
	return l.StartService(dataDir, RedisPort, "redis-server", "--port", RedisPort, "--bind", "0.0.0.0", "::", "--protected-mode", "no",
		"--save", "", "--appendonly", "yes", "--dir", dataDir, "--logfile", logPath)
}

// StartService runs args in dir as the service and waits until it
// answers on port from C. Stop kills it and every copy of it.
func (l *Lab) StartService(dir, port string, args ...string) (s *Service, err error) {
	cmd := exec.Command("nsenter", append([]string{"--net=" + l.Path("A"), "unshare", "--pid", "--net", "--fork", "--", "setsid"}, args...)...)
	cmd.Dir = dir
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s = &Service{Dir: dir, cmd: cmd}
	defer func() {
		if err != nil {
			s.Stop()
		}
	}()
	if s.PID, err = OnlyChild(cmd.Process.Pid, 10*time.Second); err != nil {
		return nil, fmt.Errorf("%s did not start: %w", args[0], err)
	}
	if err := l.linkService(s.PID, port, args[0]); err != nil {
		return nil, err
	}
	return s, nil
}

// linkService gives the service (the init of its network namespace, pid)
// its link to A's segment and its addresses, and waits until what (its
// name, for errors) answers on port from C.
func (l *Lab) linkService(pid int, port, what string) error {
	n := strconv.Itoa(pid)
	link := [][]string{
		{"ip", "-n", l.Name("A"), "link", "add", "vsvc", "type", "veth", "peer", "name", "eth0", "netns", n},
		{"ip", "-n", l.Name("A"), "link", "set", "vsvc", "master", "br0", "up"},
	}
	if l.ServiceLink != "" {
		link = [][]string{
			{"ip", "-n", l.Name("A"), "link", "add", "mvsvc", "link", l.ServiceLink, "type", "macvlan", "mode", "bridge"},
			{"ip", "-n", l.Name("A"), "link", "set", "mvsvc", "netns", n},
			{"nsenter", "-t", n, "-n", "ip", "link", "set", "mvsvc", "name", "eth0"},
		}
	}
	for _, step := range append(link, [][]string{
		{"nsenter", "-t", n, "-n", "ip", "addr", "add", LabServiceAddr + "/24", "dev", "eth0"},
		{"nsenter", "-t", n, "-n", "ip", "addr", "add", LabServiceAddr6 + "/64", "dev", "eth0", "nodad"},
		{"nsenter", "-t", n, "-n", "ip", "link", "set", "eth0", "up"},
		{"nsenter", "-t", n, "-n", "ip", "link", "set", "lo", "up"},
	}...) {
		if err := run(step...); err != nil {
			return err
		}
	}
	if err := WaitUntil(10*time.Second, func() bool {
		c, err := l.Dial("C", LabServiceAddr+":"+port)
		if err == nil {
			c.Close()
		}
		return err == nil
	}); err != nil {
		return fmt.Errorf("%s does not answer on %s:%s: %w", what, LabServiceAddr, port, err)
	}
	return nil
}

// StartContainer runs the bundle as runc container id under the state
// root root, from A's network namespace (runc makes the container one of
// its own), links it as the service, and waits until it answers on port
// from C. It returns the container's init.
func (l *Lab) StartContainer(root, bundle, id, port string) (int, error) {
	if err := RunContainerIn([]string{"nsenter", "--net=" + l.Path("A")}, root, bundle, id); err != nil {
		return 0, err
	}
	out, err := exec.Command("runc", "--root", root, "state", id).Output()
	if err != nil {
		return 0, fmt.Errorf("runc state %s: %v", id, err)
	}
	var st struct {
		PID int `json:"pid"`
	}
	if err := json.Unmarshal(out, &st); err != nil || st.PID == 0 {
		return 0, fmt.Errorf("runc state %s: %q", id, out)
	}
	return st.PID, l.linkService(st.PID, port, "container "+id)
}

// Stop kills the service's first copy and, by pid, every process whose
// working directory is its directory: its copies on any "host" (the
// directory is the caller's own).
func (s *Service) Stop() {
	s.cmd.Process.Kill()
	s.cmd.Wait()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if cwd, _ := os.Readlink("/proc/" + e.Name() + "/cwd"); cwd == s.Dir {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// RedisClient keeps one connection and sends INCR every Interval until
// halted; every reply must be the one after the last.
type RedisClient struct {
	c      net.Conn
	stop   chan struct{}
	done   chan struct{}
	mu     sync.Mutex
	n      int64
	last   int64
	maxGap time.Duration
	err    error
}

// StartRedisClient connects from C to the service and starts sending
// INCR key every interval.
func (l *Lab) StartRedisClient(key string, interval time.Duration) (*RedisClient, error) {
	return l.StartRedisClientTo(LabServiceAddr, key, interval)
}

// StartRedisClientTo is StartRedisClient to the service's address addr
// (LabServiceAddr or LabServiceAddr6).
func (l *Lab) StartRedisClientTo(addr, key string, interval time.Duration) (*RedisClient, error) {
	c, err := l.Dial("C", net.JoinHostPort(addr, RedisPort))
	if err != nil {
		return nil, err
	}
	rc := &RedisClient{c: c, stop: make(chan struct{}), done: make(chan struct{})}
	go rc.run(key, interval)
	return rc, nil
}

func (rc *RedisClient) run(key string, interval time.Duration) {
	defer close(rc.done)
	r := bufio.NewReader(rc.c)
	for {
		select {
		case <-rc.stop:
			return
		case <-time.After(interval):
		}
		t0 := time.Now()
		rc.c.SetDeadline(t0.Add(30 * time.Second))
		_, err := fmt.Fprintf(rc.c, "INCR %s\r\n", key)
		var line string
		if err == nil {
			line, err = r.ReadString('\n')
		}
		var v int64
		if err == nil {
			v, err = strconv.ParseInt(strings.TrimSpace(strings.TrimPrefix(line, ":")), 10, 64)
			if err != nil {
				err = fmt.Errorf("reply %q", line)
			}
		}
		rc.mu.Lock()
		if err == nil && v != rc.last+1 {
			err = fmt.Errorf("reply %d after %d: out of sequence", v, rc.last)
		}
		if err != nil {
			rc.err = fmt.Errorf("request %d: %w", rc.n+1, err)
			rc.mu.Unlock()
			return
		}
		rc.n, rc.last = rc.n+1, v
		rc.maxGap = max(rc.maxGap, time.Since(t0))
		rc.mu.Unlock()
	}
}

// State is what the client did so far: replies, the longest wait for
// one, and the error that stopped it.
func (rc *RedisClient) State() (n int64, maxGap time.Duration, err error) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.n, rc.maxGap, rc.err
}

// ResetGap forgets the longest wait so far.
func (rc *RedisClient) ResetGap() {
	rc.mu.Lock()
	rc.maxGap = 0
	rc.mu.Unlock()
}

// Halt stops the client and closes its connection.
func (rc *RedisClient) Halt() {
	select {
	case <-rc.stop:
	default:
		close(rc.stop)
	}
	<-rc.done
	rc.c.Close()
}

// OnlyChild waits, up to limit, until pid has one child (the init of the
// namespace unshare made, say), and returns it.
func OnlyChild(pid int, limit time.Duration) (int, error) {
	child := 0
	err := WaitUntil(limit, func() bool {
		if kids, _ := proc.Children(pid); len(kids) == 1 {
			child = kids[0]
		}
		return child != 0
	})
	return child, err
}

// WaitUntil polls cond every 2 ms until it holds, for at most limit.
func WaitUntil(limit time.Duration, cond func() bool) error {
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v", limit)
		}
		time.Sleep(2 * time.Millisecond)
	}
	return nil
}
