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

// TestPeerTextIsData: what a record holds from the peer daemon (an
// error message, a peer name) reaches the terminal with its escape
// sequences shown, not acted on, in history, in list and in an error.
func TestPeerTextIsData(t *testing.T) {
	const evil = "\x1b]0;pwned\x07\x1b[2J\x1b[31mdestination: all fine\u202e"
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/history":
			json.NewEncoder(w).Encode([]api.HistoryEntry{{
				ID: "3f25b14c5096e31e4335226751043711", Direction: "out", PID: 42, Peer: "hostB" + evil,
				Started: now, Ended: now, Outcome: api.OutcomeRolledBack,
				Error: &api.Error{Code: api.CodeAborted, Message: evil},
			}})
		case "/v1/sessions":
			json.NewEncoder(w).Encode([]api.Session{{ID: "3f25b14c5096e31e4335226751043711", Direction: "out",
				PID: 42, Peer: "hostB" + evil, Phase: "dump", Note: evil}})
		default:
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusConflict)
			json.NewEncoder(w).Encode(map[string]*api.Error{"error": {Code: api.CodeConflict, Message: evil}})
		}
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })

	for _, args := range [][]string{{"history"}, {"list"}, {"cancel", "3f25b14c5096e31e4335226751043711"}} {
		var out, errOut bytes.Buffer
		run(context.Background(), append([]string{"--socket", sock}, args...), &out, &errOut)
		all := out.String() + errOut.String()
		if strings.ContainsAny(all, "\x1b\x07\u202e") {
			t.Errorf("phaulctl %s printed the peer's escapes raw: %q", args[0], all)
		}
		if !strings.Contains(all, `\x1b[2J`) {
			t.Errorf("phaulctl %s does not show the text, escaped: %q", args[0], all)
		}
	}
}
