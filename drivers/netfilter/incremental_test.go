package netfilter

import (
	"context"
	"fmt"
	"slices"
	"testing"

	"github.com/switchman-lb/switchman/render"
)

// dumpAll renders every switchman chain of both families, for comparing
// two drivers' results.
func (f *fakes) dumpAll() []string {
	var out []string
	for fam, ft := range []*fakeTables{f.v4, f.v6} {
		for _, table := range []string{"filter", "nat"} {
			for _, c := range slices.Sorted(func(yield func(string) bool) {
				for c := range ft.chains[table] {
					if !yield(c) {
						return
					}
				}
			}) {
				for _, r := range ft.dump(table, c) {
					out = append(out, fmt.Sprintf("%d %s %s %s", fam, table, c, r))
				}
			}
		}
	}
	return out
}

func (f *fakes) reads() int { return f.v4.reads + f.v6.reads }

func TestApplyMatchesSync(t *testing.T) {
	steps := []struct {
		name    string
		changed []render.Filter
		removed []string
	}{
		{"add two filters and a masquerade", []render.Filter{
			allow("web", "192.0.2.10", 443, "198.51.100.0/24"),
			allow("api", "192.0.2.11", 443, "10.0.0.0/8", "172.16.0.0/12"),
			masq("m", "192.0.2.12", 80, "10.1.1.2:80", "10.1.1.3:80"),
		}, nil},
		{"change ranges in place", []render.Filter{allow("api", "192.0.2.11", 443, "10.0.0.0/8", "192.168.0.0/16")}, nil},
		{"move a service to another port", []render.Filter{allow("web", "192.0.2.10", 8443, "198.51.100.0/24")}, nil},
		{"change masquerade backends", []render.Filter{masq("m", "192.0.2.12", 80, "10.1.1.3:80", "10.1.1.4:80")}, nil},
		{"filter and masquerade together", []render.Filter{{Service: "m", Protocol: "tcp", VIP: allow("", "192.0.2.12", 0).VIP, Port: 80,
			AllowCIDRs: prefixes("198.51.100.0/24"), Masquerade: true, Backends: addrPorts("10.1.1.4:80")}}, nil},
		{"move to IPv6", []render.Filter{allow("api", "2001:db8::11", 443, "2001:db8:1::/48")}, nil},
		{"drop a filter, keep masquerade", []render.Filter{masq("m", "192.0.2.12", 80, "10.1.1.4:80")}, nil},
		{"remove services", nil, []string{"web", "api", "m"}},
	}
	inc, whole := newFakes(), newFakes()
	desired := map[string]render.Filter{}
	for _, step := range steps {
		var batch []*render.ServiceState
		for _, f := range step.changed {
			desired[f.Service] = f
			batch = append(batch, states(f)...)
		}
		for _, n := range step.removed {
			delete(desired, n)
			batch = append(batch, &render.ServiceState{Name: n})
		}
		if errs := inc.d.Apply(context.Background(), batch); len(errs) > 0 {
			t.Fatalf("%s: Apply: %v", step.name, errs)
		}
		var all []render.Filter
		for _, n := range slices.Sorted(func(yield func(string) bool) {
			for n := range desired {
				if !yield(n) {
					return
				}
			}
		}) {
			all = append(all, desired[n])
		}
		whole.apply(t, all...)
		// The jumps and masquerade rules may differ in order (each
		// matches traffic no other does); the service chains may not.
		equalLines(t, step.name, slices.Sorted(slices.Values(inc.dumpAll())), slices.Sorted(slices.Values(whole.dumpAll())))
		for n := range desired {
			for _, ft := range [][2]*fakeTables{{inc.v4, whole.v4}, {inc.v6, whole.v6}} {
				equalLines(t, step.name+": chain of "+n, ft[0].dump("filter", serviceChain(n)), ft[1].dump("filter", serviceChain(n)))
			}
		}
	}
}

func TestApplyTouchesOnlyItsService(t *testing.T) {
	f := newFakes()
	var all []render.Filter
	for i := range 50 {
		all = append(all, allow(fmt.Sprintf("s%d", i), fmt.Sprintf("192.0.2.%d", i+1), 443, "198.51.100.0/24"))
	}
	f.apply(t, all...)
	reads, writes := f.reads(), f.writes()
	changed := allow("s7", "192.0.2.8", 443, "198.51.100.0/24", "203.0.113.0/24")
	if errs := f.d.Apply(context.Background(), states(changed)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if n := f.reads() - reads; n != 0 {
		t.Errorf("an Apply after a Sync read the tables %d times", n)
	}
	if n := f.writes() - writes; n != 1 {
		t.Errorf("adding one range made %d writes, want 1 (an insert)", n)
	}
}

func TestApplyReadsBackAnUnknownService(t *testing.T) {
	f := newFakes()
	f.apply(t, allow("web", "192.0.2.10", 443, "198.51.100.0/24"), allow("api", "192.0.2.11", 443, "10.0.0.0/8"))
	// A new driver on the same tables (an agent restarted) applies one
	// change without a Sync first: it reads the service back first.
	g := &fakes{v4: f.v4, v6: f.v6}
	g.d = newDriver(f.d.log, f.d.open)
	reads := g.v4.reads
	if errs := g.d.Apply(context.Background(), states(allow("web", "192.0.2.10", 443, "203.0.113.0/24"))); len(errs) > 0 {
		t.Fatal(errs)
	}
	if n := g.v4.reads - reads; n != 2 {
		t.Errorf("%d reads for one unknown service, want 2 (filter and nat, once)", n)
	}
	equalLines(t, "web's chain", g.v4.dump("filter", serviceChain("web")), []string{
		"-s 203.0.113.0/24 -m comment --comment switchman:web -j RETURN",
		"-m comment --comment switchman:web -j DROP",
	})
	if got := len(g.v4.dump("filter", chainFilter)); got != 2 {
		t.Errorf("%d jumps, want web's and api's", got)
	}
}

func TestApplyRemovalOrder(t *testing.T) {
	f := newFakes()
	f.apply(t, allow("web", "192.0.2.10", 443, "198.51.100.0/24"))
	var calls []string
	f.v4.failOn = func(call, table, chain string, r rule) error {
		calls = append(calls, call+" "+chain)
		return nil
	}
	if errs := f.d.Apply(context.Background(), []*render.ServiceState{{Name: "web"}}); len(errs) > 0 {
		t.Fatal(errs)
	}
	want := []string{"Delete " + chainFilter, "Delete " + serviceChain("web"), "Delete " + serviceChain("web"), "DeleteChain " + serviceChain("web")}
	if !slices.Equal(calls, want) {
		t.Errorf("removal calls %v, want %v (the jump out before the chain is emptied)", calls, want)
	}
}

func TestApplyNewServiceReadsNothing(t *testing.T) {
	f := newFakes()
	f.apply(t, allow("web", "192.0.2.10", 443, "198.51.100.0/24"), allow("v6", "2001:db8::10", 443, "2001:db8:1::/48"), masq("m0", "192.0.2.13", 80, "10.1.1.3:80"))
	reads := f.reads()
	if errs := f.d.Apply(context.Background(), states(allow("new", "192.0.2.11", 443, "203.0.113.0/24"), masq("m", "192.0.2.12", 80, "10.1.1.2:80"))); len(errs) > 0 {
		t.Fatal(errs)
	}
	if n := f.reads() - reads; n != 0 {
		t.Errorf("new services after a Sync read the tables %d times, want 0", n)
	}
	if got := len(f.v4.dump("filter", serviceChain("new"))); got != 2 {
		t.Errorf("new's chain has %d rules", got)
	}
}
