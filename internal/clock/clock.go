// Package clock is switchman's one injected time source: the current time
// and one-shot timers set to an absolute time. Production code takes a
// Clock and uses Real; tests use Fake, which moves only when told to.
package clock

import (
	"sync"
	"time"
)

// Clock is a time source: the current time and timers.
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

// Real is the Clock of the time package.
type Real struct{}

// Now returns time.Now().
func (Real) Now() time.Time { return time.Now() }

// NewTimer returns a stopped time.Timer.
func (Real) NewTimer() Timer {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return realTimer{t}
}

type realTimer struct{ t *time.Timer }

func (r realTimer) C() <-chan time.Time  { return r.t.C }
func (r realTimer) Stop()                { r.t.Stop() }
func (r realTimer) ResetAt(at time.Time) { r.t.Reset(time.Until(at)) }

// Fake is a Clock that moves only when Advance or Set is called. It is
// safe for concurrent use.
type Fake struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

// NewFake returns a fake clock at a fixed time.
func NewFake() *Fake { return &Fake{now: time.Unix(1_000_000, 0)} }

// Now returns the fake time.
func (c *Fake) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// NewTimer returns a stopped timer of this clock.
func (c *Fake) NewTimer() Timer {
	t := &fakeTimer{clk: c, c: make(chan time.Time, 1)}
	c.mu.Lock()
	c.timers = append(c.timers, t)
	c.mu.Unlock()
	return t
}

// Advance moves the clock by d and fires the timers that are due.
func (c *Fake) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	for _, t := range c.timers {
		t.fireIfDue()
	}
}

// Armed returns how many timers are armed (for tests that wait until the
// code under test has set its timer before advancing).
func (c *Fake) Armed() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, t := range c.timers {
		if t.active {
			n++
		}
	}
	return n
}

type fakeTimer struct {
	clk    *Fake
	c      chan time.Time
	at     time.Time
	active bool
}

func (t *fakeTimer) C() <-chan time.Time { return t.c }

// fireIfDue fires t when it is due. t.clk.mu is held.
func (t *fakeTimer) fireIfDue() {
	if t.active && !t.at.After(t.clk.now) {
		t.active = false
		select {
		case t.c <- t.clk.now:
		default:
		}
	}
}

func (t *fakeTimer) Stop() {
	t.clk.mu.Lock()
	defer t.clk.mu.Unlock()
	t.active = false
	t.drain()
}

func (t *fakeTimer) ResetAt(at time.Time) {
	t.clk.mu.Lock()
	defer t.clk.mu.Unlock()
	t.drain()
	t.at = at
	t.active = true
	t.fireIfDue()
}

func (t *fakeTimer) drain() {
	select {
	case <-t.c:
	default:
	}
}
