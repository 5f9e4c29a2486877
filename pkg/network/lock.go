//go:build linux

package network

import (
	"fmt"
	"strings"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/netlock"
	"github.com/phaul/phaul/pkg/proc"
)

// LockTable is the nftables table (family inet) with which phaul holds a
// restored namespace's network until its tree runs: CRIU lifts its own
// lock when its restore ends, and a copy that waits for the commit must
// not take traffic meanwhile (what it would take, a rollback would lose).
const LockTable = "phaul-lock"

// Lock drops every packet in and out of the network namespace of pid,
// until Unlock. It returns nil for a process in this host's namespace,
// which phaul never locks.
func Lock(pid int) error {
	return inTreeNS(pid, func(c *nftables.Conn) error {
		t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: LockTable})
		drop := nftables.ChainPolicyDrop
		for _, hook := range []*nftables.ChainHook{nftables.ChainHookInput, nftables.ChainHookOutput} {
			c.AddChain(&nftables.Chain{
				Name:  map[*nftables.ChainHook]string{nftables.ChainHookInput: "input", nftables.ChainHookOutput: "output"}[hook],
				Table: t, Type: nftables.ChainTypeFilter, Hooknum: hook,
				Priority: nftables.ChainPriorityFilter, Policy: &drop,
			})
		}
		if err := c.Flush(); err != nil {
			return fmt.Errorf("lock the network of pid %d: %w", pid, err)
		}
		return nil
	})
}

// Unlocked says what Unlock did.
type Unlocked struct {
	// Repaired is how many TCP sockets it took out of repair mode;
	// Tables the lock tables it removed.
	Repaired int
	Tables   []string
}

// Unlock lets a stopped tree that CRIU dumped (pids, its root first) use
// its network again, as CRIU does itself when a dump fails: its TCP
// sockets leave repair mode (the kernel then probes each peer, which
// resends what the lock dropped), and the lock tables in its namespace,
// CRIU's and phaul's, go. Nothing is done for a tree in this host's
// namespace: CRIU locks none there. It is safe to call on a tree that
// holds neither.
func Unlock(pids []int) (Unlocked, error) {
	var u Unlocked
	if len(pids) == 0 {
		return u, nil
	}
	err := proc.EachSocket(pids, func(s proc.Socket) error {
		if !isTCP(s.FD) {
			return nil
		}
		on, err := unix.GetsockoptInt(s.FD, unix.IPPROTO_TCP, unix.TCP_REPAIR)
		if err != nil || on == 0 {
			return nil
		}
		if err := unix.SetsockoptInt(s.FD, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF); err != nil {
			return fmt.Errorf("take pid %d's TCP socket %d out of repair mode: %w", s.PID, s.Target, err)
		}
		u.Repaired++
		return nil
	})
	if err != nil {
		return u, err
	}
	err = inTreeNS(pids[0], func(c *nftables.Conn) error {
		tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
		if err != nil {
			return fmt.Errorf("list the lock tables of pid %d's namespace: %w", pids[0], err)
		}
		for _, t := range tables {
			if t.Name == LockTable || strings.HasPrefix(t.Name, netlock.Prefix) {
				c.DelTable(t)
				u.Tables = append(u.Tables, t.Name)
			}
		}
		if len(u.Tables) == 0 {
			return nil
		}
		if err := c.Flush(); err != nil {
			return fmt.Errorf("remove the lock tables %v of pid %d's namespace: %w", u.Tables, pids[0], err)
		}
		return nil
	})
	return u, err
}

// inTreeNS runs fn with an nftables connection in the network namespace
// of pid, if that is not this host's.
func inTreeNS(pid int, fn func(*nftables.Conn) error) error {
	self, err := nsInode("self")
	if err != nil {
		return err
	}
	ino, err := nsInode(fmt.Sprint(pid))
	if err != nil || ino == self {
		return err
	}
	h, err := netns.GetFromPid(pid)
	if err != nil {
		return fmt.Errorf("open the network namespace of pid %d: %w", pid, err)
	}
	defer h.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(h)))
	if err != nil {
		return fmt.Errorf("nftables in the namespace of pid %d: %w", pid, err)
	}
	return fn(c)
}
