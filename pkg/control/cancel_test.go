//go:build linux

package control

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/phaul/phaul/pkg/api"
)

// TestMemberCancelsItsOwn: a member may cancel the outgoing migrations it
// asked for, whoever owns the tree now (frozen by CRIU, or turned root's
// by a setuid program: here pid 1, root's), and no one else's, nor an
// incoming one.
func TestMemberCancelsItsOwn(t *testing.T) {
	const member, other = 54322, 54323
	uid := func(u int) *int { return &u }
	svc := &fakeService{sessions: []api.Session{
		{ID: "aaaa1111", Direction: api.DirectionOut, PID: 1, Phase: "dump", CallerUID: uid(member)},
		{ID: "bbbb2222", Direction: api.DirectionOut, PID: os.Getpid(), Phase: "dump", CallerUID: uid(other)},
		{ID: "cccc3333", Direction: api.DirectionOut, PID: os.Getpid(), Phase: "dump", CallerUID: uid(0)},
		{ID: "dddd4444", Direction: api.DirectionIn, PID: 7, Phase: "restore"},
		{ID: "eeee5555", Direction: api.DirectionOut, PID: 1, Phase: "in-doubt"},
	}}
	s := New(svc, Policy{GroupID: 4242, Group: "phaul"}, zaptest.NewLogger(t))
	for _, c := range []struct {
		uid  int
		id   string
		want int
		says string
	}{
		{member, "aaaa", http.StatusOK, ""},
		{member, "bbbb", http.StatusForbidden, "asked for by uid 54323"},
		{member, "cccc", http.StatusForbidden, "asked for by uid 0"},
		{member, "dddd", http.StatusForbidden, "incoming"},
		{member, "eeee", http.StatusForbidden, "only root"},
		{other, "aaaa", http.StatusForbidden, "asked for by uid 54322"},
		{0, "aaaa", http.StatusOK, ""},
		{0, "dddd", http.StatusOK, ""},
	} {
		svc.canceled = ""
		r := httptest.NewRequest(http.MethodPost, "/v1/sessions/"+c.id+"/cancel", nil)
		r = r.WithContext(context.WithValue(r.Context(), callerKey{}, api.Caller{UID: c.uid, GID: 4242, PID: os.Getpid()}))
		w := httptest.NewRecorder()
		s.http.Handler.ServeHTTP(w, r)
		if w.Code != c.want || !strings.Contains(w.Body.String(), c.says) {
			t.Errorf("uid %d cancels %s: %d %s; want %d, saying %q", c.uid, c.id, w.Code, w.Body, c.want, c.says)
		}
		if done := svc.canceled == c.id; done != (c.want == http.StatusOK) {
			t.Errorf("uid %d cancels %s: the service was asked: %v", c.uid, c.id, done)
		}
	}
}
