package migrate

import (
	"fmt"
	"time"
)

// round is what one pre-copy round did, from CRIU's stats-dump of its
// pre-dump.
type round struct {
	scanned, written uint64 // pages
	took             time.Duration
}

// stopRule decides after each pre-copy round whether another one is worth
// it, or the final dump should follow. A round copies what the process
// dirtied during the one before; it is worth another round while that
// shrinks and is still more than the final dump can move within the pause
// goal at the rate the rounds showed.
type stopRule struct {
	// MaxRounds bounds the rounds.
	MaxRounds int
	// PauseGoal is the pause the final dump should fit in.
	PauseGoal time.Duration
	// MinPages is the floor of the goal: below it a round saves nothing
	// worth its cost.
	MinPages uint64
	// Growth is how much larger than the round before a round may be
	// before the process counts as dirtying memory faster than rounds
	// copy it (1.1: 10 % larger).
	Growth float64
}

// defaultStopRule is phauld's rule.
var defaultStopRule = stopRule{MaxRounds: 8, PauseGoal: 100 * time.Millisecond, MinPages: 64, Growth: 1.1}

// next says whether to run another round after rounds, and why not.
func (r stopRule) next(rounds []round) (bool, string) {
	if len(rounds) == 0 {
		return true, ""
	}
	last := rounds[len(rounds)-1]
	goal := r.goal(rounds)
	switch {
	case last.written <= goal:
		return false, fmt.Sprintf("round %d copied %d pages, within the goal of %d: the final dump moves about as many", len(rounds), last.written, goal)
	case len(rounds) >= 2 && float64(last.written) > r.Growth*float64(rounds[len(rounds)-2].written):
		return false, fmt.Sprintf("round %d copied %d pages, more than round %d's %d: the process dirties memory faster than rounds copy it",
			len(rounds), last.written, len(rounds)-1, rounds[len(rounds)-2].written)
	case len(rounds) >= r.MaxRounds:
		return false, fmt.Sprintf("%d rounds, the limit", len(rounds))
	}
	return true, ""
}

// goal is how many dirty pages the final dump may leave: what moves
// within PauseGoal at the best rate the rounds reached, at least
// MinPages.
func (r stopRule) goal(rounds []round) uint64 {
	var best float64 // pages per second
	for _, x := range rounds {
		if x.took > 0 {
			best = max(best, float64(x.written)/x.took.Seconds())
		}
	}
	return max(r.MinPages, uint64(best*r.PauseGoal.Seconds()))
}
