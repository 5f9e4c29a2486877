// Package client talks to phauld's control API over its Unix socket. It is
// what phaulctl uses; other programs may use it too.
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"

	"github.com/phaul/phaul/pkg/api"
)

// Client is a control API client.
type Client struct {
	socket string
	http   *http.Client
}

// New returns a client for the control socket at path.
func New(path string) *Client {
	if path == "" {
		path = api.DefaultSocket
	}
	return &Client{
		socket: path,
		http: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			},
		}},
	}
}

// UnreachableError means the daemon could not be reached at all.
type UnreachableError struct {
	Socket string
	Err    error
}

func (e *UnreachableError) Error() string {
	return fmt.Sprintf("cannot reach phauld at %s: %v", e.Socket, e.Err)
}

func (e *UnreachableError) Unwrap() error { return e.Err }

func (c *Client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://phauld"+path, rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return nil, &UnreachableError{Socket: c.socket, Err: op.Err}
		}
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		var e struct {
			Error *api.Error `json:"error"`
		}
		if json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&e) == nil && e.Error != nil {
			return nil, e.Error
		}
		return nil, fmt.Errorf("phauld answered %s", resp.Status)
	}
	return resp, nil
}

// Status returns the daemon's status.
func (c *Client) Status(ctx context.Context) (api.Status, error) {
	var st api.Status
	resp, err := c.do(ctx, http.MethodGet, "/v1/status", nil)
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return st, fmt.Errorf("decode status: %w", err)
	}
	return st, nil
}

// Sessions lists the migrations in progress.
func (c *Client) Sessions(ctx context.Context) ([]api.Session, error) {
	var list []api.Session
	resp, err := c.do(ctx, http.MethodGet, "/v1/sessions", nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		return nil, fmt.Errorf("decode sessions: %w", err)
	}
	return list, nil
}

// History lists the newest limit finished migrations (all the daemon
// keeps, if limit <= 0), newest first.
func (c *Client) History(ctx context.Context, limit int) ([]api.HistoryEntry, error) {
	var list []api.HistoryEntry
	resp, err := c.do(ctx, http.MethodGet, "/v1/history?limit="+strconv.Itoa(limit), nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		return nil, fmt.Errorf("decode history: %w", err)
	}
	return list, nil
}

// Cancel cancels the migration whose id starts with id.
func (c *Client) Cancel(ctx context.Context, id string) (api.Session, error) {
	return c.sessionCall(ctx, id, "cancel", struct{}{})
}

// Resolve settles the migration in doubt whose id starts with id, as an
// operator decides: action is "resume" or "kill" (see api.ResolveRequest).
func (c *Client) Resolve(ctx context.Context, id, action string) (api.Session, error) {
	return c.sessionCall(ctx, id, "resolve", api.ResolveRequest{Action: action})
}

// sessionCall posts body to /v1/sessions/{id}/{verb} and decodes the
// session it answers with.
func (c *Client) sessionCall(ctx context.Context, id, verb string, body any) (api.Session, error) {
	var s api.Session
	resp, err := c.do(ctx, http.MethodPost, "/v1/sessions/"+url.PathEscape(id)+"/"+verb, body)
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return s, fmt.Errorf("decode session: %w", err)
	}
	return s, nil
}

// Run asks the daemon to start a program so that it can migrate.
func (c *Client) Run(ctx context.Context, req api.RunRequest) (api.RunResult, error) {
	var res api.RunResult
	resp, err := c.do(ctx, http.MethodPost, "/v1/run", req)
	if err != nil {
		return res, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
		return res, fmt.Errorf("decode the started program: %w", err)
	}
	return res, nil
}

// Names lists the processes known by a name on the daemon's host.
func (c *Client) Names(ctx context.Context) ([]api.Named, error) {
	var out []api.Named
	resp, err := c.do(ctx, http.MethodGet, "/v1/names", nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, fmt.Errorf("decode names: %w", err)
	}
	return out, nil
}

// Migrate asks the daemon to migrate and waits for the end. onEvent, if
// set, gets every progress event.
func (c *Client) Migrate(ctx context.Context, req api.MigrateRequest, onEvent func(api.Event)) (api.Result, error) {
	resp, err := c.do(ctx, http.MethodPost, "/v1/migrate", req)
	if err != nil {
		return api.Result{}, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	id := ""
	for sc.Scan() {
		var ev api.Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return api.Result{}, fmt.Errorf("decode event: %w", err)
		}
		if ev.ID != "" {
			id = ev.ID
		}
		switch ev.Event {
		case api.EventResult:
			if ev.Result == nil {
				return api.Result{}, errors.New("result event without a result")
			}
			return *ev.Result, nil
		case api.EventError:
			if ev.Error == nil {
				return api.Result{}, errors.New("error event without an error")
			}
			return api.Result{}, ev.Error
		default:
			if onEvent != nil {
				onEvent(ev)
			}
		}
	}
	// phauld went away mid-migration (it stopped, or died): how the
	// migration ends is not known here. phauld finishes or undoes it by
	// the commit rule when it runs again.
	why := "ended the response without a result"
	if err := sc.Err(); err != nil {
		why = fmt.Sprintf("connection broke (%v)", err)
	}
	session := "the migration"
	if id != "" {
		session = "migration " + id
	}
	if ctx.Err() != nil {
		// We were stopped, not phauld: the migration goes on there.
		return api.Result{}, api.Errorf(api.CodeInDoubt,
			"phaulctl stopped waiting for %s (%v); phauld goes on with it: see 'phaulctl list', then 'phaulctl history' for how it ended",
			session, context.Cause(ctx))
	}
	return api.Result{}, api.Errorf(api.CodeInDoubt,
		"lost phauld during %s: its %s, so how it ends is not known here. phauld finishes or undoes it by the commit rule when it runs again: see 'phaulctl history' and 'phaulctl list' then, and 'journalctl -u phauld'",
		session, why)
}
