package health

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/switchman-lb/switchman/internal/clock"
	"github.com/switchman-lb/switchman/spec"
)

var errFake = errors.New("fake failure")

// fakeChecks makes checkers that return scripted results and record when
// they were called (by the scheduler's clock).
type fakeChecks struct {
	clk clock.Clock

	mu      sync.Mutex
	results map[Key][]error // consumed in order; the last one repeats; none: success
	calls   map[Key][]time.Time
	block   chan struct{} // non-nil: Check waits for it to close, or for ctx
	cur     int           // checks running now
	peak    int           // most checks running at once
}

func newFakeChecks(clk clock.Clock) *fakeChecks {
	return &fakeChecks{clk: clk, results: map[Key][]error{}, calls: map[Key][]time.Time{}}
}

func (f *fakeChecks) newChecker(t Target) (Checker, error) {
	return &fakeChecker{f: f, key: t.Key()}, nil
}

func (f *fakeChecks) script(k Key, results ...error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.results[k] = results
}

func (f *fakeChecks) callTimes(k Key) []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.calls[k]...)
}

func (f *fakeChecks) running() (cur, peak int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.cur, f.peak
}

type fakeChecker struct {
	f   *fakeChecks
	key Key
}

func (c *fakeChecker) String() string { return "fake " + c.key.String() }

func (c *fakeChecker) Check(ctx context.Context) error {
	f := c.f
	f.mu.Lock()
	f.calls[c.key] = append(f.calls[c.key], f.clk.Now())
	f.cur++
	f.peak = max(f.peak, f.cur)
	var err error
	if rs := f.results[c.key]; len(rs) > 0 {
		err = rs[0]
		if len(rs) > 1 {
			f.results[c.key] = rs[1:]
		}
	}
	block := f.block
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.cur--
		f.mu.Unlock()
	}()
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return err
}

// waitFor polls cond until it holds or a generous deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// idle reports whether the scheduler has nothing to do at the current
// (fake) time: no check running and none due.
func (s *Scheduler) idle() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inFlight != 0 {
		return false
	}
	for _, it := range s.queue.items {
		if !it.p.dropped && it.key <= s.since(s.clock.Now()) {
			return false
		}
	}
	return true
}

// status returns k's state, failing the test when k is unknown.
func status(t *testing.T, s *Scheduler, k Key) Status {
	t.Helper()
	st, ok := s.Status(k)
	if !ok {
		t.Fatalf("Status(%s): unknown key", k)
	}
	return st
}

func (s *Scheduler) isStarted() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.started
}

// step advances the fake clock and waits until the scheduler has run every
// check that became due.
func step(t *testing.T, clk *clock.Fake, s *Scheduler, d time.Duration) {
	t.Helper()
	clk.Advance(d)
	waitFor(t, "the scheduler to run the due checks", s.idle)
}

// startRun runs s until the test ends, and checks that Run returns.
func startRun(t *testing.T, s *Scheduler) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	waitFor(t, "Run to start", s.isStarted)
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("Run returned %v, want context.Canceled", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Run did not return after its context was cancelled")
		}
	})
}

func health(interval time.Duration, rise, fall int) spec.Health {
	return spec.Health{Protocol: spec.HealthTCP, Interval: interval, Timeout: interval / 2, Rise: rise, Fall: fall}
}

func target(service string, i int, h spec.Health) Target {
	return Target{Service: service, Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 80), Health: h}
}

func changedFired(s *Scheduler) bool {
	select {
	case <-s.Changed():
		return true
	default:
		return false
	}
}

func TestSchedulerSpreadsFirstChecksThenKeepsInterval(t *testing.T) {
	clk := clock.NewFake()
	fc := newFakeChecks(clk)
	s := New(Options{Clock: clk, NewChecker: fc.newChecker, StartSpread: time.Second})
	const n = 50
	var targets []Target
	for i := range n {
		targets = append(targets, target("web", i, health(10*time.Second, 2, 3)))
	}
	s.SetService("web", targets)
	if s.Settled() {
		t.Fatal("Settled before any check ran")
	}
	t0 := clk.Now()
	startRun(t, s)
	waitFor(t, "the checks due at start", s.idle)
	for range 10 {
		step(t, clk, s, 100*time.Millisecond)
	}
	if !s.Settled() {
		t.Fatal("not Settled after the first round")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := s.WaitSettled(ctx); err != nil {
		t.Fatalf("WaitSettled: %v", err)
	}
	distinct := map[time.Time]bool{}
	for _, tg := range targets {
		calls := fc.callTimes(tg.Key())
		if len(calls) != 1 {
			t.Fatalf("%s: %d checks in the first second, want 1", tg.Key(), len(calls))
		}
		if off := calls[0].Sub(t0); off < 0 || off > time.Second {
			t.Errorf("%s: first check at +%v, want within the 1s start spread", tg.Key(), off)
		}
		distinct[calls[0]] = true
	}
	if len(distinct) < 5 {
		t.Errorf("first checks of %d targets fell on %d instants; want them spread", n, len(distinct))
	}
	for range 100 {
		step(t, clk, s, 100*time.Millisecond)
	}
	for _, tg := range targets {
		calls := fc.callTimes(tg.Key())
		if len(calls) != 2 {
			t.Fatalf("%s: %d checks after 11s, want 2", tg.Key(), len(calls))
		}
		if gap := calls[1].Sub(calls[0]); gap < 9900*time.Millisecond || gap > 10100*time.Millisecond {
			t.Errorf("%s: checks %v apart, want the 10s interval", tg.Key(), gap)
		}
	}
}

func TestSchedulerHysteresisAndNotifications(t *testing.T) {
	clk := clock.NewFake()
	fc := newFakeChecks(clk)
	reg := prometheus.NewRegistry()
	s := New(Options{Clock: clk, NewChecker: fc.newChecker, Registerer: reg})
	tg := target("api", 1, health(time.Second, 2, 3))
	k := tg.Key()
	fc.script(k, nil, errFake, errFake, errFake, nil, nil, errFake, nil)
	s.SetService("api", []Target{tg})
	startRun(t, s)
	waitFor(t, "start", s.idle)
	if st := status(t, s, k); !st.Pending || st.Healthy {
		t.Fatalf("before its first check: %+v, want pending and not healthy", st)
	}
	// want: the state after each check, and whether Changed fired.
	want := []struct {
		healthy bool
		changed bool
	}{
		{true, true},   // S: first result decides
		{true, false},  // F
		{true, false},  // F
		{false, true},  // F: fall 3
		{false, false}, // S
		{true, true},   // S: rise 2
		{true, false},  // F
		{true, false},  // S
	}
	gauge := s.m.healthy.WithLabelValues("api", k.Addr.String())
	for i, w := range want {
		step(t, clk, s, time.Second)
		if n := len(fc.callTimes(k)); n != i+1 {
			t.Fatalf("after step %d: %d checks, want %d", i, n, i+1)
		}
		st := status(t, s, k)
		fired := changedFired(s)
		if st.Pending || st.Healthy != w.healthy || fired != w.changed {
			t.Errorf("after check %d: healthy %v pending %v changed %v, want healthy %v changed %v (%+v)", i, st.Healthy, st.Pending, fired, w.healthy, w.changed, st)
		}
		if g := metricValue(t, gauge); g != map[bool]float64{true: 1, false: 0}[w.healthy] {
			t.Errorf("after check %d: gauge %v, want healthy=%v", i, g, w.healthy)
		}
	}
	st := status(t, s, k)
	if st.Successes != 1 || st.Failures != 0 || st.LastError != "" || st.LastTransition.IsZero() || st.Check != "fake "+k.String() {
		t.Errorf("final status %+v", st)
	}
	for _, c := range []struct {
		labels []string
		vec    *prometheus.CounterVec
		want   float64
	}{
		{[]string{"api", "success"}, s.m.checks, 4},
		{[]string{"api", "failure"}, s.m.checks, 4},
		{[]string{"api", "healthy"}, s.m.transitions, 2},
		{[]string{"api", "unhealthy"}, s.m.transitions, 1},
	} {
		if got := metricValue(t, c.vec.WithLabelValues(c.labels...)); got != c.want {
			t.Errorf("counter %v = %v, want %v", c.labels, got, c.want)
		}
	}
}

func TestSchedulerSetServiceKeepsRestartsAndRemoves(t *testing.T) {
	clk := clock.NewFake()
	fc := newFakeChecks(clk)
	s := New(Options{Clock: clk, NewChecker: fc.newChecker})
	a := target("web", 1, health(time.Second, 2, 2))
	b := target("web", 2, health(time.Second, 2, 2))
	fc.script(b.Key(), errFake)
	s.SetService("web", []Target{a, b})
	startRun(t, s)
	for range 3 {
		step(t, clk, s, time.Second)
	}
	if st := status(t, s, a.Key()); !st.Healthy || st.Successes != 3 {
		t.Fatalf("a after 3 successes: %+v", st)
	}
	if st := status(t, s, b.Key()); st.Healthy || st.Failures != 3 {
		t.Fatalf("b after 3 failures: %+v", st)
	}

	// The same targets again (a new slice, equal values): state and
	// schedule are kept.
	s.SetService("web", []Target{b, a})
	step(t, clk, s, time.Second)
	if st := status(t, s, a.Key()); st.Pending || st.Successes != 4 {
		t.Errorf("a after an unchanged update and one more check: %+v, want 4 successes", st)
	}
	if !s.Settled() {
		t.Error("an unchanged update unsettled the scheduler")
	}

	// a's settings change: it restarts pending, keeps reporting healthy,
	// and its first new result decides at once.
	a2 := a
	a2.Health.Fall = 5
	fc.script(a.Key(), errFake)
	s.SetService("web", []Target{a2, b})
	st := status(t, s, a.Key())
	if !st.Pending || !st.Healthy || st.Successes != 0 || st.Failures != 0 {
		t.Errorf("a right after its settings changed: %+v, want pending, still healthy, counts reset", st)
	}
	if s.Settled() {
		t.Error("Settled while a restarted target is pending")
	}
	step(t, clk, s, time.Second)
	if st := status(t, s, a.Key()); st.Pending || st.Healthy || st.Failures != 1 {
		t.Errorf("a after its first check with new settings (a failure): %+v, want unhealthy at once despite fall 5", st)
	}

	// b is removed: gone from the snapshot and never checked again.
	s.SetService("web", []Target{a2})
	n := len(fc.callTimes(b.Key()))
	for range 3 {
		step(t, clk, s, time.Second)
	}
	if _, ok := s.Status(b.Key()); ok {
		t.Error("b still known after its removal")
	}
	if got := len(fc.callTimes(b.Key())); got != n {
		t.Errorf("b checked %d more times after its removal", got-n)
	}
}

func TestSchedulerNoneIsHealthyAtOnce(t *testing.T) {
	fc := newFakeChecks(clock.Real{})
	s := New(Options{NewChecker: fc.newChecker})
	h := health(time.Second, 2, 3)
	h.Protocol = spec.HealthNone
	tg := target("udp-svc", 1, h)
	s.SetService("udp-svc", []Target{tg})
	if !s.Settled() {
		t.Fatal("a none target left the scheduler unsettled")
	}
	if st := status(t, s, tg.Key()); !st.Healthy || st.Pending {
		t.Errorf("none target: %+v, want healthy, not pending", st)
	}
	if !changedFired(s) {
		t.Error("no Changed signal for a none target turning healthy")
	}
	if len(fc.callTimes(tg.Key())) != 0 {
		t.Error("a none target's checker was made and called")
	}
}

func TestWaitSettledTimesOutWhilePending(t *testing.T) {
	s := New(Options{Clock: clock.NewFake()})
	s.SetService("web", []Target{target("web", 1, health(time.Second, 2, 3))})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := s.WaitSettled(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitSettled with a pending target and no Run = %v, want DeadlineExceeded", err)
	}
	s.SetService("web", nil)
	if err := s.WaitSettled(context.Background()); err != nil {
		t.Errorf("WaitSettled with no targets = %v", err)
	}
}

func TestSchedulerConcurrencyLimitAndShutdown(t *testing.T) {
	clk := clock.NewFake()
	fc := newFakeChecks(clk)
	fc.block = make(chan struct{})
	s := New(Options{Clock: clk, NewChecker: fc.newChecker, MaxConcurrent: 3})
	var targets []Target
	for i := range 20 {
		targets = append(targets, target("web", i, health(time.Second, 1, 1)))
	}
	s.SetService("web", targets)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	waitFor(t, "Run to start", s.isStarted)
	clk.Advance(time.Second) // every first check is due
	waitFor(t, "3 checks running", func() bool { cur, _ := fc.running(); return cur == 3 })

	// Unblock: every target gets checked, never more than 3 at once.
	fc.mu.Lock()
	close(fc.block)
	fc.block = nil
	fc.mu.Unlock()
	waitFor(t, "every target's first check", s.Settled)
	if _, peak := fc.running(); peak != 3 {
		t.Errorf("peak concurrency %d, want exactly the limit 3", peak)
	}

	// Block again; shutting down cancels the checks in flight and Run
	// returns only after they have ended.
	fc.mu.Lock()
	fc.block = make(chan struct{})
	fc.mu.Unlock()
	clk.Advance(time.Second)
	waitFor(t, "3 checks running again", func() bool { cur, _ := fc.running(); return cur == 3 })
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Run = %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancel with checks in flight")
	}
	if cur, _ := fc.running(); cur != 0 {
		t.Errorf("%d checks still running after Run returned", cur)
	}
	if err := s.Run(context.Background()); err == nil {
		t.Error("a second Run was accepted")
	}
}

// metricValue reads a gauge's or a counter's value.
func metricValue(t *testing.T, m prometheus.Metric) float64 {
	t.Helper()
	var out dto.Metric
	if err := m.Write(&out); err != nil {
		t.Fatalf("reading metric: %v", err)
	}
	if out.Gauge != nil {
		return out.GetGauge().GetValue()
	}
	return out.GetCounter().GetValue()
}

// dueOf returns when k's next check is due (false: unknown or running).
func dueOf(s *Scheduler, k Key) (int64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	svc := s.services[k.Service]
	if svc == nil || svc.targets[k.Addr] == nil || svc.targets[k.Addr].running {
		return 0, false
	}
	return svc.targets[k.Addr].due, true
}

func TestSetServiceLeavesOtherServicesAlone(t *testing.T) {
	h := health(time.Second, 2, 2)
	a1, a2 := target("a", 1, h), target("a", 2, h)
	b3, b4, b6 := target("b", 3, h), target("b", 4, h), target("b", 6, h)
	c5 := target("c", 5, h)
	b3slow := b3
	b3slow.Health.Fall = 5
	const (
		kept      = "kept"      // state and schedule unchanged
		restarted = "restarted" // pending, counts reset, Healthy kept
		added     = "new"       // pending, not healthy
		gone      = "gone"      // unknown
	)
	tests := []struct {
		name string
		set  []Target // b's new targets
		want map[Target]string
	}{
		{"the same targets again", []Target{b3, b4}, map[Target]string{b3: kept, b4: kept}},
		{"the same targets in another order", []Target{b4, b3}, map[Target]string{b3: kept, b4: kept}},
		{"one target's settings change", []Target{b3slow, b4}, map[Target]string{b3: restarted, b4: kept}},
		{"a target is added", []Target{b3, b4, b6}, map[Target]string{b3: kept, b4: kept, b6: added}},
		{"a target is removed", []Target{b3}, map[Target]string{b3: kept, b4: gone}},
		{"a duplicate address: the first wins", []Target{b3, b4, b3slow}, map[Target]string{b3: kept, b4: kept}},
		{"nil removes the service", nil, map[Target]string{b3: gone, b4: gone}},
		{"empty removes the service", []Target{}, map[Target]string{b3: gone, b4: gone}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := clock.NewFake()
			fc := newFakeChecks(clk)
			fc.script(a2.Key(), errFake)
			fc.script(b4.Key(), errFake)
			s := New(Options{Clock: clk, NewChecker: fc.newChecker})
			s.SetService("a", []Target{a1, a2})
			s.SetService("b", []Target{b3, b4})
			s.SetService("c", []Target{c5})
			startRun(t, s)
			for range 3 {
				step(t, clk, s, time.Second)
			}
			others := []Target{a1, a2, c5}
			before := map[Key]Status{}
			beforeDue := map[Key]int64{}
			for _, tg := range append(others, b3, b4) {
				before[tg.Key()] = status(t, s, tg.Key())
				beforeDue[tg.Key()], _ = dueOf(s, tg.Key())
			}
			calls := map[Key]int{}
			for _, tg := range append(others, b4) {
				calls[tg.Key()] = len(fc.callTimes(tg.Key()))
			}

			s.SetService("b", tt.set)

			for _, tg := range others {
				k := tg.Key()
				due, _ := dueOf(s, k)
				if st := status(t, s, k); st != before[k] || due != beforeDue[k] {
					t.Errorf("%s (another service) changed: %+v due %d, was %+v due %d", k, st, due, before[k], beforeDue[k])
				}
			}
			for tg, want := range tt.want {
				k := tg.Key()
				st, ok := s.Status(k)
				due, _ := dueOf(s, k)
				switch want {
				case kept:
					if !ok || st != before[k] || due != beforeDue[k] {
						t.Errorf("%s: %+v due %d, want it kept as %+v due %d", k, st, due, before[k], beforeDue[k])
					}
				case restarted:
					if !ok || !st.Pending || st.Healthy != before[k].Healthy || st.Successes != 0 || st.Failures != 0 {
						t.Errorf("%s: %+v, want pending with Healthy=%v and counts reset", k, st, before[k].Healthy)
					}
				case added:
					if !ok || !st.Pending || st.Healthy {
						t.Errorf("%s: %+v (known %v), want pending and not healthy", k, st, ok)
					}
				case gone:
					if ok {
						t.Errorf("%s: still known after its removal: %+v", k, st)
					}
				}
			}

			// The other services' checks keep their rhythm: one more each
			// in the next second, one interval after the previous.
			step(t, clk, s, time.Second)
			for _, tg := range others {
				k := tg.Key()
				got := fc.callTimes(k)
				if len(got) != calls[k]+1 {
					t.Errorf("%s: %d checks in the next second, want 1", k, len(got)-calls[k])
					continue
				}
				if gap := got[len(got)-1].Sub(got[len(got)-2]); gap != time.Second {
					t.Errorf("%s: checks %v apart after the change, want 1s", k, gap)
				}
			}
			if _, ok := s.Status(b4.Key()); !ok && len(fc.callTimes(b4.Key())) != calls[b4.Key()] {
				t.Errorf("a removed target was checked after its removal")
			}
		})
	}
}

func TestTakeChanged(t *testing.T) {
	h := health(time.Second, 2, 2)
	ts := []Target{target("web", 1, h), target("web", 2, h), target("web", 3, h), target("web", 4, h)}
	other := target("db", 9, h)
	none := target("web", 5, spec.Health{Protocol: spec.HealthNone})
	slow := func(tg Target) Target { tg.Health.Fall = 5; return tg }
	keys := func(tgs ...Target) []Key {
		var out []Key
		for _, tg := range tgs {
			out = append(out, tg.Key())
		}
		return out
	}
	tests := []struct {
		name string
		// scripts are each target's results after its first check (which
		// succeeds, except for ts[3]'s, which fails).
		scripts map[Target][]error
		steps   int                          // checks after the first round
		change  func(s *Scheduler)           // after the steps, if set
		want    []Key                        // TakeChanged then
		then    func(*testing.T, *Scheduler) // more checks, if set
	}{
		{name: "successes and failures that flip nothing", steps: 3, want: nil},
		{
			name:    "a failure short of fall changes only LastError",
			scripts: map[Target][]error{ts[0]: {errFake, nil}},
			steps:   1,
			want:    nil,
			then: func(t *testing.T, s *Scheduler) {
				if st := status(t, s, ts[0].Key()); st.LastError == "" || !st.Healthy {
					t.Errorf("after one failure: %+v, want healthy with LastError", st)
				}
			},
		},
		{
			name:    "fall flips one target",
			scripts: map[Target][]error{ts[0]: {errFake}},
			steps:   2,
			want:    keys(ts[0]),
		},
		{
			name:    "rise flips one back, fall another, in two services",
			scripts: map[Target][]error{ts[3]: {nil}, ts[1]: {errFake}, other: {errFake}},
			steps:   3,
			want:    keys(other, ts[1], ts[3]),
		},
		{
			name:   "a settings change restarts a settled target",
			change: func(s *Scheduler) { s.SetService("web", []Target{slow(ts[0]), ts[1], ts[2], ts[3]}) },
			want:   keys(ts[0]),
		},
		{
			name:   "a new target is not reported until its first result",
			change: func(s *Scheduler) { s.SetService("web", append(slices.Clone(ts), target("web", 7, h))) },
			want:   nil,
		},
		{
			name:   "a none target is healthy at once",
			change: func(s *Scheduler) { s.SetService("web", append(slices.Clone(ts), none)) },
			want:   keys(none),
		},
		{
			name:    "a flipped target removed before the call is forgotten",
			scripts: map[Target][]error{ts[0]: {errFake}},
			steps:   2,
			change:  func(s *Scheduler) { s.SetService("web", ts[1:]) },
			want:    nil,
		},
		{
			name:   "a removed service is forgotten",
			change: func(s *Scheduler) { s.SetService("web", nil) },
			want:   nil,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := clock.NewFake()
			fc := newFakeChecks(clk)
			s := New(Options{Clock: clk, NewChecker: fc.newChecker})
			for _, tg := range append(slices.Clone(ts), other) {
				fc.script(tg.Key(), append([]error{map[bool]error{true: errFake}[tg == ts[3]]}, tt.scripts[tg]...)...)
			}
			s.SetService("web", ts)
			s.SetService("db", []Target{other})
			if got := s.TakeChanged(); got != nil {
				t.Fatalf("before any check: %v, want nothing", got)
			}
			startRun(t, s)
			step(t, clk, s, time.Second)
			if got, want := s.TakeChanged(), keys(other, ts[0], ts[1], ts[2], ts[3]); !slices.Equal(got, want) {
				t.Fatalf("after the first round: %v, want every key (first results) %v", got, want)
			}
			changedFired(s) // drain
			for range tt.steps {
				step(t, clk, s, time.Second)
			}
			if tt.change != nil {
				tt.change(s)
			}
			fired := changedFired(s)
			if got := s.TakeChanged(); !slices.Equal(got, tt.want) {
				t.Errorf("TakeChanged = %v, want %v", got, tt.want)
			}
			if len(tt.want) > 0 && !fired {
				t.Error("Changed did not fire")
			}
			if got := s.TakeChanged(); got != nil {
				t.Errorf("a second TakeChanged = %v, want nothing", got)
			}
			if tt.then != nil {
				tt.then(t, s)
			}
		})
	}
}

// BenchmarkSetService sets one service of 4 targets, its Health changing
// every other call (a restart of all 4), with 100 or 10,000 other services
// of 4 targets loaded: the cost follows the one service, not all.
func BenchmarkSetService(b *testing.B) {
	for _, others := range []int{100, 10000} {
		b.Run(fmt.Sprintf("others=%d", others), func(b *testing.B) {
			fc := newFakeChecks(clock.NewFake())
			s := New(Options{Clock: clock.NewFake(), NewChecker: fc.newChecker})
			h := health(time.Second, 2, 3)
			for i := range others {
				name := fmt.Sprintf("svc%d", i)
				s.SetService(name, []Target{target(name, 1, h), target(name, 2, h), target(name, 3, h), target(name, 4, h)})
			}
			h2 := h
			h2.Fall = 5
			sets := [2][]Target{}
			for j, hh := range []spec.Health{h, h2} {
				sets[j] = []Target{target("one", 1, hh), target("one", 2, hh), target("one", 3, hh), target("one", 4, hh)}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				s.SetService("one", sets[i%2])
			}
		})
	}
}
