package render

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/spec"
)

func nftDest(addr string, w int) L4Destination {
	ap := netip.MustParseAddrPort(addr)
	return L4Destination{Address: ap.Addr(), Port: ap.Port(), Weight: w, Forwarding: spec.NAT}
}

func nftService(name, vip string, p spec.Protocol, sched spec.Scheduler, dests ...L4Destination) L4Service {
	ap := netip.MustParseAddrPort(vip)
	return L4Service{Service: name, Driver: spec.DriverNFTables, Protocol: p, Address: ap.Addr(), Port: ap.Port(), Scheduler: sched, Destinations: dests}
}

func prefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range s {
		out = append(out, netip.MustParsePrefix(p))
	}
	return out
}

func TestNFTablesGolden(t *testing.T) {
	sticky := nftService("sticky", "192.0.2.14:443", spec.TCP, spec.MaglevHashing, nftDest("10.1.1.2:8443", 1), nftDest("10.1.1.3:8443", 0), nftDest("10.1.1.4:8443", 2))
	sticky.Persistence = 90 * time.Minute
	guarded := nftService("guarded", "192.0.2.15:80", spec.TCP, spec.RoundRobin, nftDest("10.1.2.2:8080", 1), nftDest("10.1.2.3:8080", 1))
	guarded.AllowCIDRs = prefixes("10.0.0.0/9", "10.128.0.0/9", "198.51.100.0/24", "198.51.100.7/32", "203.0.113.9/32")
	guarded.Masquerade = true
	v6 := nftService("v6", "[2001:db8::10]:53", spec.UDP, spec.SourceHashing, nftDest("[2001:db8:1::2]:5353", 1), nftDest("[2001:db8:1::3]:5353", 3))
	v6.AllowCIDRs = prefixes("2001:db8:c::/48", "2001:db8:d::1/128")
	v6.Masquerade = true
	v6.Persistence = 30 * time.Second
	tests := []struct {
		name     string
		services []L4Service
	}{
		{"rr", []L4Service{nftService("web", "192.0.2.10:80", spec.TCP, spec.RoundRobin, nftDest("10.1.1.2:8080", 1), nftDest("10.1.1.3:8080", 5), nftDest("10.1.1.4:8080", 0))}},
		{"wrr", []L4Service{nftService("app", "192.0.2.11:80", spec.TCP, spec.WeightedRoundRobin, nftDest("10.1.1.2:8080", 4), nftDest("10.1.1.3:8080", 3), nftDest("10.1.1.4:8080", 2))}},
		{"sh-udp", []L4Service{nftService("dns", "192.0.2.12:53", spec.UDP, spec.SourceHashing, nftDest("10.1.3.2:53", 1), nftDest("10.1.3.3:53", 1), nftDest("10.1.3.4:53", 1))}},
		{"mh-persistence", []L4Service{sticky}},
		{"allow-masquerade", []L4Service{guarded}},
		{"ipv6", []L4Service{v6}},
		{"all-down", []L4Service{nftService("down", "192.0.2.16:80", spec.TCP, spec.WeightedRoundRobin, nftDest("10.1.1.2:8080", 0), nftDest("10.1.1.3:8080", 0))}},
		{"both-families", []L4Service{
			nftService("a", "192.0.2.20:80", spec.TCP, spec.RoundRobin, nftDest("10.1.1.2:8080", 1)),
			nftService("b", "192.0.2.20:80", spec.UDP, spec.RoundRobin, nftDest("10.1.1.2:8080", 1)),
			nftService("c", "[2001:db8::20]:80", spec.TCP, spec.RoundRobin, nftDest("[2001:db8:1::2]:8080", 1)),
		}},
		{"no-services", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := NFTablesRuleset(tt.services)
			if err != nil {
				t.Fatal(err)
			}
			golden := filepath.Join("testdata", "nftables", tt.name+".nft")
			if *update {
				if err := os.MkdirAll(filepath.Dir(golden), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test ./render -run NFTablesGolden -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("ruleset differs from %s (rerun with -update if the change is intended):\n%s", golden, lineDiff(string(want), got))
			}
			nftLoad(t, string(want))
		})
	}
}

// nftLoad loads ruleset with the real nft in a network namespace of its
// own (so the host's ruleset is never touched): `nft -c -f` must accept it,
// and after `nft -f`, `nft list table` must show the same text, up to the
// order of elements (nft lists hash sets in hash order).
func nftLoad(t *testing.T, ruleset string) {
	t.Helper()
	if ruleset == "" {
		return
	}
	nft, err := exec.LookPath("nft")
	if err != nil {
		t.Log("nft not installed (apt-get install nftables): golden not checked with nft -c")
		return
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil || os.Geteuid() != 0 {
		t.Log("needs root and unshare(1) to run nft in a namespace of its own: golden not checked with nft -c")
		return
	}
	file := filepath.Join(t.TempDir(), "ruleset.nft")
	if err := os.WriteFile(file, []byte(ruleset), 0o644); err != nil {
		t.Fatal(err)
	}
	var lists []string
	for _, fam := range []string{"ip", "ip6"} {
		if strings.Contains(ruleset, "table "+fam+" switchman {") {
			lists = append(lists, nft+" list table "+fam+" switchman")
		}
	}
	script := nft + " -c -f " + file + " && " + nft + " -f " + file + " && " + strings.Join(lists, " && ")
	out, err := exec.Command(unshare, "--net", "sh", "-c", script).CombinedOutput()
	if err != nil {
		t.Fatalf("nft rejected the ruleset: %v\n%s", err, out)
	}
	if got, want := normalizeNFT(string(out)), normalizeNFT(ruleset); got != want {
		t.Errorf("nft list shows another ruleset than the plan:\n%s", lineDiff(want, got))
	}
}

// normalizeNFT joins element lists onto one line and sorts them.
func normalizeNFT(s string) string {
	s = strings.ReplaceAll(s, ",\n\t\t\t     ", ", ")
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		head, list, ok := strings.Cut(l, "elements = { ")
		if !ok {
			continue
		}
		items := strings.Split(strings.TrimSuffix(list, " }"), ", ")
		slices.Sort(items)
		lines[i] = head + "elements = { " + strings.Join(items, ", ") + " }"
	}
	return strings.Join(lines, "\n")
}

func TestNFTSlots(t *testing.T) {
	a, b, c := "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"
	tests := []struct {
		name    string
		sched   spec.Scheduler
		dests   []L4Destination
		modulus uint32
		want    []string // the table, or the count per backend (sh, mh) as "addr=n"
	}{
		{"rr skips weight 0", spec.RoundRobin, []L4Destination{nftDest(c, 3), nftDest(a, 1), nftDest(b, 0)}, 2, []string{a, c}},
		{"rr none usable", spec.RoundRobin, []L4Destination{nftDest(a, 0)}, 1, nil},
		{"wrr is one IPVS cycle", spec.WeightedRoundRobin, []L4Destination{nftDest(a, 4), nftDest(b, 3), nftDest(c, 2)}, 9, []string{a, a, b, a, b, c, a, b, c}},
		{"wrr reduces by the gcd", spec.WeightedRoundRobin, []L4Destination{nftDest(a, 300), nftDest(b, 100)}, 4, []string{a, a, a, b}},
		{"wrr long cycle is scaled", spec.WeightedRoundRobin, []L4Destination{nftDest(a, 65535), nftDest(b, 65534)}, 1023, []string{a + "=512", b + "=511"}},
		{"sh fills 256 buckets", spec.SourceHashing, []L4Destination{nftDest(a, 1), nftDest(b, 1), nftDest(c, 1)}, SHSize, []string{a + "=86", b + "=85", c + "=85"}},
		{"sh weights", spec.SourceHashing, []L4Destination{nftDest(a, 3), nftDest(b, 1), nftDest(c, 0)}, SHSize, []string{a + "=192", b + "=64"}},
		{"mh is a Maglev table", spec.MaglevHashing, []L4Destination{nftDest(a, 1), nftDest(b, 1)}, MaglevSize, []string{a + "=126", b + "=125"}},
		{"mh none usable", spec.MaglevHashing, []L4Destination{nftDest(a, 0)}, MaglevSize, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mod, table := NFTSlots(L4Service{Scheduler: tt.sched, Destinations: tt.dests})
			if mod != tt.modulus {
				t.Errorf("modulus %d, want %d", mod, tt.modulus)
			}
			var got []string
			if len(tt.want) > 0 && strings.Contains(tt.want[0], "=") {
				counts := countOwners(table)
				for _, d := range tt.dests {
					if n := counts[netip.AddrPortFrom(d.Address, d.Port)]; n > 0 {
						got = append(got, netip.AddrPortFrom(d.Address, d.Port).String()+"="+strconv.Itoa(n))
					}
				}
				slices.Sort(got)
			} else {
				for _, e := range table {
					got = append(got, e.String())
				}
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("table %v, want %v", got, tt.want)
			}
			if int(mod) < len(table) {
				t.Errorf("modulus %d is below the table size %d", mod, len(table))
			}
		})
	}
}

func TestNFTIntervals(t *testing.T) {
	v4 := func(a string) netip.Addr { return netip.MustParseAddr(a) }
	tests := []struct {
		name     string
		v4       bool
		prefixes []netip.Prefix
		want     []NFTElement
		text     []string
	}{
		{"one", true, prefixes("10.0.0.0/8"),
			[]NFTElement{{Addr: v4("0.0.0.0"), End: true}, {Addr: v4("10.0.0.0")}, {Addr: v4("11.0.0.0"), End: true}},
			[]string{"10.0.0.0/8"}},
		{"merged halves and a covered one", true, prefixes("10.128.0.0/9", "10.0.0.0/9", "10.1.2.3/32"),
			[]NFTElement{{Addr: v4("0.0.0.0"), End: true}, {Addr: v4("10.0.0.0")}, {Addr: v4("11.0.0.0"), End: true}},
			[]string{"10.0.0.0/8"}},
		{"adjacent but not a prefix", true, prefixes("10.0.0.1/32", "10.0.0.2/31"),
			[]NFTElement{{Addr: v4("0.0.0.0"), End: true}, {Addr: v4("10.0.0.1")}, {Addr: v4("10.0.0.4"), End: true}},
			[]string{"10.0.0.1-10.0.0.3"}},
		{"from the first address", true, prefixes("0.0.0.0/2"),
			[]NFTElement{{Addr: v4("0.0.0.0")}, {Addr: v4("64.0.0.0"), End: true}},
			[]string{"0.0.0.0/2"}},
		{"to the last address", true, prefixes("128.0.0.0/1", "9.9.9.9/32"),
			[]NFTElement{{Addr: v4("0.0.0.0"), End: true}, {Addr: v4("9.9.9.9")}, {Addr: v4("9.9.9.10"), End: true}, {Addr: v4("128.0.0.0"), Open: true}},
			[]string{"9.9.9.9", "128.0.0.0/1"}},
		{"ipv6", false, prefixes("2001:db8::/32", "10.0.0.0/8"),
			[]NFTElement{{Addr: netip.IPv6Unspecified(), End: true}, {Addr: netip.MustParseAddr("2001:db8::")}, {Addr: netip.MustParseAddr("2001:db9::"), End: true}},
			[]string{"2001:db8::/32"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := nftIntervals(tt.v4, tt.prefixes)
			if !slices.Equal(got, tt.want) {
				t.Errorf("elements %+v, want %+v", got, tt.want)
			}
			if text := nftRanges(got); !slices.Equal(text, tt.text) {
				t.Errorf("shown as %v, want %v", text, tt.text)
			}
		})
	}
}

func TestNFTablesServiceRefuses(t *testing.T) {
	ok := nftService("web", "192.0.2.10:80", spec.TCP, spec.RoundRobin, nftDest("10.1.1.2:8080", 1))
	tests := []struct {
		name   string
		change func(*L4Service)
		want   string
	}{
		{"dr", func(s *L4Service) { s.Destinations[0].Forwarding = spec.Direct }, `forwarding: "dr"`},
		{"tun", func(s *L4Service) { s.Destinations[0].Forwarding = spec.Tunnel }, `forwarding: "tun"`},
		{"lc", func(s *L4Service) { s.Scheduler = spec.LeastConnection }, `scheduler: "lc"`},
		{"flags", func(s *L4Service) { s.Scheduler, s.Flags = spec.MaglevHashing, []string{spec.FlagMHPort} }, `scheduler_flags: "mh-port"`},
		{"mixed families", func(s *L4Service) { s.Destinations[0] = nftDest("[2001:db8::1]:80", 1) }, "backends: 2001:db8::1"},
		{"bad name", func(s *L4Service) { s.Service = "Web_1" }, `name: "Web_1"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := ok
			s.Destinations = slices.Clone(ok.Destinations)
			tt.change(&s)
			_, err := NFTablesService(s)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %v, want one naming %s", err, tt.want)
			}
		})
	}
	if _, err := NFTablesService(ok); err != nil {
		t.Errorf("a plain service is refused: %v", err)
	}
}

func TestNFTOwner(t *testing.T) {
	tests := []struct {
		object, owner string
		ok            bool
	}{
		{"svc-web", "web", true},
		{"slots-web-2", "web-2", true},
		{"allow-web", "web", true},
		{"allowed-web", "web", true},
		{"be-web/10.1.1.2/8080", "web", true},
		{"aff-web/2001-db8--1/443", "web", true},
		{"be-web", "", false},
		{"services", "", false},
		{"nat-prerouting", "", false},
		{"svc-Bad_Name", "", false},
		{"foreign", "", false},
	}
	for _, tt := range tests {
		owner, ok := NFTOwner(tt.object)
		if ok != tt.ok || (ok && owner != tt.owner) {
			t.Errorf("NFTOwner(%q) = %q, %v; want %q, %v", tt.object, owner, ok, tt.owner, tt.ok)
		}
	}
	// Every object a service owns is attributed to it.
	s := nftService("web", "192.0.2.10:80", spec.TCP, spec.MaglevHashing, nftDest("10.1.1.2:8080", 1), nftDest("10.1.1.3:8080", 0))
	s.Persistence, s.AllowCIDRs = time.Minute, prefixes("10.0.0.0/8")
	n, err := NFTablesService(s)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range n.Chains {
		if owner, ok := NFTOwner(c.Name); !ok || owner != "web" {
			t.Errorf("chain %s attributed to %q, %v", c.Name, owner, ok)
		}
	}
	for _, set := range n.Sets {
		if owner, ok := NFTOwner(set.Name); !ok || owner != "web" {
			t.Errorf("set %s attributed to %q, %v", set.Name, owner, ok)
		}
	}
	for _, o := range NFTBase().Chains {
		if _, ok := NFTOwner(o.Name); ok {
			t.Errorf("base chain %s attributed to a service", o.Name)
		}
	}
}

func TestNFTDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		30 * time.Second:             "30s",
		5 * time.Minute:              "5m",
		90 * time.Minute:             "1h30m",
		26*time.Hour + 4*time.Second: "1d2h4s",
	} {
		if got := nftDuration(d); got != want {
			t.Errorf("nftDuration(%s) = %q, want %q", d, got, want)
		}
	}
}
