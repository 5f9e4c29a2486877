//go:build linux

package journal

import (
	"errors"
	"testing"

	"github.com/coreos/go-systemd/v22/journal"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

type sent struct {
	msg  string
	pri  journal.Priority
	vars map[string]string
}

func TestCoreSendsStructuredEntries(t *testing.T) {
	var got []sent
	c := NewCore(zapcore.DebugLevel, "phauld")
	c.send = func(msg string, p journal.Priority, vars map[string]string) error {
		got = append(got, sent{msg, p, vars})
		return nil
	}
	log := zap.New(c).Named("session").With(zap.String("session", "abc"), zap.Int("pid", 42))
	log.Info("phase done", zap.String("phase", "dump"), zap.String("peer", "10.0.0.2:12345"), zap.Duration("duration", 1500000))
	log.Warn("careful")
	log.Error("failed", zap.Error(errors.New("boom")))
	log.Debug("detail")
	if len(got) != 4 {
		t.Fatalf("sent %d entries, want 4", len(got))
	}
	e := got[0]
	want := map[string]string{
		"PHAUL_SESSION": "abc", "PHAUL_PID": "42", "PHAUL_PHASE": "dump", "PHAUL_PEER": "10.0.0.2:12345",
		"PHAUL_DURATION": "1.5ms", "SYSLOG_IDENTIFIER": "phauld", "PHAUL_LOGGER": "session",
	}
	for k, v := range want {
		if e.vars[k] != v {
			t.Errorf("%s = %q, want %q", k, e.vars[k], v)
		}
	}
	if e.msg != "phase done" || e.pri != journal.PriInfo {
		t.Errorf("first entry %q priority %d", e.msg, e.pri)
	}
	for i, p := range []journal.Priority{journal.PriInfo, journal.PriWarning, journal.PriErr, journal.PriDebug} {
		if got[i].pri != p {
			t.Errorf("entry %d priority %d, want %d", i, got[i].pri, p)
		}
	}
	if got[2].vars["PHAUL_ERROR"] != "boom" {
		t.Errorf("error field = %q", got[2].vars["PHAUL_ERROR"])
	}
}

func TestCoreLevels(t *testing.T) {
	n := 0
	c := NewCore(zapcore.InfoLevel, "phauld")
	c.send = func(string, journal.Priority, map[string]string) error { n++; return nil }
	zap.New(c).Debug("hidden")
	if n != 0 {
		t.Fatal("a debug entry passed an info-level core")
	}
}

func TestFieldName(t *testing.T) {
	for in, want := range map[string]string{"session": "PHAUL_SESSION", "dest_pid": "PHAUL_DEST_PID", "peer-cert": "PHAUL_PEER_CERT", "x.y": "PHAUL_X_Y"} {
		if got := FieldName(in); got != want {
			t.Errorf("FieldName(%q) = %q, want %q", in, got, want)
		}
	}
}
