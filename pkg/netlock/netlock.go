//go:build linux

// Package netlock removes the network-lock tables CRIU leaves behind.
//
// To lock a process's network while it is dumped, CRIU adds an nftables
// table named "CRIU-<run id>" (family inet) and deletes it when it resumes
// the process; after a successful dump, or a crash, the table stays. A
// leftover table has made later CRIU runs hang for minutes. phaul asks
// CRIU not to lock a host's network (a tree in its host's namespace is
// dumped with network_lock SKIP), so its own runs leave none there; a tree
// in a namespace of its own is locked inside that namespace, and every
// resume lifts that lock (migrate.ResumeTree, recovery included). phauld
// sweeps the leftovers of other CRIU runs on its host's namespace, but
// only when no CRIU process is running, since a running one may hold its
// table on purpose.
package netlock

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/nftables"

	"github.com/phaul/phaul/pkg/proc"
)

// Prefix starts the name of every table CRIU creates for its network lock.
const Prefix = "CRIU-"

// Clean deletes CRIU's leftover network-lock tables in the network
// namespace open at netns (-1: this process's), unless a CRIU process is
// running on this host. It returns the names of the tables it deleted.
func Clean(netns int) ([]string, error) {
	if pid := criuRunning(); pid != 0 {
		return nil, nil
	}
	return remove(netns)
}

func remove(netns int) ([]string, error) {
	var opts []nftables.ConnOption
	if netns >= 0 {
		opts = append(opts, nftables.WithNetNSFd(netns))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("list nftables tables: %w", err)
	}
	var names []string
	for _, t := range tables {
		if strings.HasPrefix(t.Name, Prefix) {
			c.DelTable(t)
			names = append(names, t.Name)
		}
	}
	if len(names) == 0 {
		return nil, nil
	}
	if err := c.Flush(); err != nil {
		return nil, fmt.Errorf("delete nftables tables %v: %w", names, err)
	}
	return names, nil
}

// criuRunning returns the pid of a running CRIU process (see proc.IsCRIU),
// or 0.
func criuRunning() int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	for _, e := range ents {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if proc.IsCRIU(b) {
			var pid int
			fmt.Sscan(e.Name(), &pid)
			return pid
		}
	}
	return 0
}
