package health

import (
	"container/heap"
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/switchman-lb/switchman/internal/clock"
	"github.com/switchman-lb/switchman/spec"
)

// Defaults of Options.
const (
	DefaultMaxConcurrent = 4096
	DefaultStartSpread   = time.Second
)

// lateAfter is how far behind its due time a check may start before it
// counts as late in the metrics.
const lateAfter = 100 * time.Millisecond

// Options configure a Scheduler. The zero value is usable.
type Options struct {
	// Logger receives state changes; nil discards them.
	Logger *slog.Logger
	// Registerer receives the metrics; nil registers none.
	Registerer prometheus.Registerer
	// Clock is the time source for scheduling and state times; nil is
	// clock.Real. (A check's own timeout is always real time: it bounds
	// real I/O.)
	Clock clock.Clock
	// MaxConcurrent bounds the checks running at once (each holds a socket);
	// default DefaultMaxConcurrent. When every check takes its full timeout,
	// the scheduler runs at most MaxConcurrent/timeout checks a second and
	// later checks start late (see switchman_health_checks_late_total).
	MaxConcurrent int
	// StartSpread bounds the window over which a new target's first check
	// is placed at random: min(interval, StartSpread); default
	// DefaultStartSpread. It also bounds how long the first round takes.
	StartSpread time.Duration
	// NewChecker makes the checker of a target; nil is NewChecker. Tests
	// inject fakes here.
	NewChecker func(Target) (Checker, error)
}

// Status is one target's state as Snapshot reports it.
type Status struct {
	// Healthy is the target's state. While Pending, it is false for a new
	// target and the previous state for a target restarted by a settings
	// change.
	Healthy bool
	// Pending is true until the target's first check (since it was added
	// or its settings changed) has finished.
	Pending bool
	// LastError is the error of the last check; empty after a success.
	LastError string
	// LastCheck is when the last check finished; LastTransition when the
	// state last changed (a first result counts). Both zero until then.
	LastCheck, LastTransition time.Time
	// Successes and Failures are the current runs of consecutive results.
	Successes, Failures int
	// Check describes the check, e.g. "http 10.1.1.2:8080/healthz".
	Check string
}

// Scheduler runs the checks of every target. Make one with New, start Run
// once, and call Update whenever the set of targets may have changed. All
// methods are safe for concurrent use.
type Scheduler struct {
	log        *slog.Logger
	clock      clock.Clock
	limit      int
	spread     time.Duration
	newChecker func(Target) (Checker, error)
	m          *metrics

	changed chan struct{} // cap 1: coalesced state-change signal
	wake    chan struct{} // cap 1: the dispatcher has something to look at
	jobs    chan job      // unbuffered: to idle workers

	mu       sync.Mutex
	entries  map[Key]*entry
	queue    dueQueue
	inFlight int
	pending  int
	settled  chan struct{} // closed while pending == 0
	started  bool
}

// entry is one target under the scheduler's care.
type entry struct {
	target  Target
	checker Checker
	st      state
	due     time.Time
	index   int                // in the queue; -1 when not queued
	cancel  context.CancelFunc // of the check in flight, nil when none
}

// New returns a Scheduler with no targets.
func New(opts Options) *Scheduler {
	s := &Scheduler{
		log:        opts.Logger,
		clock:      opts.Clock,
		limit:      opts.MaxConcurrent,
		spread:     opts.StartSpread,
		newChecker: opts.NewChecker,
		m:          newMetrics(opts.Registerer),
		changed:    make(chan struct{}, 1),
		wake:       make(chan struct{}, 1),
		jobs:       make(chan job),
		entries:    map[Key]*entry{},
		settled:    make(chan struct{}),
	}
	close(s.settled)
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.clock == nil {
		s.clock = clock.Real{}
	}
	if s.limit <= 0 {
		s.limit = DefaultMaxConcurrent
	}
	if s.spread <= 0 {
		s.spread = DefaultStartSpread
	}
	if s.newChecker == nil {
		s.newChecker = NewChecker
	}
	return s
}

// Update makes targets the set of targets checked. A target whose key and
// Health are unchanged keeps its state and schedule; one whose Health
// changed restarts (pending, counters reset, Healthy kept until its first
// result); new ones start pending; those no longer listed stop. Of two
// targets with the same key, the first wins.
func (s *Scheduler) Update(targets []Target) {
	seen := make(map[Key]struct{}, len(targets))
	s.mu.Lock()
	now := s.clock.Now()
	for _, t := range targets {
		k := t.Key()
		if _, dup := seen[k]; dup {
			continue
		}
		seen[k] = struct{}{}
		old := s.entries[k]
		if old != nil && old.target.Health == t.Health {
			continue
		}
		carry := false
		if old != nil {
			carry = old.st.healthy
			s.drop(old)
		}
		s.add(t, carry, now)
	}
	for k, e := range s.entries {
		if _, ok := seen[k]; !ok {
			s.drop(e)
			s.m.forget(k)
		}
	}
	s.mu.Unlock()
	s.kick()
}

// add starts checking t. s.mu is held.
func (s *Scheduler) add(t Target, healthy bool, now time.Time) {
	e := &entry{target: t, index: -1}
	k := t.Key()
	s.entries[k] = e
	if t.Health.Protocol == spec.HealthNone {
		e.checker = noneChecker{}
		e.st = state{healthy: true, lastCheck: now, lastTransition: now}
		s.m.transition(k, true)
		s.notify()
		return
	}
	c, err := s.newChecker(t)
	if err != nil {
		c = brokenChecker{desc: string(t.Health.Protocol) + " " + t.CheckAddr().String(), err: err}
	}
	e.checker = c
	e.st = newState(healthy)
	if s.pending == 0 {
		s.settled = make(chan struct{})
	}
	s.pending++
	e.due = now.Add(s.jitter(t.Health.Interval))
	heap.Push(&s.queue, e)
}

// drop stops checking e: out of the queue, its check in flight cancelled
// (its result will be ignored), out of the map. s.mu is held.
func (s *Scheduler) drop(e *entry) {
	if e.index >= 0 {
		heap.Remove(&s.queue, e.index)
	}
	if e.cancel != nil {
		e.cancel()
	}
	if e.st.pending {
		s.resolvedPending()
	}
	delete(s.entries, e.target.Key())
}

// resolvedPending counts one pending target fewer. s.mu is held.
func (s *Scheduler) resolvedPending() {
	s.pending--
	if s.pending == 0 {
		close(s.settled)
	}
}

func (s *Scheduler) jitter(interval time.Duration) time.Duration {
	w := min(interval, s.spread)
	if w <= 0 {
		return 0
	}
	return time.Duration(rand.Int64N(int64(w)))
}

func interval(h spec.Health) time.Duration {
	if h.Interval > 0 {
		return h.Interval
	}
	return spec.DefaultInterval
}

func timeout(h spec.Health) time.Duration {
	if h.Timeout > 0 {
		return h.Timeout
	}
	return spec.DefaultTimeout
}

// Run runs the checks until ctx is done, then cancels the checks in flight
// and returns once every check goroutine has stopped. It may be called once.
func (s *Scheduler) Run(ctx context.Context) error {
	s.mu.Lock()
	if s.started {
		s.mu.Unlock()
		return errors.New("health: Scheduler.Run called twice")
	}
	s.started = true
	// Targets added before Run: spread their first checks from now, not
	// from when they were added.
	now := s.clock.Now()
	for _, e := range s.queue {
		if e.st.pending {
			e.due = now.Add(s.jitter(e.target.Health.Interval))
		}
	}
	heap.Init(&s.queue)
	s.mu.Unlock()

	var wg sync.WaitGroup
	timer := s.clock.NewTimer()
	defer timer.Stop()
	for {
		if next := s.dispatch(ctx, &wg); !next.IsZero() {
			timer.ResetAt(next)
		} else {
			timer.Stop()
		}
		select {
		case <-ctx.Done():
			timer.Stop()
			wg.Wait()
			return ctx.Err()
		case <-s.wake:
		case <-timer.C():
		}
	}
}

// dispatch starts every check that is due, as far as the concurrency limit
// allows, and returns when the next one is due (zero: none queued, or the
// limit is reached and a finishing check will wake the loop).
func (s *Scheduler) dispatch(ctx context.Context, wg *sync.WaitGroup) time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ctx.Err() != nil {
		return time.Time{}
	}
	defer func() { s.m.running(s.inFlight) }()
	now := s.clock.Now()
	for len(s.queue) > 0 {
		e := s.queue[0]
		if e.due.After(now) {
			return e.due
		}
		if s.inFlight >= s.limit {
			return time.Time{}
		}
		heap.Pop(&s.queue)
		if now.Sub(e.due) > lateAfter {
			s.m.lateStart()
		}
		s.inFlight++
		cctx, cancel := context.WithTimeout(ctx, timeout(e.target.Health))
		e.cancel = cancel
		j := job{e: e, due: e.due, ctx: cctx, cancel: cancel}
		select {
		case s.jobs <- j: // an idle worker takes it
		default:
			wg.Add(1)
			go s.worker(ctx, wg, j)
		}
	}
	return time.Time{}
}

// job is one check to run.
type job struct {
	e      *entry
	due    time.Time
	ctx    context.Context
	cancel context.CancelFunc
}

// workerIdle is how long a worker waits for its next job before it exits.
// Reusing workers spares each check a new goroutine and the growth of its
// stack through the dialer's calls; idle ones do not linger.
const workerIdle = 2 * time.Second

// worker runs j, then further jobs, until none comes for workerIdle or ctx
// is done.
func (s *Scheduler) worker(ctx context.Context, wg *sync.WaitGroup, j job) {
	defer wg.Done()
	idle := time.NewTimer(workerIdle)
	defer idle.Stop()
	for {
		err := j.e.checker.Check(j.ctx)
		j.cancel()
		s.finish(j.e, j.due, err)
		idle.Reset(workerIdle)
		select {
		case j = <-s.jobs:
		case <-idle.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

// finish records the result of one check of e and queues its next check.
func (s *Scheduler) finish(e *entry, due time.Time, err error) {
	s.mu.Lock()
	s.inFlight--
	s.m.running(s.inFlight)
	e.cancel = nil
	k := e.target.Key()
	if s.entries[k] != e {
		// Removed or restarted while the check ran.
		s.mu.Unlock()
		s.kick()
		return
	}
	now := s.clock.Now()
	h := e.target.Health
	wasPending := e.st.pending
	changed := e.st.observe(err, h.Rise, h.Fall, now)
	s.m.result(k, err == nil)
	if changed {
		s.m.transition(k, e.st.healthy)
		if wasPending {
			s.resolvedPending()
		}
	}
	next := due.Add(interval(h))
	if next.Before(now) {
		next = now
	}
	e.due = next
	heap.Push(&s.queue, e)
	st := e.st
	if changed {
		s.notify() // under the lock, so a reader of Snapshot after it sees the change
	}
	s.mu.Unlock()

	if changed {
		s.logChange(k, e.checker, st, wasPending)
	}
	s.kick()
}

func (s *Scheduler) logChange(k Key, c Checker, st state, first bool) {
	attrs := []any{"service", k.Service, "backend", k.Addr, "check", c.String()}
	switch {
	case st.healthy && first:
		s.log.Debug("backend healthy at first check", attrs...)
	case st.healthy:
		s.log.Info("backend healthy", append(attrs, "successes", st.successes)...)
	case first:
		s.log.Warn("backend unhealthy at first check", append(attrs, "error", st.lastError)...)
	default:
		s.log.Warn("backend unhealthy", append(attrs, "failures", st.failures, "error", st.lastError)...)
	}
}

func (s *Scheduler) kick() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *Scheduler) notify() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// Changed returns a channel that receives a value after any target changed
// state (a first result included). Signals are coalesced: one receive may
// stand for many changes, so read Snapshot after it.
func (s *Scheduler) Changed() <-chan struct{} { return s.changed }

// Snapshot returns the state of every current target.
func (s *Scheduler) Snapshot() map[Key]Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[Key]Status, len(s.entries))
	for k, e := range s.entries {
		out[k] = Status{
			Healthy:        e.st.healthy,
			Pending:        e.st.pending,
			LastError:      e.st.lastError,
			LastCheck:      e.st.lastCheck,
			LastTransition: e.st.lastTransition,
			Successes:      e.st.successes,
			Failures:       e.st.failures,
			Check:          e.checker.String(),
		}
	}
	return out
}

// Settled reports whether every current target has its first result.
func (s *Scheduler) Settled() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pending == 0
}

// WaitSettled returns nil once every current target has its first result,
// or ctx's error when ctx is done first.
func (s *Scheduler) WaitSettled(ctx context.Context) error {
	for {
		s.mu.Lock()
		if s.pending == 0 {
			s.mu.Unlock()
			return nil
		}
		ch := s.settled
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		}
	}
}

// brokenChecker stands for a target whose checker could not be made: every
// check fails with the reason.
type brokenChecker struct {
	desc string
	err  error
}

func (b brokenChecker) String() string              { return b.desc }
func (b brokenChecker) Check(context.Context) error { return b.err }

// dueQueue is a min-heap of entries by due time.
type dueQueue []*entry

func (q dueQueue) Len() int           { return len(q) }
func (q dueQueue) Less(i, j int) bool { return q[i].due.Before(q[j].due) }
func (q dueQueue) Swap(i, j int) {
	q[i], q[j] = q[j], q[i]
	q[i].index = i
	q[j].index = j
}
func (q *dueQueue) Push(x any) {
	e := x.(*entry)
	e.index = len(*q)
	*q = append(*q, e)
}
func (q *dueQueue) Pop() any {
	old := *q
	n := len(old)
	e := old[n-1]
	old[n-1] = nil
	e.index = -1
	*q = old[:n-1]
	return e
}
