package migrate

import (
	"strings"
	"testing"
	"time"
)

// TestStopRule runs the rule on recorded rounds of a 1 GiB process
// (262144 pages) at about 250000 pages/s, so a 100 ms goal is ~25000
// pages, and on a slow link.
func TestStopRule(t *testing.T) {
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	for _, tc := range []struct {
		name   string
		rounds []round
		stopAt int    // the round after which the rule stops
		why    string // part of its reason
	}{
		{"converges: stops once a round is within the goal", []round{
			{262144, 262144, ms(1050)}, {262144, 90000, ms(380)}, {262144, 31000, ms(130)}, {262144, 12000, ms(50)}, {262144, 4000, ms(17)},
		}, 4, "within the goal"},
		{"grows: the process dirties faster than rounds copy", []round{
			{262144, 262144, ms(1050)}, {262144, 120000, ms(480)}, {262144, 140000, ms(560)}, {262144, 100000, ms(400)},
		}, 3, "not a tenth fewer"},
		{"steady: a round as large as the one before ends them", []round{
			{262144, 262144, ms(1050)}, {262144, 60000, ms(240)}, {262144, 59000, ms(236)}, {262144, 58000, ms(232)},
		}, 3, "not a tenth fewer"},
		{"shrinking slowly: stops at the round limit", []round{
			{262144, 262144, ms(1050)}, {262144, 200000, ms(800)}, {262144, 170000, ms(680)}, {262144, 150000, ms(600)},
			{262144, 130000, ms(520)}, {262144, 110000, ms(440)}, {262144, 95000, ms(380)}, {262144, 82000, ms(328)}, {262144, 70000, ms(280)},
		}, 8, "the limit"},
		{"churns: every page changes between rounds", []round{
			{262144, 262144, ms(10500)}, {262144, 250000, ms(10000)},
		}, 2, "as fast as rounds copy it"},
		{"idle: one round is enough", []round{{262144, 3000, ms(20)}}, 1, "within the goal"},
		{"slow link: the goal follows the rate", []round{
			// ~25000 pages/s: the goal is 2500 pages.
			{262144, 262144, ms(10500)}, {262144, 30000, ms(1200)}, {262144, 2400, ms(96)},
		}, 3, "within the goal of 2500"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for i := 1; i <= len(tc.rounds); i++ {
				more, why := defaultStopRule.next(tc.rounds[:i])
				if i < tc.stopAt && !more {
					t.Fatalf("stopped after round %d: %s", i, why)
				}
				if i == tc.stopAt {
					if more {
						t.Fatalf("went on after round %d", i)
					}
					if !strings.Contains(why, tc.why) {
						t.Errorf("reason %q, want it to say %q", why, tc.why)
					}
					return
				}
			}
			t.Fatalf("never stopped")
		})
	}
	if more, _ := defaultStopRule.next(nil); !more {
		t.Error("no rounds yet: the rule must ask for one")
	}
}
