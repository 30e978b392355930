package ipvs_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"testing"

	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/drivers/ipvs/ipvsfake"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// state wraps an L4 service as the ServiceState the agent hands over.
func state(l render.L4Service) *render.ServiceState {
	l.Driver = spec.DriverIPVS
	return &render.ServiceState{Name: l.Service, L4: &l}
}

func removal(name string) *render.ServiceState { return &render.ServiceState{Name: name} }

func mustApply(t *testing.T, d *ipvs.Driver, states ...*render.ServiceState) {
	t.Helper()
	if errs := d.Apply(context.Background(), states); len(errs) != 0 {
		t.Fatalf("Apply: %v", errs)
	}
}

func TestApplyTouchesOnlyItsService(t *testing.T) {
	k := ipvsfake.New()
	d := newDriver(t, k, t.TempDir())
	var all []*render.ServiceState
	for i := range 50 {
		all = append(all, state(webService(fmt.Sprintf("s%d", i), vip4, uint16(1000+i), rdst(be1, 80, 1), rdst(be2, 80, 1))))
	}
	if errs := d.Sync(context.Background(), all); len(errs) != 0 {
		t.Fatal(errs)
	}
	k.ResetCounts()
	mustApply(t, d, state(webService("s7", vip4, 1007, rdst(be1, 80, 1), rdst(be2, 80, 0))))
	if got := k.Calls(ipvsfake.Services) + k.Calls(ipvsfake.Destinations); got != 0 {
		t.Errorf("a weight change read the kernel %d times, want 0", got)
	}
	if got := k.Writes(); got != 1 {
		t.Errorf("a weight change made %d writes, want 1 (one UpdateDestination)", got)
	}
	if w := k.State()[key(ipvs.TCP, vip4, 1007)].Destinations[1].Weight; w != 0 {
		t.Errorf("weight %d, want 0", w)
	}
}

func TestApplyMatchesSync(t *testing.T) {
	steps := []struct {
		name    string
		changed []*render.ServiceState
	}{
		{"add", []*render.ServiceState{
			state(webService("a", vip4, 80, rdst(be1, 80, 1), rdst(be2, 80, 1))),
			state(webService("b", vip4, 81, rdst(be1, 80, 1))),
			state(webService("c", vip6, 80, rdst(netipV6(1), 80, 1))),
		}},
		{"reweigh and add a destination", []*render.ServiceState{state(webService("a", vip4, 80, rdst(be1, 80, 3), rdst(be2, 80, 1), rdst(be3, 80, 1)))}},
		{"move to another port", []*render.ServiceState{state(webService("b", vip4, 8081, rdst(be1, 80, 1)))}},
		{"change scheduler", []*render.ServiceState{state(func() render.L4Service {
			s := webService("a", vip4, 80, rdst(be1, 80, 3), rdst(be2, 80, 1), rdst(be3, 80, 1))
			s.Scheduler = spec.WeightedRoundRobin
			return s
		}())}},
		{"take over a released vip:port", []*render.ServiceState{removal("b"), state(webService("d", vip4, 8081, rdst(be3, 80, 1)))}},
		{"remove", []*render.ServiceState{removal("a"), removal("c")}},
	}
	inc, whole := ipvsfake.New(), ipvsfake.New()
	di, dw := newDriver(t, inc, t.TempDir()), newDriver(t, whole, t.TempDir())
	desired := map[string]*render.ServiceState{}
	for _, step := range steps {
		mustApply(t, di, step.changed...)
		for _, s := range step.changed {
			if s.L4 == nil {
				delete(desired, s.Name)
			} else {
				desired[s.Name] = s
			}
		}
		var all []*render.ServiceState
		for _, s := range desired {
			all = append(all, s)
		}
		if errs := dw.Sync(context.Background(), all); len(errs) != 0 {
			t.Fatalf("%s: Sync: %v", step.name, errs)
		}
		if got, want := fmt.Sprint(inc.State()), fmt.Sprint(whole.State()); got != want {
			t.Errorf("%s: Apply left\n%s\nSync left\n%s", step.name, got, want)
		}
		if got, want := fmt.Sprint(di.Owned()), fmt.Sprint(dw.Owned()); got != want {
			t.Errorf("%s: owned %s, want %s", step.name, got, want)
		}
	}
}

func TestApplyUnknownServiceReadsItBack(t *testing.T) {
	k := ipvsfake.New()
	dir := t.TempDir()
	if errs := newDriver(t, k, dir).Sync(context.Background(), []*render.ServiceState{state(webService("web", vip4, 80, rdst(be1, 80, 1), rdst(be2, 80, 1)))}); len(errs) != 0 {
		t.Fatal(errs)
	}
	// A new driver (a restart) applies one change without a Sync first.
	d := newDriver(t, k, dir)
	k.ResetCounts()
	mustApply(t, d, state(webService("web", vip4, 80, rdst(be1, 80, 1), rdst(be2, 80, 4))))
	if got := k.Calls(ipvsfake.Services); got != 0 {
		t.Errorf("%d service listings, want 0", got)
	}
	if got := k.Calls(ipvsfake.Destinations); got != 1 {
		t.Errorf("%d destination dumps, want 1 (its own)", got)
	}
	if w := k.State()[key(ipvs.TCP, vip4, 80)].Destinations[1].Weight; w != 4 {
		t.Errorf("weight %d, want 4", w)
	}
	// A vip:port someone else created is refused, never touched.
	foreign := ipvs.Service{Protocol: ipvs.TCP, Address: vip4, Port: 9000, Scheduler: "rr", Netmask: 0xffffffff}
	if err := k.AddService(context.Background(), foreign); err != nil {
		t.Fatal(err)
	}
	errs := d.Apply(context.Background(), []*render.ServiceState{state(webService("other", vip4, 9000, rdst(be1, 80, 1)))})
	var fe *ipvs.ForeignServiceError
	if !errors.As(errs["other"], &fe) {
		t.Errorf("error %v, want a foreign service", errs["other"])
	}
	if got := k.State()[key(ipvs.TCP, vip4, 9000)]; len(got.Destinations) != 0 {
		t.Errorf("the foreign service was changed: %+v", got)
	}
}

func netipV6(n byte) netip.Addr { return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: n}) }
