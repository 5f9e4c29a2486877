package main

import (
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/phaul/phaul/pkg/api"
)

func newMigrate(c *cli) *cobra.Command {
	var req api.MigrateRequest
	cmd := &cobra.Command{
		Use:   "migrate --pid PID --to HOST[:PORT]",
		Short: "Move a process tree to another host",
		Long: `Migrate moves the process tree rooted at PID to the phauld at HOST (port
12345 unless given) and waits until it is over. It exits 0 only if the
process runs on the destination; it then prints the pid it has there.

Until the destination has restored the process and committed, the process
stays on this host, frozen; any failure resumes it here.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if req.PID <= 0 {
				return fmt.Errorf("--pid is required: the pid of the process to migrate")
			}
			if req.To == "" {
				return fmt.Errorf("--to is required: the destination host, HOST or HOST:PORT")
			}
			last := ""
			res, err := c.client().Migrate(cmd.Context(), req, func(ev api.Event) {
				if c.json || ev.Phase == last {
					return
				}
				last = ev.Phase
				fmt.Fprintf(c.stderr, "%s...\n", ev.Phase)
			})
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(res)
			}
			fmt.Fprintf(c.stdout, "pid %d now runs on %s as pid %d\n", res.SourcePID, res.Dest, res.DestPID)
			fmt.Fprintf(c.stdout, "frozen %s, total %s, %s moved (session %s)\n",
				ms(res.FrozenMS), ms(res.TotalMS), bytesHuman(res.Bytes), res.ID)
			return nil
		},
	}
	cmd.Flags().IntVar(&req.PID, "pid", 0, "root of the process tree to migrate")
	cmd.Flags().StringVar(&req.To, "to", "", "destination phauld, HOST or HOST:PORT")
	cmd.Flags().BoolVar(&c.json, "json", false, "print the result (or the error) as one JSON object")
	return cmd
}

func newStatus(c *cli) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the daemon, its CRIU and the migrations in progress",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := c.client().Status(cmd.Context())
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(st)
			}
			fmt.Fprintf(c.stdout, "phauld %s (pid %d)\n", st.Version, st.PID)
			fmt.Fprintf(c.stdout, "  migrations on: %s\n", strings.Join(st.Listen, ", "))
			switch st.Security {
			case api.SecurityTLS:
				exp := ""
				if st.TLSExpires != nil {
					exp = ", certificate expires " + st.TLSExpires.Format("2006-01-02")
				}
				fmt.Fprintf(c.stdout, "  security:      mutual TLS as %s%s\n", strings.Join(st.TLSNames, ", "), exp)
			case api.SecurityInsecure:
				fmt.Fprintln(c.stdout, "  security:      INSECURE: plain TCP, no authentication, no encryption (--insecure)")
			default:
				fmt.Fprintf(c.stdout, "  security:      migrations DISABLED: %s\n", st.Disabled)
			}
			fmt.Fprintf(c.stdout, "  control:       %s\n", st.Control)
			fmt.Fprintf(c.stdout, "  state:         %s\n", st.StateDir)
			fmt.Fprintf(c.stdout, "CRIU %s (%s)\n", st.CRIU.Version, st.CRIU.Path)
			names := make([]string, 0, len(st.CRIU.Features))
			for n := range st.CRIU.Features {
				names = append(names, n)
			}
			sort.Strings(names)
			for _, n := range names {
				v := "no"
				if st.CRIU.Features[n] {
					v = "yes"
				}
				fmt.Fprintf(c.stdout, "  %-12s %s\n", n+":", v)
			}
			return c.printSessions(st.Sessions)
		},
	}
	cmd.Flags().BoolVar(&c.json, "json", false, "print the status as JSON")
	return cmd
}

func newList(c *cli) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the migrations in progress on this host",
		Long: `List shows each migration this host's phauld is part of: its session id,
its direction (out: leaving this host; in: arriving), the process's pid on
the source, the other daemon, the phase, the bytes moved and its age.
A session "in-doubt" asked the destination to commit and lost it before
the answer: its process is held stopped here until the destination says.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			list, err := c.client().Sessions(cmd.Context())
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(list)
			}
			return c.printSessions(list)
		},
	}
	cmd.Flags().BoolVar(&c.json, "json", false, "print the list as JSON")
	return cmd
}

func newCancel(c *cli) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cancel ID",
		Short: "Stop a migration in flight; the process resumes on the source",
		Long: `Cancel stops the migration whose session id starts with ID (at least 4
hex digits; see phaulctl list), on either daemon. Before the commit, the
process resumes on the source, as it was. Once the source has asked the
destination to commit, cancel is refused: the migration ends as the
destination decides.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := c.client().Cancel(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(s)
			}
			fmt.Fprintf(c.stdout, "canceled session %s (pid %d): the process resumes on the source\n", s.ID, s.PID)
			return nil
		},
	}
	cmd.Flags().BoolVar(&c.json, "json", false, "print the canceled session as JSON")
	return cmd
}

func (c *cli) printSessions(list []api.Session) error {
	if len(list) == 0 {
		fmt.Fprintln(c.stdout, "no migrations in progress")
		return nil
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SESSION\tDIR\tPID\tPEER\tPHASE\tBYTES\tAGE")
	for _, s := range list {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\n", s.ID, s.Direction, s.PID, s.Peer, s.Phase,
			bytesHuman(s.Bytes), (time.Duration(s.AgeMS) * time.Millisecond).Round(100*time.Millisecond))
	}
	return tw.Flush()
}

func ms(v int64) string {
	if v < 1000 {
		return fmt.Sprintf("%d ms", v)
	}
	return fmt.Sprintf("%.2f s", float64(v)/1000)
}

func bytesHuman(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
