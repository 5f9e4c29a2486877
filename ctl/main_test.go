package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/phaul/phaul/pkg/api"
)

func TestDaemonUnreachableSaysWhatToDo(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"--socket", sock, "status"}, &out, &errb)
	if code == 0 {
		t.Fatal("status against a missing daemon exited 0")
	}
	if !strings.Contains(errb.String(), "systemctl start phauld.socket") {
		t.Errorf("stderr = %q: want how to start phauld", errb.String())
	}

	out.Reset()
	errb.Reset()
	code = run(context.Background(), []string{"--socket", sock, "migrate", "--pid", "1", "--to", "b", "--json"}, &out, &errb)
	var v struct{ Error *api.Error }
	if code == 0 || json.Unmarshal(out.Bytes(), &v) != nil || v.Error == nil || v.Error.Code != api.CodeUnavailable {
		t.Errorf("migrate --json: exit %d, stdout %q; want an unavailable error object", code, out.String())
	}
}

func TestMigrateNeedsFlags(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"migrate", "--to", "b"}, &out, &errb); code == 0 || !strings.Contains(errb.String(), "--pid, --name or --container is required") {
		t.Errorf("no --pid: exit %d, stderr %q", code, errb.String())
	}
	errb.Reset()
	if code := run(context.Background(), []string{"migrate", "--pid", "3"}, &out, &errb); code == 0 || !strings.Contains(errb.String(), "--to is required") {
		t.Errorf("no --to: exit %d, stderr %q", code, errb.String())
	}
}

// TestManPageDocumentsEveryCommand keeps packaging/man/phaulctl.1 in step
// with phaulctl's commands and flags.
func TestManPageDocumentsEveryCommand(t *testing.T) {
	page, err := os.ReadFile("../packaging/man/phaulctl.1")
	if err != nil {
		t.Fatal(err)
	}
	text := string(page)
	var walk func(cmd *cobra.Command)
	walk = func(cmd *cobra.Command) {
		if cmd.Hidden || cmd.Name() == "help" {
			return
		}
		if !strings.Contains(text, cmd.Name()) {
			t.Errorf("phaulctl.1 does not document %q", cmd.CommandPath())
		}
		cmd.LocalFlags().VisitAll(func(f *pflag.Flag) {
			if f.Name != "help" && !strings.Contains(text, `\-\-`+strings.ReplaceAll(f.Name, "-", `\-`)) {
				t.Errorf("phaulctl.1 does not document %s --%s", cmd.CommandPath(), f.Name)
			}
		})
		for _, sub := range cmd.Commands() {
			if cmd.Name() != "completion" {
				walk(sub)
			}
		}
	}
	root := newRoot(&cli{})
	root.InitDefaultCompletionCmd()
	walk(root)
}
