package nftables

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// TestRecordIndex keeps the record's index through transactions (tables
// created, services added, changed, removed, tables deleted) and checks
// it against an index built afresh from the same tables, and each view's
// shared elements against a scan of the whole shared sets.
func TestRecordIndex(t *testing.T) {
	svc := func(name, vip string, p spec.Protocol, masq bool, allow string, weights ...int) render.L4Service {
		ap := netip.MustParseAddrPort(vip)
		s := render.L4Service{Service: name, Driver: spec.DriverNFTables, Protocol: p, Address: ap.Addr(), Port: ap.Port(),
			Scheduler: spec.WeightedRoundRobin, Masquerade: masq}
		if allow != "" {
			s.AllowCIDRs = []netip.Prefix{netip.MustParsePrefix(allow)}
		}
		for i, w := range weights {
			a := ap.Addr().Next()
			for range i {
				a = a.Next()
			}
			s.Destinations = append(s.Destinations, render.L4Destination{Address: a, Port: 8080, Weight: w, Forwarding: spec.NAT})
		}
		return s
	}
	steps := []struct {
		name string
		all  bool
		want map[string]*render.L4Service
	}{
		{"first services", true, map[string]*render.L4Service{
			"a": new(svc("a", "192.0.2.1:80", spec.TCP, true, "10.0.0.0/8", 1, 1)),
			"b": new(svc("b", "192.0.2.2:53", spec.UDP, true, "", 1)),
			"c": new(svc("c", "192.0.2.3:80", spec.TCP, false, "", 1, 2)),
			"d": new(svc("d", "[2001:db8::1]:80", spec.TCP, true, "2001:db8::/32", 1)),
		}},
		{"a weight, b removed, c masquerades, d filter gone", false, map[string]*render.L4Service{
			"a": new(svc("a", "192.0.2.1:80", spec.TCP, true, "10.0.0.0/8", 3, 1)),
			"b": nil,
			"c": new(svc("c", "192.0.2.3:80", spec.TCP, true, "", 1, 2)),
			"d": new(svc("d", "[2001:db8::1]:80", spec.TCP, true, "", 1)),
		}},
		{"same vip:port on another protocol", false, map[string]*render.L4Service{
			"e": new(svc("e", "192.0.2.1:80", spec.UDP, false, "", 1)),
		}},
		{"d removed: ip6 table gone", false, map[string]*render.L4Service{"d": nil}},
		{"all removed", true, map[string]*render.L4Service{}},
	}
	// More services than apply inserts one by one, in one transaction,
	// their VIPs in the reverse order of their names.
	for i := range insertLimit + 4 {
		name := fmt.Sprintf("x%02d", i)
		steps[0].want[name] = new(svc(name, fmt.Sprintf("192.0.2.%d:443", 200-i), spec.TCP, i%2 == 0, "", 1))
	}
	r := newRecord(map[render.NFTFamily]*Table{})
	var handle uint64
	for n, step := range steps {
		want := Desired{Services: map[string]*render.NFTService{}, All: step.all}
		for name, s := range step.want {
			if s == nil {
				want.Services[name] = nil
				continue
			}
			n, err := render.NFTablesService(*s)
			if err != nil {
				t.Fatal(err)
			}
			want.Services[name] = &n
		}
		observed := r.tables
		if !step.all {
			observed = r.view(want.Services)
			checkView(t, step.name, r, observed, want.Services)
		}
		// The first step as one transaction, the others one per group.
		var txs [][]Op
		for _, g := range Diff(observed, want) {
			if n == 0 && len(txs) > 0 {
				txs[0] = append(txs[0], g.Ops...)
				continue
			}
			txs = append(txs, g.Ops)
		}
		for _, ops := range txs {
			handles := make([]uint64, len(ops))
			for i, op := range ops {
				if op.Kind == AddRule || op.Kind == ReplaceRule {
					handle++
					handles[i] = handle
				}
			}
			r.apply(ops, handles)
		}
		for f, tbl := range r.tables {
			for name, set := range tbl.Sets {
				for i := 1; i < len(set.Elements); i++ {
					if set.Elements[i-1].Compare(set.Elements[i]) >= 0 {
						t.Fatalf("%s: %s set %s is not sorted by key: %v", step.name, f, name, set.Elements)
					}
				}
			}
		}
		fresh := newRecord(r.tables)
		if !reflect.DeepEqual(r.owners, fresh.owners) || !reflect.DeepEqual(r.shared, fresh.shared) {
			t.Fatalf("%s: index kept through the transactions\n%+v %+v\ndiffers from one built afresh\n%+v %+v", step.name, r.owners, r.shared, fresh.owners, fresh.shared)
		}
		if len(r.owners) == 0 && len(r.tables) > 0 {
			t.Fatalf("%s: tables without services: %v", step.name, r.tables)
		}
	}
	if len(r.tables) != 0 || len(r.owners) != 0 || len(r.shared) != 0 {
		t.Fatalf("after removing all: tables %v, owners %v, shared %v", r.tables, r.owners, r.shared)
	}
}

// checkView compares the shared sets of view v with a scan of the
// record's whole shared sets for the elements of services.
func checkView(t *testing.T, step string, r *record, v map[render.NFTFamily]*Table, services map[string]*render.NFTService) {
	t.Helper()
	for f, tbl := range r.tables {
		keys := map[render.NFTElement]bool{}
		for _, name := range sharedVerdictMaps {
			var want []render.NFTElement
			for _, e := range tbl.Sets[name].Elements {
				owner, ok := render.NFTOwner(e.Goto)
				if _, named := services[owner]; ok && named {
					want = append(want, e)
					keys[render.NFTElement{Addr: e.Addr, Port: e.Port, Proto: e.Proto}] = true
				}
			}
			if got := v[f].Sets[name].Elements; !slices.Equal(got, want) {
				t.Errorf("%s: view of %s %s: %v, want %v", step, f, name, got, want)
			}
		}
		for name, proto := range masqSets {
			var want []render.NFTElement
			for _, e := range tbl.Sets[name].Elements {
				if keys[render.NFTElement{Addr: e.Addr, Port: e.Port, Proto: proto}] {
					want = append(want, e)
				}
			}
			if got := v[f].Sets[name].Elements; !slices.Equal(got, want) {
				t.Errorf("%s: view of %s %s: %v, want %v", step, f, name, got, want)
			}
		}
	}
}
