package health

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"math/rand/v2"
	"net/netip"
	"slices"
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

// loopTick is the shortest time between two timed turns of Run's loop:
// a turn starts every check that is due and reads the connect poller's
// checks that ended, and the next one comes when the next check is due
// or, with checks in flight on the poller, to read them, but no sooner
// than loopTick after. So checks due close together share one turn (at a
// few thousand checks a second, waking per check costs more than the
// check), a check starts at most loopTick late, never early, and a
// result is read at most loopTick after it came. Schedules do not drift:
// a check is due one interval after the previous one was due.
const loopTick = 10 * time.Millisecond

// Options configure a Scheduler. The zero value is usable.
type Options struct {
	// Logger receives state changes; nil discards them.
	Logger *slog.Logger
	// Registerer receives the metrics; nil registers none.
	Registerer prometheus.Registerer
	// Clock is the time source for scheduling and state times; nil is
	// clock.Real. (A check's own timeout is always real time: it bounds
	// real I/O. tcp checks are read at the loop's turns, which follow
	// this clock.)
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

// Status is one target's state as Scheduler.Status reports it.
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
// once, and call SetService whenever a service's targets may have changed.
// All methods are safe for concurrent use.
type Scheduler struct {
	log        *slog.Logger
	clock      clock.Clock
	base       time.Time // due times are nanoseconds since base
	limit      int
	spread     time.Duration
	newChecker func(Target) (Checker, error)
	m          *metrics

	changed chan struct{} // cap 1: coalesced "TakeChanged has something"
	wake    chan struct{} // cap 1: Run's loop has something to look at
	jobs    chan job      // unbuffered: to idle workers

	mu       sync.Mutex
	services map[string]*service
	queue    keyedHeap[*entry] // by due time; holds dropped entries until they come up
	flipped  map[Key]struct{}  // for TakeChanged
	inFlight int
	pending  int
	settled  chan struct{} // closed while pending == 0
	started  bool
	poller   *connectPoller // runs tcp checks; nil: they run on workers
	armed    int64          // when the loop's timer fires; math.MaxInt64: not armed
	blocked  bool           // the loop stopped at the concurrency limit

	// The loop's scratch (only Run's goroutine uses them).
	batch  []*entry
	starts []startedCheck
}

// service is the bookkeeping of one service: SetService touches only this.
type service struct {
	name    string
	targets map[netip.AddrPort]*entry
	// Its checks-run counters, looked up once (nil without metrics).
	ok, failed prometheus.Counter
}

// entry is one target under the scheduler's care.
type entry struct {
	target  Target
	svc     *service
	checker Checker
	tcp     *tcpChecker // set when the connect poller can run the checks
	st      state
	due     int64              // nanoseconds since the scheduler's base
	running bool               // a check is in flight
	dropped bool               // removed or restarted: results are ignored
	cancel  context.CancelFunc // of a check in flight on a worker
	conn    uint64             // id of a check in flight on the poller; 0 when none
}

func (e *entry) status() Status {
	st := Status{
		Healthy:        e.st.healthy,
		Pending:        e.st.pending,
		LastCheck:      e.st.lastCheck,
		LastTransition: e.st.lastTransition,
		Successes:      e.st.successes,
		Failures:       e.st.failures,
		Check:          e.checker.String(),
	}
	if e.st.lastErr != nil {
		st.LastError = e.st.lastErr.Error()
	}
	return st
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
		services:   map[string]*service{},
		flipped:    map[Key]struct{}{},
		settled:    make(chan struct{}),
		armed:      math.MaxInt64,
	}
	close(s.settled)
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.clock == nil {
		s.clock = clock.Real{}
	}
	s.base = s.clock.Now()
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

// since converts a time of the scheduler's clock to its due-time scale.
func (s *Scheduler) since(t time.Time) int64 { return int64(t.Sub(s.base)) }

// SetService makes targets the set checked for the service name and leaves
// every other service alone; it costs in proportion to this service's
// targets. A target whose address and Health are unchanged keeps its state
// and schedule; one whose Health changed restarts (pending, counters
// reset, Healthy kept until its first result); new ones start pending;
// ones no longer listed stop. nil or empty removes the service. Each
// target's Service is taken to be name; of two targets with the same
// address, the first wins.
func (s *Scheduler) SetService(name string, targets []Target) {
	s.mu.Lock()
	defer s.mu.Unlock()
	svc := s.services[name]
	if len(targets) == 0 {
		if svc != nil {
			for _, e := range svc.targets {
				s.remove(e)
			}
			delete(s.services, name)
		}
		return
	}
	if svc == nil {
		svc = &service{name: name, targets: map[netip.AddrPort]*entry{}}
		svc.ok, svc.failed = s.m.checkCounters(name)
		s.services[name] = svc
	}
	now := s.clock.Now()
	next := make(map[netip.AddrPort]*entry, len(targets))
	for _, t := range targets {
		t.Service = name
		if _, dup := next[t.Addr]; dup {
			continue
		}
		old := svc.targets[t.Addr]
		switch {
		case old == nil:
			e := s.add(svc, t, false, now)
			s.markIfChanged(e, true, false)
			next[t.Addr] = e
		case old.target.Health == t.Health:
			next[t.Addr] = old
		default: // restart, keeping Healthy until the first new result
			wasPending, wasHealthy := old.st.pending, old.st.healthy
			s.drop(old)
			e := s.add(svc, t, wasHealthy, now)
			s.markIfChanged(e, wasPending, wasHealthy)
			next[t.Addr] = e
		}
	}
	for addr, e := range svc.targets {
		if next[addr] != e && !e.dropped {
			s.remove(e)
		}
	}
	svc.targets = next
	s.kick()
}

// add starts checking t. s.mu is held.
func (s *Scheduler) add(svc *service, t Target, healthy bool, now time.Time) *entry {
	e := &entry{target: t, svc: svc}
	if t.Health.Protocol == spec.HealthNone {
		e.checker = noneChecker{}
		e.st = state{healthy: true, lastCheck: now, lastTransition: now}
		s.m.transition(t.Key(), true)
		return e
	}
	c, err := s.newChecker(t)
	if err != nil {
		c = brokenChecker{desc: string(t.Health.Protocol) + " " + t.CheckAddr().String(), err: err}
	}
	e.checker = c
	e.tcp, _ = c.(*tcpChecker)
	e.st = newState(healthy)
	if s.pending == 0 {
		s.settled = make(chan struct{})
	}
	s.pending++
	e.due = s.since(now) + s.jitter(t.Health.Interval)
	s.queue.push(e, e.due)
	return e
}

// markIfChanged records e's key for TakeChanged when its Pending or
// Healthy differs from the values given. s.mu is held.
func (s *Scheduler) markIfChanged(e *entry, pending, healthy bool) {
	if e.st.pending != pending || e.st.healthy != healthy {
		s.markFlipped(e.target.Key())
	}
}

func (s *Scheduler) markFlipped(k Key) {
	s.flipped[k] = struct{}{}
	s.notify()
}

// remove stops checking e for good: its key is forgotten. s.mu is held.
func (s *Scheduler) remove(e *entry) {
	s.drop(e)
	k := e.target.Key()
	s.m.forget(k)
	delete(s.flipped, k)
}

// drop stops checking e: it leaves the queue when it comes up, and its
// check in flight is canceled (its result will be ignored). s.mu is held.
func (s *Scheduler) drop(e *entry) {
	e.dropped = true
	if e.cancel != nil {
		e.cancel()
	}
	if e.conn != 0 && s.poller != nil {
		s.poller.cancel(e.conn)
	}
	if e.st.pending {
		s.resolvedPending()
	}
}

// resolvedPending counts one pending target fewer. s.mu is held.
func (s *Scheduler) resolvedPending() {
	s.pending--
	if s.pending == 0 {
		close(s.settled)
	}
}

func (s *Scheduler) jitter(interval time.Duration) int64 {
	w := min(interval, s.spread)
	if w <= 0 {
		return 0
	}
	return rand.Int64N(int64(w))
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
	now := s.since(s.clock.Now())
	for _, it := range s.queue.take() {
		e := it.p
		if e.dropped {
			continue
		}
		if e.st.pending {
			e.due = now + s.jitter(e.target.Health.Interval)
		}
		s.queue.push(e, e.due)
	}
	s.mu.Unlock()

	p, err := newConnectPoller()
	if err != nil {
		if !errors.Is(err, errors.ErrUnsupported) {
			s.log.Warn("tcp checks run on worker goroutines: no connect poller", "error", err)
		}
	} else {
		s.mu.Lock()
		s.poller = p
		s.mu.Unlock()
	}

	var wg sync.WaitGroup
	timer := s.clock.NewTimer()
	defer timer.Stop()
	for {
		if next, ok := s.turn(ctx, &wg); ok {
			timer.ResetAt(s.base.Add(time.Duration(next)))
		} else {
			timer.Stop()
		}
		select {
		case <-ctx.Done():
			timer.Stop()
			s.mu.Lock()
			if s.poller != nil {
				s.poller.close()
				s.poller = nil
			}
			s.mu.Unlock()
			wg.Wait()
			return ctx.Err()
		case <-s.wake:
		case <-timer.C():
		}
	}
}

// turn is one turn of Run's loop: it starts every check that is due, as
// far as the concurrency limit allows, reads the poller's checks that
// ended, and returns when to come back (false: not before a kick).
func (s *Scheduler) turn(ctx context.Context, wg *sync.WaitGroup) (int64, bool) {
	s.mu.Lock()
	if ctx.Err() != nil {
		s.mu.Unlock()
		return 0, false
	}
	p := s.poller
	now := s.since(s.clock.Now())
	s.blocked = false
	batch := s.batch[:0]
	for s.queue.len() > 0 {
		e, due := s.queue.min()
		if due > now {
			break
		}
		if e.dropped {
			s.queue.pop()
			continue
		}
		if s.inFlight >= s.limit {
			s.blocked = true
			break
		}
		s.queue.pop()
		if now-due > int64(lateAfter) {
			s.m.lateStart()
		}
		s.inFlight++
		e.running = true
		if p != nil && e.tcp != nil {
			batch = append(batch, e)
			continue
		}
		s.startWorker(ctx, wg, e)
	}
	s.mu.Unlock()

	// The poller's work happens outside s.mu: making and connecting the
	// sockets, reading which connects are done, closing them.
	starts := slices.Grow(s.starts[:0], len(batch))[:len(batch)]
	var results []checkResult
	var perr error
	if p != nil {
		p.start(batch, starts)
		results, perr = p.harvest()
	}

	var changes []change
	s.mu.Lock()
	nowT := s.clock.Now()
	for i, e := range batch {
		r := starts[i]
		switch {
		case r.err == nil:
			if e.dropped {
				p.cancel(r.id)
			} else if e.running {
				e.conn = r.id
			}
		case errors.Is(r.err, errPollerStopped):
			s.requeueLocked(ctx, wg, e)
		default: // the connect failed at once: that is the check's result
			s.recordLocked(checkResult{e: e, err: r.err}, nowT, &changes)
		}
	}
	for _, r := range results {
		if errors.Is(r.err, errPollerStopped) {
			s.requeueLocked(ctx, wg, r.e)
			continue
		}
		s.recordLocked(r, nowT, &changes)
	}
	if perr != nil && s.poller == p {
		s.poller = nil
	}
	// Still at the limit after this turn's results: a later result (a
	// worker's, or the poller's read at the next tick) wakes the loop.
	s.blocked = s.blocked && s.inFlight >= s.limit
	next, queued := int64(0), false
	if s.queue.len() > 0 && !s.blocked {
		_, next = s.queue.min()
		queued = true
	}
	if p != nil && p.pending() > 0 {
		next, queued = now, true // read them at the next tick
	}
	if queued {
		next = max(next, now+int64(loopTick))
	}
	s.armed = math.MaxInt64
	if queued {
		s.armed = next
	}
	s.m.running(s.inFlight)
	s.mu.Unlock()

	clear(batch)
	s.batch = batch[:0]
	clear(starts)
	s.starts = starts[:0]
	if perr != nil {
		s.log.Warn("tcp checks move to worker goroutines: the connect poller failed", "error", perr)
	}
	s.logChanges(changes)
	return next, queued
}

// requeueLocked runs e's check, which the poller did not run, on a worker.
// s.mu is held.
func (s *Scheduler) requeueLocked(ctx context.Context, wg *sync.WaitGroup, e *entry) {
	e.conn = 0
	if e.dropped {
		s.inFlight--
		e.running = false
		return
	}
	s.startWorker(ctx, wg, e)
}

// startedCheck is what the poller said to one start.
type startedCheck struct {
	id  uint64
	err error
}

// startWorker runs e's check on a worker goroutine. s.mu is held.
func (s *Scheduler) startWorker(ctx context.Context, wg *sync.WaitGroup, e *entry) {
	cctx, cancel := context.WithTimeout(ctx, timeout(e.target.Health))
	e.cancel = cancel
	j := job{e: e, ctx: cctx, cancel: cancel}
	select {
	case s.jobs <- j: // an idle worker takes it
	default:
		wg.Add(1)
		go s.worker(ctx, wg, j)
	}
}

// job is one check to run on a worker.
type job struct {
	e      *entry
	ctx    context.Context
	cancel context.CancelFunc
}

// workerIdle is how long a worker waits for its next job before it exits.
// Reusing workers spares each check a new goroutine and the growth of its
// stack; idle ones do not linger.
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
		s.record(checkResult{e: j.e, err: err})
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

// record records the result of a worker's check.
func (s *Scheduler) record(r checkResult) {
	var changes []change
	s.mu.Lock()
	blocked := s.blocked
	kick := s.recordLocked(r, s.clock.Now(), &changes) || blocked
	s.m.running(s.inFlight)
	s.mu.Unlock()
	s.logChanges(changes)
	if kick {
		s.kick()
	}
}

// recordLocked records the result of a check that was in flight (ignored
// when its entry was dropped meanwhile) and reports whether the entry's
// next check is due before the loop's timer fires. s.mu is held.
func (s *Scheduler) recordLocked(r checkResult, now time.Time, changes *[]change) bool {
	e := r.e
	s.inFlight--
	e.running, e.conn, e.cancel = false, 0, nil
	if e.dropped {
		return false
	}
	return s.finishLocked(e, r.err, now, changes)
}

// change is a state change to log.
type change struct {
	key   Key
	check string
	st    state
	first bool
}

// finishLocked records one result of e (err nil: success) at now, queues
// its next check, and reports whether that is due before the loop's
// timer fires. s.mu is held.
func (s *Scheduler) finishLocked(e *entry, err error, now time.Time, changes *[]change) bool {
	h := e.target.Health
	wasPending := e.st.pending
	changed := e.st.observe(err, h.Rise, h.Fall, now)
	if e.svc.ok != nil {
		if err == nil {
			e.svc.ok.Inc()
		} else {
			e.svc.failed.Inc()
		}
	}
	if changed {
		k := e.target.Key()
		s.m.transition(k, e.st.healthy)
		if wasPending {
			s.resolvedPending()
		}
		s.markFlipped(k) // under the lock: a reader after the signal sees the change
		*changes = append(*changes, change{key: k, check: e.checker.String(), st: e.st, first: wasPending})
	}
	next := e.due + int64(interval(h))
	if n := s.since(now); next < n {
		next = n
	}
	e.due = next
	s.queue.push(e, next)
	return next < s.armed
}

func (s *Scheduler) logChanges(changes []change) {
	for _, c := range changes {
		attrs := []any{"service", c.key.Service, "backend", c.key.Addr, "check", c.check}
		switch st := c.st; {
		case st.healthy && c.first:
			s.log.Debug("backend healthy at first check", attrs...)
		case st.healthy:
			s.log.Info("backend healthy", append(attrs, "successes", st.successes)...)
		case c.first:
			s.log.Warn("backend unhealthy at first check", append(attrs, "error", st.lastErr)...)
		default:
			s.log.Warn("backend unhealthy", append(attrs, "failures", st.failures, "error", st.lastErr)...)
		}
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

// Changed returns a channel that receives a value when TakeChanged has
// something to return. Signals are coalesced: one receive may stand for
// many changes.
func (s *Scheduler) Changed() <-chan struct{} { return s.changed }

// TakeChanged returns the keys whose Healthy or Pending changed since the
// last call, sorted, and forgets them: a first result, a flip by rise or
// fall, a restart by a settings change (when it changes either value), a
// protocol "none" target turning healthy. A change of LastError alone, a
// new target (pending and not healthy, as every new target is) and a
// removed one are not reported: the caller of SetService knows of them.
func (s *Scheduler) TakeChanged() []Key {
	s.mu.Lock()
	if len(s.flipped) == 0 {
		s.mu.Unlock()
		return nil
	}
	out := make([]Key, 0, len(s.flipped))
	for k := range s.flipped {
		out = append(out, k)
	}
	s.flipped = map[Key]struct{}{}
	s.mu.Unlock()
	slices.SortFunc(out, func(a, b Key) int {
		if a.Service != b.Service {
			if a.Service < b.Service {
				return -1
			}
			return 1
		}
		return a.Addr.Compare(b.Addr)
	})
	return out
}

// Status returns one target's state; false when no service has it.
func (s *Scheduler) Status(k Key) (Status, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	svc := s.services[k.Service]
	if svc == nil {
		return Status{}, false
	}
	e := svc.targets[k.Addr]
	if e == nil {
		return Status{}, false
	}
	return e.status(), true
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
