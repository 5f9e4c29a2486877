// Package api is phauld's control API: the JSON types exchanged over the
// control socket under /v1/, and the error codes. phaulctl (through
// pkg/client) and phauld (through pkg/control) both use it; docs/protocol.md
// describes the endpoints.
package api

import (
	"errors"
	"fmt"
	"time"
)

// DefaultPort is the migration port phauld listens on (P.Haul's).
const DefaultPort = 12345

// DefaultSocket is the control socket's path.
const DefaultSocket = "/run/phauld/phauld.sock"

// Code classifies an error. The set is closed: clients may switch on it.
type Code string

// Error codes.
const (
	// CodeInvalid: the request is malformed or names something that
	// cannot be migrated (pid 1, a kernel thread, phauld itself).
	CodeInvalid Code = "invalid_argument"
	// CodeNotFound: no such process or session.
	CodeNotFound Code = "not_found"
	// CodePermission: the caller may not do this.
	CodePermission Code = "permission_denied"
	// CodeUnavailable: the peer daemon cannot be reached.
	CodeUnavailable Code = "unavailable"
	// CodePrecondition: a check failed (CRIU version, CPU, features).
	CodePrecondition Code = "failed_precondition"
	// CodeAborted: the migration failed and was rolled back; the process
	// runs on the source.
	CodeAborted Code = "aborted"
	// CodeInDoubt: the outcome is not known yet; the process is held
	// stopped on the source until the destination says.
	CodeInDoubt Code = "in_doubt"
	// CodeConflict: the request conflicts with the state (cancel after
	// commit).
	CodeConflict Code = "conflict"
	// CodeCanceled: an operator canceled the migration; the process runs
	// on the source.
	CodeCanceled Code = "canceled"
	// CodeInternal: a bug or an unexpected failure.
	CodeInternal Code = "internal"
)

// Error is an error with a code, as the API returns it.
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
	// Cause, when Message also says what became of the process, is the
	// failure alone (what phaulctl history shows).
	Cause string `json:"cause,omitempty"`
}

func (e *Error) Error() string { return e.Message }

// Errorf returns an *Error with code and a formatted message.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// CodeOf returns the code of the first *Error in err's chain, or
// CodeInternal.
func CodeOf(err error) Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return CodeInternal
}

// AsError returns err as an *Error: the first in its chain, with the whole
// chain's message, or a CodeInternal one.
func AsError(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) && e.Message == err.Error() {
		return &Error{Code: e.Code, Message: e.Message, Cause: e.Cause}
	}
	return &Error{Code: CodeOf(err), Message: err.Error()}
}

// MigrateRequest asks the daemon to move a process tree to another host.
type MigrateRequest struct {
	PID int `json:"pid"`
	// Container, instead of PID, names a runc container (its id under
	// the daemon's --runc-root) to move with runc's checkpoint and
	// restore; it keeps its id on the destination.
	Container string `json:"container,omitempty"`
	// To is the destination daemon, HOST or HOST:PORT.
	To string `json:"to"`
	// Mode is how memory moves: ModeCopy, ModeLazy, ModePrecopy, or
	// ModeAuto ("" means auto).
	Mode string `json:"mode,omitempty"`
	// DetachTerminal, for a process on a terminal (which stays on this
	// host), is where its terminal output goes on the destination:
	// DetachJournal or DetachNull. "" refuses such a process.
	DetachTerminal string `json:"detach_terminal,omitempty"`
	// Name, instead of PID, names a process phaulctl run started (or
	// that arrived with a name); the name goes with it.
	Name string `json:"name,omitempty"`
	// Compress is how the page stream and images are compressed on the
	// way: CompressZstd or CompressNone ("" is none).
	Compress string `json:"compress,omitempty"`
	// BWLimit, in bytes a second, is the most the migration sends to
	// the destination (0: no limit; at least 1 MiB/s, see
	// transport.MinRate).
	BWLimit int64 `json:"bwlimit,omitempty"`
}

// RunRequest asks the daemon to start a program so that it can migrate
// (phaulctl run): Argv in Dir with Env, as the caller, the init of a pid
// namespace of its own, stdout and stderr to Log (a file) or the journal.
type RunRequest struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env,omitempty"`
	Dir  string   `json:"dir"`
	Name string   `json:"name,omitempty"`
	// Net is BRIDGE[,ADDR/PREFIX]: a network namespace of its own, with
	// a veth on the bridge.
	Net     string `json:"net,omitempty"`
	Log     string `json:"log,omitempty"`
	Journal bool   `json:"journal,omitempty"`
}

// RunResult is the started program: the pid to migrate, its name, and
// the systemd scope it runs in (where systemd runs).
type RunResult struct {
	PID   int    `json:"pid"`
	Name  string `json:"name,omitempty"`
	Scope string `json:"scope,omitempty"`
}

// Named is a process known by a name on this host.
type Named struct {
	Name string `json:"name"`
	PID  int    `json:"pid"`
}

// Where a detached terminal's output goes on the destination.
const (
	DetachJournal = "journal"
	DetachNull    = "null"
)

// Migration modes.
const (
	// ModeCopy moves all memory while the process is frozen.
	ModeCopy = "copy"
	// ModeLazy (post-copy) restores the process before its memory has
	// arrived: pages follow on demand and in the background, while the
	// source keeps its frozen copy until every page is across.
	ModeLazy = "lazy"
	// ModePrecopy copies memory in rounds while the process runs, then
	// moves what changed while it is frozen. phauld finds what changed by
	// content (a hash per page), so it needs no kernel dirty tracking.
	ModePrecopy = "precopy"
	// ModeAuto picks the best mode both hosts support: lazy, else
	// precopy, else copy.
	ModeAuto = "auto"
)

// Compressions a migration request may name (--compress).
const (
	CompressNone = "none"
	// CompressZstd compresses the page stream and the images with zstd,
	// chunk by chunk.
	CompressZstd = "zstd"
)

// Modes lists the modes a request may name.
var Modes = []string{ModeAuto, ModeCopy, ModeLazy, ModePrecopy}

// Result describes a finished migration. Fields may be added, never
// renamed.
type Result struct {
	ID string `json:"id"`
	// Container is the id of the container moved (empty: a process
	// tree).
	Container string `json:"container,omitempty"`
	SourcePID int    `json:"source_pid"`
	DestPID   int    `json:"dest_pid"`
	// NewPidNS: the destination restored the tree into a new pid
	// namespace, where it keeps its pids (SourcePID is its pid there);
	// DestPID is its pid on the destination host.
	NewPidNS bool `json:"new_pid_ns,omitempty"`
	// Name is the name the process is known by (phaulctl run --name),
	// which it keeps on the destination.
	Name string `json:"name,omitempty"`
	Dest string `json:"dest"`
	// FrozenMS is how long the process was frozen: from the start of the
	// dump until the destination resumed it.
	FrozenMS int64 `json:"frozen_ms"`
	// TotalMS is the whole migration, checks and connection included.
	TotalMS int64 `json:"total_ms"`
	// Bytes is what crossed the network for this migration: page data
	// and image files.
	Bytes int64 `json:"bytes"`
	// PageBytes is the part of Bytes that was page data.
	PageBytes int64 `json:"page_bytes"`
	// PhasesMS is how long each phase took.
	PhasesMS map[string]int64 `json:"phases_ms,omitempty"`
	// Mode is the mode the migration ran in (auto resolved).
	Mode string `json:"mode,omitempty"`
	// LazyMS, for a lazy migration, is how long after the process
	// resumed on the destination its last page arrived; the source kept
	// its frozen copy until then.
	LazyMS int64 `json:"lazy_ms,omitempty"`
	// FetchedAhead, for a lazy migration, is how many of the pages that
	// came lazily the destination fetched ahead of CRIU's lazy-pages
	// (phauld --fetch-ahead).
	FetchedAhead uint64 `json:"fetched_ahead,omitempty"`
	// Dump and Restore are CRIU's own statistics.
	Dump    *DumpStats    `json:"dump_stats,omitempty"`
	Restore *RestoreStats `json:"restore_stats,omitempty"`
	// NotRunning, on a committed migration, is why the process was not
	// seen running on the destination after the commit (empty: it was).
	NotRunning string `json:"not_running,omitempty"`
	// Network is what moved of the process's own network namespace (nil:
	// it runs in its host's, and moved none).
	Network *Network `json:"network,omitempty"`
	// Rootfs is how a container's root filesystem was synced (nil: the
	// hosts share its storage, or no container moved).
	Rootfs *RootfsSync `json:"rootfs,omitempty"`
	// BWLimit is the limit the source kept to, in bytes a second (0:
	// none).
	BWLimit int64 `json:"bwlimit,omitempty"`
	// Compress is how the page stream and images were compressed
	// (CompressZstd; empty: not). PageWireBytes and FileWireBytes are
	// what PageBytes and FileBytes (the images) came to on the wire
	// (PageWireBytes also in mode precopy: pages unchanged since they
	// were sent ahead cross as references).
	Compress      string `json:"compress,omitempty"`
	PageWireBytes int64  `json:"page_wire_bytes,omitempty"`
	FileBytes     int64  `json:"file_bytes,omitempty"`
	FileWireBytes int64  `json:"file_wire_bytes,omitempty"`
	// Precopy is what a pre-copy migration's rounds did (nil: another
	// mode).
	Precopy *Precopy `json:"precopy,omitempty"`
	// LinkRate is the link's rate in bytes a second, as the source's
	// probe measured it before --mode auto chose (0: not measured).
	LinkRate int64 `json:"link_rate,omitempty"`
}

// Precopy is a pre-copy migration's rounds and what they saved at the
// freeze.
type Precopy struct {
	// Method is how changed pages were found: "content" (phaul
	// compares each page's hash with what it sent; no kernel dirty
	// tracking needed).
	Method string         `json:"method"`
	Rounds []PrecopyRound `json:"rounds"`
	// Stop is why the rounds stopped.
	Stop string `json:"stop"`
	// HeldBytes is what the destination held of the pages sent ahead.
	HeldBytes int64 `json:"held_bytes"`
	// FreezePages are the pages CRIU's final dump moved, ReusedPages
	// those of them that crossed as references (unchanged since sent).
	FreezePages uint64 `json:"freeze_pages"`
	ReusedPages uint64 `json:"reused_pages"`
}

// PrecopyRound is one round: pages read, pages sent, and how long it
// took (reading and sending), while the process ran.
type PrecopyRound struct {
	Scanned uint64 `json:"scanned"`
	Sent    uint64 `json:"sent"`
	MS      int64  `json:"ms"`
}

// PrecopyContent is Precopy.Method for phaul's content comparison.
const PrecopyContent = "content"

// RootfsSync is a container root filesystem's sync with rsync: the pass
// while it ran, and the pass while it was frozen (part of FrozenMS), in
// bytes that crossed the link (both ways) and milliseconds.
type RootfsSync struct {
	Bytes       int64 `json:"bytes"`
	MS          int64 `json:"ms"`
	FrozenBytes int64 `json:"frozen_bytes"`
	FrozenMS    int64 `json:"frozen_ms"`
}

// Network is what a migration moved of a process's network namespace.
type Network struct {
	// Interfaces (but loopback) and Addresses (ADDR/PREFIX) moved.
	Interfaces []string `json:"interfaces"`
	Addresses  []string `json:"addresses"`
	// Veths are how the veths were made on the destination: each host
	// end, and the bridge it is on there.
	Veths []Veth `json:"veths,omitempty"`
	// Macvlans are its macvlans, each made on the destination's host
	// interface of the same name, with its MAC address.
	Macvlans []Macvlan `json:"macvlans,omitempty"`
	// TCPConnections is how many TCP connections moved; TCPInFlight how
	// many connections waited, not yet accepted, when the tree was
	// inspected: CRIU leaves those out (their clients see them reset
	// or time out).
	TCPConnections int `json:"tcp_connections"`
	TCPInFlight    int `json:"tcp_in_flight"`
	// LockedMS is how long the namespace's network was locked: from the
	// freeze until the process ran on the destination (the frozen time).
	LockedMS int64 `json:"locked_ms"`
}

// Veth is one veth of a moved namespace, as made on the destination.
type Veth struct {
	Inner  string `json:"inner"`
	Outer  string `json:"outer"`
	Bridge string `json:"bridge"`
}

// Macvlan is one macvlan of a moved namespace: its name there, and the
// host interface it is on.
type Macvlan struct {
	Inner string `json:"inner"`
	Lower string `json:"lower"`
}

// DumpStats are CRIU's dump statistics (times in microseconds).
type DumpStats struct {
	FreezingUS         uint32 `json:"freezing_us"`
	FrozenUS           uint32 `json:"frozen_us"`
	MemdumpUS          uint32 `json:"memdump_us"`
	MemwriteUS         uint32 `json:"memwrite_us"`
	PagesScanned       uint64 `json:"pages_scanned"`
	PagesSkippedParent uint64 `json:"pages_skipped_parent"`
	PagesWritten       uint64 `json:"pages_written"`
	PagesLazy          uint64 `json:"pages_lazy"`
}

// RestoreStats are CRIU's restore statistics (times in microseconds).
type RestoreStats struct {
	PagesCompared   uint64 `json:"pages_compared"`
	PagesSkippedCOW uint64 `json:"pages_skipped_cow"`
	PagesRestored   uint64 `json:"pages_restored"`
	ForkingUS       uint32 `json:"forking_us"`
	RestoreUS       uint32 `json:"restore_us"`
}

// Event is one line of a streamed response: progress, then exactly one
// result or error.
type Event struct {
	// Event is "progress", "result" or "error".
	Event string `json:"event"`
	// ID is the session id, once there is one.
	ID string `json:"id,omitempty"`
	// Phase is the migration's phase (progress events).
	Phase string `json:"phase,omitempty"`
	// Bytes moved so far (progress events): pages and image files.
	Bytes int64 `json:"bytes,omitempty"`
	// Pages of memory moved so far, and the tree's resident memory in
	// bytes when the migration began (what the page transfer should come
	// to), for an estimate.
	Pages    int64 `json:"pages,omitempty"`
	MemBytes int64 `json:"mem_bytes,omitempty"`
	// ElapsedMS is the time since the migration began.
	ElapsedMS int64 `json:"elapsed_ms,omitempty"`
	// Network (progress events) is what moves of the tree's network
	// namespace, as the result will say it: nil when it runs in its
	// host's. LockedMS is the time since the freeze so far (0 before),
	// until the tree runs on the destination; Veths come once the
	// destination made them.
	Network *Network `json:"network,omitempty"`
	Result  *Result  `json:"result,omitempty"`
	Error   *Error   `json:"error,omitempty"`
}

// Event kinds.
const (
	EventProgress = "progress"
	EventResult   = "result"
	EventError    = "error"
)

// Directions of a migration, as seen from one daemon.
const (
	// DirectionOut: this daemon is the source.
	DirectionOut = "out"
	// DirectionIn: this daemon is the destination.
	DirectionIn = "in"
)

// Session is a migration in progress, as `phaulctl status` lists it.
type Session struct {
	ID string `json:"id"`
	// Direction is DirectionOut or DirectionIn.
	Direction string    `json:"direction"`
	PID       int       `json:"pid"`
	Container string    `json:"container,omitempty"`
	Peer      string    `json:"peer"`
	Phase     string    `json:"phase"`
	Bytes     int64     `json:"bytes"`
	Started   time.Time `json:"started"`
	AgeMS     int64     `json:"age_ms"`
	// Note says what the session waits for, when that is not plain from
	// its phase (a session in doubt: what an operator may do).
	Note string `json:"note,omitempty"`
	// CallerUID is the uid that asked for an outgoing migration (absent
	// for incoming ones, and for one in doubt after a restart): a member
	// of the control group may cancel the migrations it asked for.
	CallerUID *int `json:"caller_uid,omitempty"`
}

// ResolveRequest settles a migration in doubt that neither daemon can
// settle (the destination has no record of it, or cannot be reached), as
// an operator decides: Action "resume" resumes the process held stopped on
// the source, "kill" kills it (because it runs on the destination). The
// daemon refuses it while the destination can be reached and answers.
type ResolveRequest struct {
	Action string `json:"action"`
}

// CRIU describes the daemon's CRIU.
type CRIU struct {
	Path     string          `json:"path"`
	Version  string          `json:"version"`
	Features map[string]bool `json:"features"`
}

// Status is the daemon's state.
type Status struct {
	Version  string   `json:"version"`
	PID      int      `json:"pid"`
	Listen   []string `json:"listen"`
	Control  string   `json:"control"`
	StateDir string   `json:"state_dir"`
	CRIU     CRIU     `json:"criu"`
	// Security is how migrations are protected: "mutual-tls", "insecure"
	// (plain TCP, by choice) or "disabled" (no certificates).
	Security string `json:"security"`
	// TLSNames are the names and addresses this daemon's certificate is
	// valid for; TLSExpires is when it expires.
	TLSNames   []string   `json:"tls_names,omitempty"`
	TLSExpires *time.Time `json:"tls_expires,omitempty"`
	// Disabled says why migrations are refused, and what to do.
	Disabled string `json:"disabled,omitempty"`
	// Modes says, for each migration mode, whether this host can take
	// part in it: "" if it can, else why not.
	Modes map[string]string `json:"modes,omitempty"`
	// Containers is what this host does with runc containers.
	Containers *Containers `json:"containers,omitempty"`
	Sessions   []Session   `json:"sessions"`
}

// Containers is how a host moves containers: with the runc at Runc
// (its version, its state root Root; arriving bundles in Dir), or not at
// all (Refused says why, and what to do).
type Containers struct {
	Runc        string   `json:"runc,omitempty"`
	RuncVersion string   `json:"runc_version,omitempty"`
	Root        string   `json:"root,omitempty"`
	Dir         string   `json:"dir,omitempty"`
	SharedPaths []string `json:"shared_paths,omitempty"`
	Refused     string   `json:"refused,omitempty"`
	// Podman: podman is installed; its containers are refused.
	Podman bool `json:"podman,omitempty"`
}

// HistoryEntry is one finished migration, as `phaulctl history` shows it.
// phauld keeps the newest ones across restarts.
type HistoryEntry struct {
	ID        string `json:"id"`
	Direction string `json:"direction"`
	// PID is the process's pid on the source.
	PID     int       `json:"pid"`
	Peer    string    `json:"peer"`
	Started time.Time `json:"started"`
	Ended   time.Time `json:"ended"`
	// Outcome is OutcomeCommitted, OutcomeRolledBack or OutcomeInDoubt.
	Outcome string `json:"outcome"`
	// Error is why it did not commit.
	Error *Error `json:"error,omitempty"`
	// Result holds the figures: pids, mode, times, bytes, CRIU's stats.
	Result Result `json:"result"`
}

// Outcomes of a finished migration.
const (
	// OutcomeCommitted: the process runs on the destination.
	OutcomeCommitted = "committed"
	// OutcomeRolledBack: the process runs on the source.
	OutcomeRolledBack = "rolled-back"
	// OutcomeInDoubt: the source lost the destination after asking the
	// commit; a later entry settles it.
	OutcomeInDoubt = "in-doubt"
	// OutcomeKilled: in doubt, and the destination could not say whether
	// it committed; an operator had the source's copy killed
	// (phaulctl resolve --kill).
	OutcomeKilled = "killed-by-operator"
)

// Security modes.
const (
	SecurityTLS      = "mutual-tls"
	SecurityInsecure = "insecure"
	SecurityDisabled = "disabled"
)

// Caller is who asked, from the control socket's SO_PEERCRED (and
// SO_PEERGROUPS: its supplementary groups when it connected).
type Caller struct {
	UID, GID, PID int
	Groups        []int
}
