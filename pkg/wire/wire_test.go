package wire

import (
	"github.com/phaul/phaul/pkg/api"

	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
)

func sampleMessages() []Message {
	id := SessionID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}
	return []Message{
		&Hello{Proto: 1, Role: RoleRPC, Session: id, Daemon: "phauld/test"},
		&HelloReply{OK: false, Error: "no"},
		&Prepare{PID: 42, Caller: &Caller{UID: 1000, GID: 100, Groups: []uint32{27}}, CRIUVersion: 40201, CPUInfo: []byte{1, 2, 3}, Name: "workload", JournalStreams: []uint64{1234, 1235}, Mode: "auto", SourceModes: []string{"copy", "lazy"}},
		&Ready{CRIUVersion: 40201, CPUCheck: "ok", Mode: "lazy"},
		&Ready{CRIUVersion: 40201, CPUCheck: "ok", Mode: "precopy", PrecopyCap: 8 << 30},
		&Resumed{PID: 7},
		&Resume{},
		&PagesIn{Pages: 262144},
		&FileBegin{Name: "core-1.img", Size: 10},
		&FileData{Data: []byte("0123456789")},
		&FileEnd{SHA256: strings.Repeat("ab", 32)},
		&Restore{Files: 3},
		&Restored{PID: 7, RestoreMS: 12, Stats: &api.RestoreStats{PagesRestored: 5}},
		&Commit{},
		&Committed{PID: 7},
		&Done{},
		&Fail{Code: "aborted", Message: "restore failed"},
		&Ping{Seq: 9},
		&Pong{Seq: 9},
		&PageData{Data: bytes.Repeat([]byte{0xaa}, 1000)},
		&PrecopyPages{Data: bytes.Repeat([]byte{0xbb}, 16+4096)},
		&PrecopyPagesZ{Data: bytes.Repeat([]byte{0xbd}, 16+100)},
		&PageRefs{Data: bytes.Repeat([]byte{0xcc}, 16+32)},
		&Probe{Data: make([]byte, 4096)},
		&ProbeEnd{},
		&ProbeAck{Bytes: 4 << 20},
		&PageEOF{},
		&Resolve{},
		&Outcome{Outcome: OutcomeCommitted, PID: 9},
	}
}

func channelOf(m Message) Channel {
	return specs[m.Type()].channels
}

func TestRoundTrip(t *testing.T) {
	for _, m := range sampleMessages() {
		b, err := Marshal(m)
		if err != nil {
			t.Fatalf("Marshal(%T): %v", m, err)
		}
		d := NewDecoder(channelOf(m), 16)
		// Byte by byte: a decoder must cope with any split.
		var got Message
		for i := range b {
			d.Feed(b[i : i+1])
			got, err = d.Next()
			if err != nil {
				t.Fatalf("%T: Next after %d bytes: %v", m, i+1, err)
			}
			if got != nil && i != len(b)-1 {
				t.Fatalf("%T: message after %d of %d bytes", m, i+1, len(b))
			}
		}
		if got == nil {
			t.Fatalf("%T: no message after all bytes", m)
		}
		if !reflect.DeepEqual(got, m) {
			t.Errorf("round trip %T: got %+v, want %+v", m, got, m)
		}
		again, err := ReadMessage(bytes.NewReader(b), channelOf(m))
		if err != nil || !reflect.DeepEqual(again, got) {
			t.Errorf("ReadMessage %T = %+v, %v; want %+v", m, again, err, got)
		}
	}
}

func TestDecoderManyFrames(t *testing.T) {
	var stream []byte
	var want []Message
	for i := 0; i < 50; i++ {
		m := &PageData{Data: bytes.Repeat([]byte{byte(i)}, DataChunk)}
		var err error
		if stream, err = Append(stream, m); err != nil {
			t.Fatal(err)
		}
		want = append(want, m)
	}
	d := NewDecoder(Mem, 64<<10)
	var got []Message
	for off := 0; off < len(stream); {
		sp := d.Space()
		if len(sp) == 0 {
			t.Fatal("Space returned an empty slice")
		}
		n := copy(sp, stream[off:min(len(stream), off+100_000)])
		d.Commit(n)
		off += n
		for {
			m, err := d.Next()
			if err != nil {
				t.Fatal(err)
			}
			if m == nil {
				break
			}
			// Copy: the payload aliases the decoder's buffer.
			p := m.(*PageData)
			got = append(got, &PageData{Data: append([]byte(nil), p.Data...)})
		}
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("decoded %d frames, want %d, or contents differ", len(got), len(want))
	}
	if d.Buffered() != 0 {
		t.Fatalf("Buffered = %d after all frames", d.Buffered())
	}
}

func TestHeaderErrors(t *testing.T) {
	good, _ := Marshal(&Ping{Seq: 1})
	cases := []struct {
		name  string
		frame []byte
		ch    Channel
		want  error
	}{
		{"magic", append([]byte("GET / HTTP/1.1\r\n"), good...), RPC, ErrMagic},
		{"version", func() []byte { b := bytes.Clone(good); b[2] = 9; return b }(), RPC, ErrVersion},
		{"type", func() []byte { b := bytes.Clone(good); b[3] = 0xee; return b }(), RPC, ErrType},
		{"channel", good, Mem, ErrChannel},
		{"handshake channel", good, Handshake, ErrChannel},
		{"oversize", AppendHeader(nil, TypePing, smallMax+1), RPC, ErrTooLarge},
		{"oversize page", AppendHeader(nil, TypePageData, MaxPayload+1), Mem, ErrTooLarge},
		{"huge length", []byte{'P', 'H', 1, byte(TypeFileData), 0xff, 0xff, 0xff, 0xff}, RPC, ErrTooLarge},
		{"eof with payload", AppendHeader(nil, TypePageEOF, 1), Mem, ErrTooLarge},
		{"bad json", append(AppendHeader(nil, TypePing, 3), "{x}"...), RPC, ErrPayload},
		{"bad hello role", mustFrame(t, TypeHello, `{"proto":1,"role":"admin"}`), Handshake, ErrPayload},
		{"file name with slash", mustFrame(t, TypeFileBegin, `{"name":"../etc/passwd","size":1}`), RPC, ErrPayload},
		{"hidden file name", mustFrame(t, TypeFileBegin, `{"name":".x","size":1}`), RPC, ErrPayload},
		{"negative size", mustFrame(t, TypeFileBegin, `{"name":"a.img","size":-1}`), RPC, ErrPayload},
		{"bad sha", mustFrame(t, TypeFileEnd, `{"sha256":"zz"}`), RPC, ErrPayload},
		{"bad session", mustFrame(t, TypeHello, `{"proto":1,"role":"rpc","session":"abc"}`), Handshake, ErrPayload},
	}
	for _, c := range cases {
		d := NewDecoder(c.ch, 64)
		d.Feed(c.frame)
		_, err := d.Next()
		if !errors.Is(err, c.want) {
			t.Errorf("%s: Next = %v, want %v", c.name, err, c.want)
		}
		if _, err := ReadMessage(bytes.NewReader(c.frame), c.ch); !errors.Is(err, c.want) {
			t.Errorf("%s: ReadMessage = %v, want %v", c.name, err, c.want)
		}
	}
}

func mustFrame(t *testing.T, typ Type, payload string) []byte {
	t.Helper()
	return append(AppendHeader(nil, typ, len(payload)), payload...)
}

func TestReadMessageTruncated(t *testing.T) {
	b, _ := Marshal(&Restore{Files: 2})
	for n := 1; n < len(b); n++ {
		_, err := ReadMessage(bytes.NewReader(b[:n]), RPC)
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("truncated to %d bytes: %v, want io.ErrUnexpectedEOF", n, err)
		}
	}
	if _, err := ReadMessage(bytes.NewReader(nil), RPC); err != io.EOF {
		t.Fatalf("empty stream: %v, want io.EOF", err)
	}
}

func TestAppendRejectsOversize(t *testing.T) {
	_, err := Marshal(&FileData{Data: make([]byte, MaxPayload+1)})
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Marshal oversize = %v, want ErrTooLarge", err)
	}
}

func TestValidFileName(t *testing.T) {
	for _, ok := range []string{"core-1.img", "pages-65537.img", "stats-dump", "a"} {
		if !ValidFileName(ok) {
			t.Errorf("ValidFileName(%q) = false", ok)
		}
	}
	for _, bad := range []string{"", ".", "..", "../x", "a/b", ".hidden", "a\x00b", strings.Repeat("a", 129), "sp ace"} {
		if ValidFileName(bad) {
			t.Errorf("ValidFileName(%q) = true", bad)
		}
	}
}

func TestSessionID(t *testing.T) {
	id := SessionID{0xde, 0xad}
	got, err := ParseSessionID(id.String())
	if err != nil || got != id {
		t.Fatalf("ParseSessionID(%s) = %v, %v", id, got, err)
	}
	for _, bad := range []string{"", "xyz", strings.Repeat("g", 32), strings.Repeat("a", 31)} {
		if _, err := ParseSessionID(bad); err == nil {
			t.Errorf("ParseSessionID(%q) succeeded", bad)
		}
	}
}

func TestPrepareValidate(t *testing.T) {
	for _, bad := range []*Prepare{
		{PID: 0},
		{PID: 1, Name: "a\nb"},
		{PID: 1, Name: strings.Repeat("x", 65)},
		{PID: 1, JournalStreams: []uint64{0}},
		{PID: 1, JournalStreams: make([]uint64, MaxJournalStreams+1)},
		{PID: 1, Mode: "turbo"},
		{PID: 1, SourceModes: []string{"auto"}},
		{PID: 1, Network: &Network{Veths: []Veth{{Inner: "eth0", Outer: "v0]:x@y", Bridge: "br0"}}}},
		{PID: 1, Network: &Network{Veths: []Veth{{Inner: "eth0", Outer: "v0", Bridge: ""}}}},
		{PID: 1, Network: &Network{Veths: []Veth{{Inner: "a-very-long-interface", Outer: "v0", Bridge: "br0"}}}},
		{PID: 1, Network: &Network{Macvlans: []Macvlan{{Inner: "mv0", Lower: "eth0]:x"}}}},
		{PID: 1, Network: &Network{Macvlans: []Macvlan{{Inner: "", Lower: "eth0"}}}},
		{PID: 1, Network: &Network{Addresses: []string{"10.0.0.1"}}},
		{PID: 1, Network: &Network{Interfaces: []string{".."}}},
		{PID: 1, SourcePort: 70000},
		{PID: 1, Terminals: []string{"tty[8800:1a]"}},
		{PID: 1, Terminals: []string{"tty[8800:1a]"}, Detach: "file"},
		{PID: 1, Terminals: []string{"tty[88:1a]:x"}, Detach: "null"},
		{PID: 1, Detach: "null"},
		{PID: 1, Network: &Network{Links: []NetLink{{Name: "eth0", MAC: "zz"}}}},
		{PID: 1, Network: &Network{Links: []NetLink{{Name: "eth0", Addresses: []string{"10.0.0.1"}}}}},
		{PID: 1, Network: &Network{Links: []NetLink{{Name: "eth0", MTU: 1 << 20}}}},
		{PID: 1, Network: &Network{Routes: []NetRoute{{Dev: "eth0", Dst: "default"}}}},
		{PID: 1, Network: &Network{Routes: []NetRoute{{Dev: "eth0", Gateway: "10.0.0.300"}}}},
		{PID: 1, Network: &Network{Routes: []NetRoute{{Dev: "a b"}}}},
		{PID: 1, Container: &Container{ID: "c", Config: []byte("{}"), Rootfs: "/r", Marker: "/m", Token: ""}},
		{PID: 1, Container: &Container{ID: "c", Config: []byte("{}"), Rootfs: "r"}},
		{PID: 1, Caller: &Caller{UID: 1<<32 - 1, GID: 1000}},
		{PID: 1, Caller: &Caller{UID: 1000, GID: 1<<32 - 1}},
		{PID: 1, Caller: &Caller{UID: 1000, GID: 1000, Groups: []uint32{27, 1<<32 - 1}}},
		{PID: 1, Caller: &Caller{UID: 1000, GID: 1000, Groups: make([]uint32, MaxCallerGroups+1)}},
	} {
		b, err := Marshal(bad)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ReadMessage(bytes.NewReader(b), channelOf(bad)); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
	ok := &Prepare{PID: 1, Name: strings.Repeat("x", 64), JournalStreams: []uint64{1, 2}, Caller: &Caller{UID: 1000, GID: 1000, Groups: []uint32{27, 999}},
		Network: &Network{Veths: []Veth{{Inner: "eth0", Outer: "veth-svc.1", Bridge: "br0"}}, Macvlans: []Macvlan{{Inner: "mv0", Lower: "eno1"}}, Interfaces: []string{"eth0", "mv0"},
			Addresses: []string{"10.0.0.1/24", "fd00::1/64"}, Connections: 3}}
	if err := ok.validate(); err != nil {
		t.Errorf("%+v: %v", ok, err)
	}
	// A container's namespace set-up; a container with no marker (the
	// source could not write one).
	ok = &Prepare{PID: 1, Network: &Network{Links: []NetLink{{Name: "eth0", MAC: "02:00:00:00:00:01", MTU: 1500, Addresses: []string{"10.0.0.1/24", "fd00::1/64"}}},
		Routes: []NetRoute{{Dev: "eth0"}, {Dev: "eth0", Dst: "10.1.0.0/16", Gateway: "10.0.0.254"}, {Dev: "eth0", Gateway: "fd00::fe", IPv6: true}}},
		Container: &Container{ID: "c", Config: []byte("{}"), Rootfs: "/r"}, Terminals: []string{"tty[8800:1a]"}, Detach: "journal"}
	if err := ok.validate(); err != nil {
		t.Errorf("%+v: %v", ok, err)
	}
}

// The destination runs only a receiving rsync server, with options it
// knows: never a sender (which would send its files to the source).
func TestRsyncServerArgs(t *testing.T) {
	opts, err := RsyncServerArgs([]string{"rsync", "--server", "-lHogDtpre.iLsfxCIvu", "--delete", "--stats", "--numeric-ids", ".", "/rootfs/"})
	if err != nil || len(opts) != 4 {
		t.Fatalf("rsync's own server command: %v, %v", opts, err)
	}
	for _, bad := range [][]string{
		{"rsync", "--server", "--sender", "-logDtpre.iLsfxCIvu", ".", "/etc/"},
		{"rsync", "--server", "-logDtpre.iLsfxCIvu", "--rsync-path=sh", ".", "/x/"},
		{"rsync", "--server", "-e", "sh", ".", "/x/"},
		{"sh", "--server", "-a", ".", "/x/"},
		{"rsync", "--server", "-a", "/x/"},
	} {
		if _, err := RsyncServerArgs(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestPeerTextIsCleaned: text in a peer's messages is decoded cleaned
// (no escape sequence reaches a log or a record), and an error code
// outside the known sets is refused.
func TestPeerTextIsCleaned(t *testing.T) {
	const evil = "restore failed\x1b[2J\x1b]0;owned\x07"
	decode := func(m Message, ch Channel) (Message, error) {
		b, err := Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return ReadMessage(bytes.NewReader(b), ch)
	}
	for _, m := range []Message{
		&Fail{Code: "aborted", Message: evil},
		&HelloReply{Code: RefusedBusy, Error: evil, Daemon: evil},
		&Committed{PID: 7, NotRunning: evil},
		&SyncDone{Pass: 1, Error: evil},
	} {
		ch := RPC
		if m.Type() == TypeHelloReply {
			ch = Handshake
		}
		got, err := decode(m, ch)
		if err != nil {
			t.Fatalf("%s: %v", m.Type(), err)
		}
		if s := fmtMessage(got); strings.ContainsAny(s, "\x1b\x07") || !strings.Contains(s, `\x1b[2J`) {
			t.Errorf("%s decoded as %s", m.Type(), s)
		}
	}
	for _, m := range []Message{&Fail{Code: "evil\x1b[2J", Message: "x"}, &Fail{Message: "no code"}, &HelloReply{Code: "whatever"}} {
		ch := RPC
		if m.Type() == TypeHelloReply {
			ch = Handshake
		}
		if _, err := decode(m, ch); !errors.Is(err, ErrPayload) {
			t.Errorf("%#v decoded (%v): an unknown code must be refused", m, err)
		}
	}
}

func fmtMessage(m Message) string { return fmt.Sprintf("%+v", m) }

// TestPeerTextCutIsStable: a long message cut where an escape falls
// decodes, encodes and decodes again to the same message (FuzzDecoder
// found one that did not).
func TestPeerTextCutIsStable(t *testing.T) {
	m := &Fail{Code: "aborted", Message: strings.Repeat("a", api.MaxPeerText-3) + "\x1b\x1b\x1b"}
	b, _ := Marshal(m)
	got, err := ReadMessage(bytes.NewReader(b), RPC)
	if err != nil {
		t.Fatal(err)
	}
	checkReencode(t, got, RPC)
}
