package pki

import (
	"crypto/tls"
	"time"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
)

// Security is how a daemon protects its migrations.
type Security struct {
	// Mode is api.SecurityTLS, api.SecurityInsecure or
	// api.SecurityDisabled.
	Mode string
	// Server and Client are the mutual TLS configurations (nil unless
	// Mode is api.SecurityTLS).
	Server *tls.Config
	Client func(serverName string) *tls.Config
	// Disabled says why migrations are refused, and what to run.
	Disabled error
	// ID is the daemon's identity, with mutual TLS.
	ID *Loaded
}

// LoadSecurity reads the daemon's TLS identity from dir, or takes
// insecure (plain TCP, the operator's choice). Without either, migrations
// are disabled, and Disabled says what to run.
func LoadSecurity(dir string, insecure bool, log *zap.Logger) Security {
	if insecure {
		log.Warn("--insecure: migrations run over plain TCP, unauthenticated and unencrypted (phauld says at start who can then run programs as root here)")
		return Security{Mode: api.SecurityInsecure}
	}
	id, err := Load(dir)
	if err != nil {
		disabled := api.Errorf(api.CodePrecondition,
			"this phauld serves no migrations: it has no usable TLS certificates in %s (%v). "+
				"Make them: on one host run 'phaulctl pki init --dir %s'; for every other host run "+
				"'phaulctl pki issue --dir %s --name HOST --out DIR' there and copy DIR to that host's %s; then restart phauld. "+
				"Or run every phauld with --insecure, on a network you trust",
			dir, err, dir, dir, dir)
		log.Error("migrations disabled", zap.Error(disabled))
		return Security{Mode: api.SecurityDisabled, Disabled: disabled}
	}
	log.Info("mutual TLS", zap.String("tls_dir", dir), zap.Strings("names", id.Names()), zap.Time("expires", id.Leaf.NotAfter))
	if left := time.Until(id.Leaf.NotAfter); left < 30*24*time.Hour {
		log.Warn("this daemon's certificate expires soon; issue a new one", zap.Duration("left", left.Round(time.Hour)))
	}
	return Security{Mode: api.SecurityTLS, Server: id.ServerConfig(), Client: id.ClientConfig, ID: id}
}
