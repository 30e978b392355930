package netfilter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// fakes is a driver over two fake families.
type fakes struct {
	v4, v6 *fakeTables
	d      *Driver
}

func newFakes() *fakes {
	f := &fakes{v4: newFakeTables(), v6: newFakeTables()}
	f.d = newDriver(slog.New(slog.NewTextHandler(io.Discard, nil)), func(v6 bool) (Tables, error) {
		if v6 {
			return f.v6, nil
		}
		return f.v4, nil
	})
	return f
}

func (f *fakes) writes() int { return f.v4.writes + f.v6.writes }

// apply runs a Sync with exactly these filters.
func (f *fakes) apply(t *testing.T, filters ...render.Filter) {
	t.Helper()
	if errs := f.d.Sync(context.Background(), states(filters...)); len(errs) > 0 {
		t.Fatalf("Sync: %v", errs)
	}
}

// states makes one service state per filter.
func states(filters ...render.Filter) []*render.ServiceState {
	out := make([]*render.ServiceState, len(filters))
	for i := range filters {
		out[i] = &render.ServiceState{Name: filters[i].Service, Filter: &filters[i]}
	}
	return out
}

func prefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range s {
		out = append(out, netip.MustParsePrefix(p))
	}
	return out
}

func addrPorts(s ...string) []netip.AddrPort {
	var out []netip.AddrPort
	for _, a := range s {
		out = append(out, netip.MustParseAddrPort(a))
	}
	return out
}

func allow(service, vip string, port uint16, cidrs ...string) render.Filter {
	return render.Filter{Service: service, Protocol: spec.TCP, VIP: netip.MustParseAddr(vip), Port: port, AllowCIDRs: prefixes(cidrs...)}
}

func masq(service, vip string, port uint16, backends ...string) render.Filter {
	return render.Filter{Service: service, Protocol: spec.TCP, VIP: netip.MustParseAddr(vip), Port: port, Masquerade: true, Backends: addrPorts(backends...)}
}

func equalLines(t *testing.T, what string, got, want []string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("%s:\n got  %s\n want %s", what, strings.Join(got, "\n      "), strings.Join(want, "\n      "))
	}
}

func TestApplyRules(t *testing.T) {
	web := serviceChain("web")
	dns := serviceChain("dns")
	tests := []struct {
		name    string
		filters []render.Filter
		v6      bool                // the family that gets rules
		want    map[string][]string // "table/chain" -> rules, in the family that gets rules
	}{
		{
			name:    "allow_cidrs ipv4",
			filters: []render.Filter{allow("web", "192.0.2.10", 443, "198.51.100.0/24", "10.0.0.0/8", "10.0.0.0/8")},
			want: map[string][]string{
				"filter/INPUT":            {"-m comment --comment switchman -j SWITCHMAN-FILTER", "-s 203.0.113.9/32 -j ACCEPT"},
				"filter/SWITCHMAN-FILTER": {"-d 192.0.2.10/32 -p tcp -m tcp --dport 443 -m comment --comment switchman:web -j " + web},
				"filter/" + web: {
					"-s 10.0.0.0/8 -m comment --comment switchman:web -j RETURN",
					"-s 198.51.100.0/24 -m comment --comment switchman:web -j RETURN",
					"-m comment --comment switchman:web -j DROP",
				},
			},
		},
		{
			name: "allow_cidrs ipv6 udp",
			filters: []render.Filter{{Service: "dns", Protocol: spec.UDP, VIP: netip.MustParseAddr("2001:db8::53"), Port: 53,
				AllowCIDRs: prefixes("2001:db8:1::/48")}},
			v6: true,
			want: map[string][]string{
				"filter/SWITCHMAN-FILTER": {"-d 2001:db8::53/128 -p udp -m udp --dport 53 -m comment --comment switchman:dns -j " + dns},
				"filter/" + dns: {
					"-s 2001:db8:1::/48 -m comment --comment switchman:dns -j RETURN",
					"-m comment --comment switchman:dns -j DROP",
				},
			},
		},
		{
			name:    "masquerade",
			filters: []render.Filter{masq("web", "192.0.2.10", 80, "10.1.1.2:8080", "10.1.1.3:8080")},
			want: map[string][]string{
				"nat/POSTROUTING": {"-m comment --comment switchman -j SWITCHMAN-POSTROUTING", "-s 10.9.0.0/16 -j MASQUERADE"},
				"nat/SWITCHMAN-POSTROUTING": {
					"-d 10.1.1.2/32 -p tcp -m tcp --dport 8080 -m conntrack --ctorigdst 192.0.2.10 --ctorigdstport 80 -m comment --comment switchman:web -j MASQUERADE",
					"-d 10.1.1.3/32 -p tcp -m tcp --dport 8080 -m conntrack --ctorigdst 192.0.2.10 --ctorigdstport 80 -m comment --comment switchman:web -j MASQUERADE",
				},
				"filter/INPUT": {"-s 203.0.113.9/32 -j ACCEPT"}, // no allow_cidrs: no filter chain
			},
		},
		{
			name:    "masquerade ipv6",
			filters: []render.Filter{masq("web6", "2001:db8::10", 80, "[2001:db8:2::2]:8080")},
			v6:      true,
			want: map[string][]string{
				"nat/SWITCHMAN-POSTROUTING": {
					"-d 2001:db8:2::2/128 -p tcp -m tcp --dport 8080 -m conntrack --ctorigdst 2001:db8::10 --ctorigdstport 80 -m comment --comment switchman:web6 -j MASQUERADE",
				},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakes()
			for _, ft := range []*fakeTables{f.v4, f.v6} {
				ft.chains["filter"]["INPUT"] = []rule{{"-s", "203.0.113.9/32", "-j", "ACCEPT"}}
				ft.chains["nat"]["POSTROUTING"] = []rule{{"-s", "10.9.0.0/16", "-j", "MASQUERADE"}}
			}
			f.apply(t, tc.filters...)
			got, other := f.v4, f.v6
			if tc.v6 {
				got, other = f.v6, f.v4
			}
			for key, want := range tc.want {
				table, chain, _ := strings.Cut(key, "/")
				equalLines(t, key, got.dump(table, chain), want)
			}
			if other.writes != 0 {
				t.Errorf("the other family got %d writes", other.writes)
			}
			// A second Apply with the same state writes nothing.
			before := f.writes()
			f.apply(t, tc.filters...)
			if n := f.writes() - before; n != 0 {
				t.Errorf("second Apply made %d writes", n)
			}
		})
	}
}

func TestAllowEveryoneWritesNothing(t *testing.T) {
	f := newFakes()
	// allow_cidrs 0.0.0.0/0 renders to nil AllowCIDRs; render leaves such
	// a service out of Filters, but a Filter may still arrive this way.
	f.apply(t, render.Filter{Service: "web", Protocol: spec.TCP, VIP: netip.MustParseAddr("192.0.2.10"), Port: 80})
	f.apply(t)
	if f.writes() != 0 {
		t.Errorf("%d writes for services that need no rules", f.writes())
	}
	if f.v4.hasChain("filter", chainFilter) {
		t.Error("SWITCHMAN-FILTER created with nothing to filter")
	}
}

func TestRemovalCleansUp(t *testing.T) {
	f := newFakes()
	foreign := rule{"-s", "203.0.113.9/32", "-j", "ACCEPT"}
	f.v4.chains["filter"]["INPUT"] = []rule{foreign}
	if err := f.v4.NewChain("filter", "OTHER"); err != nil {
		t.Fatal(err)
	}
	if err := f.v4.Append("filter", "OTHER", "-j", "DROP"); err != nil {
		t.Fatal(err)
	}
	f.apply(t,
		allow("web", "192.0.2.10", 443, "198.51.100.0/24"),
		allow("api", "192.0.2.11", 443, "198.51.100.0/24"),
		masq("api", "192.0.2.11", 443, "10.1.1.2:8443"),
		allow("v6", "2001:db8::10", 443, "2001:db8:1::/48"))
	// web goes, api loses its masquerade, v6 goes.
	f.apply(t, allow("api", "192.0.2.11", 443, "198.51.100.0/24"))
	equalLines(t, "INPUT", f.v4.dump("filter", "INPUT"), []string{"-m comment --comment switchman -j SWITCHMAN-FILTER", foreign.String()})
	equalLines(t, "OTHER", f.v4.dump("filter", "OTHER"), []string{"-j DROP"})
	equalLines(t, chainFilter, f.v4.dump("filter", chainFilter),
		[]string{"-d 192.0.2.11/32 -p tcp -m tcp --dport 443 -m comment --comment switchman:api -j " + serviceChain("api")})
	if f.v4.hasChain("filter", serviceChain("web")) {
		t.Error("web's chain survived its removal")
	}
	equalLines(t, chainNAT, f.v4.dump("nat", chainNAT), nil)
	// Everything gone: only the empty base chains and their jumps stay.
	f.apply(t)
	var left []string
	for _, ft := range []*fakeTables{f.v4, f.v6} {
		for table, chains := range ft.chains {
			for c := range chains {
				if strings.HasPrefix(c, serviceChainPrefix) {
					left = append(left, c)
				}
				for _, r := range ft.chains[table][c] {
					if r.service() != "" {
						left = append(left, r.String())
					}
				}
			}
		}
	}
	if len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
	equalLines(t, "INPUT at the end", f.v4.dump("filter", "INPUT"), []string{"-m comment --comment switchman -j SWITCHMAN-FILTER", foreign.String()})
	equalLines(t, "OTHER at the end", f.v4.dump("filter", "OTHER"), []string{"-j DROP"})
	before := f.writes()
	f.apply(t)
	if n := f.writes() - before; n != 0 {
		t.Errorf("Apply of nothing after cleanup made %d writes", n)
	}
}

func TestChangeCIDRsInPlace(t *testing.T) {
	f := newFakes()
	f.apply(t, allow("web", "192.0.2.10", 443, "10.0.0.0/8", "198.51.100.0/24"))
	before := f.writes()
	f.apply(t, allow("web", "192.0.2.10", 443, "10.0.0.0/8", "172.16.0.0/12"))
	if n := f.writes() - before; n != 2 {
		t.Errorf("changing one range took %d writes, want 2 (insert, delete)", n)
	}
	equalLines(t, "service chain", f.v4.dump("filter", serviceChain("web")), []string{
		"-s 10.0.0.0/8 -m comment --comment switchman:web -j RETURN",
		"-s 172.16.0.0/12 -m comment --comment switchman:web -j RETURN",
		"-m comment --comment switchman:web -j DROP",
	})
}

func TestRepairsTampering(t *testing.T) {
	f := newFakes()
	svc := allow("web", "192.0.2.10", 443, "198.51.100.0/24")
	f.apply(t, svc)
	want := map[string][]string{}
	for _, c := range []string{"INPUT", chainFilter, serviceChain("web")} {
		want[c] = f.v4.dump("filter", c)
	}
	// Someone deletes our jump from INPUT and slips a rule into our
	// service chain before the DROP.
	if err := f.v4.Delete("filter", "INPUT", jumpRule(chainFilter)...); err != nil {
		t.Fatal(err)
	}
	if err := f.v4.Insert("filter", serviceChain("web"), 2, "-j", "ACCEPT"); err != nil {
		t.Fatal(err)
	}
	f.apply(t, svc)
	for c, w := range want {
		equalLines(t, c, f.v4.dump("filter", c), w)
	}
}

func TestErrorsPerService(t *testing.T) {
	f := newFakes()
	boom := errors.New("boom")
	f.v4.failOn = func(call, table, chain string, r rule) error {
		if r.service() == "bad" && call == "Append" {
			return boom
		}
		return nil
	}
	errs := f.d.Sync(context.Background(), states(
		allow("good", "192.0.2.10", 443, "198.51.100.0/24"),
		allow("bad", "192.0.2.11", 443, "198.51.100.0/24"),
		masq("bad2", "192.0.2.12", 80, "10.1.1.2:80"),
	))
	if len(errs) != 1 || !errors.Is(errs["bad"], boom) {
		t.Fatalf("errors %v, want only bad: boom", errs)
	}
	// bad's chain is half done: nothing jumps to it.
	for _, r := range f.v4.dump("filter", chainFilter) {
		if strings.Contains(r, "switchman:bad ") {
			t.Errorf("jump to a failed service's chain: %s", r)
		}
	}
	if got := len(f.v4.dump("filter", chainFilter)); got != 1 {
		t.Errorf("%d jumps, want good's only", got)
	}
	if got := len(f.v4.dump("nat", chainNAT)); got != 1 {
		t.Errorf("%d masquerade rules, want bad2's", got)
	}
	// Fixed: the next Apply completes bad.
	f.v4.failOn = nil
	f.apply(t,
		allow("good", "192.0.2.10", 443, "198.51.100.0/24"),
		allow("bad", "192.0.2.11", 443, "198.51.100.0/24"),
		masq("bad2", "192.0.2.12", 80, "10.1.1.2:80"))
	if got := len(f.v4.dump("filter", chainFilter)); got != 2 {
		t.Errorf("%d jumps after the fix, want 2", got)
	}
}

func TestFailedServiceKeepsItsJump(t *testing.T) {
	f := newFakes()
	f.apply(t, allow("web", "192.0.2.10", 443, "198.51.100.0/24"))
	jumps := f.v4.dump("filter", chainFilter)
	f.v4.failOn = func(call, table, chain string, r rule) error {
		if call == "Insert" && chain == serviceChain("web") {
			return errors.New("boom")
		}
		return nil
	}
	errs := f.d.Apply(context.Background(), states(allow("web", "192.0.2.10", 443, "198.51.100.0/24", "10.0.0.0/8")))
	if errs["web"] == nil {
		t.Fatalf("errors %v, want web", errs)
	}
	// The old policy stays in force rather than opening the service.
	equalLines(t, "jumps", f.v4.dump("filter", chainFilter), jumps)
}

func TestMissingBinary(t *testing.T) {
	notFound := fmt.Errorf("iptables is not installed: install the iptables package: %w", exec.ErrNotFound)
	opens := 0
	d := newDriver(slog.New(slog.NewTextHandler(io.Discard, nil)), func(v6 bool) (Tables, error) {
		opens++
		return nil, notFound
	})
	errs := d.Sync(context.Background(), states(
		allow("web", "192.0.2.10", 443, "198.51.100.0/24"),
		masq("v6", "2001:db8::10", 80, "[2001:db8:2::2]:80"),
	))
	if len(errs) != 2 || !errors.Is(errs["web"], exec.ErrNotFound) || !errors.Is(errs["v6"], exec.ErrNotFound) {
		t.Errorf("errors %v, want web and v6 not found", errs)
	}
	// No filters: a missing binary is no error.
	if errs := d.Sync(context.Background(), nil); len(errs) != 0 {
		t.Errorf("errors %v with nothing to program", errs)
	}
	if opens < 3 {
		t.Errorf("opened %d times: a missing binary must be looked for again", opens)
	}
}

// TestOpenMissingBinary runs the real adapter with an empty PATH.
func TestOpenMissingBinary(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	for _, v6 := range []bool{false, true} {
		_, err := openIPTables(v6)
		if !errors.Is(err, exec.ErrNotFound) {
			t.Fatalf("v6=%v: %v, want exec.ErrNotFound", v6, err)
		}
		if !strings.Contains(err.Error(), "apt-get install iptables") {
			t.Errorf("v6=%v: %q does not say what to install", v6, err)
		}
	}
}

// byMethod runs a test once through Sync and once through Apply.
func byMethod(t *testing.T, test func(t *testing.T, f *fakes, call func(context.Context, []*render.ServiceState) map[string]error)) {
	for _, m := range []string{"Sync", "Apply"} {
		t.Run(m, func(t *testing.T) {
			f := newFakes()
			call := f.d.Sync
			if m == "Apply" {
				call = f.d.Apply
			}
			test(t, f, call)
		})
	}
}

func TestCancelledContext(t *testing.T) {
	byMethod(t, func(t *testing.T, f *fakes, call func(context.Context, []*render.ServiceState) map[string]error) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		errs := call(ctx, states(allow("web", "192.0.2.10", 443, "198.51.100.0/24")))
		if !errors.Is(errs["web"], context.Canceled) {
			t.Errorf("errors %v, want web: context canceled", errs)
		}
		if f.writes() != 0 {
			t.Errorf("%d writes after cancel", f.writes())
		}
	})
}

func TestBadFamily(t *testing.T) {
	byMethod(t, func(t *testing.T, f *fakes, call func(context.Context, []*render.ServiceState) map[string]error) {
		errs := call(context.Background(), states(
			allow("web", "192.0.2.10", 443, "2001:db8::/32"),
			masq("m", "192.0.2.11", 80, "[2001:db8::2]:80"),
			allow("ok", "192.0.2.12", 443, "198.51.100.0/24"),
		))
		if errs["web"] == nil || errs["m"] == nil || errs["ok"] != nil || len(errs) != 2 {
			t.Errorf("errors %v, want web and m", errs)
		}
	})
}

func TestName(t *testing.T) {
	if n := New(slog.New(slog.NewTextHandler(io.Discard, nil))).Name(); n != "netfilter" {
		t.Errorf("Name %q", n)
	}
}
