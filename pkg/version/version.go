// Package version holds phaul's version, set at build time with
// -ldflags "-X github.com/phaul/phaul/pkg/version.Version=...".
package version

// Version is phaul's version.
var Version = "0.1.0-dev"

// Daemon names this daemon in handshakes and logs.
func Daemon() string { return "phauld/" + Version }
