//go:build linux

// Package journal talks to systemd-journald: it sends phauld's log entries
// natively, with structured fields, and opens stdout streams for migrated
// processes whose output went to the journal on their source host.
package journal

import (
	"fmt"
	"strings"

	"github.com/coreos/go-systemd/v22/journal"
	"go.uber.org/zap/zapcore"
)

// FieldPrefix starts the journal field name of every zap field: "session"
// becomes PHAUL_SESSION, so that `journalctl PHAUL_SESSION=ID` shows one
// migration.
const FieldPrefix = "PHAUL_"

// Core is a zap core that sends each entry to journald as a native entry:
// MESSAGE, PRIORITY (from the zap level), SYSLOG_IDENTIFIER, the logger's
// name, the caller, and every field as PHAUL_<NAME>.
type Core struct {
	zapcore.LevelEnabler
	identifier string
	fields     map[string]string
	send       func(msg string, p journal.Priority, vars map[string]string) error
}

// NewCore returns a core sending entries at enab's levels to journald,
// under identifier.
func NewCore(enab zapcore.LevelEnabler, identifier string) *Core {
	return &Core{LevelEnabler: enab, identifier: identifier, fields: map[string]string{}, send: journal.Send}
}

// Enabled reports whether journald is there to send to.
func Enabled() bool { return journal.Enabled() }

// StderrIsJournal reports whether this process's stderr is connected to
// the journal (systemd sets JOURNAL_STREAM for it).
func StderrIsJournal() bool {
	ok, err := journal.StderrIsJournalStream()
	return err == nil && ok
}

// With returns a core that adds fields to every entry.
func (c *Core) With(fields []zapcore.Field) zapcore.Core {
	clone := *c
	clone.fields = make(map[string]string, len(c.fields)+len(fields))
	for k, v := range c.fields {
		clone.fields[k] = v
	}
	addFields(clone.fields, fields)
	return &clone
}

// Check adds c to ce if the entry's level is enabled.
func (c *Core) Check(ent zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(ent.Level) {
		return ce.AddCore(ent, c)
	}
	return ce
}

// Write sends one entry.
func (c *Core) Write(ent zapcore.Entry, fields []zapcore.Field) error {
	vars := make(map[string]string, len(c.fields)+len(fields)+4)
	for k, v := range c.fields {
		vars[k] = v
	}
	addFields(vars, fields)
	vars["SYSLOG_IDENTIFIER"] = c.identifier
	if ent.LoggerName != "" {
		vars[FieldPrefix+"LOGGER"] = ent.LoggerName
	}
	if ent.Caller.Defined {
		vars["CODE_FILE"] = ent.Caller.File
		vars["CODE_LINE"] = fmt.Sprint(ent.Caller.Line)
	}
	if ent.Stack != "" {
		vars[FieldPrefix+"STACK"] = ent.Stack
	}
	return c.send(ent.Message, priority(ent.Level), vars)
}

// Sync does nothing: every entry is sent as it is written.
func (c *Core) Sync() error { return nil }

// priority maps zap levels to syslog priorities.
func priority(l zapcore.Level) journal.Priority {
	switch {
	case l <= zapcore.DebugLevel:
		return journal.PriDebug
	case l == zapcore.InfoLevel:
		return journal.PriInfo
	case l == zapcore.WarnLevel:
		return journal.PriWarning
	case l == zapcore.ErrorLevel:
		return journal.PriErr
	case l == zapcore.DPanicLevel:
		return journal.PriCrit
	default:
		return journal.PriAlert
	}
}

// addFields renders fields into vars as PHAUL_<NAME>=value.
func addFields(vars map[string]string, fields []zapcore.Field) {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range fields {
		f.AddTo(enc)
	}
	for k, v := range enc.Fields {
		vars[FieldName(k)] = fmt.Sprint(v)
	}
}

// FieldName is the journal field name of zap field key: PHAUL_ and the
// key in upper case, anything but letters and digits as '_'.
func FieldName(key string) string {
	var b strings.Builder
	b.WriteString(FieldPrefix)
	for _, r := range strings.ToUpper(key) {
		if (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}
