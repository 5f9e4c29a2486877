// Command phaulctl asks the local phauld to migrate processes and reports
// what it is doing. Results go to stdout, progress and errors to stderr;
// every failure exits non-zero.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/client"
	"github.com/phaul/phaul/pkg/version"
)

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}

// cli holds what every command needs.
type cli struct {
	socket string
	json   bool
	stdout io.Writer
	stderr io.Writer
}

func (c *cli) client() *client.Client { return client.New(c.socket) }

// run runs phaulctl and returns its exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM)
	defer stop()
	c := &cli{stdout: stdout, stderr: stderr}
	root := newRoot(c)
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	c.report(err)
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	return 1
}

// Exit codes of phaulctl migrate besides 0 (the process runs on the
// destination) and 1 (refused, or any other failure: nothing was touched,
// or the daemon could not be asked). packaging/man/phaulctl.1 lists them.
const (
	// exitRolledBack: the migration failed and was rolled back; the
	// process was seen running here again.
	exitRolledBack = 3
	// exitInDoubt: the outcome is not known (the destination was lost
	// after the commit was asked: the process is held stopped here until
	// settled; or phaulctl lost its phauld), or the process was not seen
	// running here after a rollback.
	exitInDoubt = 4
	// exitNotSeen: committed, but the process was not seen running on
	// the destination.
	exitNotSeen = 5
)

// exitError is an error with its own exit code.
type exitError struct {
	code int
	err  error
	// printed: the result went to stdout already (--json); only the
	// message goes to stderr.
	printed bool
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// migrateExit gives a failed migration its exit code, by what it left.
func migrateExit(err error) error {
	switch api.CodeOf(err) {
	case api.CodeAborted, api.CodeCanceled:
		return &exitError{code: exitRolledBack, err: err}
	case api.CodeInDoubt:
		return &exitError{code: exitInDoubt, err: err}
	}
	return err
}

func newRoot(c *cli) *cobra.Command {
	root := &cobra.Command{
		Use:   "phaulctl",
		Short: "Move running processes between hosts with phauld",
		Long: `phaulctl asks the phauld on this host to migrate a running process tree
to the phauld on another host, where it keeps running.

  phaulctl migrate --pid 42 --to hostB

Set up phauld on both hosts first: systemctl enable --now phauld.socket`,
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&c.socket, "socket", api.DefaultSocket, "phauld's control socket")
	root.AddCommand(newMigrate(c), newRun(c), newNames(c), newStatus(c), newList(c), newHistory(c), newCancel(c), newResolve(c), newPKI(c))
	return root
}

// report prints err as one line on stderr (and as JSON on stdout with
// --json), with what to do about it.
func (c *cli) report(err error) {
	var un *client.UnreachableError
	msg := api.Clean(err.Error()) // it may quote the peer daemon
	switch {
	case errors.As(err, &un) && errors.Is(un.Err, syscall.EACCES):
		msg += "\nThe control socket is for root and members of group phaul: ask an administrator to add you (usermod -aG phaul USER), then log in again."
	case errors.As(err, &un):
		msg += "\nIs phauld running? Start it with 'systemctl start phauld.socket' (see 'systemctl status phauld.socket'), or pass --socket PATH."
	}
	fmt.Fprintln(c.stderr, "phaulctl: error:", msg)
	var ee *exitError
	if c.json && !(errors.As(err, &ee) && ee.printed) {
		e := api.AsError(err)
		if un != nil {
			e.Code = api.CodeUnavailable
			if errors.Is(un.Err, syscall.EACCES) {
				e.Code = api.CodePermission
			}
		}
		json.NewEncoder(c.stdout).Encode(struct {
			Error *api.Error `json:"error"`
		}{e})
	}
}

func (c *cli) printJSON(v any) error {
	enc := json.NewEncoder(c.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
