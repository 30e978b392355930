package nftables_test

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/drivers/nftables"
	"github.com/switchman-lb/switchman/drivers/nftables/nftfake"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

func dest(addr string, w int) render.L4Destination {
	ap := netip.MustParseAddrPort(addr)
	return render.L4Destination{Address: ap.Addr(), Port: ap.Port(), Weight: w, Forwarding: spec.NAT}
}

func l4(name, vip string, p spec.Protocol, sched spec.Scheduler, dests ...render.L4Destination) render.L4Service {
	ap := netip.MustParseAddrPort(vip)
	return render.L4Service{Service: name, Driver: spec.DriverNFTables, Protocol: p, Address: ap.Addr(), Port: ap.Port(), Scheduler: sched, Destinations: dests}
}

func model(t *testing.T, services ...render.L4Service) map[string]*render.NFTService {
	t.Helper()
	out := map[string]*render.NFTService{}
	for _, s := range services {
		n, err := render.NFTablesService(s)
		if err != nil {
			t.Fatal(err)
		}
		out[s.Service] = &n
	}
	return out
}

// expected returns the tables that hold exactly services, as render
// assembles them.
func expected(t *testing.T, services ...render.L4Service) map[render.NFTFamily]*nftables.Table {
	t.Helper()
	var svcs []render.NFTService
	for _, s := range model(t, services...) {
		svcs = append(svcs, *s)
	}
	out := map[render.NFTFamily]*nftables.Table{}
	for _, tc := range render.NFTAssemble(svcs) {
		tb := nftables.NewTable(tc.Family)
		for _, c := range tc.Chains {
			ch := &nftables.Chain{Name: c.Name, Hook: c.Hook}
			for _, r := range c.Rules {
				ch.Rules = append(ch.Rules, nftables.Rule{Spec: r, Known: true})
			}
			tb.Chains[c.Name] = ch
		}
		for _, s := range tc.Sets {
			tb.Sets[s.Name] = &s
		}
		out[tc.Family] = tb
	}
	return out
}

// dump formats tables with handles left out, for comparison.
func dump(tables map[render.NFTFamily]*nftables.Table) string {
	var b strings.Builder
	for _, f := range []render.NFTFamily{render.NFTIPv4, render.NFTIPv6} {
		t := tables[f]
		if t == nil {
			continue
		}
		fmt.Fprintf(&b, "table %s\n", f)
		for _, name := range slices.Sorted(mapKeys(t.Sets)) {
			s := *t.Sets[name]
			els := slices.Clone(s.Elements)
			slices.SortFunc(els, render.NFTElement.Compare)
			s.Elements = nil
			fmt.Fprintf(&b, "  set %+v\n", s)
			for _, e := range els {
				fmt.Fprintf(&b, "    %+v\n", e)
			}
		}
		for _, name := range slices.Sorted(mapKeys(t.Chains)) {
			c := t.Chains[name]
			fmt.Fprintf(&b, "  chain %s %+v\n", name, c.Hook)
			for _, r := range c.Rules {
				fmt.Fprintf(&b, "    %v %s\n", r.Known, r.Spec.Text(f))
			}
		}
	}
	return b.String()
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// commitAll commits each group to the fake and fails the test on errors.
func commitAll(t *testing.T, k *nftfake.Kernel, groups []nftables.Group) {
	t.Helper()
	for _, g := range groups {
		if _, err := k.Commit(t.Context(), g.Ops); err != nil {
			t.Fatalf("group %v: %v", g.Services, err)
		}
	}
}

// converge runs a full Diff against the fake, commits it, and checks that
// the fake then holds exactly the services and that nothing is left to do.
func converge(t *testing.T, k *nftfake.Kernel, services ...render.L4Service) []nftables.Group {
	t.Helper()
	groups := nftables.Diff(k.State(), nftables.Desired{Services: model(t, services...), All: true})
	commitAll(t, k, groups)
	if got, want := dump(k.State()), dump(expected(t, services...)); got != want {
		t.Fatalf("after the diff the kernel holds\n%s\nwant\n%s", got, want)
	}
	if again := nftables.Diff(k.State(), nftables.Desired{Services: model(t, services...), All: true}); len(again) != 0 {
		t.Fatalf("a second diff still writes: %v", again)
	}
	return groups
}

func opKinds(groups []nftables.Group) []string {
	var out []string
	for _, g := range groups {
		for _, op := range g.Ops {
			s := op.Kind.String()
			switch op.Kind {
			case nftables.AddElements, nftables.DelElements:
				s += " " + op.Set.Name + fmt.Sprintf("(%d)", len(op.Elements))
			case nftables.AddChain, nftables.DelChain, nftables.AddRule, nftables.ReplaceRule, nftables.DelRule:
				s += " " + op.Chain
			case nftables.AddSet, nftables.DelSet:
				s += " " + op.Set.Name
			}
			out = append(out, s)
		}
	}
	return out
}

func TestDiffTransitions(t *testing.T) {
	web := l4("web", "192.0.2.10:80", spec.TCP, spec.RoundRobin, dest("10.1.1.2:8080", 1), dest("10.1.1.3:8080", 1), dest("10.1.1.4:8080", 1))
	webDown := web
	webDown.Destinations = []render.L4Destination{dest("10.1.1.2:8080", 1), dest("10.1.1.3:8080", 0), dest("10.1.1.4:8080", 1)}
	mh := l4("cache", "192.0.2.11:11211", spec.TCP, spec.MaglevHashing, dest("10.1.2.2:11211", 1), dest("10.1.2.3:11211", 1), dest("10.1.2.4:11211", 1), dest("10.1.2.5:11211", 1))
	mhHeavier := mh
	mhHeavier.Destinations = slices.Clone(mh.Destinations)
	mhHeavier.Destinations[1].Weight = 2
	sticky := web
	sticky.Service, sticky.Address, sticky.Persistence = "sticky", netip.MustParseAddr("192.0.2.12"), time.Minute
	stickyDown := sticky
	stickyDown.Destinations = webDown.Destinations
	stickyLonger := sticky
	stickyLonger.Persistence = time.Hour
	guarded := web
	guarded.AllowCIDRs, guarded.Masquerade = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, true
	guardedWider := guarded
	guardedWider.AllowCIDRs = append(slices.Clone(guarded.AllowCIDRs), netip.MustParsePrefix("198.51.100.0/24"))
	web6 := web
	web6.Address = netip.MustParseAddr("2001:db8::10")
	web6.Destinations = []render.L4Destination{dest("[2001:db8:1::2]:8080", 1)}
	moved := web
	moved.Port = 81
	dns := l4("dns", "192.0.2.13:53", spec.UDP, spec.SourceHashing, dest("10.1.3.2:53", 1))

	tests := []struct {
		name   string
		before []render.L4Service
		after  []render.L4Service
		want   []string // the writes, in order; nil: do not check
	}{
		{name: "first service", after: []render.L4Service{dns}},
		{name: "nothing changes", before: []render.L4Service{web, dns}, after: []render.L4Service{web, dns}, want: []string{}},
		{name: "rr backend to weight 0: selector and its slots", before: []render.L4Service{web}, after: []render.L4Service{webDown}, want: []string{
			"delete-elements slots-web(2)", "add-elements slots-web(1)", "replace-rule svc-web"}},
		{name: "rr backend back", before: []render.L4Service{webDown}, after: []render.L4Service{web}, want: []string{
			"delete-elements slots-web(1)", "add-elements slots-web(2)", "replace-rule svc-web"}},
		{name: "mh weight: slots only", before: []render.L4Service{mh}, after: []render.L4Service{mhHeavier}},
		{name: "persistence: weight 0 drops the affinity rule", before: []render.L4Service{sticky}, after: []render.L4Service{stickyDown}, want: []string{
			"delete-rule svc-sticky", "delete-elements slots-sticky(2)", "add-elements slots-sticky(1)", "replace-rule svc-sticky"}},
		{name: "persistence: timeout change makes the sets anew", before: []render.L4Service{sticky}, after: []render.L4Service{stickyLonger}},
		{name: "persistence on", before: []render.L4Service{web}, after: []render.L4Service{func() render.L4Service { s := web; s.Persistence = time.Minute; return s }()}},
		{name: "persistence off", before: []render.L4Service{sticky}, after: []render.L4Service{func() render.L4Service { s := sticky; s.Persistence = 0; return s }()}},
		{name: "allow and masquerade on", before: []render.L4Service{web}, after: []render.L4Service{guarded}, want: []string{
			"add-chain allow-web", "add-set allowed-web", "add-elements allowed-web(3)", "add-rule allow-web",
			"add-elements filters(1)", "add-elements masq-tcp(1)"}},
		{name: "allow range added: elements only", before: []render.L4Service{guarded}, after: []render.L4Service{guardedWider}, want: []string{
			"add-elements allowed-web(2)"}},
		{name: "allow off", before: []render.L4Service{guarded}, after: []render.L4Service{web}, want: []string{
			"delete-elements filters(1)", "delete-elements masq-tcp(1)", "delete-chain allow-web", "delete-set allowed-web"}},
		{name: "port change", before: []render.L4Service{web, dns}, after: []render.L4Service{moved, dns}, want: []string{
			"delete-elements services(1)", "add-elements services(1)"}},
		{name: "remove one of two", before: []render.L4Service{web, dns}, after: []render.L4Service{dns}},
		{name: "remove the last: the table goes", before: []render.L4Service{web}, after: nil, want: []string{"delete-table"}},
		{name: "to ipv6: the ip table goes", before: []render.L4Service{web}, after: []render.L4Service{web6}},
		{name: "both families", before: []render.L4Service{web, dns}, after: []render.L4Service{web6, dns}},
		{name: "scheduler change", before: []render.L4Service{web}, after: []render.L4Service{func() render.L4Service { s := web; s.Scheduler = spec.MaglevHashing; return s }()}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := nftfake.New()
			if tt.before != nil {
				converge(t, k, tt.before...)
			}
			groups := converge(t, k, tt.after...)
			t.Logf("writes:\n  %s", strings.Join(opKinds(groups), "\n  "))
			if tt.want != nil {
				if got := opKinds(groups); !slices.Equal(got, tt.want) && !(len(got) == 0 && len(tt.want) == 0) {
					t.Errorf("writes:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(tt.want, "\n  "))
				}
			}
			// Every service's writes are one group of their own.
			for _, g := range groups {
				if len(g.Services) > 1 && g.Ops[0].Kind != nftables.DelTable && g.Ops[0].Kind != nftables.AddTable {
					t.Errorf("group for %v mixes services", g.Services)
				}
			}
		})
	}
}

// TestDiffExposesLast checks the order inside a new service's group: the
// filter and masquerade elements before the services element, which comes
// last; and in a removal the services element goes first.
func TestDiffExposesLast(t *testing.T) {
	s := l4("web", "192.0.2.10:80", spec.TCP, spec.RoundRobin, dest("10.1.1.2:8080", 1))
	s.AllowCIDRs, s.Masquerade = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, true
	k := nftfake.New()
	groups := converge(t, k, s)
	last := groups[len(groups)-1].Ops
	n := len(last)
	if last[n-1].Set.Name != render.NFTServicesMap || last[n-1].Kind != nftables.AddElements {
		t.Errorf("last write is %s, want the services element", last[n-1])
	}
	for _, op := range last[:n-1] {
		if op.Set.Name == render.NFTServicesMap {
			t.Errorf("services element written before the end: %s", op)
		}
	}
	other := l4("dns", "192.0.2.13:53", spec.UDP, spec.RoundRobin, dest("10.1.3.2:53", 1))
	converge(t, k, s, other)
	groups = converge(t, k, other)
	if first := groups[0].Ops[0]; first.Kind != nftables.DelElements || first.Set.Name != render.NFTServicesMap {
		t.Errorf("removal starts with %s, want the services element", first)
	}
}

// TestDiffScope checks that without All only the named services are
// touched: a service the diff is not told about stays, and so do objects
// nobody owns.
func TestDiffScope(t *testing.T) {
	web := l4("web", "192.0.2.10:80", spec.TCP, spec.RoundRobin, dest("10.1.1.2:8080", 1))
	dns := l4("dns", "192.0.2.13:53", spec.UDP, spec.RoundRobin, dest("10.1.3.2:53", 1))
	k := nftfake.New()
	converge(t, k, web, dns)
	k.Edit(func(tables map[render.NFTFamily]*nftables.Table) {
		tables[render.NFTIPv4].Chains["operator"] = &nftables.Chain{Name: "operator"}
	})
	// Remove web only.
	groups := nftables.Diff(k.State(), nftables.Desired{Services: map[string]*render.NFTService{"web": nil}})
	commitAll(t, k, groups)
	st := k.State()[render.NFTIPv4]
	if st.Chains["svc-dns"] == nil || st.Chains["operator"] == nil {
		t.Fatalf("a diff scoped to web touched other objects:\n%s", dump(k.State()))
	}
	if st.Chains["svc-web"] != nil {
		t.Fatal("web is still there")
	}
	// Keep leaves a service alone even in a full diff.
	groups = nftables.Diff(k.State(), nftables.Desired{All: true, Keep: map[string]bool{"dns": true}})
	commitAll(t, k, groups)
	if st := k.State()[render.NFTIPv4]; st == nil || st.Chains["svc-dns"] == nil || st.Chains["operator"] != nil {
		t.Fatalf("full diff with dns kept:\n%s", dump(k.State()))
	}
}

// TestDiffRepairsDrift edits the tables behind the driver's back and
// checks that a full diff puts them right with small writes.
func TestDiffRepairsDrift(t *testing.T) {
	web := l4("web", "192.0.2.10:80", spec.TCP, spec.WeightedRoundRobin, dest("10.1.1.2:8080", 2), dest("10.1.1.3:8080", 1))
	web.AllowCIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	tests := []struct {
		name string
		edit func(t *nftables.Table)
		want []string
	}{
		{"slot element deleted", func(t *nftables.Table) {
			s := t.Sets["slots-web"]
			s.Elements = s.Elements[1:]
		}, []string{"add-elements slots-web(1)"}},
		{"slot element pointed elsewhere", func(t *nftables.Table) {
			s := t.Sets["slots-web"]
			s.Elements[0].Backend = netip.MustParseAddrPort("10.1.1.3:8080")
		}, []string{"delete-elements slots-web(1)", "add-elements slots-web(1)"}},
		{"slots map of another kind (verdicts, as an earlier layout had)", func(t *nftables.Table) {
			t.Sets["slots-web"].Backends, t.Sets["slots-web"].Verdicts = false, true
		}, []string{"delete-rule svc-web", "delete-set slots-web", "add-set slots-web", "add-elements slots-web(3)", "add-rule svc-web"}},
		{"slots map made a plain set", func(t *nftables.Table) {
			t.Sets["slots-web"].Backends = false
		}, []string{"delete-rule svc-web", "delete-set slots-web", "add-set slots-web", "add-elements slots-web(3)", "add-rule svc-web"}},
		{"foreign rule in the service chain", func(t *nftables.Table) {
			c := t.Chains["svc-web"]
			c.Rules = slices.Insert(c.Rules, 0, nftables.Rule{Handle: 9999, Known: false})
		}, []string{"delete-rule svc-web"}},
		{"selector changed", func(t *nftables.Table) {
			c := t.Chains["svc-web"]
			c.Rules[0].Spec.Modulus = 7
		}, []string{"replace-rule svc-web"}},
		{"reject rule deleted", func(t *nftables.Table) {
			c := t.Chains["svc-web"]
			c.Rules = c.Rules[:1]
		}, []string{"add-rule svc-web"}},
		{"base rule deleted", func(t *nftables.Table) {
			t.Chains[render.NFTNATPrerouting].Rules = nil
		}, []string{"add-rule nat-prerouting"}},
		{"orphan chain and set", func(t *nftables.Table) {
			t.Chains["leftover"] = &nftables.Chain{Name: "leftover"}
			t.Sets["leftover"] = &render.NFTSet{Name: "leftover", Key: render.NFTKeyAddr}
		}, []string{"delete-chain leftover", "delete-set leftover"}},
		{"services element of nobody", func(t *nftables.Table) {
			s := t.Sets[render.NFTServicesMap]
			s.Elements = append(s.Elements, render.NFTElement{Addr: netip.MustParseAddr("192.0.2.99"), Proto: spec.TCP, Port: 1, Goto: "svc-web"})
		}, []string{"delete-elements services(1)"}},
		{"allowed set with other flags", func(t *nftables.Table) {
			t.Sets["allowed-web"].Interval = false
		}, []string{"delete-rule allow-web", "delete-set allowed-web", "add-set allowed-web", "add-elements allowed-web(3)", "add-rule allow-web"}},
		{"shared map made anew without elements", func(t *nftables.Table) {
			t.Sets[render.NFTFiltersMap].Elements = nil
			t.Sets[render.NFTFiltersMap].Size = 12
		}, []string{
			"delete-rule filter-output", "delete-rule filter-prerouting", "delete-set filters", "add-set filters",
			"add-rule filter-output", "add-rule filter-prerouting", "add-elements filters(1)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := nftfake.New()
			converge(t, k, web)
			k.Edit(func(tables map[render.NFTFamily]*nftables.Table) { tt.edit(tables[render.NFTIPv4]) })
			groups := converge(t, k, web)
			if got := opKinds(groups); !slices.Equal(got, tt.want) {
				t.Errorf("writes:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(tt.want, "\n  "))
			}
		})
	}
}

// TestDiffSwapKeys moves two services' vip:ports onto each other's in one
// pass: they share one transaction, which hides both before exposing
// either.
func TestDiffSwapKeys(t *testing.T) {
	a := l4("a", "192.0.2.10:80", spec.TCP, spec.RoundRobin, dest("10.1.1.2:8080", 1))
	b := l4("b", "192.0.2.10:81", spec.TCP, spec.RoundRobin, dest("10.1.1.3:8080", 1))
	c := l4("c", "192.0.2.10:82", spec.TCP, spec.RoundRobin, dest("10.1.1.4:8080", 1))
	k := nftfake.New()
	converge(t, k, a, b, c)
	a.Port, b.Port = 81, 80
	groups := converge(t, k, a, b, c)
	if len(groups) != 1 || !slices.Equal(groups[0].Services, []string{"a", "b"}) {
		t.Errorf("groups %v, want one for a and b", groups)
	}
}
