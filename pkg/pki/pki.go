// Package pki makes and loads the certificates phauld daemons use to
// authenticate each other with mutual TLS: a small private CA, and a key
// and certificate per host, signed by it.
//
// A TLS directory holds ca.pem (the CA certificate every daemon trusts),
// cert.pem and key.pem (this host's certificate and key). The CA's own key,
// ca-key.pem, stays on the host where the CA was made: it signs the other
// hosts' certificates (Issue) and nothing else.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// File names in a TLS directory.
const (
	CAFile    = "ca.pem"
	CAKeyFile = "ca-key.pem"
	CertFile  = "cert.pem"
	KeyFile   = "key.pem"
)

// Validity of what Init and Issue make.
const (
	CAValidity   = 10 * 365 * 24 * time.Hour
	HostValidity = 5 * 365 * 24 * time.Hour
)

// ErrExists means a file Init or Issue would write is already there.
var ErrExists = errors.New("file exists")

// Init makes a new CA in dir (ca.pem, ca-key.pem) and a certificate for
// this host (cert.pem, key.pem) valid for names (host names or IP
// addresses). It refuses to overwrite any of the files.
func Init(dir string, names []string) error {
	if len(names) == 0 {
		return errors.New("no name for the host certificate")
	}
	for _, f := range []string{CAFile, CAKeyFile, CertFile, KeyFile} {
		if err := absent(filepath.Join(dir, f)); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	caKey, err := newKey()
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "phaul CA " + names[0], Organization: []string{"phaul"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(CAValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, caKey.Public(), caKey)
	if err != nil {
		return fmt.Errorf("make CA certificate: %w", err)
	}
	ca, _ := x509.ParseCertificate(der)
	if err := writeKey(filepath.Join(dir, CAKeyFile), caKey); err != nil {
		return err
	}
	if err := writeCert(filepath.Join(dir, CAFile), der); err != nil {
		return err
	}
	return issue(dir, ca, caKey, names, now, now.Add(HostValidity))
}

// Issue makes a certificate for another host, valid for names, signed by
// the CA in caDir, into outDir: cert.pem, key.pem and a copy of ca.pem.
func Issue(caDir, outDir string, names []string) error {
	return IssueValid(caDir, outDir, names, time.Now(), time.Now().Add(HostValidity))
}

// IssueValid is Issue with an explicit validity period (tests make expired
// certificates with it).
func IssueValid(caDir, outDir string, names []string, notBefore, notAfter time.Time) error {
	if len(names) == 0 {
		return errors.New("no name for the certificate")
	}
	ca, caKey, err := loadCA(caDir)
	if err != nil {
		return err
	}
	for _, f := range []string{CertFile, KeyFile} {
		if err := absent(filepath.Join(outDir, f)); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	if filepath.Clean(outDir) != filepath.Clean(caDir) {
		if err := writeCert(filepath.Join(outDir, CAFile), ca.Raw); err != nil {
			return err
		}
	}
	return issue(outDir, ca, caKey, names, notBefore, notAfter)
}

func issue(dir string, ca *x509.Certificate, caKey crypto.Signer, names []string, notBefore, notAfter time.Time) error {
	key, err := newKey()
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: names[0], Organization: []string{"phaul"}},
		NotBefore:    notBefore.Add(-time.Hour),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		// One certificate per host, for both ends of a migration: it
		// serves as destination and connects as source.
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return fmt.Errorf("make certificate: %w", err)
	}
	if err := writeKey(filepath.Join(dir, KeyFile), key); err != nil {
		return err
	}
	return writeCert(filepath.Join(dir, CertFile), der)
}

// Loaded is a daemon's TLS identity: its certificate and the CA it trusts.
type Loaded struct {
	Cert tls.Certificate
	CAs  *x509.CertPool
	// Leaf is the parsed certificate, for logs (names, expiry).
	Leaf *x509.Certificate
}

// Load reads ca.pem, cert.pem and key.pem from dir.
func Load(dir string) (*Loaded, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile))
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, CAFile))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%s holds no certificate", filepath.Join(dir, CAFile))
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, err
	}
	return &Loaded{Cert: cert, CAs: pool, Leaf: leaf}, nil
}

// ServerConfig is the destination's side: TLS 1.3 only, and a client
// certificate signed by the CA required.
func (l *Loaded) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion:             tls.VersionTLS13,
		Certificates:           []tls.Certificate{l.Cert},
		ClientAuth:             tls.RequireAndVerifyClientCert,
		ClientCAs:              l.CAs,
		SessionTicketsDisabled: true,
	}
}

// ClientConfig is the source's side, for a destination reached as
// serverName (a host name or an IP address): its certificate must be
// signed by the CA and valid for that name.
func (l *Loaded) ClientConfig(serverName string) *tls.Config {
	cert := l.Cert
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Always present the certificate, even if the destination asks
		// for another CA's: it then refuses saying why ("unknown
		// authority"), not "no certificate".
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
		RootCAs:              l.CAs,
		ServerName:           serverName,
	}
}

// Names are the names and addresses the certificate is valid for.
func (l *Loaded) Names() []string {
	names := append([]string(nil), l.Leaf.DNSNames...)
	for _, ip := range l.Leaf.IPAddresses {
		names = append(names, ip.String())
	}
	return names
}

func loadCA(dir string) (*x509.Certificate, crypto.Signer, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CAFile))
	if err != nil {
		return nil, nil, err
	}
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, nil, fmt.Errorf("%s: no certificate", filepath.Join(dir, CAFile))
	}
	ca, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, nil, fmt.Errorf("the CA key is not here (%w): issue certificates on the host where 'phaulctl pki init' made the CA", err)
	}
	block, _ = pem.Decode(keyPEM)
	if block == nil {
		return nil, nil, fmt.Errorf("%s: no key", filepath.Join(dir, CAKeyFile))
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, nil, err
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, nil, fmt.Errorf("%s: not a signing key", filepath.Join(dir, CAKeyFile))
	}
	return ca, signer, nil
}

func newKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

func absent(path string) error {
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("%s: %w; remove it first if you mean to replace it", path, ErrExists)
	}
	return nil
}

func writeKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

func writeCert(path string, der []byte) error {
	return writePEM(path, "CERTIFICATE", der, 0o644)
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if err := pem.Encode(f, &pem.Block{Type: typ, Bytes: der}); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
