package health

import (
	"context"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// View is the scheduler as the reconcile loop sees it (agent.HealthSource):
// services in, backend references and render's health out.
type View struct{ s *Scheduler }

// NewView adapts s to the loop.
func NewView(s *Scheduler) View { return View{s: s} }

// SetService checks every backend of the service (nil: none).
func (v View) SetService(name string, svc *spec.Service) {
	if svc == nil {
		v.s.SetService(name, nil)
		return
	}
	v.s.SetService(name, TargetsFor(svc))
}

// TakeChanged names the backends whose state changed since the last call.
func (v View) TakeChanged() []render.BackendRef {
	keys := v.s.TakeChanged()
	out := make([]render.BackendRef, len(keys))
	for i, k := range keys {
		out[i] = render.BackendRef(k)
	}
	return out
}

// Backend reports one backend; one still pending counts as down unless it
// was healthy before its settings changed (a target restarted by a
// settings change keeps its state while its first new check runs).
func (v View) Backend(ref render.BackendRef) (render.Health, bool) {
	st, ok := v.s.Status(Key(ref))
	if !ok {
		return render.Health{}, false
	}
	return render.Health{Healthy: st.Healthy, Pending: st.Pending && !st.Healthy, LastError: st.LastError, LastTransition: st.LastTransition}, true
}

// Changed fires when TakeChanged has something.
func (v View) Changed() <-chan struct{} { return v.s.Changed() }

// WaitSettled returns once every target has had its first check.
func (v View) WaitSettled(ctx context.Context) error { return v.s.WaitSettled(ctx) }
