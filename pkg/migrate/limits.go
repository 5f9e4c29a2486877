//go:build linux

package migrate

import (
	"fmt"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/pkg/api"
)

// Limits are what a daemon's destination sessions share: how many CRIU
// page servers may run at once, and how much disk their images and pages
// may take. A zero field is no limit. One Limits serves every session of
// a daemon; its methods are safe from any session's loop.
type Limits struct {
	// PageServers bounds the CRIU page servers (a copy migration's) and
	// lazy-pages daemons (a lazy one's) running at once.
	PageServers int
	// SessionDisk bounds what one session writes under its directory:
	// its image files and, in copy mode, its pages.
	SessionDisk int64
	// TotalDisk bounds what the sessions in flight write together.
	TotalDisk int64
	// MinFree is what must stay free on the state directory's
	// filesystem.
	MinFree FreeSpace

	mu          sync.Mutex
	pageServers int
	disk        int64
}

// FreeSpace is an amount of free space to keep: Bytes, or Percent of the
// filesystem's size, whichever is larger.
type FreeSpace struct {
	Bytes   int64
	Percent float64
}

// String is the amount as phauld's --min-free-disk takes it.
func (f FreeSpace) String() string {
	switch {
	case f.Percent > 0 && f.Bytes > 0:
		return fmt.Sprintf("%g%% or %s", f.Percent, FormatSize(f.Bytes))
	case f.Percent > 0:
		return fmt.Sprintf("%g%%", f.Percent)
	}
	return FormatSize(f.Bytes)
}

// takePageServer takes a page server's slot; release gives it back (once,
// however often it is called).
func (l *Limits) takePageServer() (release func(), err error) {
	if l == nil {
		return func() {}, nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.PageServers > 0 && l.pageServers >= l.PageServers {
		return nil, api.Errorf(api.CodeUnavailable,
			"the destination runs %d CRIU page servers already, its limit: try again later, or raise phauld --max-page-servers there", l.pageServers)
	}
	l.pageServers++
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			l.pageServers--
			l.mu.Unlock()
		})
	}, nil
}

// disk accounts for one session's writes under dir.
type disk struct {
	l       *Limits
	dir     string
	used    int64 // what this session has written, or announced
	checked int64 // used when free space was last looked at
}

// freeCheckEvery is how many bytes a session writes between two looks at
// the filesystem's free space.
const freeCheckEvery = 32 << 20

// add counts n more bytes for the session and refuses them if they break
// a limit. A refusal names the limit and the flag that raises it.
func (d *disk) add(n int64) error {
	if d.l == nil || n <= 0 {
		return nil
	}
	l := d.l
	l.mu.Lock()
	if l.SessionDisk > 0 && d.used+n > l.SessionDisk {
		l.mu.Unlock()
		return api.Errorf(api.CodeUnavailable,
			"the migration's images would take more than %s on the destination, its limit per migration: raise phauld --max-session-disk there",
			FormatSize(l.SessionDisk))
	}
	if l.TotalDisk > 0 && l.disk+n > l.TotalDisk {
		total := l.disk
		l.mu.Unlock()
		return api.Errorf(api.CodeUnavailable,
			"the migrations arriving at the destination would take more than %s together (%s already), its limit: try again later, or raise phauld --max-disk there",
			FormatSize(l.TotalDisk), FormatSize(total))
	}
	l.disk += n
	d.used += n
	l.mu.Unlock()
	if d.used-d.checked >= freeCheckEvery || d.checked == 0 {
		d.checked = d.used
		return d.checkFree(0)
	}
	return nil
}

// checkFree refuses if the filesystem of the session's directory would
// have less than MinFree free once more bytes are written there.
func (d *disk) checkFree(more int64) error {
	if d.l == nil || (d.l.MinFree.Bytes <= 0 && d.l.MinFree.Percent <= 0) {
		return nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(d.dir, &st); err != nil {
		return fmt.Errorf("free space of %s: %w", d.dir, err)
	}
	size := int64(st.Blocks) * int64(st.Bsize)
	free := int64(st.Bavail)*int64(st.Bsize) - more
	keep := max(d.l.MinFree.Bytes, int64(float64(size)*d.l.MinFree.Percent/100))
	if free < keep {
		return api.Errorf(api.CodeUnavailable,
			"the destination's state directory has %s free, and phauld keeps at least %s free there: free some space (phaulctl history lists failed migrations, whose images stay for --keep-failed), or lower phauld --min-free-disk there",
			FormatSize(max(free, 0)), FormatSize(keep))
	}
	return nil
}

// release gives back what the session counted in the total (its files
// stay until their directory goes; the total is of sessions in flight).
func (d *disk) release() {
	if d.l == nil || d.used == 0 {
		return
	}
	d.l.mu.Lock()
	d.l.disk -= d.used
	d.l.mu.Unlock()
	d.used = 0
}

// FormatSize writes n bytes as phauld's size flags take them (KiB, MiB,
// GiB, TiB: powers of 1024).
func FormatSize(n int64) string {
	const unit = 1024
	sizes := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	f, i := float64(n), 0
	for f >= unit && i < len(sizes)-1 {
		f /= unit
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	return fmt.Sprintf("%.4g %s", f, sizes[i])
}
