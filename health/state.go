package health

import "time"

// state is one target's health state machine. It is pure: it knows nothing
// of scheduling or time sources; the caller passes the time of each result.
type state struct {
	pending        bool // no result since the target (re)started
	healthy        bool
	successes      int   // consecutive
	failures       int   // consecutive
	lastErr        error // of the last check; nil after a success
	lastCheck      time.Time
	lastTransition time.Time
}

// newState returns the state of a target that has not been checked yet.
// healthy is what it reports until its first result: false for a new
// target, the previous value for a restarted one.
func newState(healthy bool) state {
	return state{pending: true, healthy: healthy}
}

// observe records one check result (err == nil is a success) with the
// target's rise and fall, and reports whether the state changed: the first
// result always does (pending ends); after that, only a flip of healthy
// after rise consecutive successes or fall consecutive failures.
func (s *state) observe(err error, rise, fall int, now time.Time) bool {
	s.lastCheck = now
	if err == nil {
		s.successes++
		s.failures = 0
		s.lastErr = nil
	} else {
		s.failures++
		s.successes = 0
		s.lastErr = err
	}
	switch {
	case s.pending:
		s.pending = false
		s.healthy = err == nil
	case !s.healthy && s.successes >= max(rise, 1):
		s.healthy = true
	case s.healthy && s.failures >= max(fall, 1):
		s.healthy = false
	default:
		return false
	}
	s.lastTransition = now
	return true
}
