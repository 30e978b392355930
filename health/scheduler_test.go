package health

import (
	"context"
	"errors"
	"net/netip"
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
	return s.inFlight == 0 && (len(s.queue) == 0 || s.queue[0].due.After(s.clock.Now()))
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
	s.Update(targets)
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
	s.Update([]Target{tg})
	startRun(t, s)
	waitFor(t, "start", s.idle)
	if st := s.Snapshot()[k]; !st.Pending || st.Healthy {
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
		st := s.Snapshot()[k]
		fired := changedFired(s)
		if st.Pending || st.Healthy != w.healthy || fired != w.changed {
			t.Errorf("after check %d: healthy %v pending %v changed %v, want healthy %v changed %v (%+v)", i, st.Healthy, st.Pending, fired, w.healthy, w.changed, st)
		}
		if g := metricValue(t, gauge); g != map[bool]float64{true: 1, false: 0}[w.healthy] {
			t.Errorf("after check %d: gauge %v, want healthy=%v", i, g, w.healthy)
		}
	}
	st := s.Snapshot()[k]
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

func TestSchedulerUpdateKeepsRestartsAndRemoves(t *testing.T) {
	clk := clock.NewFake()
	fc := newFakeChecks(clk)
	s := New(Options{Clock: clk, NewChecker: fc.newChecker})
	a := target("web", 1, health(time.Second, 2, 2))
	b := target("web", 2, health(time.Second, 2, 2))
	fc.script(b.Key(), errFake)
	s.Update([]Target{a, b})
	startRun(t, s)
	for range 3 {
		step(t, clk, s, time.Second)
	}
	snap := s.Snapshot()
	if st := snap[a.Key()]; !st.Healthy || st.Successes != 3 {
		t.Fatalf("a after 3 successes: %+v", st)
	}
	if st := snap[b.Key()]; st.Healthy || st.Failures != 3 {
		t.Fatalf("b after 3 failures: %+v", st)
	}

	// The same targets again (a new slice, equal values): state and
	// schedule are kept.
	s.Update([]Target{b, a})
	step(t, clk, s, time.Second)
	if st := s.Snapshot()[a.Key()]; st.Pending || st.Successes != 4 {
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
	s.Update([]Target{a2, b})
	st := s.Snapshot()[a.Key()]
	if !st.Pending || !st.Healthy || st.Successes != 0 || st.Failures != 0 {
		t.Errorf("a right after its settings changed: %+v, want pending, still healthy, counts reset", st)
	}
	if s.Settled() {
		t.Error("Settled while a restarted target is pending")
	}
	step(t, clk, s, time.Second)
	if st := s.Snapshot()[a.Key()]; st.Pending || st.Healthy || st.Failures != 1 {
		t.Errorf("a after its first check with new settings (a failure): %+v, want unhealthy at once despite fall 5", st)
	}

	// b is removed: gone from the snapshot and never checked again.
	s.Update([]Target{a2})
	n := len(fc.callTimes(b.Key()))
	for range 3 {
		step(t, clk, s, time.Second)
	}
	if _, ok := s.Snapshot()[b.Key()]; ok {
		t.Error("b still in the snapshot after its removal")
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
	s.Update([]Target{tg})
	if !s.Settled() {
		t.Fatal("a none target left the scheduler unsettled")
	}
	if st := s.Snapshot()[tg.Key()]; !st.Healthy || st.Pending {
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
	s.Update([]Target{target("web", 1, health(time.Second, 2, 3))})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := s.WaitSettled(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitSettled with a pending target and no Run = %v, want DeadlineExceeded", err)
	}
	s.Update(nil)
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
	s.Update(targets)
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
