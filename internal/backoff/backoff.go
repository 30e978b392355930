// Package backoff is switchman's one retry delay: it doubles from a minimum
// up to a maximum, with optional jitter, and starts again from the minimum
// after Reset.
package backoff

import (
	"math/rand/v2"
	"time"
)

// Backoff is a doubling delay. The zero value is not usable; make one with
// New. It is not safe for concurrent use.
type Backoff struct {
	min, max, cur time.Duration
	jitter        float64
}

// New returns a backoff from lo doubling up to hi. jitter (0 to 1) spreads
// each delay at random over [d*(1-jitter), d], so many retries that failed
// together do not come back together.
func New(lo, hi time.Duration, jitter float64) *Backoff {
	if hi < lo {
		hi = lo
	}
	return &Backoff{min: lo, max: hi, cur: lo, jitter: min(max(jitter, 0), 1)}
}

// Next returns the delay before the next attempt and doubles the one after.
func (b *Backoff) Next() time.Duration {
	d := b.cur
	b.cur = min(b.cur*2, b.max)
	if b.jitter > 0 && d > 0 {
		d -= time.Duration(rand.Float64() * b.jitter * float64(d))
	}
	return d
}

// Reset starts again from the minimum (after a success).
func (b *Backoff) Reset() { b.cur = b.min }
