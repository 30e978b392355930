package agent

import (
	"net/netip"
	"time"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// drainer remembers the backends each service had at the last pass. A
// backend that leaves a service that still exists is kept at weight 0 until
// its connections end or the service's drain time is up; a backend that
// comes back during its drain is simply restored.
type drainer struct {
	prev     map[string]map[netip.AddrPort]spec.Backend
	draining map[string]map[netip.AddrPort]drainEntry
}

type drainEntry struct {
	backend  spec.Backend
	deadline time.Time
}

func newDrainer() *drainer {
	return &drainer{prev: map[string]map[netip.AddrPort]spec.Backend{}, draining: map[string]map[netip.AddrPort]drainEntry{}}
}

// update records the services in force and returns the backends to keep
// draining, by service.
func (d *drainer) update(services []*spec.Service, now time.Time) map[string][]spec.Backend {
	cur := make(map[string]map[netip.AddrPort]spec.Backend, len(services))
	for _, s := range services {
		m := make(map[netip.AddrPort]spec.Backend, len(s.Backends))
		for _, b := range s.Backends {
			m[b.AddrPort()] = b
		}
		cur[s.Name] = m
		dr := d.draining[s.Name]
		for ap, b := range d.prev[s.Name] {
			if _, still := m[ap]; still || s.Drain <= 0 {
				continue
			}
			if _, already := dr[ap]; already {
				continue
			}
			if dr == nil {
				dr = map[netip.AddrPort]drainEntry{}
				d.draining[s.Name] = dr
			}
			dr[ap] = drainEntry{backend: b, deadline: now.Add(s.Drain)}
		}
		for ap := range dr {
			if _, back := m[ap]; back {
				delete(dr, ap) // restored, not recreated
			}
		}
	}
	for name := range d.draining {
		if _, ok := cur[name]; !ok || len(d.draining[name]) == 0 {
			delete(d.draining, name) // a deleted service goes at once
		}
	}
	d.prev = cur
	out := make(map[string][]spec.Backend, len(d.draining))
	for name, dr := range d.draining {
		for _, e := range dr {
			out[name] = append(out[name], e.backend)
		}
	}
	return out
}

func (d *drainer) empty() bool { return len(d.draining) == 0 }

// services names the services with draining backends.
func (d *drainer) services() map[string]bool {
	out := make(map[string]bool, len(d.draining))
	for name := range d.draining {
		out[name] = true
	}
	return out
}

// finish ends drains that are over: time is up, or (when counts are known)
// no connection is left. It reports whether any ended.
func (d *drainer) finish(now time.Time, conns map[render.BackendRef]int, known bool) bool {
	ended := false
	for name, dr := range d.draining {
		for ap, e := range dr {
			n, counted := conns[render.BackendRef{Service: name, Addr: ap}]
			if !now.Before(e.deadline) || (known && counted && n == 0) {
				delete(dr, ap)
				ended = true
			}
		}
		if len(dr) == 0 {
			delete(d.draining, name)
		}
	}
	return ended
}

// nextCheck is when to look at connection counts again.
func (d *drainer) nextCheck(now time.Time) time.Duration {
	next := time.Second
	for _, dr := range d.draining {
		for _, e := range dr {
			next = min(next, max(e.deadline.Sub(now), time.Millisecond))
		}
	}
	return next
}
