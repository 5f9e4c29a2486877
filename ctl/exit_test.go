package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/pkg/api"
)

// fakeDaemon serves phauld's control socket with migrate answered by
// answer: the events it writes (nil ends the stream without a result,
// as a phauld that died would).
func fakeDaemon(t *testing.T, answer []api.Event) string {
	return fakeDaemonHold(t, answer, false)
}

// fakeDaemonHold is fakeDaemon; with hold, the stream stays open after
// answer until the client goes (a migration still running).
func fakeDaemonHold(t *testing.T, answer []api.Event, hold bool) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/migrate" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		enc := json.NewEncoder(w)
		for _, ev := range answer {
			enc.Encode(ev)
		}
		if hold {
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		}
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock
}

// TestMigrateExitCodes: phaulctl migrate's exit status says what the
// migration left, as its --help and man page list: 0 runs there, 1
// nothing touched, 3 rolled back and running here, 4 not settled or not
// seen, 5 committed but not seen running there.
func TestMigrateExitCodes(t *testing.T) {
	const id = "3f25b14c5096e31e4335226751043711"
	result := func(r api.Result) []api.Event {
		r.ID, r.SourcePID, r.DestPID, r.Dest = id, 42, 4242, "hostB:12345"
		return []api.Event{{Event: api.EventProgress, ID: id, Phase: "dump"}, {Event: api.EventResult, ID: id, Result: &r}}
	}
	fail := func(code api.Code, msg string) []api.Event {
		return []api.Event{{Event: api.EventProgress, ID: id, Phase: "dump"}, {Event: api.EventError, ID: id, Error: &api.Error{Code: code, Message: msg}}}
	}
	cases := []struct {
		name   string
		answer []api.Event
		code   int
		want   string // in stdout (0) or stderr
	}{
		{"committed", result(api.Result{}), 0, "now runs on hostB:12345 as pid 4242"},
		{"refused", fail(api.CodePrecondition, "lazy migration impossible"), 1, "lazy migration impossible"},
		{"rolled back", fail(api.CodeAborted, "migration failed; the process was resumed here (pid 42)"), 3, "resumed here"},
		{"canceled", fail(api.CodeCanceled, "migration failed; the process was resumed here (pid 42): canceled"), 3, "canceled"},
		{"in doubt", fail(api.CodeInDoubt, "the destination was lost after the commit was asked"), 4, "lost after the commit"},
		{"phauld lost", []api.Event{{Event: api.EventProgress, ID: id, Phase: "dump"}}, 4, "3f25b14c"},
		{"not seen running there", result(api.Result{NotRunning: "pid 4242 is still stopped"}), 5, "not seen running there (pid 4242 is still stopped)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sock := fakeDaemon(t, c.answer)
			for _, asJSON := range []bool{false, true} {
				args := []string{"--socket", sock, "migrate", "--pid", "42", "--to", "hostB", "--quiet"}
				if asJSON {
					args = append(args, "--json")
				}
				var out, errb bytes.Buffer
				code := run(context.Background(), args, &out, &errb)
				if code != c.code {
					t.Errorf("json %v: exit %d, want %d (stdout %q, stderr %q)", asJSON, code, c.code, out.String(), errb.String())
				}
				if !asJSON && !strings.Contains(out.String()+errb.String(), c.want) {
					t.Errorf("output %q / %q does not say %q", out.String(), errb.String(), c.want)
				}
				if asJSON {
					// stdout is one JSON object: the result, or the error.
					var v map[string]any
					if err := json.Unmarshal(out.Bytes(), &v); err != nil {
						t.Errorf("--json stdout %q: %v", out.String(), err)
					}
				}
			}
		})
	}
}

// TestMigrateStoppedWhileWaiting: phaulctl stopped (SIGTERM) while phauld
// migrates says the migration goes on in phauld, not that phauld was lost.
func TestMigrateStoppedWhileWaiting(t *testing.T) {
	sock := fakeDaemonHold(t, []api.Event{{Event: api.EventProgress, ID: "3f25b14c", Phase: "dump"}}, true)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	var out, errb bytes.Buffer
	code := run(ctx, []string{"--socket", sock, "migrate", "--pid", "42", "--to", "hostB", "--quiet"}, &out, &errb)
	if code != exitInDoubt || !strings.Contains(errb.String(), "phauld goes on with it") || strings.Contains(errb.String(), "lost phauld") {
		t.Fatalf("exit %d, stderr %q; want 4, saying phauld goes on", code, errb.String())
	}
}
