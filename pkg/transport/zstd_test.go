//go:build linux

package transport

import (
	"bytes"
	"crypto/rand"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/klauspost/compress/zstd"

	"github.com/phaul/phaul/pkg/loop"
	"github.com/phaul/phaul/pkg/precopy"
	"github.com/phaul/phaul/pkg/wire"
)

// pageLike is memory as a process holds it: half zero pages, half text.
func pageLike(size int) []byte {
	b := make([]byte, size)
	line := []byte("the quick brown fox jumps over the lazy dog 0123456789\n")
	for off := 0; off < size; off += 8192 {
		for i := off + 4096; i < min(off+8192, size); i++ {
			b[i] = line[(i*7+off/8192)%len(line)]
		}
	}
	return b
}

func TestCodecRoundTrip(t *testing.T) {
	c, err := NewCodec()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	src := pageLike(wire.DataChunk)
	z := c.Compress([]byte("hdr"), src)
	if z == nil || string(z[:3]) != "hdr" || len(z) > len(src)/4 {
		t.Fatalf("page-like chunk compressed to %d bytes of %d", len(z), len(src))
	}
	got, err := c.Decompress(z[3:])
	if err != nil || !bytes.Equal(got, src) {
		t.Fatalf("round trip: %v, equal %v", err, bytes.Equal(got, src))
	}
	noise := make([]byte, 64<<10)
	rand.Read(noise)
	if z := c.Compress(nil, noise); z != nil {
		t.Fatalf("random bytes 'compressed' to %d of %d: they should go as is", len(z), len(noise))
	}
	if z := c.Compress(nil, make([]byte, minCompress-1)); z != nil {
		t.Fatal("a chunk below minCompress was compressed")
	}
}

// TestCodecRefusesBadFrames: what the peer sends is checked, never
// trusted: garbage, a truncated frame, and a frame that would decode to
// more than a chunk all fail.
func TestCodecRefusesBadFrames(t *testing.T) {
	c, err := NewCodec()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	good := c.Compress(nil, pageLike(wire.DataChunk))
	big, _ := zstd.NewWriter(nil)
	bomb := big.EncodeAll(make([]byte, 16<<20), nil) // 16 MiB of zeros
	big.Close()
	for name, b := range map[string][]byte{
		"garbage":   []byte(strings.Repeat("not zstd ", 100)),
		"truncated": good[:len(good)/2],
		"bomb":      bomb,
	} {
		if out, err := c.Decompress(b); err == nil {
			t.Errorf("%s: decoded to %d bytes, want an error", name, len(out))
		}
	}
	if _, err := c.Decompress(good); err != nil {
		t.Fatalf("a good frame after bad ones: %v", err)
	}
}

// TestRelayCompressed runs two relays with codecs back to back over a
// socket pair, as the source's and the destination's: half
// page-like and half random chunks (12 MiB) go from one "CRIU" to the other, every
// byte in order, and the page-like part crosses in far fewer bytes.
func TestRelayCompressed(t *testing.T) {
	l, err := loop.New()
	if err != nil {
		t.Fatal(err)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	var relays [2]*Relay
	var ends [2]*os.File
	failed := make(chan error, 4)
	for i := range relays {
		mem, err := NewConn(l, "mem", &Link{fc: &fdConn{fd: fds[i]}}, wire.Mem, 4<<20)
		if err != nil {
			t.Fatal(err)
		}
		local, criuEnd := newPageSocketForTest(t)
		ends[i] = criuEnd
		r, err := newRelay(l, local, mem)
		if err != nil {
			t.Fatal(err)
		}
		if r.Codec, err = NewCodec(); err != nil {
			t.Fatal(err)
		}
		defer r.Codec.Close()
		mem.OnMessage = r.FromPeer
		mem.OnClose = func(err error) {
			if err != io.EOF {
				failed <- err
			}
		}
		r.OnError = func(err error) { failed <- err }
		relays[i] = r
	}
	defer ends[0].Close()
	defer ends[1].Close()
	stop := runLoop(t, l)
	defer stop()

	var want []byte
	for i := 0; i < 48; i++ {
		chunk := pageLike(wire.DataChunk)
		if i%2 == 1 {
			rand.Read(chunk)
		}
		want = append(want, chunk...)
	}
	fd0 := int(ends[0].Fd())
	wrote := make(chan struct{})
	defer func() { <-wrote }() // before the ends close
	go func() {
		defer close(wrote)
		ends[0].Write(want)
		unix.Shutdown(fd0, unix.SHUT_WR)
	}()
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(ends[1])
		got <- b
	}()
	select {
	case b := <-got:
		if !bytes.Equal(b, want) {
			t.Fatalf("the far CRIU got %d bytes, want the %d written, in order", len(b), len(want))
		}
	case err := <-failed:
		t.Fatal(err)
	case <-time.After(30 * time.Second):
		t.Fatal("the stream never ended")
	}
	done := make(chan [2]int64, 1)
	l.Post(func() { done <- [2]int64{relays[0].Sent(), relays[0].SentWire()} })
	n := <-done
	t.Logf("page stream %d bytes, %d on the wire", n[0], n[1])
	if n[0] != int64(len(want)) || n[1] > n[0]*6/10 {
		t.Fatalf("sent %d, on the wire %d: want %d, and the page-like half (of %d) compressed", n[0], n[1], len(want), len(want)/2)
	}
}

// TestRelayRefusesUnagreedOrBadCompression: compressed data on a relay
// without a codec, or that does not decode, fails the stream.
func TestRelayRefusesUnagreedOrBadCompression(t *testing.T) {
	r, _ := relayForTest(t, false)
	if err := r.FromPeer(&wire.PageDataZ{Data: []byte("x")}); err == nil || !strings.Contains(err.Error(), "no compression was agreed") {
		t.Fatalf("compressed data without a codec: %v", err)
	}
	var err error
	if r.Codec, err = NewCodec(); err != nil {
		t.Fatal(err)
	}
	defer r.Codec.Close()
	if err := r.FromPeer(&wire.PageDataZ{Data: []byte("definitely not a zstd frame")}); err == nil {
		t.Fatal("a corrupt compressed chunk was taken")
	}
}

// TestRelayPagesAheadCompressed: a pre-copy destination's relay hands
// compressed pages sent ahead to its store decoded, key first; without
// an agreed codec, or with a frame that is only a key, it refuses them.
func TestRelayPagesAheadCompressed(t *testing.T) {
	r, _ := relayForTest(t, false)
	var got []byte
	r.Ahead = func(frame []byte) error {
		got = append([]byte(nil), frame...)
		return nil
	}
	pages := pageLike(64 << 10)
	key := precopy.AppendPages(nil, 7, 0x400000, nil)
	c, err := NewCodec()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	z := c.Compress(append([]byte(nil), key...), pages)
	if z == nil || len(z) >= len(key)+len(pages)/2 {
		t.Fatalf("page-like memory compressed to %d bytes of %d", len(z), len(pages))
	}
	if err := r.FromPeer(&wire.PrecopyPagesZ{Data: z}); err == nil || !strings.Contains(err.Error(), "no compression was agreed") {
		t.Fatalf("compressed pages ahead without a codec: %v", err)
	}
	if r.Codec, err = NewCodec(); err != nil {
		t.Fatal(err)
	}
	defer r.Codec.Close()
	if err := r.FromPeer(&wire.PrecopyPagesZ{Data: z}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, append(key, pages...)) {
		t.Fatalf("the store got %d bytes, not the key and the pages", len(got))
	}
	if err := r.FromPeer(&wire.PrecopyPagesZ{Data: key}); err == nil {
		t.Fatal("a compressed frame of only a key was taken")
	}
}

// BenchmarkCodec is the CPU cost of compressing and decompressing a
// chunk: page-like (half zero pages, half text) and random.
func BenchmarkCodec(b *testing.B) {
	c, err := NewCodec()
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	random := make([]byte, wire.DataChunk)
	rand.Read(random)
	for _, in := range []struct {
		name string
		data []byte
	}{{"pagelike", pageLike(wire.DataChunk)}, {"random", random}} {
		b.Run("compress/"+in.name, func(b *testing.B) {
			b.SetBytes(int64(len(in.data)))
			dst := make([]byte, 0, len(in.data)*2)
			for b.Loop() {
				c.Compress(dst[:0], in.data)
			}
		})
		z := c.Compress(nil, in.data)
		if z == nil {
			continue
		}
		b.Run("decompress/"+in.name, func(b *testing.B) {
			b.SetBytes(int64(len(in.data)))
			for b.Loop() {
				if _, err := c.Decompress(z); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
