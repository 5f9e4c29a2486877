package systemd

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/phaul/phaul/pkg/api"
)

// StatusLine is what STATUS= says: the listeners, and each migration in
// progress.
func StatusLine(listen []string, sessions []api.Session) string {
	s := "serving migrations on " + strings.Join(listen, ", ")
	if len(sessions) == 0 {
		return s + "; idle"
	}
	var ids []string
	for _, x := range sessions {
		ids = append(ids, fmt.Sprintf("%s %s pid %d %s", x.ID[:min(8, len(x.ID))], x.Direction, x.PID, x.Phase))
	}
	return fmt.Sprintf("%s; %d migration(s): %s", s, len(sessions), strings.Join(ids, ", "))
}

// KeepStatus keeps STATUS= current and pings the watchdog at half its
// interval, until ctx ends. STATUS= follows sessions and their phases
// within a quarter second and is sent only when it changes; the first,
// idle, line is taken as sent with READY=1. A ping follows a call to
// sessions (the session manager), so a daemon whose manager hangs stops
// pinging and systemd restarts it.
func KeepStatus(ctx context.Context, listen []string, sessions func() []api.Session) {
	wd := WatchdogInterval()
	tick := 250 * time.Millisecond
	if wd > 0 && wd/2 < tick {
		tick = wd / 2
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	last, pinged := StatusLine(listen, nil), time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var msg []string
		if line := StatusLine(listen, sessions()); line != last {
			msg = append(msg, "STATUS="+line)
			last = line
		}
		if wd > 0 && time.Since(pinged) >= wd/2-tick/2 {
			msg = append(msg, "WATCHDOG=1")
			pinged = time.Now()
		}
		if len(msg) > 0 {
			Notify(strings.Join(msg, "\n"))
		}
	}
}
