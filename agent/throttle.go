package agent

import "time"

// throttle decides when the loop makes its pass after changes. A lone
// change after a quiet spell goes through at once (the leading edge); a
// change within quiet of the last pass waits until quiet has passed since
// it, and the changes that follow are coalesced, each pushing the pass back
// by quiet, but never past maxDelay after the first of them.
type throttle struct {
	quiet, maxDelay time.Duration
	lastPass        time.Time
	first, due      time.Time
}

// change notes a change at now and returns when the pass is due.
func (t *throttle) change(now time.Time) time.Time {
	switch {
	case t.first.IsZero():
		t.first = now
		if t.lastPass.IsZero() || now.Sub(t.lastPass) >= t.quiet {
			t.due = now
			return t.due
		}
		t.due = t.lastPass.Add(t.quiet)
		return t.due
	case !t.due.After(t.first):
		// The leading edge is due already: nothing to push back.
		return t.due
	}
	t.due = now.Add(max(0, min(t.quiet, t.maxDelay-now.Sub(t.first))))
	return t.due
}

// passed notes the pass made at now.
func (t *throttle) passed(now time.Time) {
	t.lastPass, t.first, t.due = now, time.Time{}, time.Time{}
}
