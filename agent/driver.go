// Package agent runs switchman's reconcile loop. It keeps a record per
// service (its verdict, last good version, rendered state, status and
// retry backoff); an event re-evaluates and re-renders only the services
// it names, and hands them only to the drivers that serve them. Each driver
// runs in a worker goroutine of its own, so a slow or failing driver
// delays only its own services. A periodic Sync of every driver is the
// repair path.
package agent

import (
	"context"
	"maps"
	"sync"
	"time"

	"github.com/switchman-lb/switchman/render"
)

// Driver programs one data plane (IPVS, nf_tables, HAProxy, netfilter,
// VIPs). The agent calls it from one goroutine of its own, never
// concurrently with itself. See docs/ARCHITECTURE.md.
type Driver interface {
	// Name names the driver in logs and status, e.g. "ipvs".
	Name() string
	// Apply brings each given service to its desired state and touches
	// nothing else: a service whose part for this driver is nil is removed
	// from this driver's system. It reads only what these services need
	// and returns the services it could not program, with the reason.
	Apply(ctx context.Context, changed []*render.ServiceState) map[string]error
	// Sync makes the driver's whole system match all, every service this
	// driver serves: it reads back what the system holds, repairs drift and
	// removes what it owns that is not in all. When nothing differs it
	// writes nothing.
	Sync(ctx context.Context, all []*render.ServiceState) map[string]error
}

// ConnectionCounter is implemented by drivers that can tell how many
// connections a backend still has, which ends a drain early. It is asked
// only about the services named, those with draining backends, from the
// driver's own worker.
type ConnectionCounter interface {
	Connections(ctx context.Context, services map[string]bool) (map[render.BackendRef]int, error)
}

// Plane is a driver as the loop runs it.
type Plane struct {
	Driver Driver
	// Part names the part of each service's state this driver serves
	// (render.PartIPVS, ...). The loop hands the driver a service when
	// that part changes, including its removal.
	Part string
	// Guard marks a driver whose part must be in force before the other
	// drivers expose the service (the access filter), and removed only
	// after they have withdrawn it.
	Guard bool
	// Timeout bounds one Apply or Sync (default 2 minutes).
	Timeout time.Duration
}

// workKind is what a worker was asked to do.
type workKind int

const (
	workApply workKind = iota
	workSync
	workCount
)

// result is what a worker reports back to the loop.
type result struct {
	plane int
	kind  workKind
	// gens is the generation of every service handed to the driver.
	gens map[string]uint64
	errs map[string]error
	// conns and countErr answer a workCount.
	conns    map[render.BackendRef]int
	countErr error
	took     time.Duration
}

// worker runs one plane's driver. The loop queues work without blocking:
// the latest state of a service replaces an older one still queued.
type worker struct {
	index int
	plane Plane
	out   chan<- result
	wake  chan struct{}

	mu      sync.Mutex
	pending map[string]*render.ServiceState
	sync    []*render.ServiceState // with syncing: what the Sync is for
	syncing bool                   // a Sync is asked for
	count   map[string]bool        // non-nil: connection counts asked for
}

func newWorker(i int, p Plane, out chan<- result) *worker {
	if p.Timeout <= 0 {
		p.Timeout = 2 * time.Minute
	}
	return &worker{index: i, plane: p, out: out, wake: make(chan struct{}, 1), pending: map[string]*render.ServiceState{}}
}

func (w *worker) kick() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// apply queues one service's state.
func (w *worker) apply(s *render.ServiceState) {
	w.mu.Lock()
	w.pending[s.Name] = s
	w.mu.Unlock()
	w.kick()
}

// syncAll queues a Sync of every service the driver serves. A queued
// state that all holds in the same or a newer version is dropped; the
// others stay queued and are applied after the Sync.
func (w *worker) syncAll(all []*render.ServiceState) {
	w.mu.Lock()
	w.sync, w.syncing = all, true
	for _, s := range all {
		if p, ok := w.pending[s.Name]; ok && p.Generation <= s.Generation {
			delete(w.pending, s.Name)
		}
	}
	w.mu.Unlock()
	w.kick()
}

// countConns asks for the connection counts of the named services.
func (w *worker) countConns(services map[string]bool) {
	w.mu.Lock()
	if w.count == nil {
		w.count = map[string]bool{}
	}
	maps.Copy(w.count, services)
	w.mu.Unlock()
	w.kick()
}

// run serves the queue until ctx is done.
func (w *worker) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.wake:
		}
		for ctx.Err() == nil && w.step(ctx) {
		}
	}
}

// step does what is queued (a Sync, else the pending Applies, then any
// connection count) and reports whether there was anything.
func (w *worker) step(ctx context.Context) bool {
	w.mu.Lock()
	all, syncing, count := w.sync, w.syncing, w.count
	var batch []*render.ServiceState
	if !syncing && len(w.pending) > 0 {
		batch = make([]*render.ServiceState, 0, len(w.pending))
		for _, s := range w.pending {
			batch = append(batch, s)
		}
		w.pending = map[string]*render.ServiceState{} // not clear: see evaluateDirty
	}
	w.sync, w.syncing, w.count = nil, false, nil
	w.mu.Unlock()
	switch {
	case syncing:
		w.run1(ctx, workSync, all)
	case batch != nil:
		w.run1(ctx, workApply, batch)
	}
	if count != nil {
		w.counts(ctx, count)
	}
	return syncing || batch != nil || count != nil
}

func (w *worker) run1(ctx context.Context, kind workKind, states []*render.ServiceState) {
	start := time.Now()
	dctx, cancel := context.WithTimeout(ctx, w.plane.Timeout)
	var errs map[string]error
	if kind == workSync {
		errs = w.plane.Driver.Sync(dctx, states)
	} else {
		errs = w.plane.Driver.Apply(dctx, states)
	}
	cancel()
	if ctx.Err() != nil {
		return // shutting down: the results say nothing about the services
	}
	gens := make(map[string]uint64, len(states))
	for _, s := range states {
		gens[s.Name] = s.Generation
	}
	w.send(ctx, result{plane: w.index, kind: kind, gens: gens, errs: errs, took: time.Since(start)})
}

func (w *worker) counts(ctx context.Context, services map[string]bool) {
	cc, ok := w.plane.Driver.(ConnectionCounter)
	if !ok {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	conns, err := cc.Connections(cctx, services)
	cancel()
	w.send(ctx, result{plane: w.index, kind: workCount, conns: conns, countErr: err})
}

func (w *worker) send(ctx context.Context, r result) {
	select {
	case w.out <- r:
	case <-ctx.Done():
	}
}
