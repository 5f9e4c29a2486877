//go:build linux

package migrate

import (
	"bytes"
	"crypto/rand"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/loop"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// TestSenderStreamsBounded sends image files, one of them far larger than
// the conn's high-water mark, to a receiver reading slowly: every byte
// arrives in order and checked, and what waits in the conn's queue never
// passes the mark by more than a chunk.
func TestSenderStreamsBounded(t *testing.T) {
	src, dst := t.TempDir(), t.TempDir()
	sizes := map[string]int{"core-1.img": 1234, "empty.img": 0, "ghost-file-1.img": 40 << 20, "pstree.img": 77}
	var names []string
	for n, size := range sizes {
		b := make([]byte, size)
		rand.Read(b)
		if err := os.WriteFile(filepath.Join(src, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	names, err := imageFiles(src)
	if err != nil || len(names) != len(sizes) {
		t.Fatalf("imageFiles = %v, %v", names, err)
	}

	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.FileConn(os.NewFile(uintptr(fds[0]), "near"))
	if err != nil {
		t.Fatal(err)
	}
	far := os.NewFile(uintptr(fds[1]), "far")
	defer far.Close()
	lk, err := transport.NewLink(c)
	if err != nil {
		t.Fatal(err)
	}
	l, err := loop.New()
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	conn, err := transport.NewConn(l, "rpc", lk, wire.RPC, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.OnMessage = func(wire.Message) error { return nil }

	// The far end: a receiver, reading slowly at first.
	received := make(chan error, 1)
	go func() {
		r := receiver{dir: dst}
		dec := wire.NewDecoder(wire.RPC, 2<<20)
		for i := 0; r.files < len(names); i++ {
			if i < 20 {
				time.Sleep(5 * time.Millisecond)
			}
			n, err := far.Read(dec.Space())
			if err != nil {
				received <- err
				return
			}
			dec.Commit(n)
			for {
				m, err := dec.Next()
				if err != nil {
					received <- err
					return
				}
				if m == nil {
					break
				}
				switch m := m.(type) {
				case *wire.FileBegin:
					err = r.begin(m)
				case *wire.FileData:
					err = r.data(m.Data)
				case *wire.FileEnd:
					err = r.end(m)
				}
				if err != nil {
					received <- err
					return
				}
			}
		}
		received <- nil
	}()

	var sendErr error
	sent := false
	s := newSender(conn, src, names, func(err error) { sendErr, sent = err, true })
	s.start()
	peak := 0
	for deadline := time.Now().Add(30 * time.Second); !sent || !conn.Flushed(); {
		peak = max(peak, conn.OutLen())
		if _, err := l.RunOnce(); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatal("the files were not sent within 30 s")
		}
	}
	if sendErr != nil {
		t.Fatal(sendErr)
	}
	if err := <-received; err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		a, _ := os.ReadFile(filepath.Join(src, n))
		b, _ := os.ReadFile(filepath.Join(dst, n))
		if !bytes.Equal(a, b) {
			t.Errorf("%s arrived changed (%d bytes, sent %d)", n, len(b), len(a))
		}
	}
	if limit := transport.HighWater + wire.HeaderLen + wire.DataChunk + 4096; peak > limit {
		t.Errorf("up to %d bytes waited in the queue: more than the mark and a chunk (%d)", peak, limit)
	}
	t.Logf("queue peak %d bytes for %d MiB of files", peak, 40)
}
