package agent

import (
	"testing"
	"time"
)

func TestThrottle(t *testing.T) {
	t0 := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	type step struct {
		pass bool // a pass at the time, instead of a change
		ms   int  // when
		due  int  // for a change: when the pass is due
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"first change ever goes at once", []step{{ms: 0, due: 0}}},
		{"a lone change after a quiet spell goes at once", []step{{pass: true, ms: 0}, {ms: 500, due: 500}}},
		{"a change soon after a pass waits until quiet has passed since it", []step{{pass: true, ms: 0}, {ms: 10, due: 50}}},
		{"a burst pushes the pass back", []step{{pass: true, ms: 0}, {ms: 10, due: 50}, {ms: 40, due: 90}, {ms: 80, due: 130}}},
		{"a steady stream is cut at maxDelay", []step{{pass: true, ms: 0}, {ms: 10, due: 50}, {ms: 150, due: 200}, {ms: 190, due: 210}, {ms: 209, due: 210}}},
		{"changes behind a leading edge do not delay it", []step{{pass: true, ms: 0}, {ms: 100, due: 100}, {ms: 100, due: 100}}},
		{"after the leading pass, the next change waits", []step{{ms: 0, due: 0}, {pass: true, ms: 1}, {ms: 5, due: 51}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			th := throttle{quiet: 50 * time.Millisecond, maxDelay: 200 * time.Millisecond}
			for i, s := range tt.steps {
				if s.pass {
					th.passed(at(s.ms))
					continue
				}
				if got := th.change(at(s.ms)); !got.Equal(at(s.due)) {
					t.Fatalf("step %d: change at %dms: due %v, want %dms", i, s.ms, got.Sub(t0), s.due)
				}
			}
		})
	}
}
