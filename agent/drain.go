package agent

import (
	"net/netip"
	"slices"
	"time"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// drainer remembers the backends each service had in force. A backend
// that leaves a service that still exists is kept at weight 0 until its
// connections end or the service's drain time is up; a backend that comes
// back during its drain is simply restored. It is the one drain: drivers
// delete a backend only when render stops listing it.
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

// update records the version of service name now in force (nil: none, the
// service is gone or refused) and returns its backends to keep draining.
func (d *drainer) update(name string, s *spec.Service, now time.Time) []spec.Backend {
	if s == nil {
		delete(d.prev, name)
		delete(d.draining, name) // a deleted service goes at once
		return nil
	}
	cur := make(map[netip.AddrPort]spec.Backend, len(s.Backends))
	for _, b := range s.Backends {
		cur[b.AddrPort()] = b
	}
	dr := d.draining[name]
	for ap, b := range d.prev[name] {
		if _, still := cur[ap]; still || s.Drain <= 0 {
			continue
		}
		if _, already := dr[ap]; already {
			continue
		}
		if dr == nil {
			dr = map[netip.AddrPort]drainEntry{}
			d.draining[name] = dr
		}
		dr[ap] = drainEntry{backend: b, deadline: now.Add(s.Drain)}
	}
	for ap := range dr {
		if _, back := cur[ap]; back {
			delete(dr, ap) // restored, not recreated
		}
	}
	if len(dr) == 0 {
		delete(d.draining, name)
	}
	d.prev[name] = cur
	return d.backends(name)
}

// backends lists the draining backends of one service, sorted.
func (d *drainer) backends(name string) []spec.Backend {
	dr := d.draining[name]
	if len(dr) == 0 {
		return nil
	}
	out := make([]spec.Backend, 0, len(dr))
	for _, e := range dr {
		out = append(out, e.backend)
	}
	slices.SortFunc(out, func(a, b spec.Backend) int { return a.AddrPort().Compare(b.AddrPort()) })
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
// no connection is left. It returns the services whose drains changed.
func (d *drainer) finish(now time.Time, conns map[render.BackendRef]int, known bool) []string {
	var ended []string
	for name, dr := range d.draining {
		n0 := len(dr)
		for ap, e := range dr {
			n, counted := conns[render.BackendRef{Service: name, Addr: ap}]
			if !now.Before(e.deadline) || (known && counted && n == 0) {
				delete(dr, ap)
			}
		}
		if len(dr) != n0 {
			ended = append(ended, name)
		}
		if len(dr) == 0 {
			delete(d.draining, name)
		}
	}
	slices.Sort(ended)
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
