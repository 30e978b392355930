package agent

import (
	"context"
	"log/slog"
	"maps"
	"reflect"
	"slices"
	"time"

	"github.com/switchman-lb/switchman/internal/backoff"
	"github.com/switchman-lb/switchman/internal/clock"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/status"
	"github.com/switchman-lb/switchman/watcher"
)

// Source is the agent's view of etcd: a local copy read key by key, and
// the keys that changed.
type Source interface {
	// Synced reports whether the first full list has completed.
	Synced() bool
	// Changed fires (coalesced) when TakeChanges has something.
	Changed() <-chan struct{}
	// TakeChanges returns what changed since the last call.
	TakeChanges() watcher.Changes
	// ServiceNames lists every service (definition or pool) in the copy.
	ServiceNames() []string
	// Service returns one service's definition and pool members.
	Service(name string) (def watcher.KV, members map[string]watcher.KV, ok bool)
	// Value returns another key (a certificate) by its full key.
	Value(key string) (watcher.KV, bool)
}

// StatusSink receives each service's status when it changes. It must not
// block on I/O.
type StatusSink interface {
	Set(name string, st status.Status)
	Delete(name string)
}

// HealthSource is the health checker as the loop sees it.
type HealthSource interface {
	// SetService sets the backends checked for one service; nil stops
	// checking it.
	SetService(name string, svc *spec.Service)
	// Changed fires (coalesced) when TakeChanged has something.
	Changed() <-chan struct{}
	// TakeChanged names the backends whose Healthy or Pending changed since
	// the last call.
	TakeChanged() []render.BackendRef
	// Backend returns one backend's state; false when it is not checked.
	Backend(ref render.BackendRef) (render.Health, bool)
	// WaitSettled returns once every backend has had its first check, or
	// when ctx is done.
	WaitSettled(ctx context.Context) error
}

// GroupSink learns the HA groups the services in force name (the HA
// elector). SetGroups must not block.
type GroupSink interface {
	SetGroups(groups []string)
}

// Options configure the loop.
type Options struct {
	// Groups, when set, is told the set of HA groups of the services in
	// force whenever it changes.
	Groups GroupSink
	// Policy is what definitions are judged by.
	Policy Policy
	// Debounce is the quiet the loop keeps between passes: a change within
	// Debounce of the last pass waits until Debounce has passed since it,
	// and more changes coming within Debounce of each other are coalesced
	// into one pass; a lone change after a quiet spell is taken at once.
	// MaxDelay bounds the wait under a steady stream. The default
	// (DefaultDebounce) is short because a pass costs what its changes
	// cost, not what the whole table does: a long window would buy little
	// coalescing and add its length to every change that follows another.
	Debounce, MaxDelay time.Duration
	// SettleTimeout bounds how long the first apply waits for the health
	// checker's first round.
	SettleTimeout time.Duration
	// Resync is how often every driver runs a Sync, the repair path
	// (default 30s).
	Resync time.Duration
	// RetryMin and RetryMax bound each failed service's own backoff
	// (default 1s to 30s).
	RetryMin, RetryMax time.Duration
	// Clock is the time source; nil is the real clock.
	Clock clock.Clock
	// LastGood keeps last good versions across restarts; nil keeps them in
	// memory only.
	LastGood *LastGood
	// Restored are the last good versions read from LastGood at start.
	Restored map[string]Input
	// Ready, when set, is called once, from the loop's goroutine, when
	// the first pass is done: every driver's first Sync has reported (a
	// service a driver refused is failed and retried, and still counts as
	// reported). The agent's systemd readiness hangs on it. It must not
	// block.
	Ready func()
}

// Agent is the reconcile loop. It owns all state; nothing else mutates it.
type Agent struct {
	log     *slog.Logger
	src     Source
	status  StatusSink
	health  HealthSource
	metrics *Metrics
	opts    Options
	clk     clock.Clock

	eval    *Evaluator
	drain   *drainer
	records map[string]*record
	// bySecret indexes services by the etcd keys they refer to.
	bySecret map[string]map[string]bool

	planes  []Plane
	workers []*worker
	results chan result

	// dirty are services to re-evaluate; rerender are services to render
	// again with the verdict they have (health, drains).
	dirty, rerender map[string]bool
	// retries holds the services waiting to retry a failed driver.
	retries map[string]bool
	// started is set once the first Sync is issued; synced marks the
	// planes whose first Sync reported; guardLeft counts the guard planes
	// whose first Sync has not.
	started   bool
	synced    []bool
	guardLeft int
	// start times the first pass, for the log line that says what the
	// start-up spent.
	start struct{ begin, listed, evaluated, synced time.Time }

	// syncLeft counts the planes whose first Sync has not reported; Ready
	// is called when it reaches 0.
	syncLeft int

	// groups counts the services in force per HA group.
	groups map[string]int

	// counting is how many connection counts are outstanding; conns
	// gathers them.
	counting   int
	conns      map[render.BackendRef]int
	connsKnown bool
}

// DefaultDebounce is Options.Debounce when none is given.
const DefaultDebounce = 10 * time.Millisecond

// New returns an agent. health and metrics may be nil.
func New(log *slog.Logger, src Source, planes []Plane, st StatusSink, health HealthSource, metrics *Metrics, opts Options) *Agent {
	if opts.Debounce <= 0 {
		opts.Debounce = DefaultDebounce
	}
	if opts.MaxDelay <= 0 {
		opts.MaxDelay = time.Second
	}
	if opts.SettleTimeout <= 0 {
		opts.SettleTimeout = 15 * time.Second
	}
	if opts.Resync <= 0 {
		opts.Resync = 30 * time.Second
	}
	if opts.RetryMin <= 0 {
		opts.RetryMin = time.Second
	}
	if opts.RetryMax < opts.RetryMin {
		opts.RetryMax = max(30*time.Second, opts.RetryMin)
	}
	if opts.Clock == nil {
		opts.Clock = clock.Real{}
	}
	a := &Agent{
		log: log, src: src, status: st, health: health, metrics: metrics, opts: opts, clk: opts.Clock,
		drain: newDrainer(), records: map[string]*record{}, bySecret: map[string]map[string]bool{},
		planes: planes, results: make(chan result, 4*len(planes)+1),
		dirty: map[string]bool{}, rerender: map[string]bool{}, retries: map[string]bool{},
		groups: map[string]int{},
	}
	a.eval = NewEvaluator(opts.Policy, func(k string) ([]byte, bool) {
		kv, ok := src.Value(k)
		return kv.Value, ok
	})
	for i, p := range planes {
		a.workers = append(a.workers, newWorker(i, p, a.results))
	}
	return a
}

// Run reconciles until ctx is done. It does nothing until the source has
// completed its first full list, so an empty copy never tears anything
// down; its first pass is a Sync of every driver.
func (a *Agent) Run(ctx context.Context) error {
	for _, w := range a.workers {
		go w.run(ctx)
	}
	a.start.begin = a.clk.Now()
	for !a.src.Synced() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-a.src.Changed():
		}
	}
	a.start.listed = a.clk.Now()
	a.restore()
	a.src.TakeChanges() // the first pass reads everything
	for _, n := range a.src.ServiceNames() {
		a.dirty[n] = true
	}
	for n := range a.opts.Restored {
		a.dirty[n] = true // restored but deleted from etcd meanwhile: removed
	}
	a.evaluateDirty()
	a.start.evaluated = a.clk.Now()
	if a.health != nil {
		// Let the checker's first round finish, so a restart does not
		// program weight 0 for healthy backends.
		sctx, cancel := context.WithTimeout(ctx, a.opts.SettleTimeout)
		if err := a.health.WaitSettled(sctx); err != nil && ctx.Err() == nil {
			a.log.Warn("health checks did not all finish their first round; unchecked backends start at weight 0", "waited", a.opts.SettleTimeout)
		}
		cancel()
		// Render again the services whose backends the first round
		// decided (those with health "none" have nothing to redo).
		for _, ref := range a.health.TakeChanged() {
			a.rerender[ref.Service] = true
		}
		a.evaluateDirty()
	}
	a.start.synced = a.clk.Now()
	a.firstSync()

	var healthCh <-chan struct{}
	if a.health != nil {
		healthCh = a.health.Changed()
	}
	debounce := a.clk.NewTimer()
	defer debounce.Stop()
	resync := a.clk.NewTimer()
	defer resync.Stop()
	resync.ResetAt(a.clk.Now().Add(a.opts.Resync))
	retry := a.clk.NewTimer()
	defer retry.Stop()
	drainT := a.clk.NewTimer()
	defer drainT.Stop()
	a.armDrain(drainT)
	th := throttle{quiet: a.opts.Debounce, maxDelay: a.opts.MaxDelay}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-a.src.Changed():
			debounce.ResetAt(th.change(a.clk.Now()))
			continue
		case <-healthCh:
			debounce.ResetAt(th.change(a.clk.Now()))
			continue
		case r := <-a.results:
			a.handle(r)
		case <-debounce.C():
			th.passed(a.clk.Now())
			a.collect()
			a.evaluateDirty()
		case <-retry.C():
			a.retryDue()
		case <-resync.C():
			a.periodicSync()
			resync.ResetAt(a.clk.Now().Add(a.opts.Resync))
		case <-drainT.C():
			a.checkDrains()
		}
		a.armRetry(retry)
		a.armDrain(drainT)
	}
}

// restore seeds the evaluator with the last good versions kept on disk.
func (a *Agent) restore() {
	for name, in := range a.opts.Restored {
		if err := a.eval.Restore(name, in); err != nil {
			a.log.Warn("last good version on disk is not valid now; not restored", "service", name, "error", err)
		}
	}
}

// collect takes the keyed changes of the watcher and the health checker.
func (a *Agent) collect() {
	ch := a.src.TakeChanges()
	for n := range ch.Services {
		a.dirty[n] = true
	}
	for k := range ch.Other {
		for n := range a.bySecret[k] {
			a.dirty[n] = true
		}
	}
	if a.health != nil {
		for _, ref := range a.health.TakeChanged() {
			a.rerender[ref.Service] = true
		}
	}
}

// evaluateDirty re-evaluates the dirty services (and the other claimants
// of their vip:ports), then renders and dispatches everything affected.
func (a *Agent) evaluateDirty() {
	start := a.clk.Now()
	n := len(a.dirty) + len(a.rerender)
	for _, name := range slices.Sorted(mapKeys(a.dirty)) {
		def, members, ok := a.src.Service(name)
		in := Input{Def: def, Members: members, Exists: ok}
		for _, affected := range a.eval.Update(name, in) {
			a.rerender[affected] = true
		}
		a.indexSecrets(name)
		if lg := a.opts.LastGood; lg != nil {
			switch {
			case !ok:
				lg.Delete(name)
			case a.eval.LatestValid(name):
				lg.Save(name, in)
			}
		}
	}
	// New maps, not clear: a map keeps the size it once grew to (10,000
	// entries after a first pass), and ranging over it costs that much.
	a.dirty = map[string]bool{}
	for _, name := range slices.Sorted(mapKeys(a.rerender)) {
		a.renderOne(name)
	}
	a.rerender = map[string]bool{}
	if n > 0 {
		a.metrics.observePass(a.clk.Now().Sub(start), n)
	}
}

func (a *Agent) indexSecrets(name string) {
	r := a.records[name]
	var old []string
	if r != nil {
		old = r.secrets
	}
	cur := a.eval.Secrets(name)
	for _, k := range old {
		delete(a.bySecret[k], name)
		if len(a.bySecret[k]) == 0 {
			delete(a.bySecret, k)
		}
	}
	for _, k := range cur {
		if a.bySecret[k] == nil {
			a.bySecret[k] = map[string]bool{}
		}
		a.bySecret[k][name] = true
	}
	if r == nil && len(cur) > 0 {
		r = a.record(name)
	}
	if r != nil {
		r.secrets = cur
	}
}

func (a *Agent) record(name string) *record {
	r := a.records[name]
	if r == nil {
		r = &record{name: name, planes: make([]planeState, len(a.planes)), backoff: backoff.New(a.opts.RetryMin, a.opts.RetryMax, 0.2)}
		a.records[name] = r
	}
	return r
}

// renderOne renders one service with its current verdict and, when its
// desired state changed, hands it to the drivers.
func (a *Agent) renderOne(name string) {
	v := a.eval.Verdict(name)
	r := a.record(name)
	now := a.clk.Now()
	if v.InForce != r.svc {
		if a.health != nil {
			a.health.SetService(name, v.InForce)
		}
		a.regroup(r.svc, v.InForce)
		r.svc = v.InForce
	}
	r.verdict = v
	st := &render.ServiceState{Name: name}
	if v.InForce != nil {
		in := render.Input{Draining: map[string][]spec.Backend{name: a.drain.update(name, v.InForce, now)}}
		if a.health != nil {
			in.Healthy, in.Pending = map[render.BackendRef]bool{}, map[render.BackendRef]bool{}
			for _, b := range v.InForce.Backends {
				a.healthInto(in, render.BackendRef{Service: name, Addr: b.AddrPort()})
			}
			for _, b := range in.Draining[name] {
				a.healthInto(in, render.BackendRef{Service: name, Addr: b.AddrPort()})
			}
		}
		if v.InForce.TLS != nil && v.InForce.TLS.CertificateKey != "" {
			if kv, ok := a.src.Value(v.InForce.TLS.CertificateKey); ok {
				in.Secrets = map[string][]byte{v.InForce.TLS.CertificateKey: kv.Value}
			}
		}
		st = render.RenderService(v.InForce, in)
	} else {
		a.drain.update(name, nil, now)
	}
	if r.state != nil && sameState(r.state, st) {
		a.publish(r)
		a.forget(r)
		return
	}
	if r.state == nil && st.Removed() {
		// Never rendered, nothing to remove: a refused new service.
		r.state = st
		a.publish(r)
		a.forget(r)
		return
	}
	r.gen++
	st.Generation = r.gen
	r.state = st
	if a.started {
		a.dispatch(r)
	}
	a.publish(r)
	a.forget(r)
}

// regroup moves one service's count from its old HA group to its new one
// and tells the group sink when the set of groups changed.
func (a *Agent) regroup(old, cur *spec.Service) {
	changed := false
	if old != nil {
		if a.groups[old.Group]--; a.groups[old.Group] <= 0 {
			delete(a.groups, old.Group)
			changed = true
		}
	}
	if cur != nil {
		if a.groups[cur.Group]++; a.groups[cur.Group] == 1 {
			changed = true
		}
	}
	if changed && a.opts.Groups != nil {
		a.opts.Groups.SetGroups(slices.Sorted(maps.Keys(a.groups)))
	}
}

func (a *Agent) healthInto(in render.Input, ref render.BackendRef) {
	if h, ok := a.health.Backend(ref); ok {
		in.Healthy[ref] = h.Healthy
		if h.Pending {
			in.Pending[ref] = true
		}
	}
}

// sameState compares two states of one service, generation aside.
func sameState(a, b *render.ServiceState) bool {
	x, y := *a, *b
	x.Generation, y.Generation = 0, 0
	return reflect.DeepEqual(x, y)
}

// forget drops the record of a service that is gone from etcd and from
// every driver.
func (a *Agent) forget(r *record) {
	if r.verdict.Exists || r.busy() || !r.state.Removed() {
		return
	}
	for _, p := range r.planes {
		if p.served {
			return
		}
	}
	delete(a.records, r.name)
	delete(a.retries, r.name)
}

// armDrain sets t to the next look at draining backends.
func (a *Agent) armDrain(t clock.Timer) {
	if a.drain.empty() || a.counting > 0 {
		t.Stop()
		return
	}
	now := a.clk.Now()
	t.ResetAt(now.Add(a.drain.nextCheck(now)))
}

// checkDrains ends the drains whose time is up and asks the drivers that
// can count connections about the rest; countsIn ends those with none.
func (a *Agent) checkDrains() {
	for _, n := range a.drain.finish(a.clk.Now(), nil, false) {
		a.rerender[n] = true
	}
	if !a.drain.empty() && a.counting == 0 {
		services := a.drain.services()
		a.conns, a.connsKnown = map[render.BackendRef]int{}, false
		for i, p := range a.planes {
			if _, ok := p.Driver.(ConnectionCounter); ok {
				a.workers[i].countConns(services)
				a.counting++
			}
		}
	}
	a.evaluateDirty()
}

func (a *Agent) countsIn(res result) {
	a.counting--
	if res.countErr != nil {
		a.log.Warn("read connection counts for draining backends", "driver", a.planes[res.plane].Driver.Name(), "error", res.countErr)
	} else {
		a.connsKnown = true
		for k, v := range res.conns {
			a.conns[k] += v
		}
	}
	if a.counting > 0 {
		return
	}
	for _, n := range a.drain.finish(a.clk.Now(), a.conns, a.connsKnown) {
		a.rerender[n] = true
	}
	a.evaluateDirty()
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}
