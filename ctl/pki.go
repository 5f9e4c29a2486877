package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/phaul/phaul/pkg/pki"
)

func newPKI(c *cli) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pki",
		Short: "Make the certificates phauld daemons authenticate each other with",
		Long: `Daemons migrate only to and from daemons they trust: each has a key and a
certificate signed by a CA they all trust, and they check each other's with
mutual TLS. pki makes a small CA and the certificates:

  # on one host (it keeps the CA's key):
  phaulctl pki init --dir /etc/phauld/tls
  # for every other host, still on the first:
  phaulctl pki issue --dir /etc/phauld/tls --name hostB --out hostB-tls
  # then copy hostB-tls/ to hostB as /etc/phauld/tls, and restart phauld.

A certificate must be valid for the name or address other hosts give to
'phaulctl migrate --to': give --name once for each (e.g. --name hostB
--name 10.0.0.2). docs/security.md shows the same with openssl.`,
		Args: cobra.NoArgs,
	}
	cmd.AddCommand(newPKIInit(c), newPKIIssue(c))
	return cmd
}

func newPKIInit(c *cli) *cobra.Command {
	var dir string
	var names []string
	cmd := &cobra.Command{
		Use:   "init --dir DIR [--name NAME]...",
		Short: "Make a CA and this host's certificate",
		Long: `Init makes a new CA (ca.pem, and its key ca-key.pem) and a certificate for
this host (cert.pem, key.pem) in DIR, valid for each NAME (a host name or
an IP address; default: this host's name). It never overwrites a file.
Keys are written mode 0600.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if len(names) == 0 {
				h, err := os.Hostname()
				if err != nil {
					return fmt.Errorf("no --name, and no host name: %w", err)
				}
				names = []string{h}
			}
			if err := pki.Init(dir, names); err != nil {
				return err
			}
			fmt.Fprintf(c.stdout, "made a CA and a certificate for %v in %s\n", names, dir)
			fmt.Fprintf(c.stdout, "keep %s on this host only; issue the other hosts' certificates with 'phaulctl pki issue --dir %s --name HOST --out DIR'\n",
				filepath.Join(dir, pki.CAKeyFile), dir)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "/etc/phauld/tls", "directory to write into")
	cmd.Flags().StringArrayVar(&names, "name", nil, "a name or address the certificate is valid for (repeatable)")
	return cmd
}

func newPKIIssue(c *cli) *cobra.Command {
	var dir, out string
	var names []string
	cmd := &cobra.Command{
		Use:   "issue --dir DIR --name NAME [--name NAME]... --out DIR2",
		Short: "Issue a certificate for another host",
		Long: `Issue makes a key and a certificate for another host, signed by the CA in
DIR (made by 'phaulctl pki init'), valid for each NAME, and writes them to
DIR2 with a copy of the CA certificate: cert.pem, key.pem, ca.pem. Copy
DIR2 to that host as phauld's --tls-dir (default /etc/phauld/tls).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if len(names) == 0 {
				return fmt.Errorf("--name is required: the other host's name or address, as given to 'phaulctl migrate --to'")
			}
			if out == "" {
				return fmt.Errorf("--out is required: the directory to write the new certificate to")
			}
			if err := pki.Issue(dir, out, names); err != nil {
				return err
			}
			fmt.Fprintf(c.stdout, "issued a certificate for %v in %s; copy it to that host's /etc/phauld/tls\n", names, out)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "/etc/phauld/tls", "directory of the CA")
	cmd.Flags().StringArrayVar(&names, "name", nil, "a name or address the certificate is valid for (repeatable)")
	cmd.Flags().StringVar(&out, "out", "", "directory to write the certificate to")
	return cmd
}
