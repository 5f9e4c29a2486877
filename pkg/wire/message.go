package wire

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/phaul/phaul/pkg/api"
)

// Type identifies a message. The numbers are part of the protocol: never
// renumber a type, only add new ones.
type Type uint8

// Message types. Handshake messages open every connection; the others
// travel on the rpc connection (commands and image files) or the mem
// connection (page data) of a migration.
const (
	TypeHello      Type = 0x01
	TypeHelloReply Type = 0x02

	TypePrepare   Type = 0x10
	TypeReady     Type = 0x11
	TypeFileBegin Type = 0x12
	TypeFileData  Type = 0x13
	TypeFileEnd   Type = 0x14
	TypeRestore   Type = 0x15
	TypeRestored  Type = 0x16
	TypeCommit    Type = 0x17
	TypeCommitted Type = 0x18
	TypeDone      Type = 0x19
	TypeFail      Type = 0x1a
	TypePing      Type = 0x1b
	TypePong      Type = 0x1c
	// 0x1d and 0x1e are kept for pre-copy rounds.
	TypeResumed Type = 0x1f
	TypePagesIn Type = 0x20
	TypeResume  Type = 0x21
	// A container's root filesystem, synced with rsync over the rpc
	// connection (see SyncOpen).
	TypeSyncOpen Type = 0x22
	TypeSyncData Type = 0x23
	TypeSyncEOF  Type = 0x24
	TypeSyncDone Type = 0x25
	// TypeFileDataZ is FileData compressed (zstd, one frame per chunk),
	// when the two sides agreed to compress (Prepare's Compress).
	TypeFileDataZ Type = 0x26
	// TypeProbeAck answers a link probe (TypeProbe, TypeProbeEnd).
	TypeProbeAck Type = 0x27

	TypePageData Type = 0x30
	TypePageEOF  Type = 0x31
	// TypePageDataZ is PageData compressed, as TypeFileDataZ.
	TypePageDataZ Type = 0x32
	// Pre-copy (see pkg/precopy): pages sent ahead while the tree runs,
	// and, in the page stream at the freeze, references to them.
	TypePrecopyPages Type = 0x33
	TypePageRefs     Type = 0x34
	// A link probe: filler bytes the source sends before Prepare, so that
	// --mode auto knows the link's rate (see ProbeAck).
	TypeProbe    Type = 0x35
	TypeProbeEnd Type = 0x36
	// TypePrecopyPagesZ is PrecopyPages with its pages compressed.
	TypePrecopyPagesZ Type = 0x37

	TypeResolve Type = 0x40
	TypeOutcome Type = 0x41
)

// Channel is the connection a message travels on.
type Channel uint8

// Channels. A handshake decoder accepts only handshake messages; after the
// handshake a connection is rpc or mem (of a migration), or query (a
// source asking how a migration it lost track of ended).
const (
	Handshake Channel = 1 << iota
	RPC
	Mem
	Query
)

func (c Channel) String() string {
	switch c {
	case Handshake:
		return "handshake"
	case RPC:
		return "rpc"
	case Mem:
		return "mem"
	case Query:
		return "query"
	}
	return fmt.Sprintf("channel(%d)", uint8(c))
}

// Message is anything that can be sent in a frame.
type Message interface {
	Type() Type
}

// validator is implemented by messages whose decoded fields need checks
// beyond JSON syntax.
type validator interface {
	validate() error
}

// spec describes a message type: its name (for logs), its size limit, the
// channels it may travel on, whether its payload is raw bytes rather than
// JSON, and how to make an empty one to decode into.
type spec struct {
	name     string
	max      int
	channels Channel
	raw      bool
	new      func() Message
}

const (
	smallMax   = 4 << 10
	controlMax = 64 << 10
	// prepareMax: a prepare lists the tree's task ids and files.
	prepareMax = 1 << 20
)

// specs is the table of every message type: the only way bytes from the
// wire choose what gets decoded.
var specs = [256]*spec{
	TypeHello:         {name: "hello", max: smallMax, channels: Handshake, new: func() Message { return new(Hello) }},
	TypeHelloReply:    {name: "hello-reply", max: smallMax, channels: Handshake, new: func() Message { return new(HelloReply) }},
	TypePrepare:       {name: "prepare", max: prepareMax, channels: RPC, new: func() Message { return new(Prepare) }},
	TypeReady:         {name: "ready", max: controlMax, channels: RPC, new: func() Message { return new(Ready) }},
	TypeFileBegin:     {name: "file-begin", max: smallMax, channels: RPC, new: func() Message { return new(FileBegin) }},
	TypeFileData:      {name: "file-data", max: MaxPayload, channels: RPC, raw: true, new: func() Message { return new(FileData) }},
	TypeFileEnd:       {name: "file-end", max: smallMax, channels: RPC, new: func() Message { return new(FileEnd) }},
	TypeRestore:       {name: "restore", max: smallMax, channels: RPC, new: func() Message { return new(Restore) }},
	TypeRestored:      {name: "restored", max: controlMax, channels: RPC, new: func() Message { return new(Restored) }},
	TypeCommit:        {name: "commit", max: smallMax, channels: RPC, new: func() Message { return new(Commit) }},
	TypeCommitted:     {name: "committed", max: smallMax, channels: RPC, new: func() Message { return new(Committed) }},
	TypeDone:          {name: "done", max: smallMax, channels: RPC | Query, new: func() Message { return new(Done) }},
	TypeFail:          {name: "fail", max: controlMax, channels: RPC, new: func() Message { return new(Fail) }},
	TypePing:          {name: "ping", max: smallMax, channels: RPC, new: func() Message { return new(Ping) }},
	TypePong:          {name: "pong", max: smallMax, channels: RPC, new: func() Message { return new(Pong) }},
	TypeResumed:       {name: "resumed", max: smallMax, channels: RPC, new: func() Message { return new(Resumed) }},
	TypePagesIn:       {name: "pages-in", max: smallMax, channels: RPC, new: func() Message { return new(PagesIn) }},
	TypeResume:        {name: "resume", max: smallMax, channels: RPC, new: func() Message { return new(Resume) }},
	TypeSyncOpen:      {name: "sync-open", max: smallMax, channels: RPC, new: func() Message { return new(SyncOpen) }},
	TypeSyncData:      {name: "sync-data", max: MaxPayload, channels: RPC, raw: true, new: func() Message { return new(SyncData) }},
	TypeFileDataZ:     {name: "file-data-z", max: MaxPayload, channels: RPC, raw: true, new: func() Message { return new(FileDataZ) }},
	TypeSyncEOF:       {name: "sync-eof", max: 0, channels: RPC, raw: true, new: func() Message { return new(SyncEOF) }},
	TypeSyncDone:      {name: "sync-done", max: controlMax, channels: RPC, new: func() Message { return new(SyncDone) }},
	TypePageData:      {name: "page-data", max: MaxPayload, channels: Mem, raw: true, new: func() Message { return new(PageData) }},
	TypePageEOF:       {name: "page-eof", max: 0, channels: Mem, raw: true, new: func() Message { return new(PageEOF) }},
	TypePageDataZ:     {name: "page-data-z", max: MaxPayload, channels: Mem, raw: true, new: func() Message { return new(PageDataZ) }},
	TypePrecopyPages:  {name: "precopy-pages", max: MaxPayload, channels: Mem, raw: true, new: func() Message { return new(PrecopyPages) }},
	TypePrecopyPagesZ: {name: "precopy-pages-z", max: MaxPayload, channels: Mem, raw: true, new: func() Message { return new(PrecopyPagesZ) }},
	TypePageRefs:      {name: "page-refs", max: MaxPayload, channels: Mem, raw: true, new: func() Message { return new(PageRefs) }},
	TypeProbe:         {name: "probe", max: MaxPayload, channels: Mem, raw: true, new: func() Message { return new(Probe) }},
	TypeProbeEnd:      {name: "probe-end", max: 0, channels: Mem, raw: true, new: func() Message { return new(ProbeEnd) }},
	TypeProbeAck:      {name: "probe-ack", max: smallMax, channels: RPC, new: func() Message { return new(ProbeAck) }},
	TypeResolve:       {name: "resolve", max: smallMax, channels: Query, new: func() Message { return new(Resolve) }},
	TypeOutcome:       {name: "outcome", max: smallMax, channels: Query, new: func() Message { return new(Outcome) }},
}

func (t Type) String() string {
	if s := specs[t]; s != nil {
		return s.name
	}
	return fmt.Sprintf("type(0x%02x)", uint8(t))
}

// rawMessage is a message whose payload is its bytes, not JSON.
type rawMessage interface {
	Message
	bytes() []byte
	setBytes([]byte)
}

func decode(t Type, payload []byte) (Message, error) {
	s := specs[t]
	m := s.new()
	if s.raw {
		m.(rawMessage).setBytes(payload)
		return m, nil
	}
	if err := json.Unmarshal(payload, m); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrPayload, s.name, err)
	}
	if v, ok := m.(validator); ok {
		if err := v.validate(); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrPayload, s.name, err)
		}
	}
	return m, nil
}

// Append appends m as one frame to b.
func Append(b []byte, m Message) ([]byte, error) {
	s := specs[m.Type()]
	if s == nil {
		return b, fmt.Errorf("%w 0x%02x", ErrType, byte(m.Type()))
	}
	var payload []byte
	if s.raw {
		payload = m.(rawMessage).bytes()
	} else {
		var err error
		if payload, err = json.Marshal(m); err != nil {
			return b, fmt.Errorf("encode %s: %w", s.name, err)
		}
	}
	if len(payload) > s.max {
		return b, fmt.Errorf("%w: %s of %d bytes (limit %d)", ErrTooLarge, s.name, len(payload), s.max)
	}
	b = AppendHeader(b, m.Type(), len(payload))
	return append(b, payload...), nil
}

// Marshal returns m as one frame.
func Marshal(m Message) ([]byte, error) { return Append(nil, m) }

// SessionID names one migration on both daemons. It is chosen at random by
// the source.
type SessionID [16]byte

// String returns the id as 32 lower-case hex digits.
func (id SessionID) String() string { return hex.EncodeToString(id[:]) }

// ParseSessionID parses the form String returns.
func ParseSessionID(s string) (SessionID, error) {
	var id SessionID
	if len(s) != 2*len(id) {
		return id, fmt.Errorf("session id %q: want %d hex digits", s, 2*len(id))
	}
	if _, err := hex.Decode(id[:], []byte(s)); err != nil {
		return id, fmt.Errorf("session id %q: %w", s, err)
	}
	return id, nil
}

// MarshalText implements encoding.TextMarshaler.
func (id SessionID) MarshalText() ([]byte, error) { return []byte(id.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (id *SessionID) UnmarshalText(b []byte) error {
	v, err := ParseSessionID(string(b))
	if err != nil {
		return err
	}
	*id = v
	return nil
}

// Role is what a connection is for.
type Role string

// Roles of connections.
const (
	RoleRPC Role = "rpc"
	RoleMem Role = "mem"
	// RoleQuery is a lone connection on which a source asks the outcome
	// of a migration whose connections it lost after asking the commit.
	RoleQuery Role = "query"
)

// Hello is the first message on every connection, sent by the dialing side.
type Hello struct {
	// Proto is the highest protocol version the sender speaks.
	Proto   int       `json:"proto"`
	Role    Role      `json:"role"`
	Session SessionID `json:"session"`
	// Daemon is the sender's software and version, for logs.
	Daemon string `json:"daemon,omitempty"`
}

// HelloReply answers a Hello. When OK is false, Code says why (one of the
// Refused codes), Error in words, and the connection is closed. A
// destination that refuses a connection before any TLS (too busy, an
// address --allow-peer does not list, the other security mode) writes
// this frame in plain, TLS or not: the source recognises it.
type HelloReply struct {
	OK     bool   `json:"ok"`
	Code   string `json:"code,omitempty"`
	Error  string `json:"error,omitempty"`
	Daemon string `json:"daemon,omitempty"`
	// Probe: this daemon answers link probes (see Probe); a source
	// probes only a destination that says so.
	Probe bool `json:"probe,omitempty"`
}

// Why a destination refuses a connection (HelloReply.Code).
const (
	// RefusedBusy: the destination has too many connections that are
	// not a session yet (from this address, or in all).
	RefusedBusy = "busy"
	// RefusedPeer: the destination's --allow-peer does not list the
	// source's address.
	RefusedPeer = "peer_not_allowed"
	// RefusedNeedsTLS: the destination requires mutual TLS and the
	// source spoke plain TCP (it runs with --insecure).
	RefusedNeedsTLS = "tls_required"
	// RefusedInsecure: the destination runs with --insecure and the
	// source spoke TLS.
	RefusedInsecure = "destination_insecure"
	// RefusedSession: the session is already running, already has this
	// connection, or the protocol version is not spoken.
	RefusedSession = "session"
	// RefusedStopping: the destination phauld is shutting down.
	RefusedStopping = "stopping"
)

var refusedCodes = map[string]bool{"": true, RefusedBusy: true, RefusedPeer: true, RefusedNeedsTLS: true,
	RefusedInsecure: true, RefusedSession: true, RefusedStopping: true}

// Prepare opens a migration: the source tells the destination what it is
// about to send, and the destination checks it can take it.
type Prepare struct {
	PID int `json:"pid"`
	// Container is set when the tree is a runc container, which moves
	// with runc's checkpoint and restore.
	Container *Container `json:"container,omitempty"`
	// CRIUVersion is the source's CRIU version as major*10000 +
	// minor*100 + sublevel.
	CRIUVersion int `json:"criu_version"`
	// CPUInfo is the source's cpuinfo.img (from CRIU's cpuinfo dump), for
	// the destination's cpuinfo check. Empty if the source could not make
	// one.
	CPUInfo []byte `json:"cpuinfo,omitempty"`
	// Name is the root process's command name.
	Name string `json:"name,omitempty"`
	// JournalStreams are the inodes of the tree's sockets that are
	// connected to journald's stdout socket (a process systemd started).
	// They are dumped as external; the destination connects each afresh
	// to its own journald.
	JournalStreams []uint64 `json:"journal_streams,omitempty"`
	// Mode is the mode the user asked for: copy, lazy, precopy or auto
	// ("" is copy, from a source that predates modes).
	Mode string `json:"mode,omitempty"`
	// Compress asks for the page stream and images to be compressed
	// ("zstd"; "" or "none": not). A destination that takes it says so
	// in Ready's Compress; the frames are PageDataZ and FileDataZ.
	Compress string `json:"compress,omitempty"`
	// PrecopySeed seeds the hash of pages sent ahead (mode precopy): the
	// destination checks each page a reference names by it.
	PrecopySeed uint64 `json:"precopy_seed,omitempty"`
	// LinkRate is the link's rate as the source's probe measured it, in
	// bytes a second (0: not measured), and MemBytes the tree's resident
	// memory: with both, auto weighs pre-copy against lazy.
	LinkRate int64 `json:"link_rate,omitempty"`
	MemBytes int64 `json:"mem_bytes,omitempty"`
	// SourceModes are the modes the source can run as a source; the
	// destination picks the mode (auto: the best both can run).
	SourceModes []string `json:"source_modes,omitempty"`
	// Network is set when the tree has a network namespace of its own,
	// which moves with it.
	Network *Network `json:"network,omitempty"`
	// SourcePort is the port the source daemon listens on for
	// migrations (0: none), by which the destination names it.
	SourcePort int `json:"source_port,omitempty"`
	// Terminals are the terminals the tree is attached to, as CRIU's
	// external keys (tty[RDEV:DEV]): the destination gives it a new
	// terminal for each, whose output goes to Detach ("journal" or
	// "null").
	Terminals []string `json:"terminals,omitempty"`
	// Detach may also be the absolute path of a file the output is
	// appended to on the destination (a root caller's choice).
	Detach string `json:"detach_terminal,omitempty"`
	// TaskIDs are the pids and thread ids of the tree as its dump
	// records them (in its own pid namespace). A destination on which
	// any is taken restores the tree into a new pid namespace, unless
	// OwnPidNS: the root is the init of a pid namespace of its own, which
	// CRIU makes anew.
	TaskIDs  []int `json:"task_ids,omitempty"`
	OwnPidNS bool  `json:"own_pid_ns,omitempty"`
	// RunName is the name the process is known by on the source
	// (phaulctl run --name), which it keeps.
	RunName string `json:"run_name,omitempty"`
	// Files are the regular files the tree has open, maps or runs, as
	// CRIU will reopen them by path on the destination: the destination
	// refuses before the freeze if one is missing there or differs.
	Files []FileCheck `json:"files,omitempty"`
	// UnixPeers are the paths of sockets outside the tree that its Unix
	// datagram sockets are connected to (syslog's /dev/log, say): CRIU
	// connects them to the same paths on the destination, which must
	// have a socket at each.
	UnixPeers []string `json:"unix_peers,omitempty"`
	// ShellJob: the tree's root is in a session (or group) whose leader
	// is outside it, a shell's job; it is restored into the restoring
	// CRIU's session and group.
	ShellJob bool `json:"shell_job,omitempty"`
	// Caller is who asked for the migration on the source (the control
	// socket's peer): a destination restores, as root, files by the
	// paths the images name, and gives a caller other than root no
	// access it would not have here. Nil from a source that predates it.
	Caller *Caller `json:"caller,omitempty"`
}

// Caller is a user's identity: uid, primary gid, supplementary groups.
type Caller struct {
	UID    uint32   `json:"uid"`
	GID    uint32   `json:"gid"`
	Groups []uint32 `json:"groups,omitempty"`
}

// MaxCallerGroups bounds Caller.Groups (the kernel allows 65536; a
// Prepare must stay under its size limit with its other lists).
const MaxCallerGroups = 4096

// MaxUnixPeers bounds the UnixPeers of a Prepare.
const MaxUnixPeers = 64

// FileCheck is a file a tree uses, as the source has it: its mode, its
// size (CheckSize: a restore checks it, as for any file but one open
// only for appending) and, for a program or library it runs, its ELF
// build-id (hex).
type FileCheck struct {
	Path      string `json:"path"`
	Mode      uint32 `json:"mode"`
	Size      int64  `json:"size"`
	CheckSize bool   `json:"check_size,omitempty"`
	BuildID   string `json:"build_id,omitempty"`
}

// MaxFileChecks bounds the files a Prepare lists, and MaxFileCheckBytes
// their paths together.
const (
	MaxFileChecks     = 8192
	MaxFileCheckBytes = 384 << 10
)

// MaxTaskIDs bounds the tasks of a tree a Prepare lists.
const MaxTaskIDs = 1 << 15

// runName is what phaulctl run --name allows: it names a unit
// (phaul-run-NAME.scope) and a journal identifier.
var runName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// ValidDetachFile reports whether path may be where a detached terminal's
// output goes (--detach-terminal FILE): absolute, clean, at most 4096
// bytes, no NUL.
func ValidDetachFile(path string) bool {
	return len(path) > 1 && len(path) <= 4096 && path[0] == '/' && filepath.Clean(path) == path && !strings.ContainsRune(path, 0)
}

// ValidRunName reports whether name may name a process phaulctl run
// starts.
func ValidRunName(name string) bool { return runName.MatchString(name) }

var ttyKey = regexp.MustCompile(`^tty\[[0-9a-f]{1,16}:[0-9a-f]{1,16}\]$`)

// Network is a tree's own network namespace, as the source found it.
type Network struct {
	// Veths lead from the namespace to the source host: each is
	// recreated on the destination, its host end on the bridge of the
	// same name (or the one phauld's --bridge-map gives).
	Veths []Veth `json:"veths,omitempty"`
	// Macvlans sit on interfaces of the source host: each is recreated
	// on the destination's interface of the same name, with its MAC
	// address.
	Macvlans []Macvlan `json:"macvlans,omitempty"`
	// Interfaces (but loopback) and Addresses (ADDR/PREFIX), for what
	// the result says.
	Interfaces []string `json:"interfaces,omitempty"`
	Addresses  []string `json:"addresses,omitempty"`
	// Connections is the number of TCP connections the tree holds, which
	// move with it; InFlight those not yet accepted, which do not.
	Connections int `json:"tcp_connections"`
	InFlight    int `json:"tcp_in_flight"`
	// Links and Routes are the namespace's own set-up, for a destination
	// that makes the namespace itself: a runc container's (runc has
	// CRIU dump a container's network namespace empty, as one it does
	// not manage). Set only for containers.
	Links  []NetLink  `json:"links,omitempty"`
	Routes []NetRoute `json:"routes,omitempty"`
}

// NetLink is an interface of a namespace: its name, MAC address, MTU and
// addresses (ADDR/PREFIX; link-local ones left to the kernel).
type NetLink struct {
	Name      string   `json:"name"`
	MAC       string   `json:"mac,omitempty"`
	MTU       int      `json:"mtu,omitempty"`
	Addresses []string `json:"addresses,omitempty"`
}

// NetRoute is a route of a namespace's main table that its addresses do
// not make by themselves: to Dst (ADDR/PREFIX; "" is the default route),
// through Gateway (if any), out of Dev.
type NetRoute struct {
	Dst     string `json:"dst,omitempty"`
	Gateway string `json:"gateway,omitempty"`
	Dev     string `json:"dev"`
	// IPv6: a default route of either family is Dst "".
	IPv6 bool `json:"ipv6,omitempty"`
	// Src is the preferred source address; Metric the route's priority;
	// Scope its scope (netlink's: 0 universe, 253 link); Onlink: the
	// gateway is on the link whatever the addresses say.
	Src    string `json:"src,omitempty"`
	Metric int    `json:"metric,omitempty"`
	Scope  int    `json:"scope,omitempty"`
	Onlink bool   `json:"onlink,omitempty"`
}

// Veth is a veth pair from a tree's namespace to its host.
type Veth struct {
	// Inner is its name in the namespace, Outer the host end's.
	Inner string `json:"inner"`
	Outer string `json:"outer"`
	// Bridge is the host bridge the host end is on.
	Bridge string `json:"bridge"`
}

// Container is a runc container as the source describes it.
type Container struct {
	// ID is its id, which it keeps on the destination.
	ID string `json:"id"`
	// Config is its bundle's config.json; Rootfs the absolute path of
	// its root filesystem on the source.
	Config []byte `json:"config"`
	Rootfs string `json:"rootfs"`
	// Marker is a file the source made next to the rootfs for this
	// migration, holding Token: a destination that sees it, with the
	// token, at the same path shares the storage, and nothing need be
	// copied. Both are empty when the source could not write it
	// (read-only storage).
	Marker string `json:"marker"`
	Token  string `json:"token"`
	// RuncVersion is the source's runc.
	RuncVersion string `json:"runc_version,omitempty"`
}

// MaxContainerConfig bounds a container's config.json.
const MaxContainerConfig = 48 << 10

func (c *Container) validate() error {
	if !validContainerID(c.ID) {
		return fmt.Errorf("container id %q", c.ID)
	}
	if len(c.Config) == 0 || len(c.Config) > MaxContainerConfig {
		return fmt.Errorf("container config of %d bytes", len(c.Config))
	}
	paths := []string{c.Rootfs}
	if c.Marker != "" || c.Token != "" {
		paths = append(paths, c.Marker)
	}
	for _, p := range paths {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || len(p) > 4096 {
			return fmt.Errorf("container path %q", p)
		}
	}
	if (c.Marker != "" && len(c.Token) != 32) || len(c.RuncVersion) > 64 {
		return fmt.Errorf("container token or runc version")
	}
	return nil
}

var containerID = regexp.MustCompile(`^[A-Za-z0-9_+.-]{1,128}$`)

func validContainerID(id string) bool { return containerID.MatchString(id) && id != "." && id != ".." }

// Macvlan is a macvlan of a tree's namespace on a host interface.
type Macvlan struct {
	// Inner is its name in the namespace, Lower the host interface.
	Inner string `json:"inner"`
	Lower string `json:"lower"`
}

// ValidIfName reports whether name can be a network interface's name
// (1 to 15 bytes, as Linux allows) of the characters phaul accepts, which
// cannot change the meaning of the CRIU option it goes into.
func ValidIfName(name string) bool {
	return ifName.MatchString(name) && name != "." && name != ".."
}

var ifName = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)

// MaxInterfaces bounds a Network's lists.
const MaxInterfaces = 64

// Ready says the destination passed its checks and its page server is
// listening on the mem connection.
type Ready struct {
	CRIUVersion int `json:"criu_version"`
	// CPUCheck is "ok", or "skipped" when CRIU cannot compare CPUs here.
	CPUCheck string `json:"cpu_check"`
	// Mode is the migration's mode, as the destination chose it ("" is
	// copy).
	Mode string `json:"mode,omitempty"`
	// Veths are the tree's veths as the destination will make them: the
	// host end's name and bridge there.
	Veths []Veth `json:"veths,omitempty"`
	// Sync: the destination does not share the container's storage and
	// asks for its root filesystem (SyncOpen).
	Sync bool `json:"sync,omitempty"`
	// Compress is the compression the destination takes (Prepare's
	// Compress, echoed), "" if none.
	Compress string `json:"compress,omitempty"`
	// PrecopyCap is the most the destination holds of pages sent ahead
	// (mode precopy; 0: no cap of its own).
	PrecopyCap int64 `json:"precopy_cap,omitempty"`
	// PrecopyCompress says the destination decodes PrecopyPagesZ (with
	// Compress agreed).
	PrecopyCompress bool `json:"precopy_compress,omitempty"`
}

// SyncOpen starts a pass of rsync over a container's root filesystem
// (source to destination), the destination having asked for it (Ready's
// Sync): Args are the arguments the source's rsync gives its server
// ("rsync --server ... . DEST"); the destination checks them and runs its
// own server into the bundle it made, whatever DEST says. SyncData carries
// rsync's bytes both ways; SyncEOF ends one direction; the destination's
// SyncDone says how its server ended. Pass 1 runs while the container
// runs, pass 2 while it is frozen.
type SyncOpen struct {
	Pass int      `json:"pass"`
	Args []string `json:"args"`
}

// SyncData is rsync's bytes.
type SyncData struct{ Data []byte }

// SyncEOF ends the sender's direction of the rsync stream.
type SyncEOF struct{}

// SyncDone is how the destination's rsync server ended.
type SyncDone struct {
	Pass  int    `json:"pass"`
	Error string `json:"error,omitempty"`
	// Code is rsync's exit status (0 with no Error).
	Code int `json:"code,omitempty"`
}

var rsyncOption = regexp.MustCompile(`^-[A-Za-z.]+$`)

// RsyncServerArgs checks what the source's rsync would run as its server
// and returns the server's options (without "rsync --server", ".", and
// the path): only a receiving server (no --sender), with option letters
// and the few long options phaul's client gives.
func RsyncServerArgs(args []string) ([]string, error) {
	if len(args) < 5 || args[0] != "rsync" || args[1] != "--server" || args[len(args)-2] != "." {
		return nil, fmt.Errorf("not an rsync server command: %q", args)
	}
	opts := args[2 : len(args)-2]
	for _, o := range opts {
		switch {
		case o == "--delete", o == "--numeric-ids", o == "--stats":
		case rsyncOption.MatchString(o):
		default:
			return nil, fmt.Errorf("rsync server option %q not allowed", o)
		}
	}
	return opts, nil
}

func (m *SyncOpen) validate() error {
	if m.Pass != 1 && m.Pass != 2 {
		return fmt.Errorf("sync pass %d", m.Pass)
	}
	if len(m.Args) > 32 {
		return fmt.Errorf("%d rsync arguments", len(m.Args))
	}
	_, err := RsyncServerArgs(m.Args)
	return err
}

// Resume asks the destination to let the restored tree of a lazy
// migration run before its memory has all arrived. It is not the commit:
// until Commit, a failure discards that copy and resumes the source's.
type Resume struct{}

// PagesIn says every page of a lazy migration is in at the destination
// (its lazy-pages daemon finished): the source may ask the commit.
type PagesIn struct {
	// Pages is how many pages came lazily; FetchedAhead how many of them
	// the destination's relay fetched ahead of lazy-pages.
	Pages        uint64 `json:"pages"`
	FetchedAhead uint64 `json:"fetched_ahead,omitempty"`
}

// Resumed says the destination resumed the tree of a lazy migration
// under PID; its memory is still arriving, and Committed follows once the
// last page is in.
type Resumed struct {
	PID int `json:"pid"`
}

// FileBegin starts an image file; FileData chunks and a FileEnd follow.
type FileBegin struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// FileData is a chunk of the current image file.
type FileData struct{ Data []byte }

// FileEnd ends the current image file with the SHA-256 of its contents.
type FileEnd struct {
	SHA256 string `json:"sha256"`
}

// Restore asks the destination to restore, once it holds Files image files
// and the page server has finished.
type Restore struct {
	Files int `json:"files"`
}

// Restored says the destination restored the tree, stopped, under PID.
type Restored struct {
	PID int `json:"pid"`
	// RestoreMS is how long CRIU's restore took, as the destination saw it.
	RestoreMS int64 `json:"restore_ms"`
	// Stats are CRIU's restore statistics, when it wrote them.
	Stats *api.RestoreStats `json:"stats,omitempty"`
	// NewPidNS: the tree's pids were taken on the destination, which
	// restored it into a new pid namespace where it keeps them; PID is
	// its root's pid on the destination host.
	NewPidNS bool `json:"new_pid_ns,omitempty"`
}

// Commit asks the destination to commit: resume its copy and make the
// migration final.
type Commit struct{}

// Committed says the destination recorded the commit and resumed PID.
// NotRunning, if set, is why PID was not seen running afterwards: the
// migration is committed all the same.
type Committed struct {
	PID        int    `json:"pid"`
	NotRunning string `json:"not_running,omitempty"`
}

// Done ends a migration after Committed; both sides may forget it.
type Done struct{}

// Fail aborts a migration. Code is one of the control API's error codes.
type Fail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Ping asks the peer to show it is alive; it answers with a Pong of the
// same Seq.
type Ping struct {
	Seq uint64 `json:"seq"`
}

// Pong answers a Ping.
type Pong struct {
	Seq uint64 `json:"seq"`
}

// PageData is a chunk of CRIU's page-server stream, relayed as is.
type PageData struct{ Data []byte }

// PageEOF says the sender's side of the page-server stream has ended.
type PageEOF struct{}

// PageDataZ is a chunk of the page stream, compressed (one zstd frame that
// decodes to at most DataChunk bytes).
type PageDataZ struct{ Data []byte }

// FileDataZ is a chunk of an image file, compressed as PageDataZ.
type FileDataZ struct{ Data []byte }

// PrecopyPages are pages of the running tree sent ahead (mode precopy):
// the key of the first (CRIU's destination id and the address, 8 bytes
// each, little-endian), then whole pages. The destination keeps them
// until the freeze (pkg/precopy.Store).
type PrecopyPages struct{ Data []byte }

// PrecopyPagesZ is PrecopyPages with its pages compressed: the key as it
// is, then one zstd frame that decodes to the pages (at most DataChunk
// bytes). Only to a destination whose Ready says PrecopyCompress.
type PrecopyPagesZ struct{ Data []byte }

// PageRefs stands, in the page stream at the freeze, for pages the
// destination holds as they were sent ahead: the first's key as in
// PrecopyPages, then a 16-byte hash of each page's content.
type PageRefs struct{ Data []byte }

// Probe is filler the source sends on the mem connection before Prepare
// when it asks for --mode auto and the destination said in its
// HelloReply that it answers probes: ProbeEnd follows the last, and the
// destination answers with ProbeAck on rpc. The time from the first to
// the answer is the link's rate, for the choice of mode.
type Probe struct{ Data []byte }

// ProbeEnd ends a link probe.
type ProbeEnd struct{}

// ProbeAck answers ProbeEnd: how many probe bytes arrived.
type ProbeAck struct {
	Bytes int64 `json:"bytes"`
}

// Resolve asks the destination how the session of the query connection's
// handshake ended.
type Resolve struct{}

// Outcomes a destination reports.
const (
	// OutcomeCommitted: the destination committed; its copy runs.
	OutcomeCommitted = "committed"
	// OutcomeAborted: the destination did not commit and never will; it
	// has no copy.
	OutcomeAborted = "aborted"
	// OutcomeUnknown: the destination has no record of the session (its
	// state was lost): nobody can tell.
	OutcomeUnknown = "unknown"
)

// Outcome answers Resolve. After acting on a committed or aborted outcome
// the source sends Done, and the destination may forget the session.
type Outcome struct {
	Outcome string `json:"outcome"`
	// PID is the process's pid on the destination when committed.
	PID int `json:"pid,omitempty"`
}

// Type methods tie each struct to its number.

func (*Hello) Type() Type         { return TypeHello }
func (*HelloReply) Type() Type    { return TypeHelloReply }
func (*Prepare) Type() Type       { return TypePrepare }
func (*Ready) Type() Type         { return TypeReady }
func (*FileBegin) Type() Type     { return TypeFileBegin }
func (*FileData) Type() Type      { return TypeFileData }
func (*FileEnd) Type() Type       { return TypeFileEnd }
func (*Restore) Type() Type       { return TypeRestore }
func (*Restored) Type() Type      { return TypeRestored }
func (*Commit) Type() Type        { return TypeCommit }
func (*Committed) Type() Type     { return TypeCommitted }
func (*Done) Type() Type          { return TypeDone }
func (*Fail) Type() Type          { return TypeFail }
func (*Ping) Type() Type          { return TypePing }
func (*Pong) Type() Type          { return TypePong }
func (*Resumed) Type() Type       { return TypeResumed }
func (*Resume) Type() Type        { return TypeResume }
func (*SyncOpen) Type() Type      { return TypeSyncOpen }
func (*SyncData) Type() Type      { return TypeSyncData }
func (*SyncEOF) Type() Type       { return TypeSyncEOF }
func (*SyncDone) Type() Type      { return TypeSyncDone }
func (*PagesIn) Type() Type       { return TypePagesIn }
func (*PageData) Type() Type      { return TypePageData }
func (*PageEOF) Type() Type       { return TypePageEOF }
func (*PageDataZ) Type() Type     { return TypePageDataZ }
func (*FileDataZ) Type() Type     { return TypeFileDataZ }
func (*PrecopyPages) Type() Type  { return TypePrecopyPages }
func (*PrecopyPagesZ) Type() Type { return TypePrecopyPagesZ }
func (*PageRefs) Type() Type      { return TypePageRefs }
func (*Probe) Type() Type         { return TypeProbe }
func (*ProbeEnd) Type() Type      { return TypeProbeEnd }
func (*ProbeAck) Type() Type      { return TypeProbeAck }
func (*Resolve) Type() Type       { return TypeResolve }
func (*Outcome) Type() Type       { return TypeOutcome }

func (m *FileData) bytes() []byte          { return m.Data }
func (m *FileData) setBytes(b []byte)      { m.Data = b }
func (m *PageData) bytes() []byte          { return m.Data }
func (m *PageData) setBytes(b []byte)      { m.Data = b }
func (m *PageDataZ) bytes() []byte         { return m.Data }
func (m *PageDataZ) setBytes(b []byte)     { m.Data = b }
func (m *FileDataZ) bytes() []byte         { return m.Data }
func (m *FileDataZ) setBytes(b []byte)     { m.Data = b }
func (m *PrecopyPages) bytes() []byte      { return m.Data }
func (m *PrecopyPages) setBytes(b []byte)  { m.Data = b }
func (m *PrecopyPagesZ) bytes() []byte     { return m.Data }
func (m *PrecopyPagesZ) setBytes(b []byte) { m.Data = b }
func (m *PageRefs) bytes() []byte          { return m.Data }
func (m *PageRefs) setBytes(b []byte)      { m.Data = b }
func (m *Probe) bytes() []byte             { return m.Data }
func (m *Probe) setBytes(b []byte)         { m.Data = b }
func (m *ProbeEnd) bytes() []byte          { return nil }
func (m *ProbeEnd) setBytes([]byte)        {}
func (m *SyncData) bytes() []byte          { return m.Data }
func (m *SyncData) setBytes(b []byte)      { m.Data = b }
func (m *SyncEOF) bytes() []byte           { return nil }
func (m *SyncEOF) setBytes([]byte)         {}
func (m *PageEOF) bytes() []byte           { return nil }
func (m *PageEOF) setBytes([]byte)         {}

var fileName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)

// ValidFileName reports whether name may be used for an image file: a plain
// name of letters, digits, '_', '-' and '.', not starting with '.', at most
// 128 bytes. No separators, no "..", nothing hidden.
func ValidFileName(name string) bool { return fileName.MatchString(name) }

func (m *Hello) validate() error {
	if m.Proto < 1 {
		return fmt.Errorf("protocol version %d", m.Proto)
	}
	if m.Role != RoleRPC && m.Role != RoleMem && m.Role != RoleQuery {
		return fmt.Errorf("unknown role %q", m.Role)
	}
	m.Daemon = api.Clean(m.Daemon)
	return nil
}

// MaxJournalStreams bounds Prepare.JournalStreams: a process has two
// (stdout and stderr); a tree a few per process.
const MaxJournalStreams = 64

// modeNames are the modes the protocol knows.
var modeNames = map[string]bool{"": true, "copy": true, "lazy": true, "precopy": true, "auto": true}

func (m *Prepare) validate() error {
	if m.PID <= 0 {
		return fmt.Errorf("pid %d", m.PID)
	}
	if m.SourcePort < 0 || m.SourcePort > 65535 {
		return fmt.Errorf("source port %d", m.SourcePort)
	}
	if m.LinkRate < 0 || m.MemBytes < 0 {
		return fmt.Errorf("link rate %d, memory %d", m.LinkRate, m.MemBytes)
	}
	if len(m.Terminals) > 8 || (len(m.Terminals) > 0) != (m.Detach == "journal" || m.Detach == "null" || ValidDetachFile(m.Detach)) || (m.Detach != "" && len(m.Terminals) == 0) {
		return fmt.Errorf("%d terminals, detached to %q", len(m.Terminals), m.Detach)
	}
	for _, k := range m.Terminals {
		if !ttyKey.MatchString(k) {
			return fmt.Errorf("terminal %q", k)
		}
	}
	if m.Container != nil {
		if err := m.Container.validate(); err != nil {
			return err
		}
	}
	if m.RunName != "" && !runName.MatchString(m.RunName) {
		return fmt.Errorf("run name %q", m.RunName)
	}
	if len(m.Files) > MaxFileChecks {
		return fmt.Errorf("%d files", len(m.Files))
	}
	paths := 0
	for _, f := range m.Files {
		paths += len(f.Path)
	}
	if paths > MaxFileCheckBytes {
		return fmt.Errorf("files with %d bytes of paths", paths)
	}
	for _, f := range m.Files {
		if len(f.Path) == 0 || len(f.Path) > 4096 || f.Path[0] != '/' || len(f.BuildID) > 128 || f.Size < 0 {
			return fmt.Errorf("file %.64q", f.Path)
		}
	}
	if len(m.UnixPeers) > MaxUnixPeers {
		return fmt.Errorf("%d unix peers", len(m.UnixPeers))
	}
	for _, p := range m.UnixPeers {
		if !ValidDetachFile(p) || len(p) > 108 {
			return fmt.Errorf("unix peer %.64q", p)
		}
	}
	if len(m.TaskIDs) > MaxTaskIDs {
		return fmt.Errorf("%d task ids", len(m.TaskIDs))
	}
	for _, id := range m.TaskIDs {
		if id <= 0 || id > 1<<22 { // the kernel's PID_MAX_LIMIT
			return fmt.Errorf("task id %d", id)
		}
	}
	if !modeNames[m.Mode] {
		return fmt.Errorf("mode %q", m.Mode)
	}
	if len(m.SourceModes) > 8 {
		return fmt.Errorf("%d source modes", len(m.SourceModes))
	}
	for _, x := range m.SourceModes {
		if !modeNames[x] || x == "" || x == "auto" {
			return fmt.Errorf("source mode %q", x)
		}
	}
	// Name becomes a journal stream's identifier line: a command name
	// (the kernel keeps 15 bytes), of printable characters.
	if len(m.Name) > 64 {
		return fmt.Errorf("process name of %d bytes", len(m.Name))
	}
	for _, r := range m.Name {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("process name %q has control characters", m.Name)
		}
	}
	if len(m.JournalStreams) > MaxJournalStreams {
		return fmt.Errorf("%d journal streams (at most %d)", len(m.JournalStreams), MaxJournalStreams)
	}
	for _, ino := range m.JournalStreams {
		if ino == 0 {
			return fmt.Errorf("journal stream inode 0")
		}
	}
	if c := m.Caller; c != nil {
		// (uid_t)-1 is no one: setuid(-1) means "unchanged".
		if c.UID == 1<<32-1 || c.GID == 1<<32-1 || len(c.Groups) > MaxCallerGroups {
			return fmt.Errorf("caller uid %d gid %d with %d groups", c.UID, c.GID, len(c.Groups))
		}
		for _, g := range c.Groups {
			if g == 1<<32-1 {
				return fmt.Errorf("caller group %d", g)
			}
		}
	}
	if m.Network != nil {
		return m.Network.validate()
	}
	return nil
}

func (n *Network) validate() error {
	if len(n.Veths) > MaxInterfaces || len(n.Macvlans) > MaxInterfaces || len(n.Interfaces) > MaxInterfaces || len(n.Addresses) > 4*MaxInterfaces {
		return fmt.Errorf("network: %d veths, %d macvlans, %d interfaces, %d addresses", len(n.Veths), len(n.Macvlans), len(n.Interfaces), len(n.Addresses))
	}
	for _, v := range n.Macvlans {
		for _, name := range []string{v.Inner, v.Lower} {
			if !ValidIfName(name) {
				return fmt.Errorf("network: interface name %q not allowed", name)
			}
		}
	}
	for _, v := range n.Veths {
		for _, name := range []string{v.Inner, v.Outer, v.Bridge} {
			if !ValidIfName(name) {
				return fmt.Errorf("network: interface name %q not allowed", name)
			}
		}
	}
	for _, name := range n.Interfaces {
		if !ValidIfName(name) {
			return fmt.Errorf("network: interface name %q not allowed", name)
		}
	}
	for _, a := range n.Addresses {
		if _, _, err := net.ParseCIDR(a); err != nil {
			return fmt.Errorf("network: address %q", a)
		}
	}
	if n.Connections < 0 || n.InFlight < 0 {
		return fmt.Errorf("network: %d connections, %d in flight", n.Connections, n.InFlight)
	}
	if len(n.Links) > MaxInterfaces || len(n.Routes) > 16*MaxInterfaces {
		return fmt.Errorf("network: %d links, %d routes", len(n.Links), len(n.Routes))
	}
	for _, l := range n.Links {
		if !ValidIfName(l.Name) || l.MTU < 0 || l.MTU > 65535 || len(l.Addresses) > 4*MaxInterfaces {
			return fmt.Errorf("network: link %q (mtu %d, %d addresses)", l.Name, l.MTU, len(l.Addresses))
		}
		if _, err := net.ParseMAC(l.MAC); l.MAC != "" && err != nil {
			return fmt.Errorf("network: link %s's MAC address %q", l.Name, l.MAC)
		}
		for _, a := range l.Addresses {
			if _, _, err := net.ParseCIDR(a); err != nil {
				return fmt.Errorf("network: address %q", a)
			}
		}
	}
	for _, r := range n.Routes {
		if !ValidIfName(r.Dev) {
			return fmt.Errorf("network: route's interface name %q not allowed", r.Dev)
		}
		if _, _, err := net.ParseCIDR(r.Dst); r.Dst != "" && err != nil {
			return fmt.Errorf("network: route to %q", r.Dst)
		}
		if r.Gateway != "" && net.ParseIP(r.Gateway) == nil {
			return fmt.Errorf("network: route's gateway %q", r.Gateway)
		}
		if r.Src != "" && net.ParseIP(r.Src) == nil || r.Metric < 0 || r.Scope < 0 || r.Scope > 255 {
			return fmt.Errorf("network: route source %q, metric %d, scope %d", r.Src, r.Metric, r.Scope)
		}
	}
	return nil
}

func (m *ProbeAck) validate() error {
	if m.Bytes < 0 {
		return fmt.Errorf("bytes %d", m.Bytes)
	}
	return nil
}

func (m *Ready) validate() error {
	if !modeNames[m.Mode] || m.Mode == "auto" {
		return fmt.Errorf("mode %q", m.Mode)
	}
	if m.PrecopyCap < 0 {
		return fmt.Errorf("precopy_cap %d", m.PrecopyCap)
	}
	return (&Network{Veths: m.Veths}).validate()
}

func (m *FileBegin) validate() error {
	if !ValidFileName(m.Name) {
		return fmt.Errorf("file name %q not allowed", m.Name)
	}
	if m.Size < 0 {
		return fmt.Errorf("file %s: size %d", m.Name, m.Size)
	}
	return nil
}

func (m *FileEnd) validate() error {
	if b, err := hex.DecodeString(m.SHA256); err != nil || len(b) != 32 {
		return fmt.Errorf("sha256 %q", m.SHA256)
	}
	return nil
}

func (m *Restore) validate() error {
	if m.Files < 0 {
		return fmt.Errorf("files %d", m.Files)
	}
	return nil
}

// Text from the peer is data: the decoders below keep it, cleaned
// (api.Clean), so that no escape sequence reaches a log, a record or a
// terminal; codes must be of the known sets.

func (m *HelloReply) validate() error {
	if !refusedCodes[m.Code] {
		return fmt.Errorf("unknown refusal code %.32q", m.Code)
	}
	m.Error, m.Daemon = api.Clean(m.Error), api.Clean(m.Daemon)
	return nil
}

func (m *Fail) validate() error {
	if !api.Code(m.Code).Known() {
		return fmt.Errorf("unknown error code %.32q", m.Code)
	}
	m.Message = api.Clean(m.Message)
	return nil
}

func (m *SyncDone) validate() error {
	m.Error = api.Clean(m.Error)
	return nil
}

func (m *Restored) validate() error {
	if m.PID <= 0 {
		return fmt.Errorf("pid %d", m.PID)
	}
	return nil
}

func (m *Committed) validate() error {
	if m.PID <= 0 {
		return fmt.Errorf("pid %d", m.PID)
	}
	m.NotRunning = api.Clean(m.NotRunning)
	return nil
}

func (m *Outcome) validate() error {
	switch m.Outcome {
	case OutcomeCommitted, OutcomeAborted, OutcomeUnknown:
		return nil
	}
	return fmt.Errorf("unknown outcome %q", m.Outcome)
}
