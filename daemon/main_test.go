//go:build linux

package main

import (
	"bytes"
	"context"
	"flag"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/journal"
)

// TestManPageDocumentsEveryFlag keeps packaging/man/phauld.8 in step with
// the flags phauld has.
func TestManPageDocumentsEveryFlag(t *testing.T) {
	page, err := os.ReadFile("../packaging/man/phauld.8")
	if err != nil {
		t.Fatal(err)
	}
	var o options
	newFlagSet(&o, io.Discard).VisitAll(func(f *flag.Flag) {
		if !strings.Contains(string(page), `\-\-`+strings.ReplaceAll(f.Name, "-", `\-`)) {
			t.Errorf("phauld.8 does not document --%s", f.Name)
		}
	})
}

func TestParseFlags(t *testing.T) {
	for _, bad := range [][]string{{"extra"}, {"--log-target", "syslog"}, {"--peer-timeout", "10ms"}, {"--nope"}} {
		if _, err := parseFlags(bad, io.Discard); err == nil {
			t.Errorf("parseFlags(%q) accepted", bad)
		}
	}
	o, err := parseFlags([]string{"--listen", "127.0.0.1:1", "--insecure"}, io.Discard)
	if err != nil || o.listen != "127.0.0.1:1" || !o.insecure || o.tlsDir != "/etc/phauld/tls" {
		t.Errorf("parseFlags = %+v, %v", o, err)
	}
}

func TestAllowPeerFlag(t *testing.T) {
	o, err := parseFlags([]string{"--allow-peer", "10.1.2.0/24", "--allow-peer", "192.168.7.9", "--allow-peer", "::ffff:10.9.0.0/112", "--allow-peer", "fd00::/64"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if got := o.allowPeers.String(); got != "10.1.2.0/24,192.168.7.9/32,10.9.0.0/16,fd00::/64" {
		t.Errorf("--allow-peer gave %s", got)
	}
	for _, bad := range []string{"10.1.2.0/33", "host.example", ""} {
		if _, err := parseFlags([]string{"--allow-peer", bad}, io.Discard); err == nil {
			t.Errorf("--allow-peer %q accepted", bad)
		}
	}
	w := insecureWarning([]string{"0.0.0.0:12345"}, o.allowPeers[:1])
	if !strings.Contains(w, "anyone who can connect to 0.0.0.0:12345 from 10.1.2.0/24 can run programs as root on this host") {
		t.Errorf("the warning with --allow-peer: %q", w)
	}
}

func TestLogTargetJournalNeedsJournald(t *testing.T) {
	if journal.Enabled() {
		t.Skip("journald runs here")
	}
	err := run(context.Background(), []string{"--log-target", "journal", "--state-dir", t.TempDir()}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "no journald here") {
		t.Fatalf("run --log-target journal without journald: %v", err)
	}
}

// --insecure says what it gives away, at start and in --help.
func TestInsecureSaysWhatItGivesAway(t *testing.T) {
	w := insecureWarning([]string{"0.0.0.0:12345", "[::]:12345"}, nil)
	if !strings.Contains(w, "anyone who can connect to 0.0.0.0:12345, [::]:12345 can run programs as root on this host") {
		t.Errorf("the warning: %q", w)
	}
	var help bytes.Buffer
	parseFlags([]string{"--help"}, &help)
	if !strings.Contains(help.String(), "can run programs as root on this host") {
		t.Errorf("phauld --help does not say what --insecure gives away:\n%s", help.String())
	}
}

// TestLimitFlags: the liveness and limit flags take sizes, percentages
// and durations as documented, refuse nonsense, and default as
// docs/operations.md says.
func TestLimitFlags(t *testing.T) {
	o, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.phaseTimeout != time.Minute || o.maxIncoming != 16 || o.maxOutgoing != 16 || o.maxPageServers != 8 ||
		o.maxSessionDisk != 0 || o.maxDisk != 0 || o.minFreeDisk.Percent != 5 || o.keepFailed != 7*24*time.Hour || o.precopyCap != 8<<30 ||
		o.fetchAhead != 64<<20 {
		t.Errorf("defaults %+v", o)
	}
	o, err = parseFlags([]string{"--max-session-disk", "20G", "--max-disk", "1.5TiB", "--min-free-disk", "2g",
		"--phase-timeout", "0", "--keep-failed", "0", "--max-page-servers", "0", "--precopy-cap", "512M", "--fetch-ahead", "0"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.maxSessionDisk != 20<<30 || o.maxDisk != 3<<39 || o.minFreeDisk.Bytes != 2<<30 || o.minFreeDisk.Percent != 0 ||
		o.phaseTimeout != 0 || o.keepFailed != 0 || o.maxPageServers != 0 || o.precopyCap != 512<<20 || o.fetchAhead != 0 {
		t.Errorf("parsed %+v", o)
	}
	for _, bad := range [][]string{
		{"--max-session-disk", "lots"}, {"--max-disk", "5Q"}, {"--min-free-disk", "120%"}, {"--precopy-cap", "-1G"}, {"--fetch-ahead", "4K"},
		{"--phase-timeout", "10ms"}, {"--keep-failed", "-1h"}, {"--max-incoming", "-1"},
	} {
		if _, err := parseFlags(bad, io.Discard); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}
