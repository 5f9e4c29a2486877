//go:build linux

package control

import (
	"fmt"

	"github.com/phaul/phaul/pkg/api"
	"github.com/phaul/phaul/pkg/proc"
)

// Policy says who may do what through the control socket: root anything;
// a member of the control group (phaul) only what concerns processes it
// owns; anyone else nothing. The socket's own permissions (0660, root:phaul)
// keep others out before they can ask; Policy holds even if they reach it.
type Policy struct {
	// GroupID is the control group's gid; -1 lets only root in.
	GroupID int
	// Group is its name, for messages.
	Group string
}

// member reports whether the caller is root or in the control group, by
// the caller process's own credentials (primary and supplementary
// groups, from /proc).
func (p Policy) member(c api.Caller) bool {
	if c.UID == 0 {
		return true
	}
	if p.GroupID < 0 {
		return false
	}
	if c.GID == p.GroupID {
		return true
	}
	groups, err := proc.Groups(c.PID)
	if err != nil {
		return false
	}
	for _, g := range groups {
		if g == p.GroupID {
			return true
		}
	}
	return false
}

// CanUse allows root and members of the control group.
func (p Policy) CanUse(c api.Caller) error {
	if p.member(c) {
		return nil
	}
	return api.Errorf(api.CodePermission,
		"uid %d may not use phauld: only root and members of group %q may (an administrator can add you: usermod -aG %s USER)",
		c.UID, p.Group, p.Group)
}

// CanMigrate allows root to migrate any process, and a member of the
// control group to migrate a tree of processes that all belong to it. It
// is the early answer the control API gives; the daemon asks
// CanMigrateTree again on the identity it records.
func (p Policy) CanMigrate(c api.Caller, pid int) error {
	if err := p.CanUse(c); err != nil {
		return err
	}
	if c.UID == 0 {
		return nil
	}
	root, err := proc.Stat(pid)
	if err != nil {
		// Not found: let the daemon say so, with its own message.
		return nil
	}
	pids, err := proc.Tree(pid)
	if err != nil {
		return nil
	}
	return p.CanMigrateTree(c, root, pids)
}

// CanMigrateTree is CanMigrate for the tree rooted at root (as it was
// identified: pid and start time) whose processes are pids: a process
// that is not root any more (its pid reused) is refused, so an answer
// about one process is never taken for another.
func (p Policy) CanMigrateTree(c api.Caller, root proc.Info, pids []int) error {
	if err := p.CanUse(c); err != nil {
		return err
	}
	if c.UID == 0 {
		return nil
	}
	if cur, err := proc.Stat(root.PID); err != nil || cur.StartTime != root.StartTime {
		return api.Errorf(api.CodeNotFound, "pid %d exited while it was checked", root.PID)
	}
	for _, q := range pids {
		info, err := proc.Stat(q)
		if err != nil {
			continue
		}
		if info.UID != c.UID {
			return api.Errorf(api.CodePermission,
				"uid %d may migrate only its own processes, and pid %d belongs to uid %d", c.UID, q, info.UID)
		}
	}
	return nil
}

// CanMigrateFrozen is the check made again at the freeze, before anything
// of the tree leaves this host (see migrate.SourceConfig.CheckFrozen):
// root may migrate anything; for anyone else every task of the frozen
// tree rooted at root, threads included, must run as the caller, by its
// real, effective, saved and filesystem uids, and not be held undumpable
// by the kernel. A tree that ran a setuid program since the request is
// refused here, naming the task and its owner.
func (p Policy) CanMigrateFrozen(c api.Caller, root proc.Info) error {
	if c.UID == 0 {
		return nil
	}
	if cur, err := proc.Stat(root.PID); err != nil || cur.StartTime != root.StartTime {
		return api.Errorf(api.CodeNotFound, "pid %d exited before the freeze", root.PID)
	}
	pids, err := proc.Tree(root.PID)
	if err != nil {
		return api.Errorf(api.CodeNotFound, "pid %d exited before the freeze", root.PID)
	}
	tasks, err := proc.TaskCreds(pids)
	if err != nil {
		return api.Errorf(api.CodePermission, "cannot tell who the frozen tree's tasks belong to: %v", err)
	}
	return ownedBy(c, tasks)
}

// ownedBy refuses tasks unless every one runs as c's uid, and with
// groups c has (its gid or a supplementary one): a task of a setgid
// program holds what its group may read.
func ownedBy(c api.Caller, tasks []proc.TaskCred) error {
	uid := c.UID
	if len(tasks) == 0 {
		return api.Errorf(api.CodeNotFound, "the frozen tree has no tasks")
	}
	groups := map[int]bool{c.GID: true}
	for _, g := range c.Groups {
		groups[g] = true
	}
	kinds := [...]string{"real", "effective", "saved", "filesystem"}
	for _, t := range tasks {
		who := ""
		for i, id := range t.UIDs {
			if id != uid {
				who = fmt.Sprintf("its %s uid is %d", kinds[i], id)
				break
			}
		}
		if who == "" && t.Owner != uid {
			who = fmt.Sprintf("the kernel gives it to uid %d (it ran a setuid program)", t.Owner)
		}
		if who == "" {
			for i, id := range t.GIDs {
				if !groups[id] {
					task := fmt.Sprintf("pid %d", t.PID)
					if t.TID != t.PID {
						task = fmt.Sprintf("thread %d of pid %d", t.TID, t.PID)
					}
					return api.Errorf(api.CodePermission,
						"at the freeze, %s runs with group %d (its %s gid), which uid %d who asked is not in: a member may migrate only processes of its own uid and groups, and the tree changed since the request (a setgid program?)",
						task, id, kinds[i], uid)
				}
			}
			continue
		}
		task := fmt.Sprintf("pid %d", t.PID)
		if t.TID != t.PID {
			task = fmt.Sprintf("thread %d of pid %d", t.TID, t.PID)
		}
		return api.Errorf(api.CodePermission,
			"at the freeze, %s is owned by uid %d, not by uid %d who asked (%s): uid %d may migrate only its own processes, and the tree changed since the request (a setuid program?)",
			task, ownerOf(t, uid), uid, who, uid)
	}
	return nil
}

// ownerOf is the first id of t that is not uid: who else the task is.
func ownerOf(t proc.TaskCred, uid int) int {
	for _, id := range t.UIDs {
		if id != uid {
			return id
		}
	}
	return t.Owner
}
