package main

import (
	"fmt"
	"os"
	"path/filepath"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/phaul/phaul/pkg/api"
)

func newRun(c *cli) *cobra.Command {
	var req api.RunRequest
	cmd := &cobra.Command{
		Use:   "run [--name NAME] [--net BRIDGE[,ADDR/PREFIX]] [--log FILE | --journal] -- CMD [ARGS]",
		Short: "Start a program so that it can migrate",
		Long: `Run asks phauld to start CMD so that phaul can move it, and prints its pid:

  - it is the init (pid 1) of a pid namespace of its own, in a session of
    its own, with no terminal: nothing ties it to this host's pids or to
    the shell that started it;
  - its stdin is /dev/null; its stdout and stderr go to FILE (--log,
    appended, opened with your rights), to the journal (--journal, under
    NAME or the program's name), or nowhere;
  - it runs as you, in this directory, with this environment;
  - where systemd runs, it is placed in a scope of its own under
    phaul.slice (phaul-run-NAME.scope, or phaul-run-PID.scope), so that
    stopping phauld never stops it;
  - with --net (root only) it gets a network namespace of its own, with a
    veth whose end in it is eth0, on BRIDGE, with ADDR/PREFIX, and a
    default route through the bridge's address in that subnet if it has
    one: a service whose clients keep their connections when it moves.

Migrate it with 'phaulctl migrate --pid PID' or, given --name, with
'phaulctl migrate --name NAME'; the name goes with it. 'phaulctl names'
lists the names known here.

Exit status: 0 started (CMD runs); 1 refused or failed (CMD not found, the
bridge missing, the name taken, ...), nothing left running.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if req.Log != "" && req.Journal {
				return fmt.Errorf("--log and --journal: choose one")
			}
			dir, err := os.Getwd()
			if err != nil {
				return err
			}
			if req.Log != "" && !filepath.IsAbs(req.Log) {
				req.Log = filepath.Join(dir, req.Log)
			}
			req.Argv, req.Env, req.Dir = args, os.Environ(), dir
			res, err := c.client().Run(cmd.Context(), req)
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(res)
			}
			fmt.Fprintf(c.stdout, "%d\n", res.PID)
			if res.Scope != "" {
				fmt.Fprintf(c.stderr, "started pid %d in %s; migrate it with phaulctl migrate --pid %d\n", res.PID, res.Scope, res.PID)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&req.Name, "name", "", "a `NAME` to migrate it by (phaulctl migrate --name NAME)")
	cmd.Flags().StringVar(&req.Net, "net", "", "a network namespace of its own: eth0 on `BRIDGE[,ADDR/PREFIX]` (root only)")
	cmd.Flags().StringVar(&req.Log, "log", "", "append its stdout and stderr to `FILE`")
	cmd.Flags().BoolVar(&req.Journal, "journal", false, "send its stdout and stderr to the journal")
	cmd.Flags().BoolVar(&c.json, "json", false, "print the started program as JSON")
	// Flags after CMD are CMD's, with or without "--".
	cmd.Flags().SetInterspersed(false)
	return cmd
}

func newNames(c *cli) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "names",
		Short: "List the processes known by a name on this host",
		Long: `Names lists the processes 'phaulctl run --name' started here, or that
arrived here with a name, and their pids.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			list, err := c.client().Names(cmd.Context())
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(list)
			}
			w := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tPID")
			for _, n := range list {
				fmt.Fprintf(w, "%s\t%d\n", n.Name, n.PID)
			}
			return w.Flush()
		},
	}
	cmd.Flags().BoolVar(&c.json, "json", false, "print the list as JSON")
	return cmd
}
