//go:build linux

package migrate

import (
	"os"
	"time"

	"github.com/phaul/phaul/pkg/criu"
	"github.com/phaul/phaul/pkg/pidns"
)

// CRIU is what the state machines ask of CRIU: pkg/criu's Client gives it
// (through FromClient), and the unit tier's fake (package migratetest)
// does too. Each request is one Op the session's loop drives.
type CRIU interface {
	StartDump(criu.Options) (Op, error)
	StartPageServer(criu.Options) (Op, error)
	StartRestore(criu.Options) (Op, error)
	StartCPUInfoCheck(criu.Options) (Op, error)
	StartLazyPages(dir string, ps *os.File) (LazyPages, error)
	// Stopped lists the tasks of the dump in dir that were stopped by a
	// job-control signal when CRIU froze them, by their pid in their own
	// pid namespace (see criu.StoppedTasks).
	Stopped(dir string) (map[int]bool, error)
	// Taken lists the task ids of ids that a restore here could not
	// give a tree, being in use (see pidns.Taken); the tree is then
	// restored into a new pid namespace.
	Taken(ids []int) []int
}

// Op is one CRIU request in progress (see criu.Op).
type Op interface {
	// Fd becomes readable when CRIU has sent an event.
	Fd() int
	// Next reads one event without blocking (criu.ErrAgain: none yet).
	Next() (criu.Event, error)
	// Reply answers the notification Next last returned.
	Reply(ok bool) error
	// WaitPID asks a kept-open page server request to wait for pid.
	WaitPID(pid int) error
	// Close closes the RPC socket: CRIU ends the request on its own.
	Close() error
	// Abandon closes the socket and makes sure CRIU is gone, waiting at
	// most grace before it kills it; it reports whether it had to.
	Abandon(grace time.Duration) bool
	// LogPath is CRIU's log file for the request.
	LogPath() string
	// Pid is the request's CRIU process.
	Pid() int
}

// LazyPages is a running `criu lazy-pages` daemon (see criu.LazyPages).
type LazyPages interface {
	StatusFd() int
	Ready() bool
	ExitFd() int
	Result() error
	Kill()
	Close()
	Transferred() (copied, total uint64, ok bool)
}

// FromClient is the CRIU of c.
func FromClient(c *criu.Client) CRIU { return clientCRIU{c} }

type clientCRIU struct{ c *criu.Client }

func (c clientCRIU) StartDump(o criu.Options) (Op, error)       { return op(c.c.StartDump(o)) }
func (c clientCRIU) StartPageServer(o criu.Options) (Op, error) { return op(c.c.StartPageServer(o)) }
func (c clientCRIU) StartRestore(o criu.Options) (Op, error)    { return op(c.c.StartRestore(o)) }
func (c clientCRIU) StartCPUInfoCheck(o criu.Options) (Op, error) {
	return op(c.c.StartCPUInfoCheck(o))
}

func (c clientCRIU) StartLazyPages(dir string, ps *os.File) (LazyPages, error) {
	lp, err := c.c.StartLazyPages(dir, ps)
	if err != nil {
		return nil, err
	}
	return lp, nil
}

func (c clientCRIU) Stopped(dir string) (map[int]bool, error) { return criu.StoppedTasks(dir) }

func (c clientCRIU) Taken(ids []int) []int { return pidns.Taken(ids) }

// op keeps a nil *criu.Op from becoming a non-nil Op.
func op(o *criu.Op, err error) (Op, error) {
	if err != nil {
		return nil, err
	}
	return o, nil
}
