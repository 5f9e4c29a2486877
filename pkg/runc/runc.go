//go:build linux

// Package runc drives the runc binary, so that the runtime that runs a
// container keeps knowing it on both hosts: its state, pausing and
// resuming it, deleting it, and its checkpoint and restore (which runc
// does with CRIU, knowing the container's mounts, cgroups, namespaces and
// devices).
package runc

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Runc is one runc state root, driven through the binary at Path.
type Runc struct {
	// Path is runc's binary ("runc": found in PATH); Root its state root
	// (runc's --root; "" is runc's own default, /run/runc for root).
	Path, Root string
	// CRIU, if set, is the CRIU binary runc runs (runc's --criu).
	CRIU string
}

// DefaultRoot is runc's state root for root.
const DefaultRoot = "/run/runc"

// State is a container as `runc state` reports it.
type State struct {
	ID          string            `json:"id"`
	PID         int               `json:"pid"`
	Status      string            `json:"status"` // created, running, paused, stopped
	Bundle      string            `json:"bundle"`
	Rootfs      string            `json:"rootfs"`
	Created     time.Time         `json:"created"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// ErrNotExist is a container runc does not know.
var ErrNotExist = errors.New("container does not exist")

func (r *Runc) path() string {
	if r.Path == "" {
		return "runc"
	}
	return r.Path
}

func (r *Runc) command(ctx context.Context, args ...string) *exec.Cmd {
	var global []string
	if r.Root != "" {
		global = append(global, "--root", r.Root)
	}
	if r.CRIU != "" {
		global = append(global, "--criu", r.CRIU)
	}
	cmd := exec.CommandContext(ctx, r.path(), append(global, args...)...)
	// The container's stdio must be nothing of ours: CRIU cannot carry a
	// descriptor on a host file.
	cmd.Stdin = nil
	return cmd
}

// run runs runc with args and returns its stdout; a failure carries runc's
// own message.
func (r *Runc) run(ctx context.Context, args ...string) ([]byte, error) {
	cmd := r.command(ctx, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), CommandError(args[0], err, stderr.Bytes())
	}
	return stdout.Bytes(), nil
}

// Error is a runc command that failed, with what runc said.
type Error struct {
	Command string
	Message string
	Err     error
}

func (e *Error) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("runc %s: %v", e.Command, e.Err)
	}
	return fmt.Sprintf("runc %s: %s", e.Command, e.Message)
}

func (e *Error) Unwrap() error { return e.Err }

// logMsg finds the message of runc's logrus lines (level=error msg="…").
var logMsg = regexp.MustCompile(`msg="((?:[^"\\]|\\.)*)"`)

// CommandError turns a runc command's exit and its stderr into an *Error
// with runc's own message (ErrNotExist underneath for an unknown
// container).
func CommandError(command string, err error, stderr []byte) error {
	var msgs []string
	for _, line := range strings.Split(strings.TrimSpace(string(stderr)), "\n") {
		if m := logMsg.FindStringSubmatch(line); m != nil {
			msg := strings.ReplaceAll(strings.ReplaceAll(m[1], `\"`, `"`), `\n`, "; ")
			msgs = append(msgs, msg)
		} else if line = strings.TrimSpace(line); line != "" {
			msgs = append(msgs, line)
		}
	}
	e := &Error{Command: command, Message: strings.Join(msgs, "; "), Err: err}
	if strings.Contains(e.Message, "does not exist") {
		e.Err = ErrNotExist
	}
	return e
}

// Version is runc's version ("1.1.5+ds1").
func (r *Runc) Version(ctx context.Context) (string, error) {
	out, err := r.run(ctx, "--version")
	if err != nil {
		return "", err
	}
	first, _, _ := strings.Cut(string(out), "\n")
	v, ok := strings.CutPrefix(strings.TrimSpace(first), "runc version ")
	if !ok {
		return "", fmt.Errorf("runc --version said %q", first)
	}
	return v, nil
}

// State is the state of container id (ErrNotExist if runc does not know
// it).
func (r *Runc) State(ctx context.Context, id string) (State, error) {
	var s State
	out, err := r.run(ctx, "state", id)
	if err != nil {
		return s, err
	}
	if err := json.Unmarshal(out, &s); err != nil {
		return s, fmt.Errorf("runc state %s: %w", id, err)
	}
	return s, nil
}

// Pause freezes the container's processes (its cgroup's freezer).
func (r *Runc) Pause(ctx context.Context, id string) error {
	_, err := r.run(ctx, "pause", id)
	return err
}

// Resume thaws a paused container.
func (r *Runc) Resume(ctx context.Context, id string) error {
	_, err := r.run(ctx, "resume", id)
	return err
}

// ResumeIfPaused thaws the container if it is paused, and does nothing
// if it is not (running already, after a dump that failed and resumed it).
func (r *Runc) ResumeIfPaused(ctx context.Context, id string) error {
	st, err := r.State(ctx, id)
	if err != nil {
		return err
	}
	if st.Status != "paused" {
		return nil
	}
	return r.Resume(ctx, id)
}

// Delete deletes the container; force kills it first if it runs (or is
// paused).
func (r *Runc) Delete(ctx context.Context, id string, force bool) error {
	args := []string{"delete"}
	if force {
		args = append(args, "--force")
	}
	_, err := r.run(ctx, append(args, id)...)
	return err
}

// CheckpointOptions are the runc checkpoint options phaul uses.
type CheckpointOptions struct {
	// ImagePath receives the images, WorkPath CRIU's log (dump.log).
	ImagePath, WorkPath string
	// PageServer, if set, is ADDR:PORT of the page server the pages go
	// to instead of ImagePath.
	PageServer string
	// LeaveRunning keeps the container after the dump (a paused one
	// stays paused); without it runc deletes it.
	LeaveRunning bool
	// TCPEstablished carries established connections; SkipInFlight
	// leaves connections not yet accepted behind instead of failing.
	TCPEstablished, SkipInFlight bool
	// LazyPages leaves the memory out of the images: once dumped, CRIU
	// serves it from PageServer's port (on every address: CRIU takes
	// only the port) to one lazy-pages daemon, and runc returns when
	// that one has it all. StatusFd, if not 0, is the descriptor (in
	// the command's ExtraFiles, write-only) on which runc writes a NUL
	// byte when the server listens.
	LazyPages bool
	StatusFd  int
	// FileLocks carries the container's file locks.
	FileLocks bool
}

func (o CheckpointOptions) args() []string {
	a := []string{"checkpoint", "--image-path", o.ImagePath, "--work-path", o.WorkPath}
	if o.PageServer != "" {
		a = append(a, "--page-server", o.PageServer)
	}
	if o.LeaveRunning {
		a = append(a, "--leave-running")
	}
	if o.TCPEstablished {
		a = append(a, "--tcp-established")
	}
	if o.SkipInFlight {
		a = append(a, "--tcp-skip-in-flight")
	}
	if o.LazyPages {
		a = append(a, "--lazy-pages")
	}
	if o.FileLocks {
		a = append(a, "--file-locks")
	}
	if o.StatusFd != 0 {
		a = append(a, "--status-fd", strconv.Itoa(o.StatusFd))
	}
	return a
}

// CheckpointCommand is the command that checkpoints container id, for a
// caller that runs and watches it itself (CRIU can take long).
func (r *Runc) CheckpointCommand(ctx context.Context, id string, o CheckpointOptions) *exec.Cmd {
	return r.command(ctx, append(o.args(), id)...)
}

// RestoreOptions are the runc restore options phaul uses.
type RestoreOptions struct {
	// Bundle is the container's bundle here (its config.json);
	// ImagePath the images, WorkPath where CRIU logs (restore.log).
	Bundle, ImagePath, WorkPath string
	// TCPEstablished restores established connections.
	TCPEstablished bool
	// LazyPages leaves the memory to the lazy-pages daemon whose socket
	// is in WorkPath.
	LazyPages bool
	// FileLocks takes the container's file locks again.
	FileLocks bool
}

// RestoreCommand is the command that restores container id, detached (runc
// returns once CRIU has restored it), with no stdio of ours.
func (r *Runc) RestoreCommand(ctx context.Context, id string, o RestoreOptions) *exec.Cmd {
	a := []string{"restore", "--detach", "--bundle", o.Bundle, "--image-path", o.ImagePath, "--work-path", o.WorkPath}
	if o.TCPEstablished {
		a = append(a, "--tcp-established")
	}
	if o.LazyPages {
		a = append(a, "--lazy-pages")
	}
	if o.FileLocks {
		a = append(a, "--file-locks")
	}
	return r.command(ctx, append(a, id)...)
}

// ManagerAnnotation is the annotation by which a container manager
// (podman: "libpod") marks the containers it has runc run.
const ManagerAnnotation = "io.container.manager"

// PodmanContainer reports whether podman (if installed) has a container
// name (a name or an id), and its full id.
func PodmanContainer(ctx context.Context, name string) (id string, ok bool) {
	path, err := exec.LookPath("podman")
	if err != nil || !ValidID(name) {
		return "", false
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "container", "inspect", "--format", "{{.ID}}", "--", name).Output()
	if err != nil {
		return "", false
	}
	id = strings.TrimSpace(string(out))
	return id, id != ""
}

// ValidID reports whether id can be a container id phaul accepts (runc's
// own rule: letters, digits, _ + - .; not . or ..).
func ValidID(id string) bool {
	return idRE.MatchString(id) && id != "." && id != ".."
}

var idRE = regexp.MustCompile(`^[A-Za-z0-9_+.-]{1,128}$`)

// Exists reports whether path exists (for checks of a bundle's mounts).
func Exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
