//go:build linux

package migrate

import (
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/wire"
)

// The link probe: with --mode auto, before Prepare, the source sends
// probeBytes of filler on the mem connection and times the destination's
// answer, so that the destination can weigh pre-copy against lazy by the
// link's rate (autoMode). It costs probeBytes on the link once: 30 ms at
// 1 Gbit/s.

// probeBytes is the probe's size: enough to fill a gigabit link's
// pipe several times over, little next to any process's memory.
const probeBytes = 4 << 20

// maxProbeBytes bounds what a destination takes as a probe.
const maxProbeBytes = 16 << 20

// probeFirst says whether the source probes the link before Prepare:
// auto was asked, the destination answers probes, and pre-copy is one of
// the choices (not for a container, which auto moves in copy mode).
func (m *source) probeFirst() bool {
	return (m.p.Mode == api.ModeAuto || m.p.Mode == "") && m.p.PeerProbes &&
		m.p.AsSource.Can(api.ModePrecopy) && m.p.Container == nil
}

// startProbe sends the probe; it is part of the prepare phase.
func (m *source) startProbe() error {
	m.tProbe = time.Now()
	filler := make([]byte, wire.DataChunk)
	for sent := 0; sent < probeBytes; sent += len(filler) {
		if err := m.mem.Send(&wire.Probe{Data: filler}); err != nil {
			return err
		}
	}
	return m.mem.Send(&wire.ProbeEnd{})
}

// probed takes the destination's answer: the rate goes in the Prepare
// held back, which goes now.
func (m *source) probed(got int64) error {
	took := time.Since(m.tProbe)
	if got != probeBytes {
		return protocolErr("the destination counted %d probe bytes, %d were sent", got, probeBytes)
	}
	m.linkRate = int64(float64(got) / max(took.Seconds(), 1e-6))
	m.log.Info("link measured", zap.Int64("bytes_per_second", m.linkRate), zap.Duration("took", took))
	prep := m.prepare
	m.prepare = nil
	prep.LinkRate = m.linkRate
	return m.rpc.Send(prep)
}

// onProbe counts a probe on the destination's mem connection, before
// Prepare, and answers its end; handled reports whether msg was one.
func (m *dest) onProbe(msg wire.Message) (handled bool, err error) {
	switch msg.(type) {
	case *wire.Probe, *wire.ProbeEnd:
	default:
		return false, nil
	}
	if m.mode != "" {
		return true, protocolErr("a link probe after prepare")
	}
	if p, ok := msg.(*wire.Probe); ok {
		if m.probeBytes += int64(len(p.Data)); m.probeBytes > maxProbeBytes {
			return true, protocolErr("a link probe of more than %d bytes", maxProbeBytes)
		}
		return true, nil
	}
	return true, m.rpc.Send(&wire.ProbeAck{Bytes: m.probeBytes})
}

// Auto's weighing of pre-copy against lazy: pre-copy when the link is
// slow and the memory large for it, so that lazy's pages would follow
// the process for long (each fault a round trip, the source needed all
// the while); lazy otherwise.
const (
	// precopyRateBelow: a link slower than this (bytes a second) is
	// slow: on the shaped 1 Gbit/s link (118 MB/s) pre-copy froze a
	// 512 MiB process 1.8 s against copy's 5.6 s; on loopback (several
	// hundred MB/s through the relays) it gains nothing on copy.
	precopyRateBelow = 256 << 20
	// precopyAfter: pre-copy when the memory takes longer than this to
	// cross the link.
	precopyAfter = 2 * time.Second
)

// autoMode is auto's choice, given what both sides can run, the link's
// measured rate (0: not measured) and the tree's memory, and why.
func autoMode(src, dst Capabilities, rate, mem int64) (string, string) {
	both := func(m string) bool { return src.Can(m) && dst.Can(m) }
	if both(api.ModePrecopy) && rate > 0 && rate < precopyRateBelow {
		if cross := time.Duration(float64(mem) / float64(rate) * float64(time.Second)); cross > precopyAfter {
			return api.ModePrecopy, "the link carries " + rateText(rate) + ": the memory takes " + cross.Round(100*time.Millisecond).String() + " to cross"
		}
	}
	for _, m := range []string{api.ModeLazy, api.ModePrecopy, api.ModeCopy} {
		if both(m) {
			why := "the best both hosts run"
			if rate > 0 {
				why += " (the link carries " + rateText(rate) + ")"
			}
			return m, why
		}
	}
	return "", ""
}

func rateText(r int64) string {
	return FormatSize(r) + "/s"
}
