package ipvs

import (
	"context"
	"maps"

	"github.com/switchman-lb/switchman/render"
)

// Apply brings the given services to their IPVS part (a state without one
// removes what the driver created for that service) and touches nothing
// else: no listing of the kernel's services. A service the driver
// programmed and confirmed is diffed against that record with no read at
// all; any other is read back first, its own destinations only.
func (d *Driver) Apply(ctx context.Context, changed []*render.ServiceState) map[string]error {
	errs := map[string]error{}
	names := make(map[string]bool, len(changed))
	var parts []render.L4Service
	for _, s := range changed {
		names[s.Name] = true
		if p, ok := s.Part(render.PartIPVS); ok {
			parts = append(parts, p.(render.L4Service))
		}
	}
	want, bad := DesiredFrom(parts)
	maps.Copy(errs, bad)
	select {
	case d.turn <- struct{}{}:
		defer func() { <-d.turn }()
	case <-ctx.Done():
		for n := range names {
			errs[n] = ctx.Err()
		}
		return errs
	}
	owned := d.Owned()
	wanted := make(map[Key]bool, len(want))
	for _, w := range want {
		wanted[w.Service.Key()] = true
	}
	keep := map[Key]bool{} // keys of unconvertible services: left as they are
	for _, p := range parts {
		if _, failed := bad[p.Service]; failed {
			keep[Key{Protocol: protocolOf(p.Protocol), Address: p.Address.Unmap(), Port: p.Port}] = true
		}
	}
	actual := map[Key]Observed{}
	// What the named services own and no longer want goes (Diff deletes
	// owned keys that are present and not desired).
	for k, name := range owned {
		if !names[name] || wanted[k] || keep[k] {
			continue
		}
		obs := Observed{Service: k.Service()}
		if last, ok := d.applied[k]; ok {
			obs.Service = last.Service
		}
		actual[k] = obs
	}
	var ready []Desired
	for _, w := range want {
		k := w.Service.Key()
		if last, ok := d.applied[k]; ok && owned[k] == w.Name {
			actual[k] = Observed{Service: last.Service, Destinations: last.Destinations}
			ready = append(ready, w)
			continue
		}
		// Not confirmed by this driver: read the service's destinations
		// (ESRCH: it does not exist). Its settings are not read, so an
		// existing one of ours gets one UpdateService.
		dsts, found, err := destinationsOf(ctx, d.kernel, d.timeout, k)
		if err != nil {
			errs[w.Name] = err
			continue
		}
		if found {
			obs := Observed{Service: k.Service(), Destinations: dsts}
			obs.Service.Scheduler = "?"
			actual[k] = obs
		}
		ready = append(ready, w)
	}
	ops, refused := Diff(ready, actual, owned)
	maps.Copy(errs, refused)
	next := maps.Clone(owned)
	d.commit(ctx, ops, ready, next, errs)

	// Remember what this Apply left in the kernel for the services it
	// handled; forget the ones that failed, and the removed ones.
	for k, name := range owned {
		if names[name] {
			delete(d.applied, k)
		}
	}
	for _, w := range ready {
		if errs[w.Name] == nil {
			d.applied[w.Service.Key()] = w
		}
	}
	return errs
}
