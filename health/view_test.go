package health

import (
	"net/netip"
	"testing"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

func TestView(t *testing.T) {
	v := NewView(New(Options{}))
	svc := func(proto spec.HealthProtocol) *spec.Service {
		return &spec.Service{Name: "web", Health: spec.Health{Protocol: proto, Interval: 2e9, Timeout: 1e9, Rise: 1, Fall: 1},
			Backends: []spec.Backend{{Address: netip.MustParseAddr("127.0.0.1"), Port: 9}}}
	}
	ref := render.BackendRef{Service: "web", Addr: netip.MustParseAddrPort("127.0.0.1:9")}
	v.SetService("web", svc(spec.HealthTCP))
	if h, ok := v.Backend(ref); !ok || !h.Pending || h.Healthy {
		t.Errorf("a new tcp target: %+v %v, want pending and not healthy", h, ok)
	}
	v.SetService("web", svc(spec.HealthNone))
	if h, ok := v.Backend(ref); !ok || h.Pending || !h.Healthy {
		t.Errorf("a target without checks: %+v %v, want healthy", h, ok)
	}
	if got := v.TakeChanged(); len(got) != 1 || got[0] != ref {
		t.Errorf("changed %v, want %v", got, ref)
	}
	v.SetService("web", nil)
	if _, ok := v.Backend(ref); ok {
		t.Error("a removed service's backend is still reported")
	}
}
