package agent

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/switchman-lb/switchman/internal/backoff"
	"github.com/switchman-lb/switchman/internal/clock"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/status"
)

// record is everything the loop knows about one service.
type record struct {
	name    string
	verdict Verdict
	svc     *spec.Service        // the version in force, as the checker knows it
	state   *render.ServiceState // last rendered; nil before the first render
	gen     uint64
	planes  []planeState // by plane index
	// first are the planes the current generation went to first, later
	// the planes it goes to once those applied it (the guard ordering:
	// the filter before exposure, exposure withdrawn before the filter).
	first, later []int
	backoff      *backoff.Backoff
	retryAt      time.Time
	secrets      []string
	status       status.Status
	published    bool
	logged       string
}

// planeState is one driver's view of one service.
type planeState struct {
	served bool                 // the driver may hold a part of the service
	sent   *render.ServiceState // the last state handed to the driver
	wait   bool                 // no report on sent yet
	err    error                // the driver's error on sent
}

// busy reports whether a driver still owes a report on the current state.
func (r *record) busy() bool {
	if len(r.later) > 0 {
		return true
	}
	for _, p := range r.planes {
		if p.wait {
			return true
		}
	}
	return false
}

// failed reports whether a driver refused the current state.
func (r *record) failed() bool {
	for _, p := range r.planes {
		if p.err != nil {
			return true
		}
	}
	return false
}

// dispatch hands the record's current state to the drivers whose part
// changed: guards first when the state has a guarded part (the filter
// before exposure), guards last otherwise (exposure withdrawn before the
// filter).
func (a *Agent) dispatch(r *record) {
	var guards, others []int
	guardIn := false
	for i, p := range a.planes {
		ps := &r.planes[i]
		part, ok := r.state.Part(p.Part)
		var had bool
		var old any
		if ps.sent != nil {
			old, had = ps.sent.Part(p.Part)
		}
		if !ok && !had && !ps.served {
			continue // nothing for this driver, before or now
		}
		if ok && had && ps.err == nil && !ps.wait && reflect.DeepEqual(part, old) {
			continue // the driver holds exactly this part already
		}
		if p.Guard {
			guards = append(guards, i)
			guardIn = guardIn || ok
		} else {
			others = append(others, i)
		}
	}
	r.first, r.later = others, guards
	if guardIn {
		r.first, r.later = guards, others
	}
	if len(r.first) == 0 {
		r.first, r.later = r.later, nil
	}
	for _, i := range r.first {
		a.send(r, i, true)
	}
}

// send hands the current state to plane i; apply is false when the state
// goes with a Sync the caller issues.
func (a *Agent) send(r *record, i int, apply bool) {
	ps := &r.planes[i]
	ps.sent, ps.wait, ps.err = r.state, true, nil
	if _, ok := r.state.Part(a.planes[i].Part); ok {
		ps.served = true
	}
	if apply {
		a.workers[i].apply(r.state)
	}
}

// advance hands the current state to the later planes once every first
// plane applied it without error.
func (a *Agent) advance(r *record) {
	if len(r.later) == 0 {
		return
	}
	for _, i := range r.first {
		if ps := r.planes[i]; ps.wait || ps.err != nil || ps.sent != r.state {
			return
		}
	}
	later := r.later
	r.first, r.later = later, nil
	for _, i := range later {
		a.send(r, i, true)
	}
}

// handle takes one worker's report.
func (a *Agent) handle(res result) {
	if res.kind == workCount {
		a.countsIn(res)
		return
	}
	p := a.planes[res.plane]
	a.metrics.observeDriver(p.Driver.Name(), res.kind, res.took)
	now := a.clk.Now()
	for _, name := range slices.Sorted(mapKeys(res.gens)) {
		r := a.records[name]
		if r == nil {
			continue
		}
		ps := &r.planes[res.plane]
		if ps.sent == nil || ps.sent.Generation != res.gens[name] {
			continue // a newer state is on its way
		}
		ps.wait = false
		ps.err = res.errs[name]
		if ps.err == nil {
			if _, ok := ps.sent.Part(p.Part); !ok {
				ps.served = false // removed
			}
		}
		if r.failed() {
			r.retryAt = now.Add(r.backoff.Next())
			a.retries[name] = true
		} else if !r.busy() {
			r.backoff.Reset()
			delete(a.retries, name)
		}
		a.advance(r)
		a.publish(r)
		a.forget(r)
	}
	for name, err := range res.errs {
		if _, ok := res.gens[name]; !ok && err != nil {
			a.log.Warn("driver could not remove what it holds of a service it no longer serves", "driver", p.Driver.Name(), "service", name, "error", err)
		}
	}
	if res.kind == workSync && !a.synced[res.plane] {
		a.synced[res.plane] = true
		a.syncLeft--
		if a.syncLeft == 0 {
			a.ready()
		}
		if p.Guard {
			a.guardLeft--
			if a.guardLeft == 0 {
				a.syncExposure()
			}
		}
	}
}

// firstSync starts the first pass: a Sync of every guard driver, then (in
// syncExposure, once the guards reported) a Sync of the others with the
// services whose guards are in force. A service whose filter cannot be
// installed is never exposed: fail closed.
func (a *Agent) firstSync() {
	a.started = true
	a.synced = make([]bool, len(a.planes))
	a.syncLeft = len(a.planes)
	if a.syncLeft == 0 {
		a.ready() // no driver: nothing to apply
	}
	lists := make([][]*render.ServiceState, len(a.planes))
	for _, name := range slices.Sorted(mapKeys(a.records)) {
		r := a.records[name]
		if r.state == nil || r.state.Removed() {
			continue
		}
		r.gen++
		r.state.Generation = r.gen
		r.first, r.later = nil, nil
		for i, p := range a.planes {
			if _, ok := r.state.Part(p.Part); !ok {
				continue
			}
			if p.Guard {
				r.first = append(r.first, i)
				a.send(r, i, false)
				lists[i] = append(lists[i], r.state)
			} else {
				r.later = append(r.later, i)
			}
		}
	}
	for i, p := range a.planes {
		if p.Guard {
			a.guardLeft++
			a.workers[i].syncAll(lists[i])
		}
	}
	if a.guardLeft == 0 {
		a.syncExposure()
	}
	for _, name := range slices.Sorted(mapKeys(a.records)) {
		a.publish(a.records[name]) // those no driver owes a report on
	}
}

// ready tells Options.Ready that the first pass is done, and logs what
// it spent.
func (a *Agent) ready() {
	now, st := a.clk.Now(), a.start
	a.log.Info("first pass done: every driver read back its system and applied the services",
		"services", len(a.records),
		"etcd_list", st.listed.Sub(st.begin), "evaluate_and_render", st.evaluated.Sub(st.listed),
		"health_first_round", st.synced.Sub(st.evaluated), "drivers", now.Sub(st.synced), "total", now.Sub(st.begin))
	if a.opts.Ready != nil {
		a.opts.Ready()
	}
}

// syncExposure issues the first Sync of every non-guard driver.
func (a *Agent) syncExposure() {
	lists := make([][]*render.ServiceState, len(a.planes))
	for _, name := range slices.Sorted(mapKeys(a.records)) {
		r := a.records[name]
		// A service whose guards reported went on to the other drivers
		// already (advance, as an Apply); their first Sync must list it
		// too, or the Sync would remove it from what they hold.
		for i, p := range a.planes {
			if !p.Guard && r.state != nil && r.planes[i].sent == r.state {
				lists[i] = append(lists[i], r.state)
			}
		}
		ready := true
		for _, i := range r.first {
			if ps := r.planes[i]; ps.wait || ps.err != nil {
				ready = false
			}
		}
		if !ready || r.state == nil {
			continue
		}
		for _, i := range r.later {
			if a.planes[i].Guard {
				continue
			}
			a.send(r, i, false)
			lists[i] = append(lists[i], r.state)
		}
		r.first, r.later = append(r.first, r.later...), nil
	}
	for i, p := range a.planes {
		if !p.Guard {
			a.workers[i].syncAll(lists[i])
		}
	}
}

// periodicSync asks every driver to compare its whole system with what it
// was handed, and repair it: the repair path.
func (a *Agent) periodicSync() {
	if a.guardLeft > 0 {
		return // the first pass is not done
	}
	lists := make([][]*render.ServiceState, len(a.planes))
	for _, r := range a.records {
		for i, p := range a.planes {
			ps := r.planes[i]
			if ps.sent == nil {
				continue
			}
			if _, ok := ps.sent.Part(p.Part); ok {
				lists[i] = append(lists[i], ps.sent)
			}
		}
	}
	for i := range a.planes {
		a.workers[i].syncAll(lists[i])
	}
}

// retryDue hands the current state again to the drivers that refused it,
// for every service whose backoff is over.
func (a *Agent) retryDue() {
	now := a.clk.Now()
	for name := range a.retries {
		r := a.records[name]
		if r == nil {
			delete(a.retries, name)
			continue
		}
		if r.retryAt.After(now) {
			continue
		}
		delete(a.retries, name)
		for i := range a.planes {
			if ps := r.planes[i]; ps.err != nil && !slices.Contains(r.later, i) {
				a.send(r, i, true)
			}
		}
	}
}

// armRetry sets t to the earliest retry.
func (a *Agent) armRetry(t clock.Timer) {
	var next time.Time
	for name := range a.retries {
		if r := a.records[name]; r != nil && (next.IsZero() || r.retryAt.Before(next)) {
			next = r.retryAt
		}
	}
	if next.IsZero() {
		t.Stop()
		return
	}
	t.ResetAt(next)
}

// publish writes the record's status when it is settled: every driver
// reported on the current state, or one refused it, or the definition was
// refused.
func (a *Agent) publish(r *record) {
	if !r.verdict.Exists {
		// Deleted: its status goes at once, while the drivers let go.
		if r.published {
			a.metrics.forget(r)
			a.status.Delete(r.name)
			r.published = false
		}
		return
	}
	if !a.started || r.busy() && !r.failed() && r.verdict.Rejected == nil {
		return
	}
	st := a.statusOf(r)
	if r.published && reflect.DeepEqual(st, r.status) {
		return
	}
	if st.Error != r.logged {
		if st.State != status.StateApplied {
			a.log.Warn("service not applied", "service", r.name, "state", st.State, "error", st.Error)
		} else if r.logged != "" {
			a.log.Info("service applied", "service", r.name)
		}
		r.logged = st.Error
	}
	a.metrics.transition(r.status, r.published, st)
	r.status, r.published = st, true
	a.status.Set(r.name, st)
}

// statusOf assembles a service's status from its verdict, its rendered
// state, its drivers' reports and the health checker.
func (a *Agent) statusOf(r *record) status.Status {
	v := r.verdict
	st := status.Status{State: status.StateApplied, Revision: v.Revision, Backends: []status.BackendStatus{}}
	if v.InForce != nil {
		st.Driver = string(v.InForce.Driver)
		st.VIP = v.InForce.Key().String()
	}
	var msgs []string
	if v.Rejected != nil {
		st.State = status.StateRejected
		msgs = append(msgs, v.Rejected.Error())
		if v.InForce != nil {
			msgs = append(msgs, fmt.Sprintf("the last good version (revision %d) stays in force", v.Revision))
		}
	}
	if r.state != nil && !r.state.Removed() {
		st.FailingOpen = r.state.Report.FailingOpen
		st.Backends = a.backendStatuses(r.state.Report)
		var fails []string
		for _, part := range r.state.Required() {
			if !slices.ContainsFunc(a.planes, func(p Plane) bool { return p.Part == part }) {
				fails = append(fails, fmt.Sprintf("no %s driver runs on this agent (add %s to --drivers)", part, part))
			}
		}
		for i, ps := range r.planes {
			if ps.err != nil {
				fails = append(fails, a.planes[i].Driver.Name()+": "+ps.err.Error())
			}
		}
		if len(fails) > 0 {
			if st.State == status.StateApplied {
				st.State = status.StateFailed
			}
			slices.Sort(fails)
			msgs = append(msgs, fails...)
		}
	}
	st.Error = strings.Join(msgs, "; ")
	return st
}

func (a *Agent) backendStatuses(rep render.ServiceReport) []status.BackendStatus {
	out := make([]status.BackendStatus, 0, len(rep.Backends))
	for _, b := range rep.Backends {
		bs := status.BackendStatus{Address: b.Address.String(), Port: b.Port, Healthy: b.Healthy, Weight: b.Weight, Draining: b.Draining}
		if a.health != nil {
			if h, ok := a.health.Backend(render.BackendRef{Service: rep.Name, Addr: netip.AddrPortFrom(b.Address, b.Port)}); ok {
				bs.LastError = h.LastError
				if !h.LastTransition.IsZero() {
					t := h.LastTransition.UTC()
					bs.LastTransition = &t
				}
			}
		}
		out = append(out, bs)
	}
	return out
}
