package health

import "time"

// Clock is the time source of a Scheduler: the current time and timers.
// Tests inject a fake; production uses RealClock.
type Clock interface {
	Now() time.Time
	// NewTimer returns a stopped timer.
	NewTimer() Timer
}

// Timer is a one-shot timer set to an absolute time (so a fake clock that
// moves between reading Now and arming the timer cannot lose a firing).
// Stop and ResetAt discard a pending firing, as time.Timer does since
// Go 1.23.
type Timer interface {
	C() <-chan time.Time
	Stop()
	// ResetAt arms the timer to fire at t, at once if t is not after Now.
	ResetAt(t time.Time)
}

// RealClock is the Clock of the time package.
type RealClock struct{}

// Now returns time.Now().
func (RealClock) Now() time.Time { return time.Now() }

// NewTimer returns a stopped time.Timer.
func (RealClock) NewTimer() Timer {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return realTimer{t}
}

type realTimer struct{ t *time.Timer }

func (r realTimer) C() <-chan time.Time  { return r.t.C }
func (r realTimer) Stop()                { r.t.Stop() }
func (r realTimer) ResetAt(at time.Time) { r.t.Reset(time.Until(at)) }
