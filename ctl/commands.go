package main

import (
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/phaul/phaul/pkg/api"
)

func newMigrate(c *cli) *cobra.Command {
	var req api.MigrateRequest
	var quiet bool
	cmd := &cobra.Command{
		Use:   "migrate (--pid PID | --name NAME | --container ID) --to HOST[:PORT]",
		Short: "Move a process tree, or a runc container, to another host",
		Long: `Migrate moves the process tree rooted at PID to the phauld at HOST (port
12345 unless given) and waits until it is over. It exits 0 only if the
process was seen running on the destination; it then prints the pid it has
there.

--name NAME migrates the process 'phaulctl run --name NAME' started (or
that arrived here with that name); it keeps the name on the destination.

A process in this host's pid namespace (not the init of one of its own)
whose pids are taken on the destination is restored there into a new pid
namespace, where it keeps its pids; the line printed then names its pid
on the destination host and says so.

Until the destination has restored the process and committed, the process
stays on this host, frozen; any failure resumes it here.

A process (and every process of its tree) is part of one migration at a
time: a second migrate of it is refused at once, naming the migration that
holds it, until that one has ended (in doubt included).

Exit status:
  0  the process runs on the destination;
  1  refused or failed before anything was touched (bad arguments, no such
     process, checks, the destination unreachable), or phauld could not
     be asked;
  3  the migration failed and was rolled back: the process was seen
     running here again;
  4  not settled, or not seen:
     - in doubt: the destination was lost after the commit was asked. The
       process is held stopped here until the destination answers;
       'phaulctl list' shows the migration, and 'phaulctl resolve' settles
       it when the destination cannot;
     - phaulctl lost its phauld during the migration: phauld settles it
       when it runs again ('phaulctl history' says how);
     - after a rollback, the process was not seen running here: the
       message says what was seen (nothing holds it any more).
  5  committed: the process moved (it is gone from here), but it was not
     seen running on the destination; the message says why.

--mode picks how memory moves:
  copy     all memory moves while the process is frozen;
  lazy     post-copy: the process resumes on the destination before its
           memory has arrived; pages follow on demand and in the
           background. The source keeps its frozen copy until every page
           is across; if the link fails before, the source copy resumes
           and the destination's is discarded. Needs userfaultfd on the
           destination (CRIU's lazy_pages check) and fs.pipe-max-size of
           at least 4 MiB on the source (phauld raises it at start).
  precopy  memory is sent ahead in rounds while the process runs, then
           only the pages that changed since move while it is frozen
           (phauld compares them by content: no kernel dirty tracking
           needed). For a slow link; the destination keeps what was sent
           ahead (phauld --precopy-cap).
  auto     the best both hosts support: lazy, else precopy, else copy;
           but precopy where the link is slow for the memory: the
           source measures the link first (4 MiB), and auto takes
           precopy when it carries under 256 MiB/s and the memory would
           take over 2 s to cross it.
'phaulctl status' shows which modes this host supports.

A process on a terminal is refused before anything is frozen (the
terminal stays on this host) unless --detach-terminal journal|null|FILE
gives it a new terminal on the destination, whose output goes to the
journal there (under the process's name), nowhere, or to the end of FILE
(an absolute path there; root only, as the destination opens it as
root); what it reads from it never comes.

--container ID moves the runc container ID (under phauld's --runc-root)
instead, with runc's own checkpoint and restore: it keeps its id on the
destination, which runc there lists as running; until the commit it stays
paused here, and any failure resumes it. A root filesystem on storage
both hosts share (at the same path) is not copied; otherwise it is synced
with rsync over phaul's own link, once while the container runs and once
while it is frozen. Containers move in copy, lazy or precopy mode (auto:
copy), with their own network namespace; podman's are refused (podman
cannot keep a container frozen until the commit).

On a terminal, a progress bar shows the phase, bytes and pages moved, the
rate and an estimate; otherwise plain lines go to stderr.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			given := 0
			for _, set := range []bool{req.PID > 0, req.Container != "", req.Name != ""} {
				if set {
					given++
				}
			}
			switch {
			case given > 1:
				return fmt.Errorf("--pid, --name and --container each name what to migrate: give one")
			case given == 0:
				return fmt.Errorf("--pid, --name or --container is required: the pid of the process, its name (phaulctl run --name), or the id of the runc container, to migrate")
			}
			if req.To == "" {
				return fmt.Errorf("--to is required: the destination host, HOST or HOST:PORT")
			}
			if !slices.Contains(api.Modes, req.Mode) {
				return fmt.Errorf("--mode %q: want one of %s", req.Mode, strings.Join(api.Modes, ", "))
			}
			prog := newProgress(c.stderr)
			res, err := c.client().Migrate(cmd.Context(), req, func(ev api.Event) {
				if !c.json && !quiet {
					prog.event(ev)
				}
			})
			prog.done()
			if err != nil {
				return migrateExit(err)
			}
			var notRunning *exitError
			if res.NotRunning != "" {
				notRunning = &exitError{code: exitNotSeen, err: fmt.Errorf(
					"committed: pid %d moved to %s as pid %d, but it was not seen running there (%s); look at it there (kill -CONT if it is stopped)",
					res.SourcePID, res.Dest, res.DestPID, res.NotRunning)}
			}
			if c.json {
				if err := c.printJSON(res); err != nil {
					return err
				}
				if notRunning != nil {
					notRunning.printed = true
					return notRunning
				}
				return nil
			}
			if notRunning != nil {
				c.printFigures(res)
				return notRunning
			}
			if res.Container != "" {
				fmt.Fprintf(c.stdout, "container %s now runs on %s (its init: pid %d there)\n", res.Container, res.Dest, res.DestPID)
			} else if res.NewPidNS {
				fmt.Fprintf(c.stdout, "pid %d now runs on %s as pid %d, in a pid namespace of its own where it is still pid %d (its pids were taken there)\n",
					res.SourcePID, res.Dest, res.DestPID, res.SourcePID)
			} else {
				fmt.Fprintf(c.stdout, "pid %d now runs on %s as pid %d\n", res.SourcePID, res.Dest, res.DestPID)
			}
			c.printFigures(res)
			return nil
		},
	}
	cmd.Flags().IntVar(&req.PID, "pid", 0, "root of the process tree to migrate")
	cmd.Flags().StringVar(&req.Container, "container", "", "id of the runc container to migrate (instead of --pid)")
	cmd.Flags().StringVar(&req.Name, "name", "", "name of the process to migrate, as phaulctl run --name gave it (instead of --pid)")
	cmd.Flags().StringVar(&req.To, "to", "", "destination phauld, HOST or HOST:PORT")
	cmd.Flags().StringVar(&req.Mode, "mode", api.ModeAuto, "how memory moves: copy, lazy, precopy or auto")
	cmd.Flags().StringVar(&req.DetachTerminal, "detach-terminal", "", "for a process on a terminal (which stays here): give it a new one on the destination, its output to the `journal`, to null, or appended to a FILE there (an absolute path; root only) (without it, such a process is refused)")
	cmd.Flags().StringVar(&req.Compress, "compress", api.CompressNone, "compress the page stream and the images on the way: zstd (for a slow link; costs CPU on both hosts) or none")
	cmd.Flags().Var((*rateFlag)(&req.BWLimit), "bwlimit", "send at most RATE to the destination, to leave room for the service's own traffic: bytes a second with K, M or G (8M is 8 MiB/s), or bits with kbit, mbit or gbit (100mbit); at least 1M (default: no limit)")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "no progress display")
	cmd.Flags().BoolVar(&c.json, "json", false, "print the result (or the error) as one JSON object")
	return cmd
}

// printFigures shows a migration's mode, times, bytes and CRIU's stats.
func (c *cli) printFigures(res api.Result) {
	fmt.Fprintf(c.stdout, "mode %s: frozen %s, total %s, %s moved (session %s)\n",
		res.Mode, ms(res.FrozenMS), ms(res.TotalMS), bytesHuman(res.Bytes), res.ID)
	if res.Compress != "" {
		fmt.Fprintf(c.stdout, "  compressed with %s: pages %s as %s, images %s as %s\n", res.Compress,
			bytesHuman(res.PageBytes), bytesHuman(res.PageWireBytes), bytesHuman(res.FileBytes), bytesHuman(res.FileWireBytes))
	}
	if res.BWLimit > 0 {
		fmt.Fprintf(c.stdout, "  sent at most %s (--bwlimit)\n", rateHuman(res.BWLimit))
	}
	if res.LinkRate > 0 {
		fmt.Fprintf(c.stdout, "  the link measured %s/s before auto chose %s\n", bytesHuman(res.LinkRate), res.Mode)
	}
	if p := res.Precopy; p != nil {
		var sent uint64
		for _, r := range p.Rounds {
			sent += r.Sent
		}
		fmt.Fprintf(c.stdout, "  pre-copy (by %s): %d rounds sent %s ahead while it ran (%s); at the freeze %d of %d pages unchanged, %s crossed\n",
			p.Method, len(p.Rounds), bytesHuman(int64(sent)*4096), p.Stop, p.ReusedPages, p.FreezePages, bytesHuman(res.PageWireBytes))
	}
	if res.LazyMS > 0 {
		fmt.Fprintf(c.stdout, "  last page arrived %s after the process resumed\n", ms(res.LazyMS))
		if res.FetchedAhead > 0 {
			fmt.Fprintf(c.stdout, "  %d pages fetched ahead of lazy-pages\n", res.FetchedAhead)
		}
	}
	if d := res.Dump; d != nil && res.Mode == api.ModeLazy {
		// CRIU leaves its dump statistics at zero in lazy mode: show
		// what phauld measured and counted instead of the zeros.
		fmt.Fprintf(c.stdout, "  dump: frozen %s; pages lazy %d, with the images %d (CRIU reports no other dump figures in lazy mode)\n",
			us(d.FrozenUS), d.PagesLazy, d.PagesWritten)
	} else if d != nil {
		fmt.Fprintf(c.stdout, "  dump: freezing %s, frozen %s, memdump %s, memwrite %s; pages scanned %d, written %d, lazy %d\n",
			us(d.FreezingUS), us(d.FrozenUS), us(d.MemdumpUS), us(d.MemwriteUS), d.PagesScanned, d.PagesWritten, d.PagesLazy)
	}
	if r := res.Restore; r != nil {
		fmt.Fprintf(c.stdout, "  restore: %s; pages restored %d\n", us(r.RestoreUS), r.PagesRestored)
	}
	if r := res.Rootfs; r != nil {
		fmt.Fprintf(c.stdout, "  rootfs: synced with rsync: %s in %s while it ran, %s in %s while it was frozen\n",
			bytesHuman(r.Bytes), ms(r.MS), bytesHuman(r.FrozenBytes), ms(r.FrozenMS))
	}
	if n := res.Network; n != nil {
		fmt.Fprintf(c.stdout, "  network: namespace moved; interfaces %s, addresses %s; %d TCP connections carried, network locked %s\n",
			listOrNone(n.Interfaces), listOrNone(n.Addresses), n.TCPConnections, ms(n.LockedMS))
		for _, v := range n.Veths {
			fmt.Fprintf(c.stdout, "  network: veth %s, its host end %s on bridge %s there\n", v.Inner, v.Outer, v.Bridge)
		}
		for _, v := range n.Macvlans {
			fmt.Fprintf(c.stdout, "  network: macvlan %s, on interface %s there\n", v.Inner, v.Lower)
		}
		if n.TCPInFlight > 0 {
			fmt.Fprintf(c.stdout, "  network: %d connections not yet accepted were left behind (their clients see them fail)\n", n.TCPInFlight)
		}
	}
}

func listOrNone(l []string) string {
	if len(l) == 0 {
		return "none"
	}
	return strings.Join(l, ", ")
}

func us(v uint32) string { return ms(int64(v) / 1000) }

func newHistory(c *cli) *cobra.Command {
	var limit int
	cmd := &cobra.Command{
		Use:   "history",
		Short: "List past migrations of this host, newest first",
		Long: `History lists the migrations this host's phauld took part in, newest
first, as it keeps them across restarts (the newest 1000): session id,
direction (out: this host was the source), the pid on the source, the other
daemon, the outcome (committed: the process runs on the destination;
rolled-back: it runs on the source; in-doubt: not settled yet), the mode,
how long the process was frozen, the bytes moved, when it ended and, if it
did not commit, why. --json has every figure, CRIU's statistics included.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if limit < 0 {
				return fmt.Errorf("--limit %d: want 0 (all) or more", limit)
			}
			list, err := c.client().History(cmd.Context(), limit)
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(list)
			}
			if len(list) == 0 {
				fmt.Fprintln(c.stdout, "no migrations yet")
				return nil
			}
			tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ENDED\tSESSION\tDIR\tPID\tPEER\tOUTCOME\tMODE\tFROZEN\tBYTES\tERROR")
			for _, e := range list {
				frozen := "-"
				if e.Result.FrozenMS > 0 {
					frozen = ms(e.Result.FrozenMS)
				}
				mode := e.Result.Mode
				if mode == "" {
					mode = "-"
				}
				msg := ""
				if e.Error != nil {
					// The outcome says what became of the process: the
					// cause is what is left to say.
					msg = e.Error.Message
					if e.Error.Cause != "" {
						msg = e.Error.Cause
					}
					// A record may hold what a peer said: shown as data.
					msg = api.Clean(msg)
					if r := []rune(msg); len(r) > 100 {
						msg = string(r[:97]) + "..."
					}
				}
				pid := strconv.Itoa(e.PID)
				if e.Result.Container != "" {
					pid += " (container " + api.Clean(e.Result.Container) + ")"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Ended.Local().Format("2006-01-02 15:04:05"),
					api.Clean(e.ID[:min(8, len(e.ID))]), e.Direction, pid, api.Clean(e.Peer), e.Outcome, api.Clean(mode), frozen, bytesHuman(e.Result.Bytes), msg)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().IntVarP(&limit, "limit", "n", 20, "show the newest N (0: all that are kept)")
	cmd.Flags().BoolVar(&c.json, "json", false, "print the entries as JSON")
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
			if len(st.Modes) > 0 {
				fmt.Fprintln(c.stdout, "migration modes (as source and destination)")
				for _, m := range []string{api.ModeCopy, api.ModeLazy, api.ModePrecopy} {
					why, ok := st.Modes[m]
					switch {
					case !ok:
						continue
					case why == "":
						fmt.Fprintf(c.stdout, "  %-12s yes\n", m+":")
					default:
						fmt.Fprintf(c.stdout, "  %-12s no: %s\n", m+":", why)
					}
				}
				fmt.Fprintln(c.stdout, "  auto:        lazy where both hosts can, but precopy where the link measures under 256 MiB/s and the memory would take over 2 s to cross it")
			}
			if k := st.Containers; k != nil {
				if k.Refused != "" {
					fmt.Fprintf(c.stdout, "containers: refused: %s\n", k.Refused)
				} else {
					fmt.Fprintf(c.stdout, "containers: runc %s (%s), state root %s, arriving bundles in %s\n", k.RuncVersion, k.Runc, k.Root, k.Dir)
				}
				if len(k.SharedPaths) > 0 {
					fmt.Fprintf(c.stdout, "  shared storage (--shared-path): %s\n", strings.Join(k.SharedPaths, ", "))
				}
				if k.Podman {
					fmt.Fprintf(c.stdout, "  podman is installed: its containers are refused (podman cannot keep one frozen until the commit)\n")
				}
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
the answer: its process is held stopped here until the destination says;
a line under the table says what it waits for, and when the destination
cannot say (it has no record of the session), how an operator settles it
(phaulctl resolve).`,
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
destination decides. Root may cancel any migration; a member of group
phaul only the outgoing migrations it asked for.`,
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

func newResolve(c *cli) *cobra.Command {
	var resume, kill bool
	cmd := &cobra.Command{
		Use:   "resolve ID --resume|--kill",
		Short: "Settle a migration in doubt that the destination cannot settle",
		Long: `Resolve settles the migration in doubt whose session id starts with ID (at
least 4 hex digits; 'phaulctl list' shows it, phase in-doubt): its source
asked the destination to commit and lost it before the answer, and the
destination cannot say how it ended (it has no record of the session, or
cannot be reached). The process is held stopped on this host meanwhile.

First find out whether the process runs on the destination. Then:
  --kill    it does: kill the stopped copy here;
  --resume  it does not: resume the copy here.
The wrong choice leaves two copies running (--resume while it runs there)
or none (--kill while it does not). Resolve asks the destination once more
first; if it can be reached and answers, its answer settles the migration
and resolve is refused, saying what it answered. Only root may resolve.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if resume == kill {
				return fmt.Errorf("give exactly one of --resume (the process does not run on the destination) or --kill (it does)")
			}
			action := "resume"
			if kill {
				action = "kill"
			}
			s, err := c.client().Resolve(cmd.Context(), args[0], action)
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(s)
			}
			if kill {
				fmt.Fprintf(c.stdout, "settled session %s: the stopped copy here (pid %d) was killed\n", s.ID, s.PID)
			} else {
				fmt.Fprintf(c.stdout, "settled session %s: the process runs here again (pid %d)\n", s.ID, s.PID)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&resume, "resume", false, "resume the copy held stopped here: the process does not run on the destination")
	cmd.Flags().BoolVar(&kill, "kill", false, "kill the copy held stopped here: the process runs on the destination")
	cmd.Flags().BoolVar(&c.json, "json", false, "print the settled session as JSON")
	return cmd
}

func (c *cli) printSessions(list []api.Session) error {
	if len(list) == 0 {
		fmt.Fprintln(c.stdout, "no migrations in progress")
		return nil
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SESSION\tDIR\tPID\tPEER\tPHASE\tBYTES\tAGE")
	var notes []string
	for _, s := range list {
		pid := strconv.Itoa(s.PID)
		if s.Container != "" {
			pid += " (container " + api.Clean(s.Container) + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID, s.Direction, pid, api.Clean(s.Peer), s.Phase,
			bytesHuman(s.Bytes), (time.Duration(s.AgeMS) * time.Millisecond).Round(100*time.Millisecond))
		if s.Note != "" {
			notes = append(notes, fmt.Sprintf("%s: %s", s.ID[:min(8, len(s.ID))], api.Clean(s.Note)))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, n := range notes {
		fmt.Fprintln(c.stdout, n)
	}
	return nil
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
