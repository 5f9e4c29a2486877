//go:build linux

package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/api"
)

// controlEndpoints are the requests the fuzzer sends: every one the
// server decodes a body or a parameter of, and the plain ones.
var controlEndpoints = []struct{ method, path string }{
	{http.MethodPost, "/v1/migrate"},
	{http.MethodPost, "/v1/run"},
	{http.MethodPost, "/v1/sessions/{id}/resolve"},
	{http.MethodPost, "/v1/sessions/{id}/cancel"},
	{http.MethodGet, "/v1/history?limit={id}"},
	{http.MethodGet, "/v1/status"},
	{http.MethodGet, "/v1/sessions"},
	{http.MethodGet, "/v1/names"},
	{http.MethodPost, "/v1/{id}"},
}

// FuzzControlRequest drives the control API's real handler (routing,
// policy, body decoding) with arbitrary bodies, ids and callers, against a
// fake service: it must never panic, and must always answer with JSON, an
// error object with a code and a message, or, for a migration that
// started, a stream of JSON events ending in a result or an error.
func FuzzControlRequest(f *testing.F) {
	for i, body := range []string{
		`{"pid": 42, "to": "hostB"}`,
		`{"pid": 42, "to": "hostB", "mode": "lazy", "detach_terminal": "journal"}`,
		`{"argv": ["sleep", "1"], "dir": "/", "name": "x", "env": ["A=b"]}`,
		`{"action": "kill"}`,
		``, `{`, `null`, `[]`, `{"pid": "x"}`, `{"pid": 1e400}`, `{"pid": 1, "evil": true}`,
		`{"pid": 1}{"pid": 2}`, "\xff\xfe", `{"argv": [null]}`,
	} {
		f.Add(uint8(i), "abcd1234", []byte(body), uint8(i))
	}
	svc := &fakeService{}
	s := New(svc, Policy{GroupID: 4242, Group: "phaul"}, zap.NewNop())
	callers := []api.Caller{
		{UID: 0, GID: 0, PID: os.Getpid()},
		{UID: 54322, GID: 4242, PID: os.Getpid()},  // a member
		{UID: 54321, GID: 54321, PID: os.Getpid()}, // an outsider
		{UID: -1, GID: -1},                         // unknown credentials
	}
	f.Fuzz(func(t *testing.T, which uint8, id string, body []byte, who uint8) {
		e := controlEndpoints[int(which)%len(controlEndpoints)]
		target := strings.Replace(e.path, "{id}", url.PathEscape(id), 1)
		r := httptest.NewRequest(e.method, "http://phauld"+target, bytes.NewReader(body))
		r = r.WithContext(context.WithValue(r.Context(), callerKey{}, callers[int(who)%len(callers)]))
		w := httptest.NewRecorder()
		s.http.Handler.ServeHTTP(w, r)
		checkAnswer(t, w)
	})
}

// checkAnswer fails unless w holds a well-formed answer.
func checkAnswer(t *testing.T, w *httptest.ResponseRecorder) {
	t.Helper()
	if w.Code < 200 || w.Code > 599 {
		t.Fatalf("status %d", w.Code)
	}
	if w.Header().Get("Content-Type") == "application/x-ndjson" {
		// A migration's stream: events, the last a result or an error.
		var last api.Event
		n := 0
		sc := bufio.NewScanner(bytes.NewReader(w.Body.Bytes()))
		for sc.Scan() {
			if err := json.Unmarshal(sc.Bytes(), &last); err != nil {
				t.Fatalf("stream line %q: %v", sc.Bytes(), err)
			}
			n++
		}
		if n == 0 || (last.Event != api.EventResult && last.Event != api.EventError) ||
			(last.Event == api.EventError && (last.Error == nil || last.Error.Code == "" || last.Error.Message == "")) {
			t.Fatalf("stream of %d events ends with %+v", n, last)
		}
		return
	}
	if ct := w.Header().Get("Content-Type"); ct != "application/json" {
		t.Fatalf("status %d, content type %q: %q", w.Code, ct, w.Body)
	}
	if !json.Valid(w.Body.Bytes()) {
		t.Fatalf("status %d: not JSON: %q", w.Code, w.Body)
	}
	if w.Code >= 300 {
		var e struct{ Error *api.Error }
		if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || e.Error == nil || e.Error.Code == "" || e.Error.Message == "" {
			t.Fatalf("status %d without an error object: %q", w.Code, w.Body)
		}
	}
}
