package agent

import (
	"net/netip"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

func svc(name string, drain time.Duration, addrs ...string) *spec.Service {
	s := &spec.Service{Name: name, Drain: drain, VIP: netip.MustParseAddr("192.0.2.1"), Port: 80}
	for _, a := range addrs {
		s.Backends = append(s.Backends, spec.Backend{Address: netip.MustParseAddr(a), Port: 80, Weight: 1})
	}
	return s
}

func drainingAddrs(list []spec.Backend) map[string]bool {
	out := map[string]bool{}
	for _, b := range list {
		out[b.Address.String()] = true
	}
	return out
}

func TestDrainer(t *testing.T) {
	t0 := time.Unix(1000, 0)
	ref := func(a string) render.BackendRef {
		return render.BackendRef{Service: "web", Addr: netip.MustParseAddrPort(a + ":80")}
	}
	tests := []struct {
		name string
		run  func(t *testing.T, d *drainer)
	}{
		{"removed backend drains until its time is up", func(t *testing.T, d *drainer) {
			d.update("web", svc("web", 30*time.Second, "10.0.0.1", "10.0.0.2"), t0)
			got := d.update("web", svc("web", 30*time.Second, "10.0.0.1"), t0)
			if !drainingAddrs(got)["10.0.0.2"] {
				t.Fatalf("10.0.0.2 not draining: %v", got)
			}
			if len(d.finish(t0.Add(29*time.Second), nil, false)) > 0 {
				t.Fatal("drain ended before its time with no counts")
			}
			if len(d.finish(t0.Add(30*time.Second), nil, false)) == 0 || !d.empty() {
				t.Fatal("drain did not end at its deadline")
			}
		}},
		{"no connections left ends the drain early", func(t *testing.T, d *drainer) {
			d.update("web", svc("web", time.Hour, "10.0.0.1", "10.0.0.2"), t0)
			d.update("web", svc("web", time.Hour, "10.0.0.1"), t0)
			if len(d.finish(t0, map[render.BackendRef]int{ref("10.0.0.2"): 3}, true)) > 0 {
				t.Fatal("ended with 3 connections")
			}
			if len(d.finish(t0, map[render.BackendRef]int{ref("10.0.0.2"): 0}, true)) == 0 {
				t.Fatal("did not end with 0 connections")
			}
		}},
		{"a backend the counter does not know keeps draining", func(t *testing.T, d *drainer) {
			d.update("web", svc("web", time.Hour, "10.0.0.1", "10.0.0.2"), t0)
			d.update("web", svc("web", time.Hour, "10.0.0.1"), t0)
			if len(d.finish(t0, map[render.BackendRef]int{}, true)) > 0 {
				t.Fatal("ended without a count for the backend")
			}
		}},
		{"a backend that comes back is restored", func(t *testing.T, d *drainer) {
			d.update("web", svc("web", time.Hour, "10.0.0.1", "10.0.0.2"), t0)
			d.update("web", svc("web", time.Hour, "10.0.0.1"), t0)
			got := d.update("web", svc("web", time.Hour, "10.0.0.1", "10.0.0.2"), t0)
			if len(got) != 0 || !d.empty() {
				t.Fatalf("still draining after coming back: %v", got)
			}
		}},
		{"drain 0 removes at once", func(t *testing.T, d *drainer) {
			d.update("web", svc("web", 0, "10.0.0.1", "10.0.0.2"), t0)
			if got := d.update("web", svc("web", 0, "10.0.0.1"), t0); len(got) != 0 {
				t.Fatalf("drained with drain 0: %v", got)
			}
		}},
		{"a deleted service ends its drains", func(t *testing.T, d *drainer) {
			d.update("web", svc("web", time.Hour, "10.0.0.1", "10.0.0.2"), t0)
			d.update("web", svc("web", time.Hour, "10.0.0.1"), t0)
			if got := d.update("web", nil, t0); len(got) != 0 || !d.empty() {
				t.Fatalf("drains of a deleted service: %v", got)
			}
		}},
		{"the deadline is not pushed back by later passes", func(t *testing.T, d *drainer) {
			d.update("web", svc("web", 10*time.Second, "10.0.0.1", "10.0.0.2"), t0)
			d.update("web", svc("web", 10*time.Second, "10.0.0.1"), t0)
			d.update("web", svc("web", 10*time.Second, "10.0.0.1"), t0.Add(5*time.Second))
			if next := d.nextCheck(t0.Add(9500 * time.Millisecond)); next != 500*time.Millisecond {
				t.Fatalf("next check in %v, want 500ms", next)
			}
			if len(d.finish(t0.Add(10*time.Second), nil, false)) == 0 {
				t.Fatal("deadline moved")
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.run(t, newDrainer()) })
	}
}
