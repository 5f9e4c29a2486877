//go:build linux

// Package criu runs CRIU for phauld. It is the only package that knows
// go-criu: it turns a plain Options struct into CRIU's RPC options in one
// place, starts each request in its own `criu swrk` process, and lets a
// caller's event loop drive the request without blocking (Op.Fd is a socket
// to wait on). When CRIU fails, the error quotes the Error lines of CRIU's
// own log.
package criu

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"github.com/phaul/phaul/pkg/pidns"
	"github.com/phaul/phaul/pkg/proc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// ErrAgain is returned by Op.Next when CRIU has sent nothing yet.
var ErrAgain = errors.New("criu: no message yet")

// maxMessage bounds one RPC message from CRIU. Responses are small; the
// largest seen carry an error message of a few hundred bytes.
const maxMessage = 1 << 20

// Client starts CRIU requests.
type Client struct {
	path string
}

// New returns a client that runs the CRIU binary at path (looked up in PATH
// if it has no slash).
func New(path string) *Client {
	if path == "" {
		path = "criu"
	}
	return &Client{path: path}
}

// Path is the CRIU binary the client runs.
func (c *Client) Path() string { return c.path }

// Event is one message from CRIU: a notification to answer (Notify is set),
// or the response that ends the request.
type Event struct {
	// Notify is the name of a notification ("post-dump", "post-restore",
	// ...). Answer it with Op.Reply before CRIU goes on.
	Notify string
	// PID is the pid a notification or response carries: the restored
	// root task (post-restore, RESTORE), or the page server (PAGE_SERVER*).
	PID int
	// Status is the wait status of the pid a WAIT_PID request waited for.
	Status syscall.WaitStatus
	// Err is set when the request failed.
	Err error
}

// Op is one CRIU request in progress, in its own `criu swrk` process.
type Op struct {
	kind    string
	dir     string
	logFile string
	cmd     *exec.Cmd
	sk      int
	buf     []byte
	// last is the last response read, for callers that need more of it
	// than Event carries.
	last *rpc.CriuResp
	// pending is the response type expected next.
	pending rpc.CriuReqType

	closeOnce sync.Once
	exited    chan struct{}
	exitErr   error
	// nsInit: the process started is the init of a new pid namespace,
	// with CRIU its child (Options.PidNSInit); exited is CRIU's exit.
	nsInit bool
}

// start runs `criu swrk` with the RPC socket at fd 3 and files at fds 4, 5,
// ..., and sends req.
func (c *Client) start(kind string, o *Options, req *rpc.CriuReq) (*Op, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("criu %s: socketpair: %w", kind, err)
	}
	theirs := os.NewFile(uintptr(fds[1]), "criu-swrk")
	defer theirs.Close()
	if err := unix.SetNonblock(fds[0], true); err != nil {
		unix.Close(fds[0])
		return nil, fmt.Errorf("criu %s: %w", kind, err)
	}

	// exec.Cmd duplicates ExtraFiles to fds 3, 4, ... in the child and
	// clears close-on-exec there only, so no other session's descriptors
	// leak into this CRIU.
	files := []*os.File{theirs}
	if o != nil {
		files = append(files, o.files()...)
	}
	var cmd *exec.Cmd
	var status *os.File // the pid namespace's init reports CRIU's exit on it
	if o != nil && o.PidNSInit != "" {
		r, w, err := os.Pipe()
		if err != nil {
			unix.Close(fds[0])
			return nil, fmt.Errorf("criu %s: %w", kind, err)
		}
		defer w.Close()
		status = r
		cmd = pidns.Wrap(o.PidNSInit, len(files), c.path, "swrk", "3")
		cmd.ExtraFiles = append(files, w)
	} else {
		cmd = exec.Command(c.path, "swrk", "3")
		if o != nil && o.EnterPidNS > 0 {
			// nsenter forks into the pid namespace and waits for CRIU,
			// passing its exit on; the descriptors go through as they are.
			cmd = exec.Command("nsenter", "--target", strconv.Itoa(o.EnterPidNS), "--pid", "--mount", "--", c.path, "swrk", "3")
		}
		cmd.ExtraFiles = files
		cmd.SysProcAttr = &syscall.SysProcAttr{
			// Its own process group: a Ctrl-C meant for a foreground
			// phauld must not reach a CRIU holding a frozen tree.
			// No Pdeathsig: if phauld dies, CRIU sees its RPC socket
			// close and rolls back by itself; killing it mid-dump could
			// leave its parasite in the tasks.
			Setpgid: true,
		}
	}
	// CRIU logs to its log file; anything on stderr is a crash message.
	cmd.Stdout, cmd.Stderr = nil, nil
	if err := cmd.Start(); err != nil {
		unix.Close(fds[0])
		if status != nil {
			status.Close()
		}
		return nil, fmt.Errorf("criu %s: start %s: %w", kind, cmd.Path, err)
	}
	op := &Op{
		kind:    kind,
		cmd:     cmd,
		sk:      fds[0],
		buf:     make([]byte, maxMessage),
		pending: req.GetType(),
		exited:  make(chan struct{}),
	}
	if o != nil {
		op.dir, op.logFile = o.ImagesDir, o.LogFile
	}
	if status == nil {
		go func() {
			op.exitErr = cmd.Wait()
			close(op.exited)
		}()
	} else {
		// CRIU is the init's child; the init lives on as long as the
		// restored tree does.
		op.nsInit = true
		go func() {
			ws, ok := pidns.ReadStatus(status)
			status.Close()
			switch {
			case !ok:
				op.exitErr = errors.New("the pid namespace's init ended before CRIU")
			case ws.Exited() && ws.ExitStatus() == 0:
			case ws.Signaled():
				op.exitErr = fmt.Errorf("signal: %v", ws.Signal())
			default:
				op.exitErr = fmt.Errorf("exit status %d", ws.ExitStatus())
			}
			close(op.exited)
		}()
		go cmd.Wait()
	}
	if err := op.send(req); err != nil {
		op.Close()
		return nil, err
	}
	return op, nil
}

// Pid is the pid of the request's `criu swrk` process, or, for a restore
// into a new pid namespace, of that namespace's init (CRIU's parent).
func (op *Op) Pid() int { return op.cmd.Process.Pid }

// Kind names the request ("dump", "restore", ...).
func (op *Op) Kind() string { return op.kind }

// Fd is the RPC socket: it becomes readable when CRIU has sent an event.
func (op *Op) Fd() int { return op.sk }

// LogPath is CRIU's log file for this request.
func (op *Op) LogPath() string {
	if op.logFile == "" {
		return ""
	}
	return filepath.Join(op.dir, op.logFile)
}

// Exited is closed when the swrk process has exited.
func (op *Op) Exited() <-chan struct{} { return op.exited }

func (op *Op) send(req *rpc.CriuReq) error {
	b, err := proto.Marshal(req)
	if err != nil {
		return fmt.Errorf("criu %s: encode request: %w", op.kind, err)
	}
	for {
		_, err = unix.Write(op.sk, b)
		if err == unix.EINTR {
			continue
		}
		break
	}
	if err != nil {
		return fmt.Errorf("criu %s: send request: %w", op.kind, err)
	}
	return nil
}

// Next reads one event without blocking. It returns ErrAgain when there is
// none yet. A closed socket (CRIU exited) is an error.
func (op *Op) Next() (Event, error) {
	var n int
	var err error
	for {
		n, err = unix.Read(op.sk, op.buf)
		if err == unix.EINTR {
			continue
		}
		break
	}
	switch {
	case err == unix.EAGAIN:
		return Event{}, ErrAgain
	case err != nil:
		return Event{}, fmt.Errorf("criu %s: read: %w", op.kind, err)
	case n == 0:
		return Event{}, op.failure(fmt.Sprintf("criu exited without answering (%s)", op.exitStatus()))
	}
	resp := &rpc.CriuResp{}
	if err := proto.Unmarshal(op.buf[:n], resp); err != nil {
		return Event{}, fmt.Errorf("criu %s: decode response: %w", op.kind, err)
	}
	op.last = resp
	if resp.GetType() == rpc.CriuReqType_NOTIFY {
		return Event{Notify: resp.GetNotify().GetScript(), PID: int(resp.GetNotify().GetPid())}, nil
	}
	ev := Event{}
	if !resp.GetSuccess() {
		msg := resp.GetCrErrmsg()
		if msg == "" && resp.GetCrErrno() != 0 {
			msg = syscall.Errno(resp.GetCrErrno()).Error()
		}
		ev.Err = op.failure(msg)
		if resp.GetCrErrno() != 0 {
			ev.Err.(*Error).Errno = syscall.Errno(resp.GetCrErrno())
		}
		return ev, nil
	}
	want := op.pending
	if want == rpc.CriuReqType_PAGE_SERVER_CHLD {
		// CRIU answers PAGE_SERVER_CHLD with a PAGE_SERVER response.
		want = rpc.CriuReqType_PAGE_SERVER
	}
	if resp.GetType() != want {
		return Event{}, fmt.Errorf("criu %s: unexpected %v response", op.kind, resp.GetType())
	}
	switch resp.GetType() {
	case rpc.CriuReqType_RESTORE:
		ev.PID = int(resp.GetRestore().GetPid())
	case rpc.CriuReqType_PAGE_SERVER, rpc.CriuReqType_PAGE_SERVER_CHLD:
		ev.PID = int(resp.GetPs().GetPid())
	case rpc.CriuReqType_WAIT_PID:
		ev.Status = syscall.WaitStatus(resp.GetStatus())
	}
	return ev, nil
}

// Reply answers the notification last returned by Next. Answering false
// makes CRIU abort: a dump resumes the tasks, a restore kills them.
func (op *Op) Reply(ok bool) error {
	t := rpc.CriuReqType_NOTIFY
	return op.send(&rpc.CriuReq{Type: &t, NotifySuccess: proto.Bool(ok)})
}

// WaitPID asks a kept-open page server request to wait for pid (the page
// server it started) to exit. The response's Status is its wait status.
func (op *Op) WaitPID(pid int) error {
	t := rpc.CriuReqType_WAIT_PID
	op.pending = t
	return op.send(&rpc.CriuReq{Type: &t, Pid: proto.Uint32(uint32(pid))})
}

// Close closes the RPC socket. CRIU ends the request when it next talks to
// the socket: a dump waiting on a notification resumes its tasks, a restore
// kills its tasks. Close does not wait for CRIU to exit; see Exited.
func (op *Op) Close() error {
	var err error
	op.closeOnce.Do(func() { err = unix.Close(op.sk) })
	return err
}

// Abandon ends a request that is no longer wanted and whose process may
// be killed: a restore, a page server, a check; never a dump, which could
// leave its parasite in the tasks. It closes the RPC socket, which CRIU
// takes for "no" (a restore then kills what it restored), and waits up to
// grace for CRIU to exit. A CRIU still there after that (4.2.1 can hang
// after an aborted restore, waiting on tasks it already killed) is killed
// with the trees it forked, and waited for as long again. It reports
// whether CRIU had to be killed.
func (op *Op) Abandon(grace time.Duration) bool {
	op.Close()
	select {
	case <-op.exited:
		return false
	case <-time.After(grace):
	}
	kids, _ := proc.Children(op.cmd.Process.Pid)
	for _, k := range kids {
		if tree, err := proc.OpenTree(k, 0); err == nil {
			proc.SignalAll(tree, syscall.SIGKILL)
			proc.CloseAll(tree)
		}
	}
	op.cmd.Process.Kill()
	select {
	case <-op.exited:
	case <-time.After(grace):
	}
	return true
}

func (op *Op) exitStatus() string {
	select {
	case <-op.exited:
		if op.exitErr != nil {
			return op.exitErr.Error()
		}
		return "exit status 0"
	default:
		return "still running"
	}
}

func (op *Op) failure(msg string) *Error {
	e := &Error{Op: op.kind, Msg: msg, Log: op.LogPath()}
	if e.Log != "" {
		e.Lines = ErrorLines(e.Log, maxQuoted)
	}
	return e
}
