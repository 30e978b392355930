package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/status"
	"github.com/switchman-lb/switchman/watcher"
)

// Source is the agent's view of etcd: a copy of the definitions and a
// signal when it changes.
type Source interface {
	Snapshot() watcher.Snapshot
	Changed() <-chan struct{}
	Synced() bool
}

// StatusSink receives every service's status after each reconcile. It must
// not block on I/O.
type StatusSink interface {
	Publish(map[string]status.Status)
}

// BackendHealth is the health checker's word on one backend.
type BackendHealth struct {
	Healthy bool
	// Pending is true until the backend's first check has finished.
	Pending        bool
	LastError      string
	LastTransition time.Time
}

// HealthSource is the health checker as the loop sees it.
type HealthSource interface {
	// SetServices replaces the set of services whose backends are checked.
	SetServices([]*spec.Service)
	// View returns every checked backend's state. A backend whose first
	// check has not finished is reported unhealthy.
	View() map[render.BackendRef]BackendHealth
	// Changed fires when any backend changes state.
	Changed() <-chan struct{}
	// WaitSettled returns once every backend has had its first check, or
	// when ctx is done.
	WaitSettled(ctx context.Context) error
}

// ConnectionCounter is implemented by drivers that can tell how many
// connections a backend still has, which ends a drain early. It is asked
// only about the services named, those with draining backends.
type ConnectionCounter interface {
	Connections(ctx context.Context, services map[string]bool) (map[render.BackendRef]int, error)
}

// Options configure the loop.
type Options struct {
	// Debounce is how long the loop waits after a change for more to come
	// (coalescing bursts); MaxDelay bounds the wait under a steady stream.
	Debounce, MaxDelay time.Duration
	// SettleTimeout bounds how long the first apply waits for the health
	// checker's first round.
	SettleTimeout time.Duration
	// Prefix is the etcd prefix, for certificate keys.
	Prefix string
	// VIPCIDRs restricts the VIPs this agent serves; empty means any.
	VIPCIDRs []netip.Prefix
	// Resync is the longest the loop waits between passes when nothing
	// happens: a quiet pass repairs changes made behind the agent's back
	// (default 30s).
	Resync time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Agent is the reconcile loop. It owns all state; nothing else mutates it.
type Agent struct {
	log     *slog.Logger
	src     Source
	drivers []Driver
	status  StatusSink
	health  HealthSource
	metrics *Metrics
	opts    Options
	eval    *evaluator
	drain   *drainer
	// logged is each service's last logged error, so a failure retried
	// every pass is logged once until it changes.
	logged map[string]string
}

// New returns an agent. health and metrics may be nil.
func New(log *slog.Logger, src Source, drivers []Driver, status StatusSink, health HealthSource, metrics *Metrics, opts Options) *Agent {
	if opts.Debounce <= 0 {
		opts.Debounce = 50 * time.Millisecond
	}
	if opts.MaxDelay <= 0 {
		opts.MaxDelay = time.Second
	}
	if opts.SettleTimeout <= 0 {
		opts.SettleTimeout = 15 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Resync <= 0 {
		opts.Resync = 30 * time.Second
	}
	return &Agent{log: log, src: src, drivers: drivers, status: status, health: health, metrics: metrics, opts: opts,
		eval: newEvaluator(opts.Prefix, opts.VIPCIDRs), drain: newDrainer(), logged: map[string]string{}}
}

// Run reconciles until ctx is done. It does nothing until the source has
// completed its first full list, so an empty copy never tears anything down.
func (a *Agent) Run(ctx context.Context) error {
	var healthCh <-chan struct{}
	if a.health != nil {
		healthCh = a.health.Changed()
	}
	for !a.src.Synced() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-a.src.Changed():
		}
	}
	if a.health != nil {
		// Tell the checker what to check and let its first round finish, so
		// a restart does not program weight 0 for healthy backends.
		a.health.SetServices(inForce(a.eval.evaluate(a.src.Snapshot())))
		sctx, cancel := context.WithTimeout(ctx, a.opts.SettleTimeout)
		if err := a.health.WaitSettled(sctx); err != nil && ctx.Err() == nil {
			a.log.Warn("health checks did not all finish their first round; unchecked backends start at weight 0", "waited", a.opts.SettleTimeout)
		}
		cancel()
	}
	retry := newBackoff(time.Second, 30*time.Second)
	timer := time.NewTimer(0) // the first pass at once
	defer timer.Stop()
	var firstChange time.Time
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-a.src.Changed():
			firstChange = a.debounce(timer, firstChange)
			continue
		case <-healthCh:
			firstChange = a.debounce(timer, firstChange)
			continue
		case <-timer.C:
		}
		firstChange = time.Time{}
		res := a.reconcile(ctx)
		switch {
		case res.failed:
			timer.Reset(retry.next())
		case res.wakeIn > 0:
			retry.reset()
			timer.Reset(min(res.wakeIn, a.opts.Resync))
		default:
			retry.reset()
			timer.Reset(a.opts.Resync)
		}
	}
}

// debounce (re)arms the timer after a change: a burst is coalesced into one
// pass, which comes no later than MaxDelay after the burst's first change.
func (a *Agent) debounce(timer *time.Timer, firstChange time.Time) time.Time {
	now := a.opts.Now()
	if firstChange.IsZero() {
		firstChange = now
	}
	timer.Reset(max(0, min(a.opts.Debounce, a.opts.MaxDelay-now.Sub(firstChange))))
	return firstChange
}

// passResult tells the loop when to come back.
type passResult struct {
	failed bool          // a driver failed: retry with backoff
	wakeIn time.Duration // draining: look again after this long
}

// reconcile runs one pass: evaluate, render, apply, record.
func (a *Agent) reconcile(ctx context.Context) passResult {
	start := a.opts.Now()
	snap := a.src.Snapshot()
	verdicts := a.eval.evaluate(snap)
	services := inForce(verdicts)
	if a.health != nil {
		a.health.SetServices(services)
	}
	in := render.Input{Services: services, Secrets: secrets(snap)}
	var view map[render.BackendRef]BackendHealth
	if a.health != nil {
		view = a.health.View()
		in.Healthy = make(map[render.BackendRef]bool, len(view))
		in.Pending = map[render.BackendRef]bool{}
		for ref, h := range view {
			in.Healthy[ref] = h.Healthy
			if h.Pending {
				in.Pending[ref] = true
			}
		}
	}
	in.Draining = a.drain.update(services, start)
	desired := render.Render(in)

	failures := map[string][]string{}
	for _, d := range a.drivers {
		dctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		errs := d.Apply(dctx, desired)
		cancel()
		for name, err := range errs {
			failures[name] = append(failures[name], fmt.Sprintf("%s: %v", d.Name(), err))
		}
	}
	if ctx.Err() != nil {
		// Shutting down: the drivers were cut off, which says nothing
		// about the services; report nothing rather than "failed".
		return passResult{}
	}
	wake := a.finishDrains(ctx, start)

	statuses := make(map[string]status.Status, len(verdicts))
	reports := map[string]render.ServiceReport{}
	for _, r := range desired.Services {
		reports[r.Name] = r
	}
	counts := map[string]int{}
	var maxRev int64
	for name, v := range verdicts {
		st := status.Status{State: status.StateApplied, Revision: v.revision, Backends: []status.BackendStatus{}}
		if v.inForce != nil {
			st.Driver = string(v.inForce.Driver)
			st.VIP = v.inForce.Key().String()
		}
		if r, ok := reports[name]; ok {
			st.FailingOpen = r.FailingOpen
			st.Backends = backendStatuses(r, name, view)
		}
		var msgs []string
		if v.rejected != nil {
			st.State = status.StateRejected
			msgs = append(msgs, v.rejected.Error())
			if v.inForce != nil {
				msgs = append(msgs, fmt.Sprintf("the last good version (revision %d) stays in force", v.revision))
			}
		}
		if f := failures[name]; len(f) > 0 {
			if st.State == status.StateApplied {
				st.State = status.StateFailed
			}
			sort.Strings(f)
			msgs = append(msgs, f...)
		}
		st.Error = strings.Join(msgs, "; ")
		if st.State == status.StateApplied {
			maxRev = max(maxRev, v.revision)
		}
		if st.State != status.StateApplied && a.logged[name] != st.Error {
			a.log.Warn("service not applied", "service", name, "state", st.State, "error", st.Error)
		}
		a.logged[name] = st.Error
		counts[st.State]++
		if st.FailingOpen {
			counts["failing_open"]++
		}
		statuses[name] = st
	}
	for name := range a.logged {
		if _, ok := verdicts[name]; !ok {
			delete(a.logged, name)
		}
	}
	if a.status != nil {
		a.status.Publish(statuses)
	}
	a.metrics.observe(a.opts.Now().Sub(start), counts, maxRev)
	a.log.Debug("reconciled", "services", len(verdicts), "revision", snap.Revision, "took", a.opts.Now().Sub(start))
	return passResult{failed: len(failures) > 0, wakeIn: wake}
}

// finishDrains ends the drains whose backends have no connections left or
// whose time is up, and says when to look again.
func (a *Agent) finishDrains(ctx context.Context, now time.Time) time.Duration {
	if a.drain.empty() {
		return 0
	}
	conns := map[render.BackendRef]int{}
	known := false
	for _, d := range a.drivers {
		if cc, ok := d.(ConnectionCounter); ok {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			c, err := cc.Connections(cctx, a.drain.services())
			cancel()
			if err != nil {
				a.log.Warn("read connection counts for draining backends", "driver", d.Name(), "error", err)
				continue
			}
			known = true
			for k, v := range c {
				conns[k] += v
			}
		}
	}
	if a.drain.finish(now, conns, known) {
		return time.Millisecond // some drains ended: reconcile again to delete them
	}
	return a.drain.nextCheck(now)
}

func secrets(snap watcher.Snapshot) map[string][]byte {
	out := make(map[string][]byte, len(snap.Other))
	for k, v := range snap.Other {
		out[k] = v.Value
	}
	return out
}

func backendStatuses(r render.ServiceReport, name string, view map[render.BackendRef]BackendHealth) []status.BackendStatus {
	out := make([]status.BackendStatus, 0, len(r.Backends))
	for _, b := range r.Backends {
		bs := status.BackendStatus{Address: b.Address.String(), Port: b.Port, Healthy: b.Healthy, Weight: b.Weight, Draining: b.Draining}
		if h, ok := view[render.BackendRef{Service: name, Addr: netip.AddrPortFrom(b.Address, b.Port)}]; ok {
			bs.LastError = h.LastError
			if !h.LastTransition.IsZero() {
				t := h.LastTransition.UTC()
				bs.LastTransition = &t
			}
		}
		out = append(out, bs)
	}
	return out
}

// backoff doubles a delay up to a bound.
type backoff struct{ cur, min, max time.Duration }

func newBackoff(lo, hi time.Duration) *backoff { return &backoff{cur: lo, min: lo, max: hi} }

func (b *backoff) next() time.Duration {
	d := b.cur
	b.cur = min(b.cur*2, b.max)
	return d
}

func (b *backoff) reset() { b.cur = b.min }
