//go:build linux

package criu

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"google.golang.org/protobuf/proto"
)

// DefaultLogLevel is CRIU's log verbosity unless a caller asks otherwise:
// 4 (debug) makes a failed migration diagnosable from its log alone.
const DefaultLogLevel = 4

// Options are the CRIU options phaul uses, for every kind of request.
type Options struct {
	// ImagesDir is where CRIU reads or writes images; its logs and
	// statistics go there too.
	ImagesDir string
	// LogFile is the log's name inside ImagesDir.
	LogFile string
	// LogLevel is CRIU's verbosity, 0-4; 0 means DefaultLogLevel.
	LogLevel int
	// PID is the root of the tree to dump.
	PID int
	// LeaveStopped leaves the tasks stopped (SIGSTOP) after a successful
	// dump or restore, instead of killing (dump) or resuming (restore)
	// them. phaul uses it on both sides so that the fate of each copy is
	// its own decision, made after the commit.
	LeaveStopped bool
	// Notify makes CRIU stop at each notification (pre-dump, post-dump,
	// post-restore, ...) until it is answered.
	Notify bool
	// PageServer is a connected stream socket: a dump writes pages to it,
	// a page server reads them from it.
	PageServer *os.File
	// External lists resources outside the tree that the dump records by
	// reference (e.g. "unix[INODE]", one end of a Unix stream connection
	// whose other end stays behind); ExtUnixSk allows external Unix
	// sockets at all.
	External  []string
	ExtUnixSk bool
	// InheritFds hand the restored tree files in place of resources
	// dumped as external: Key names the resource ("socket:[INODE]").
	InheritFds []InheritFd
	// LazyPages: a dump leaves the tree's anonymous private memory in
	// pipes and, after post-dump, serves it on PageServer to a lazy-pages
	// daemon until that one closes; a restore leaves it to the lazy-pages
	// daemon running in ImagesDir (see StartLazyPages).
	LazyPages bool
	// GhostLimit is the largest deleted file (by allocated size) a dump
	// carries in its images; 0 is CRIU's default, 1 MiB.
	GhostLimit uint32
	// Network: the tree has a network namespace of its own, which moves
	// with it. Its established TCP connections are dumped (in repair
	// mode) and restored, connections not yet accepted are left out, and
	// the namespace's network is locked with nftables from the freeze on
	// (a dump leaves the lock, and the repair mode, on a tree it leaves
	// stopped: see pkg/network Unlock). Without it the network is never
	// locked, and CRIU refuses connected TCP sockets.
	Network bool
	// FileLocks carries the tree's file locks (flock, POSIX and OFD
	// locks): a dump records them, a restore takes them again. A lock on
	// a file the tree shares with a process outside it fails the dump.
	FileLocks bool
	// ShellJob lets the tree's root be in a session and process group
	// whose leader is outside the tree (a job a shell started): a dump
	// records it so, and a restore puts the tree in CRIU's own session
	// and group.
	ShellJob bool
	// PidNSInit, for a restore, is phauld's binary: the restore runs in
	// a new pid namespace (and mount namespace, for its /proc) whose init
	// is `PidNSInit pidns-init` (see pkg/pidns), so that the tree keeps
	// pids that are taken in this one.
	PidNSInit string
	// EnterPidNS, for a dump, is the host pid of the init of a pid
	// namespace (one PidNSInit made): CRIU runs in that namespace and its
	// mount namespace (through nsenter), where PID is the tree's root.
	EnterPidNS int
	// configFile is a CRIU configuration file for what RPC cannot say.
	configFile string
}

// InheritFd is a file a restore gives the tree in place of an external
// resource.
type InheritFd struct {
	Key  string
	File *os.File
}

// files are the files the swrk process inherits after its RPC socket (fd
// 3): the page server socket, then the inherited fds, in this order.
func (o *Options) files() []*os.File {
	var fs []*os.File
	if o.PageServer != nil {
		fs = append(fs, o.PageServer)
	}
	for _, f := range o.InheritFds {
		fs = append(fs, f.File)
	}
	return fs
}

// rpcOpts turns o into CRIU's RPC options: the one place where phaul's
// choices of CRIU behaviour are made.
func (o *Options) rpcOpts() *rpc.CriuOpts {
	level := o.LogLevel
	if level == 0 {
		level = DefaultLogLevel
	}
	r := &rpc.CriuOpts{
		// images_dir_fd is required by the protocol; -1 means "use
		// images_dir".
		ImagesDirFd: proto.Int32(-1),
		ImagesDir:   proto.String(o.ImagesDir),
		LogLevel:    proto.Int32(int32(level)),
		// A tree in its host's namespace: the network is not locked
		// (CRIU would lock the host's), and CRIU refuses connected TCP
		// sockets, which phaul refuses before the freeze.
		NetworkLock: rpc.CriuNetworkLockMethod_SKIP.Enum(),
		// Restored tasks stay in the restoring daemon's cgroup; where
		// they go from there is the daemon's business, not CRIU's.
		ManageCgroupsMode: rpc.CriuCgMode_IGNORE.Enum(),
	}
	if o.Network {
		r.NetworkLock = rpc.CriuNetworkLockMethod_NFTABLES.Enum()
		r.TcpEstablished = proto.Bool(true)
		r.TcpSkipInFlight = proto.Bool(true)
	}
	if o.LogFile != "" {
		r.LogFile = proto.String(o.LogFile)
	}
	if o.PID != 0 {
		r.Pid = proto.Int32(int32(o.PID))
	}
	if o.LeaveStopped {
		r.LeaveStopped = proto.Bool(true)
	}
	if o.Notify {
		r.NotifyScripts = proto.Bool(true)
	}
	fd := int32(4) // the first file after the RPC socket
	if o.PageServer != nil {
		// A lazy dump ignores ps.fd over RPC and would listen on a port
		// of its own, on every address; its socket is given in the
		// configuration file instead (see StartDump).
		if !o.LazyPages {
			r.Ps = &rpc.CriuPageServerInfo{Fd: proto.Int32(fd)}
		}
		fd++
	}
	if o.LazyPages {
		r.LazyPages = proto.Bool(true)
	}
	if o.configFile != "" {
		r.ConfigFile = proto.String(o.configFile)
	}
	if o.FileLocks {
		r.FileLocks = proto.Bool(true)
	}
	if o.GhostLimit != 0 {
		r.GhostLimit = proto.Uint32(o.GhostLimit)
	}
	for _, in := range o.InheritFds {
		r.InheritFd = append(r.InheritFd, &rpc.InheritFd{Key: proto.String(in.Key), Fd: proto.Int32(fd)})
		fd++
	}
	if o.ShellJob {
		r.ShellJob = proto.Bool(true)
	}
	if o.ExtUnixSk {
		r.ExtUnixSk = proto.Bool(true)
	}
	r.External = append(r.External, o.External...)
	return r
}

func request(t rpc.CriuReqType, o *Options, keepOpen bool) *rpc.CriuReq {
	req := &rpc.CriuReq{Type: t.Enum()}
	if o != nil {
		req.Opts = o.rpcOpts()
	}
	if keepOpen {
		req.KeepOpen = proto.Bool(true)
	}
	return req
}

// LazyDumpConf is the configuration file a lazy dump writes in its images
// directory: not an image.
const LazyDumpConf = "lazy-dump.conf"

// StartDump dumps the tree rooted at o.PID, writing pages to
// o.PageServer. With o.Notify and o.LeaveStopped, CRIU holds the frozen
// tree at "post-dump" until answered: false resumes the tree, true leaves
// it stopped.
func (c *Client) StartDump(o Options) (*Op, error) {
	if o.LazyPages && o.PageServer != nil {
		// CRIU reads "ps-socket" from a configuration file after the RPC
		// options: the page server then serves on our socket (fd 4 in
		// swrk) instead of listening.
		path := filepath.Join(o.ImagesDir, LazyDumpConf)
		if err := os.WriteFile(path, []byte("ps-socket 4\n"), 0o600); err != nil {
			return nil, fmt.Errorf("criu dump: %w", err)
		}
		o.configFile = path
	}
	return c.start("dump", &o, request(rpc.CriuReqType_DUMP, &o, false))
}

// StartPageServer starts a page server that reads a dump's pages from
// o.PageServer into o.ImagesDir. The response carries the page server's
// pid; the request stays open so that WaitPID can learn how it ended.
func (c *Client) StartPageServer(o Options) (*Op, error) {
	return c.start("page-server", &o, request(rpc.CriuReqType_PAGE_SERVER_CHLD, &o, true))
}

// StartRestore restores the tree whose images are in o.ImagesDir.
func (c *Client) StartRestore(o Options) (*Op, error) {
	return c.start("restore", &o, request(rpc.CriuReqType_RESTORE, &o, false))
}

// StartCPUInfoCheck checks that this host's CPU can run tasks dumped on
// the host whose cpuinfo.img is in o.ImagesDir. A failure with Errno
// ENOTSUP means CRIU cannot compare CPUs here.
func (c *Client) StartCPUInfoCheck(o Options) (*Op, error) {
	return c.start("cpuinfo-check", &o, request(rpc.CriuReqType_CPUINFO_CHECK, &o, false))
}
