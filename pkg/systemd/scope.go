package systemd

import (
	"context"
	"fmt"
	"sync"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	godbus "github.com/godbus/dbus/v5"
)

// ScopeSlice is the slice migrated processes' scopes go in: `systemctl
// status phaul.slice` lists them.
const ScopeSlice = "phaul.slice"

// Placer moves processes into transient scopes of their own, over one
// connection to systemd's private socket that it keeps (and makes again
// after a failure): a new connection per scope costs a round of
// authentication on the path of a migration's pause.
type Placer struct {
	mu   sync.Mutex
	conn *sddbus.Conn
}

// NewPlacer returns a placer; it connects at the first Place.
func NewPlacer() *Placer { return &Placer{} }

// Place moves pids into a new transient scope unit, name (ending in
// .scope), in ScopeSlice: they then live and die on their own, not with
// the unit that started them. It talks to systemd on its private socket,
// which needs no D-Bus daemon (and root). ctx bounds the whole call.
func (p *Placer) Place(ctx context.Context, name, description string, pids []int) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	err := p.place(ctx, name, description, pids)
	if err != nil && p.conn != nil && !p.conn.Connected() {
		// The connection broke (systemd restarted): once more, anew.
		p.conn.Close()
		p.conn = nil
		err = p.place(ctx, name, description, pids)
	}
	return err
}

func (p *Placer) place(ctx context.Context, name, description string, pids []int) error {
	if p.conn == nil {
		conn, err := sddbus.NewSystemdConnectionContext(ctx)
		if err != nil {
			return fmt.Errorf("connect to systemd: %w", err)
		}
		p.conn = conn
	}
	upids := make([]uint32, len(pids))
	for i, pid := range pids {
		upids[i] = uint32(pid)
	}
	props := []sddbus.Property{
		sddbus.PropDescription(description),
		sddbus.PropSlice(ScopeSlice),
		sddbus.PropPids(upids...),
		{Name: "CollectMode", Value: godbus.MakeVariant("inactive-or-failed")},
	}
	done := make(chan string, 1)
	if _, err := p.conn.StartTransientUnitContext(ctx, name, "fail", props, done); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	select {
	case result := <-done:
		if result != "done" {
			return fmt.Errorf("start %s: job %s", name, result)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("start %s: %w", name, ctx.Err())
	}
}

// Close closes the connection to systemd.
func (p *Placer) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conn != nil {
		p.conn.Close()
		p.conn = nil
	}
}
