//go:build linux

package session

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/migrate"
	"github.com/phaul/phaul/pkg/pki"
	"github.com/phaul/phaul/pkg/wire"
	"github.com/phaul/phaul/test/harness"
)

// newAdmitManager is a manager on loopback with the admission bounds a;
// mutual TLS with id, plain TCP without.
func newAdmitManager(t *testing.T, id *pki.Loaded, a Admission) (*Manager, string, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	cfg := Config{
		Log: zap.New(core), CRIU: migrate.FromClient(criu.New("/nonexistent/criu")),
		Info:     criu.Info{Version: criu.Version{Major: 4, Minor: 2}},
		StateDir: t.TempDir(), HandshakeTimeout: 2 * time.Second,
		Admission: a,
	}
	if id != nil {
		cfg.ServerTLS, cfg.ClientTLS = id.ServerConfig(), id.ClientConfig
	} else {
		cfg.Insecure = true
	}
	m, err := NewManager(cfg)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go m.Serve(l)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		m.Shutdown(ctx)
	})
	return m, l.Addr().String(), logs
}

// pairs dials both connections of a migration with m's own dial, as a
// source does, and returns the first error.
func pairs(t *testing.T, m *Manager, addr string) error {
	t.Helper()
	sid := newID(t)
	ctx := context.Background()
	for _, role := range []wire.Role{wire.RoleRPC, wire.RoleMem} {
		lk, err := m.dial(ctx, addr, sid, role)
		if err != nil {
			return err
		}
		defer lk.Close()
	}
	return nil
}

// bothModes runs f with mutual TLS (id) and with plain TCP (nil).
func bothModes(t *testing.T, f func(t *testing.T, id *pki.Loaded)) {
	id, _ := testPKI(t)
	t.Run("tls", func(t *testing.T) { f(t, id) })
	t.Run("insecure", func(t *testing.T) { f(t, nil) })
}

// TestIdleFloodStopsNothing: 400 connections held open to the
// destination, saying nothing, do not keep a migration out (they used
// to fill the 256 handshake places for 10 s each); and a silent
// connection is dropped after FirstByte.
func TestIdleFloodStopsNothing(t *testing.T) {
	bothModes(t, func(t *testing.T, pk *pki.Loaded) {
		m, addr, _ := newAdmitManager(t, pk, Admission{FirstByte: 2 * time.Second})
		t.Cleanup(harness.Flood("127.0.0.1", addr, 400, true, nil))
		time.Sleep(500 * time.Millisecond) // all 400 in
		for i := 0; i < 3; i++ {
			if err := pairs(t, m, addr); err != nil {
				t.Fatalf("a migration's connections during the flood: %v", err)
			}
		}
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
			t.Fatalf("a silent connection: %v, want it closed", err)
		}
		if d := time.Since(start); d < 1500*time.Millisecond || d > 5*time.Second {
			t.Errorf("a silent connection closed after %v, want about 2 s", d)
		}
	})
}

// TestLoneHelloFloodStopsNothing: lone hellos do not keep a migration
// out (128 of them filled the unpaired places for 30 s): neither 128
// sent once from the source's own address (the oldest give way), nor
// 200 held open and sent again as fast as they are dropped from another
// address (it has its own bound).
func TestLoneHelloFloodStopsNothing(t *testing.T) {
	lone := func(c net.Conn) {
		wire.WriteMessage(c, &wire.Hello{Proto: wire.Version, Role: wire.RoleRPC, Session: newID(t)})
	}
	t.Run("once, same address", func(t *testing.T) {
		m, addr, _ := newAdmitManager(t, nil, Admission{})
		t.Cleanup(harness.Flood("127.0.0.1", addr, 128, false, lone))
		time.Sleep(time.Second)
		for i := 0; i < 3; i++ {
			if err := pairs(t, m, addr); err != nil {
				t.Fatalf("a migration's connections after the flood: %v", err)
			}
		}
	})
	t.Run("held, another address", func(t *testing.T) {
		m, addr, _ := newAdmitManager(t, nil, Admission{})
		t.Cleanup(harness.Flood("127.0.0.2", addr, 200, true, lone))
		time.Sleep(time.Second)
		for i := 0; i < 3; i++ {
			if err := pairs(t, m, addr); err != nil {
				t.Fatalf("a migration's connections during the flood: %v", err)
			}
		}
	})
}

// TestLoneConnectionFreedOnClose: a lone connection whose peer closes it
// gives its place back at once, not after the pair timeout.
func TestLoneConnectionFreedOnClose(t *testing.T) {
	m, addr, _ := newAdmitManager(t, nil, Admission{Halves: 2, HalvesPerAddr: 2, HalfGrace: time.Hour})
	for i := 0; i < 2; i++ {
		c, r := hello(t, addr, newID(t), wire.RoleRPC)
		if !r.OK {
			t.Fatal(r.Error)
		}
		c.Close()
	}
	deadline := time.Now().Add(time.Second)
	for {
		err := pairs(t, m, addr)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("1 s after the lone connections closed: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestSaturatedSaysSo: when every handshake place is taken by young
// connections, a source is told the destination is saturated, in both
// modes, not that its certificates are wrong.
func TestSaturatedSaysSo(t *testing.T) {
	bothModes(t, func(t *testing.T, pk *pki.Loaded) {
		m, addr, logs := newAdmitManager(t, pk, Admission{Handshakes: 2, HandshakesPerAddr: 2, HandshakeGrace: time.Hour})
		for i := 0; i < 2; i++ {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Write([]byte{0x16}) // a first byte, then nothing
		}
		time.Sleep(200 * time.Millisecond)
		err := pairs(t, m, addr)
		if err == nil || !strings.Contains(err.Error(), "saturated") || strings.Contains(err.Error(), "certificate") {
			t.Fatalf("a source facing a saturated destination got %v", err)
		}
		waitLog(t, logs, "the destination is saturated")
	})
}

// TestAllowPeer: with --allow-peer, an address outside the list is
// refused before any byte is read, and the source is told why; inside,
// a migration's connections pair.
func TestAllowPeer(t *testing.T) {
	bothModes(t, func(t *testing.T, pk *pki.Loaded) {
		m, addr, logs := newAdmitManager(t, pk, Admission{AllowPeers: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}})
		err := pairs(t, m, addr)
		if err == nil || !strings.Contains(err.Error(), "--allow-peer") {
			t.Fatalf("a source outside --allow-peer got %v", err)
		}
		waitLog(t, logs, "not in --allow-peer")

		m, addr, _ = newAdmitManager(t, pk, Admission{AllowPeers: []netip.Prefix{
			netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("127.0.0.0/8")}})
		if err := pairs(t, m, addr); err != nil {
			t.Fatalf("a source inside --allow-peer: %v", err)
		}
	})
}

// TestMixedModesSaySo: a TLS daemon and an insecure one name the cause
// on both sides, instead of blaming certificates or a bad frame.
func TestMixedModesSaySo(t *testing.T) {
	id, _ := testPKI(t)
	tlsM, tlsAddr, tlsLogs := newAdmitManager(t, id, Admission{})
	plainM, plainAddr, plainLogs := newAdmitManager(t, nil, Admission{})

	err := pairs(t, tlsM, plainAddr)
	if err == nil || !strings.Contains(err.Error(), "runs with --insecure, and this phauld uses mutual TLS") {
		t.Errorf("a TLS source to an insecure destination: %v", err)
	}
	waitLog(t, plainLogs, "the peer speaks TLS (it runs with certificates), and this daemon runs with --insecure")

	err = pairs(t, plainM, tlsAddr)
	if err == nil || !strings.Contains(err.Error(), "requires mutual TLS, and this phauld runs with --insecure") {
		t.Errorf("an insecure source to a TLS destination: %v", err)
	}
	waitLog(t, tlsLogs, "the peer runs with --insecure")
}
