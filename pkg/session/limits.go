//go:build linux

package session

import (
	"sync"

	"github.com/phaul/phaul/pkg/api"
)

// Default limits on sessions in flight (phauld --max-incoming,
// --max-outgoing).
const (
	DefaultMaxIncoming = 16
	DefaultMaxOutgoing = 16
)

// admitOut takes a slot for an outgoing migration, or refuses it with the
// limit and the flag that raises it. release gives the slot back (once).
func (m *Manager) admitOut() (release func(), err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if max := m.cfg.MaxOutgoing; max > 0 && m.nOutgoing >= max {
		return nil, api.Errorf(api.CodeUnavailable,
			"this host runs %d outgoing migrations already, its limit: wait for one to end, or raise phauld --max-outgoing", m.nOutgoing)
	}
	m.nOutgoing++
	return m.releaser(&m.nOutgoing), nil
}

// admitIn takes a slot for an incoming migration. At the limit it returns
// the refusal the session gives the source at its Prepare (so that the
// source sees why), and a release that does nothing.
func (m *Manager) admitIn() (release func(), refuse error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if max := m.cfg.MaxIncoming; max > 0 && m.nIncoming >= max {
		return func() {}, api.Errorf(api.CodeUnavailable,
			"the destination runs %d incoming migrations already, its limit: try again later, or raise phauld --max-incoming there", m.nIncoming)
	}
	m.nIncoming++
	return m.releaser(&m.nIncoming), nil
}

func (m *Manager) releaser(n *int) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			m.mu.Lock()
			*n--
			m.mu.Unlock()
		})
	}
}
