//go:build linux

package integration

import (
	"bytes"
	"encoding/json"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/proc"
	"github.com/phaul/phaul/pkg/wire"
	"github.com/phaul/phaul/test/faultproxy"
)

// fzMember and fzOther are members of group phaul in these tests.
const fzMember, fzOther = 54332, 54333

// asMember runs phaulctl against d as uid, a member of gid.
func asMember(t *testing.T, d *daemon, uid, gid int, args ...string) ctlResult {
	t.Helper()
	cmd := exec.Command(bins.phaulctl, append([]string{"--socket", d.Socket}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), Groups: []uint32{uint32(gid)}}}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := ctlResult{stdout: out.String(), stderr: errb.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return r
}

// fzTurncoat starts, as the member, a shell that waits for the file go
// and then execs root, a setuid-root copy of the workload that makes
// every uid root's: a tree the member owns when phauld checks it at the
// request, and root's by the freeze. It is killed at the end of the test.
func fzTurncoat(t *testing.T, dir, root, goFile string) *exec.Cmd {
	t.Helper()
	status := filepath.Join(dir, "status.json")
	cmd := exec.Command("sh", "-c", `while [ ! -e "$0" ]; do sleep 0.02; done; exec "$1" --become-root --mem 8 --status "$2"`, goFile, root, status)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: &syscall.Credential{Uid: fzMember, Gid: fzMember}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// fzTurnRoot is the hook that lets the tree of pid run the setuid
// program (go) and waits until all its uids are root's.
func fzTurnRoot(t *testing.T, pid int, goFile string) func() {
	return func() {
		if err := os.WriteFile(goFile, nil, 0o644); err != nil {
			t.Error(err)
			return
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			tasks, err := proc.TaskCreds([]int{pid})
			if err == nil && len(tasks) > 0 && tasks[0].UIDs == [4]int{} {
				// The workload is up: its memory filled (its status
				// file says so).
				if _, err := os.Stat(filepath.Join(filepath.Dir(goFile), "status.json")); err == nil {
					return
				}
			}
			if time.Now().After(deadline) {
				t.Errorf("pid %d did not turn root's: %+v, %v", pid, tasks, err)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// TestMemberTreeRecheckedAtFreeze (issue 13, item 4): a member's tree
// that runs a setuid-root program after phauld checked it at the request
// is refused at the freeze, before any page leaves: the migration rolls
// back saying which pid is whose, the destination gets no page, and the
// tree runs here again. The tree is made to change between the check and
// the freeze by holding the destination's first handshake answer (the
// fault proxy) while it execs the program. (Root here lacks
// CAP_SYS_RESOURCE: CRIU could not dump the member's own tree; this one
// is root's at the dump, which is what the check must catch.) Then a
// member cancels its own migration of such a tree, held before the
// freeze, which another member may not.
func TestMemberTreeRecheckedAtFreeze(t *testing.T) {
	integration(t)
	a := startDaemon(t, "A", "127.0.0.1:19101", daemonOpts{insecure: true})
	b := startDaemon(t, "B", "127.0.0.2:19102", daemonOpts{insecure: true})
	px := newFaultProxy(t, "127.0.0.3:19103", b.addr)
	openUp(filepath.Dir(a.Socket), 0o755)
	g, err := user.LookupGroup("phaul")
	if err != nil {
		t.Fatalf("phauld did not create group phaul: %v", err)
	}
	gid, _ := strconv.Atoi(g.Gid)

	// The setuid-root program: a copy of the workload, root's, 4755.
	progDir := t.TempDir()
	openUp(progDir, 0o755)
	root := filepath.Join(progDir, "fz-root-workload")
	copyFile(t, bins.workload, root)
	if err := os.Chmod(root, os.ModeSetuid|0o755); err != nil {
		t.Fatal(err)
	}

	// 1. Refused at the freeze.
	dir := t.TempDir()
	openUp(dir, 0o777)
	goFile := filepath.Join(dir, "go")
	tree := fzTurncoat(t, dir, root, goFile)
	pid := tree.Process.Pid
	hello := &faultproxy.Rule{Dir: faultproxy.ToSource, Type: wire.TypeHelloReply, Nth: 1, Action: faultproxy.Pass}
	pages := &faultproxy.Rule{Dir: faultproxy.ToDest, Type: wire.TypePageData, Nth: 1, Action: faultproxy.Pass}
	turn := fzTurnRoot(t, pid, goFile)
	hello.Hook = func() {
		turn()
		px.Arm(pages) // from now on: does a page reach the destination?
	}
	px.Arm(hello)
	r := asMember(t, a, fzMember, gid, "migrate", "--pid", strconv.Itoa(pid), "--to", px.Addr(), "--mode", "copy", "--json")
	var out struct{ Error *api.Error }
	json.Unmarshal([]byte(r.stdout), &out)
	select {
	case <-hello.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("the handshake was not held: exit %d, %s %s", r.code, r.stdout, r.stderr)
	}
	want := "pid " + strconv.Itoa(pid) + " is owned by uid 0, not by uid " + strconv.Itoa(fzMember)
	if r.code != 3 || out.Error == nil || !strings.Contains(out.Error.Message, "at the freeze") || !strings.Contains(out.Error.Message, want) {
		t.Errorf("member migrating a tree turned root's: exit %d, %s %s; want rolled back (3), saying %q", r.code, r.stdout, r.stderr, want)
	}
	select {
	case <-pages.Fired():
		t.Error("a page of the root-owned tree reached the destination")
	default:
	}
	if !strings.Contains(a.log(), "the frozen tree is refused") {
		t.Error("the source did not log the refusal at the freeze")
	}
	waitRunning(t, pid)

	// 2. A member cancels its own migration (the tree root's by then,
	// held before the freeze); another member may not.
	dir2 := t.TempDir()
	openUp(dir2, 0o777)
	goFile2 := filepath.Join(dir2, "go")
	tree2 := fzTurncoat(t, dir2, root, goFile2)
	pid2 := tree2.Process.Pid
	ready := &faultproxy.Rule{Dir: faultproxy.ToSource, Type: wire.TypeReady, Nth: 1, Action: faultproxy.Pass}
	var other, own ctlResult
	ready.Hook = func() {
		list := a.sessions(t)
		if len(list) != 1 || list[0].CallerUID == nil || *list[0].CallerUID != fzMember {
			t.Errorf("sessions: %+v; want one, asked for by uid %d", list, fzMember)
			return
		}
		id := list[0].ID[:8]
		other = asMember(t, a, fzOther, gid, "cancel", id)
		own = asMember(t, a, fzMember, gid, "cancel", id)
	}
	turn2 := fzTurnRoot(t, pid2, goFile2)
	hello2 := &faultproxy.Rule{Dir: faultproxy.ToSource, Type: wire.TypeHelloReply, Nth: 1, Action: faultproxy.Pass,
		Hook: func() { turn2(); px.Arm(ready) }}
	px.Arm(hello2)
	r = asMember(t, a, fzMember, gid, "migrate", "--pid", strconv.Itoa(pid2), "--to", px.Addr(), "--mode", "copy", "--json")
	select {
	case <-ready.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("the migration was not held before the freeze: exit %d, %s %s", r.code, r.stdout, r.stderr)
	}
	if other.code == 0 || !strings.Contains(other.stderr, "may cancel only the migrations it asked for") {
		t.Errorf("another member's cancel: exit %d, %s %s; want refused", other.code, other.stdout, other.stderr)
	}
	if own.code != 0 {
		t.Errorf("the member's cancel of its own migration: exit %d, %s %s", own.code, own.stdout, own.stderr)
	}
	out.Error = nil
	json.Unmarshal([]byte(r.stdout), &out)
	if r.code != 3 || out.Error == nil || out.Error.Code != api.CodeCanceled {
		t.Errorf("the canceled migration: exit %d, %s %s; want canceled (3)", r.code, r.stdout, r.stderr)
	}
	waitRunning(t, pid2)
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestSessionFilesPrivateOnDisk (issue 13, item 7): a migration whose
// restore fails for real keeps its session directories on both sides, and
// everything in them is root's alone, though CRIU writes its images and
// logs 0644: files 0600, directories 0700.
func TestSessionFilesPrivateOnDisk(t *testing.T) {
	integration(t)
	held := t.TempDir()
	a := startDaemon(t, "A", "127.0.0.1:19111", daemonOpts{})
	b := startDaemon(t, "B", "127.0.0.2:19112", daemonOpts{wrap: readOnlyWrap(held)})
	w := startWorkload(t, workloadOpts{memMiB: 16, extra: []string{"--hold", filepath.Join(held, "data")}})
	r := a.phaulctl(t, "migrate", "--pid", strconv.Itoa(w.pid), "--to", b.addr, "--mode", "copy", "--json")
	if r.code != 3 {
		t.Fatalf("migrate with a restore that fails: exit %d, %s %s; want rolled back (3)", r.code, r.stdout, r.stderr)
	}
	waitRunning(t, w.pid)
	for _, d := range []*daemon{a, b} {
		checkSessionPrivate(t, d)
	}
}

// TestKeptImagesPrivateOnDisk: with --keep-images a successful
// migration's session directories stay, on both sides, root's alone.
func TestKeptImagesPrivateOnDisk(t *testing.T) {
	integration(t)
	keep := daemonOpts{flags: []string{"--keep-images"}}
	a := startDaemon(t, "A", "127.0.0.1:19121", keep)
	b := startDaemon(t, "B", "127.0.0.2:19122", keep)
	w := startWorkload(t, workloadOpts{memMiB: 16})
	res := a.migrate(t, w.pid, b)
	w.track(res.DestPID)
	for _, d := range []*daemon{a, b} {
		checkSessionPrivate(t, d)
	}
}

// checkSessionPrivate checks d's one session directory: images in it,
// every file 0600, every directory 0700.
func checkSessionPrivate(t *testing.T, d *daemon) {
	t.Helper()
	dirs, _ := filepath.Glob(filepath.Join(d.state, "sessions", "*"))
	if len(dirs) != 1 {
		t.Fatalf("phauld %s keeps %d session directories, want one", d.name, len(dirs))
	}
	images := 0
	filepath.WalkDir(dirs[0], func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			t.Error(err)
			return nil
		}
		info, err := e.Info()
		if err != nil {
			return nil
		}
		want := fs.FileMode(0o600)
		if e.IsDir() {
			want = 0o700
		}
		if info.Mode().Perm() != want {
			t.Errorf("phauld %s: %s is %v, want %v", d.name, path, info.Mode().Perm(), want)
		}
		if strings.HasSuffix(path, ".img") {
			images++
		}
		return nil
	})
	if images == 0 {
		t.Errorf("phauld %s: no images in %s", d.name, dirs[0])
	}
}
