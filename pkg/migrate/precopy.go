package migrate

import (
	"fmt"
	"time"
)

// round is what one pre-copy round did: pages read, pages sent (new or
// changed since sent), and how long reading and sending took.
type round struct {
	scanned, written uint64 // pages
	took             time.Duration
}

// stopRule decides after each pre-copy round whether another one is worth
// it, or the final dump should follow. A round copies what the process
// changed during the one before; it is worth another round while that
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
	// Shrink is how much of the round before's pages a round may copy
	// for another round to be worth it (0.9: the rounds go on while each
	// copies at least a tenth fewer pages than the one before; a process
	// that changes as much between rounds as before gains nothing from
	// another).
	Shrink float64
	// Churn is the share of round 1's pages a later round may copy
	// again before the process counts as rewriting all its memory
	// between rounds (another round would copy it all again).
	Churn float64
}

// defaultStopRule is phauld's rule.
var defaultStopRule = stopRule{MaxRounds: 8, PauseGoal: 100 * time.Millisecond, MinPages: 64, Shrink: 0.9, Churn: 0.9}

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
	case len(rounds) >= 2 && float64(last.written) >= r.Churn*float64(rounds[0].written):
		return false, fmt.Sprintf("round %d copied %d pages, nearly the %d of round 1: the process rewrites its memory as fast as rounds copy it",
			len(rounds), last.written, rounds[0].written)
	case len(rounds) >= 2 && float64(last.written) > r.Shrink*float64(rounds[len(rounds)-2].written):
		return false, fmt.Sprintf("round %d copied %d pages, not a tenth fewer than round %d's %d: another round would not leave the final dump less",
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
