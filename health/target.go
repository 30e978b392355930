package health

import (
	"net/netip"

	"github.com/switchman-lb/switchman/spec"
)

// Key names one backend of one service. It has the shape of
// render.BackendRef, so the agent converts one into the other directly.
type Key struct {
	Service string
	Addr    netip.AddrPort
}

// String formats the key as service/addr:port.
func (k Key) String() string { return k.Service + "/" + k.Addr.String() }

// Target is one backend to check: the service it belongs to, its real
// address, and the service's check settings.
type Target struct {
	Service string
	Addr    netip.AddrPort
	Health  spec.Health
}

// Key returns the target's identity. Two targets with the same key and the
// same Health are the same check; with different Health, the check restarts.
func (t Target) Key() Key { return Key{Service: t.Service, Addr: t.Addr} }

// CheckAddr is the address checks are sent to: the backend's address with
// Health.Port when set, else the backend's own port.
func (t Target) CheckAddr() netip.AddrPort {
	if t.Health.Port != 0 {
		return netip.AddrPortFrom(t.Addr.Addr(), t.Health.Port)
	}
	return t.Addr
}

// TargetsFor returns one target per backend of one service, for
// Scheduler.SetService(svc.Name, TargetsFor(svc)).
func TargetsFor(svc *spec.Service) []Target {
	out := make([]Target, 0, len(svc.Backends))
	for _, b := range svc.Backends {
		out = append(out, Target{Service: svc.Name, Addr: b.AddrPort(), Health: svc.Health})
	}
	return out
}
