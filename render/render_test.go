package render

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/switchman-lb/switchman/spec"
)

// The -update flag (declared in haproxy_test.go, shared by the package's
// golden tests) also rewrites testdata/ipvs/*.golden.

// renderDefs are the definitions the render tests use, written the way an
// operator would, parsed and merged the way the agent does.
var renderDefs = map[string]string{
	// Backends out of order, to show Render sorts them.
	"web": "vip: 192.0.2.10\nport: 80\nbackends:\n  - {address: 10.1.1.3, port: 8080}\n  - {address: 10.1.1.2, port: 8080, weight: 2}\n",
	// Same VIP as web: one entry in VIPs.
	"dns": "vip: 192.0.2.10\nport: 53\nprotocol: udp\nscheduler: wlc\nbackends:\n  - address: 10.1.2.3\n  - address: 10.1.2.2\n    weight: 3\nhealth: {protocol: udp, payload: ping}\n",
	// Flags out of order, to show they are sorted.
	"cache": "vip: 192.0.2.40\nport: 11211\nscheduler: mh\nscheduler_flags: [mh-port, mh-fallback]\npersistence: 300s\nbackends:\n  - address: 10.1.5.2\n  - address: 10.1.5.3\n",
	"dr":    "vip: 192.0.2.50\nport: 80\nforwarding: dr\nscheduler: wrr\nbackends:\n  - {address: 10.1.7.2, weight: 2}\n  - address: 10.1.7.3\n",
	// tun may reach an IPv6 backend from an IPv4 VIP.
	"tun": "vip: 192.0.2.51\nport: 80\nforwarding: tun\nbackends:\n  - address: 10.1.8.2\n  - address: \"2001:db8:100::5\"\n",
	"v6":  "vip: \"2001:db8::10\"\nport: 443\nbackends:\n  - {address: \"2001:db8:100::12\", port: 8443}\n  - {address: \"2001:db8:100::11\", port: 8443}\n",
	// Filtered and masqueraded.
	"locked": "vip: 192.0.2.60\nport: 3306\nallow_cidrs: [203.0.113.7, 198.51.100.0/24]\npreserve_client_ip: false\nbackends:\n  - address: 10.1.9.2\n  - address: 10.1.9.3\n",
	// Masquerade is asked for, but DR cannot masquerade: no filter.
	"dr-nomasq": "vip: 192.0.2.52\nport: 80\nforwarding: dr\npreserve_client_ip: false\nbackends:\n  - address: 10.1.7.9\n",
	// HAProxy: allow_cidrs filtered, never masqueraded (it proxies).
	"proxy": "vip: 192.0.2.30\nport: 5432\ndriver: haproxy\nscheduler: lc\npreserve_client_ip: false\nallow_cidrs: [198.51.100.0/24]\nbackends:\n  - address: 10.1.4.2\n  - address: 10.1.4.3\n",
	"tls":   "vip: 192.0.2.20\nport: 443\ntls: {certificate_key: /switchman/certs/api}\nbackends:\n  - {address: 10.1.3.2, port: 8080}\n",
	// A catch-all range among others means no filter.
	"open":   "vip: 192.0.2.61\nport: 80\nallow_cidrs: [198.51.100.0/24, 0.0.0.0/0]\nbackends:\n  - address: 10.1.9.9\n",
	"closed": "vip: 192.0.2.80\nport: 80\nfail_open: false\nbackends:\n  - address: 10.1.11.2\n  - address: 10.1.11.3\n",
	// A loopback VIP is served but not added to VIPs.
	"local": "vip: 127.0.0.1\nport: 8081\nbackends:\n  - address: 127.0.0.2\n",
	// Static backend plus pool members (see renderMembers).
	"pool": "vip: 192.0.2.70\nport: 8080\nbackends:\n  - address: 10.1.10.2\n",
}

// renderMembers are pool members under backends/<service>/.
var renderMembers = map[string][]spec.Member{
	"pool": {
		{Name: "app-3", Address: netip.MustParseAddr("10.1.10.3"), Weight: 1},
		{Name: "app-1", Address: netip.MustParseAddr("10.1.10.1"), Port: 9090, Weight: 5},
	},
}

// services parses and merges the named definitions, in the order given.
func services(t *testing.T, names ...string) []*spec.Service {
	t.Helper()
	var out []*spec.Service
	for _, n := range names {
		doc, ok := renderDefs[n]
		if !ok {
			t.Fatalf("no test definition %q", n)
		}
		s, err := spec.Parse(n, []byte(doc))
		if err == nil {
			s, err = spec.Merge(s, renderMembers[n])
		}
		if err != nil {
			t.Fatalf("definition %s: %v", n, err)
		}
		out = append(out, s)
	}
	return out
}

func allServices(t *testing.T) []*spec.Service {
	t.Helper()
	names := make([]string, 0, len(renderDefs))
	for n := range renderDefs {
		names = append(names, n)
	}
	slices.Sort(names)
	return services(t, names...)
}

func ref(service, addr string) BackendRef {
	return BackendRef{Service: service, Addr: netip.MustParseAddrPort(addr)}
}

func drainee(addr string, weight int) spec.Backend {
	ap := netip.MustParseAddrPort(addr)
	return spec.Backend{Address: ap.Addr(), Port: ap.Port(), Weight: weight, Source: "backends[9]"}
}

// renderScenarios are the inputs of the golden tests.
func renderScenarios(t *testing.T) []struct {
	name string
	in   Input
} {
	return []struct {
		name string
		in   Input
	}{
		{"all-healthy", Input{Services: allServices(t), Secrets: map[string][]byte{"/switchman/certs/api": []byte("PEM")}}},
		{"one-down", Input{Services: services(t, "web", "dns"), Healthy: map[BackendRef]bool{
			ref("web", "10.1.1.2:8080"): false,
			ref("web", "10.1.1.3:8080"): true,
			// Same address, other service: must not leak into web or dns.
			ref("dns", "10.1.1.2:8080"): false,
		}}},
		{"all-down-fail-open", Input{Services: services(t, "web"), Healthy: map[BackendRef]bool{
			ref("web", "10.1.1.2:8080"): false,
			ref("web", "10.1.1.3:8080"): false,
		}}},
		{"all-down-fail-closed", Input{Services: services(t, "closed"), Healthy: map[BackendRef]bool{
			ref("closed", "10.1.11.2:80"): false,
			ref("closed", "10.1.11.3:80"): false,
		}}},
		{"draining", Input{
			Services: services(t, "web", "locked"),
			Healthy:  map[BackendRef]bool{ref("web", "10.1.1.9:8080"): false},
			Draining: map[string][]spec.Backend{
				// 10.1.1.9 left the definition: kept at weight 0.
				// 10.1.1.2 is back in the definition: not duplicated.
				"web": {drainee("10.1.1.9:8080", 4), drainee("10.1.1.2:8080", 2)},
				// A drained backend of a masqueraded service keeps its rule.
				"locked": {drainee("10.1.9.1:3306", 1)},
				// Draining for a service that is gone: ignored.
				"gone": {drainee("10.9.9.9:80", 1)},
			},
		}},
	}
}

// goldenText is what a golden file holds: the ipvsadm -S lines, then the
// whole State as indented JSON.
func goldenText(t *testing.T, st *State) []byte {
	t.Helper()
	js, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	b.WriteString("# ipvsadm -S -n\n")
	b.WriteString(IPVSRules(st.IPVS))
	b.WriteString("# state\n")
	b.Write(js)
	b.WriteByte('\n')
	return b.Bytes()
}

func TestRenderGolden(t *testing.T) {
	for _, sc := range renderScenarios(t) {
		t.Run(sc.name, func(t *testing.T) {
			got := goldenText(t, Render(sc.in))
			path := filepath.Join("testdata", "ipvs", sc.name+".golden")
			if *update {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./render -run TestRenderGolden -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs from the rendered state (rerun with -update if the change is intended):\n%s", path, lineDiff(string(want), string(got)))
			}
		})
	}
}

// lineDiff lists the lines that differ between want and got.
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	for i := 0; i < max(len(w), len(g)); i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			b.WriteString("line " + strconv.Itoa(i+1) + ":\n  want " + wl + "\n  got  " + gl + "\n")
		}
	}
	return b.String()
}

// findReport returns the report of one service.
func findReport(t *testing.T, st *State, name string) ServiceReport {
	t.Helper()
	for _, r := range st.Services {
		if r.Name == name {
			return r
		}
	}
	t.Fatalf("no report for service %s in %+v", name, st.Services)
	return ServiceReport{}
}

func findIPVS(t *testing.T, st *State, name string) L4Service {
	t.Helper()
	for _, s := range st.IPVS {
		if s.Service == name {
			return s
		}
	}
	t.Fatalf("no IPVS service %s", name)
	return L4Service{}
}

// weights formats a report's backends as addr=weight[flags], in order.
func weights(r ServiceReport) string {
	var parts []string
	for _, b := range r.Backends {
		p := netip.AddrPortFrom(b.Address, b.Port).String() + "=" + strconv.Itoa(b.Weight)
		if !b.Healthy {
			p += ",down"
		}
		if b.Draining {
			p += ",draining"
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, " ")
}

// TestRenderWeights states the health rules outright, so a golden file
// rewritten by mistake cannot hide a broken rule.
func TestRenderWeights(t *testing.T) {
	sc := map[string]Input{}
	for _, s := range renderScenarios(t) {
		sc[s.name] = s.in
	}
	tests := []struct {
		scenario, service string
		want              string
		failingOpen       bool
	}{
		{"all-healthy", "web", "10.1.1.2:8080=2 10.1.1.3:8080=1", false},
		{"all-healthy", "pool", "10.1.10.1:9090=5 10.1.10.2:8080=1 10.1.10.3:8080=1", false},
		{"one-down", "web", "10.1.1.2:8080=0,down 10.1.1.3:8080=1", false},
		{"one-down", "dns", "10.1.2.2:53=3 10.1.2.3:53=1", false},
		{"all-down-fail-open", "web", "10.1.1.2:8080=2,down 10.1.1.3:8080=1,down", true},
		{"all-down-fail-closed", "closed", "10.1.11.2:80=0,down 10.1.11.3:80=0,down", false},
		{"draining", "web", "10.1.1.2:8080=2 10.1.1.3:8080=1 10.1.1.9:8080=0,down,draining", false},
		{"draining", "locked", "10.1.9.1:3306=0,draining 10.1.9.2:3306=1 10.1.9.3:3306=1", false},
	}
	for _, tt := range tests {
		t.Run(tt.scenario+"/"+tt.service, func(t *testing.T) {
			st := Render(sc[tt.scenario])
			r := findReport(t, st, tt.service)
			if got := weights(r); got != tt.want {
				t.Errorf("backends = %s\n            want %s", got, tt.want)
			}
			if r.FailingOpen != tt.failingOpen {
				t.Errorf("FailingOpen = %v; want %v", r.FailingOpen, tt.failingOpen)
			}
			// The IPVS destinations carry exactly the reported weights.
			var dests []string
			for _, d := range findIPVS(t, st, tt.service).Destinations {
				dests = append(dests, netip.AddrPortFrom(d.Address, d.Port).String()+"="+strconv.Itoa(d.Weight))
			}
			var reported []string
			for _, b := range r.Backends {
				reported = append(reported, netip.AddrPortFrom(b.Address, b.Port).String()+"="+strconv.Itoa(b.Weight))
			}
			if !slices.Equal(dests, reported) {
				t.Errorf("IPVS destinations %v differ from the report %v", dests, reported)
			}
		})
	}
	if st := Render(sc["draining"]); len(st.Services) != 2 {
		t.Errorf("draining for a service that is gone rendered something: %+v", st.Services)
	}
}

func TestRenderMissingHealthIsHealthy(t *testing.T) {
	svcs := services(t, "web", "closed")
	healthy := map[BackendRef]bool{}
	for _, s := range svcs {
		for _, b := range s.Backends {
			healthy[BackendRef{Service: s.Name, Addr: b.AddrPort()}] = true
		}
	}
	unknown, known := Render(Input{Services: svcs}), Render(Input{Services: svcs, Healthy: healthy})
	if !reflect.DeepEqual(unknown, known) {
		t.Errorf("no health view and all healthy render differently:\n%+v\n%+v", unknown, known)
	}
}

func TestRenderDeterministic(t *testing.T) {
	svcs := allServices(t)
	want := goldenText(t, Render(Input{Services: svcs}))
	for i := range 5 {
		shuffled := slices.Clone(svcs)
		// A fixed permutation per round: reverse, then rotate by i.
		slices.Reverse(shuffled)
		shuffled = append(shuffled[i:], shuffled[:i]...)
		before := slices.Clone(shuffled)
		got := goldenText(t, Render(Input{Services: shuffled}))
		if !bytes.Equal(got, want) {
			t.Fatalf("round %d: output depends on input order:\n%s", i, lineDiff(string(want), string(got)))
		}
		if !slices.Equal(before, shuffled) {
			t.Fatalf("Render reordered its input")
		}
	}
	st := Render(Input{Services: svcs})
	if !slices.IsSortedFunc(st.Services, func(a, b ServiceReport) int { return strings.Compare(a.Name, b.Name) }) {
		t.Error("reports not sorted by name")
	}
	if !slices.IsSortedFunc(st.IPVS, func(a, b L4Service) int { return strings.Compare(a.Service, b.Service) }) {
		t.Error("IPVS services not sorted by name")
	}
	for _, s := range st.IPVS {
		if !slices.IsSortedFunc(s.Destinations, func(a, b L4Destination) int {
			return netip.AddrPortFrom(a.Address, a.Port).Compare(netip.AddrPortFrom(b.Address, b.Port))
		}) {
			t.Errorf("%s destinations not sorted", s.Service)
		}
		if !slices.IsSorted(s.Flags) {
			t.Errorf("%s flags %v not sorted", s.Service, s.Flags)
		}
	}
}

func TestRenderVIPs(t *testing.T) {
	st := Render(Input{Services: allServices(t)})
	var got []string
	for _, a := range st.VIPs {
		got = append(got, a.String())
	}
	want := []string{"192.0.2.10", "192.0.2.20", "192.0.2.30", "192.0.2.40", "192.0.2.50", "192.0.2.51", "192.0.2.52", "192.0.2.60", "192.0.2.61", "192.0.2.70", "192.0.2.80", "2001:db8::10"}
	if !slices.Equal(got, want) {
		t.Errorf("VIPs = %v\nwant %v (deduplicated, sorted, no loopback)", got, want)
	}
	if Render(Input{}).VIPs != nil {
		t.Error("no services, yet VIPs")
	}
}

func TestRenderDrivers(t *testing.T) {
	st := Render(Input{Services: allServices(t), Secrets: map[string][]byte{"/switchman/certs/api": []byte("PEM")}})
	var ipvs, haproxy []string
	for _, s := range st.IPVS {
		ipvs = append(ipvs, s.Service)
	}
	for _, h := range st.HAProxy {
		haproxy = append(haproxy, h.Name)
	}
	if want := []string{"cache", "dns", "dr", "dr-nomasq", "local", "locked", "open", "pool", "tun", "v6", "web", "closed"}; !sameSet(ipvs, want) {
		t.Errorf("IPVS services %v; want %v", ipvs, want)
	}
	if want := []string{"proxy", "tls"}; !slices.Equal(haproxy, want) {
		t.Errorf("HAProxy services %v; want %v", haproxy, want)
	}
	for _, h := range st.HAProxy {
		if h.Name == "tls" && string(h.CertificatePEM) != "PEM" {
			t.Errorf("tls service PEM = %q; want the secret", h.CertificatePEM)
		}
	}
	c := findIPVS(t, st, "cache")
	if c.Persistence.Seconds() != 300 || !slices.Equal(c.Flags, []string{"mh-fallback", "mh-port"}) || c.Scheduler != spec.MaglevHashing {
		t.Errorf("cache = %+v", c)
	}
	for _, d := range findIPVS(t, st, "tun").Destinations {
		if d.Forwarding != spec.Tunnel {
			t.Errorf("tun destination %+v", d)
		}
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

func TestRenderFilters(t *testing.T) {
	st := Render(Input{
		Services: allServices(t),
		Draining: map[string][]spec.Backend{"locked": {drainee("10.1.9.1:3306", 1)}},
	})
	got := map[string]Filter{}
	for _, f := range st.Filters {
		got[f.Service] = f
	}
	// Only these need netfilter: the rest allow everyone and keep the
	// client address.
	var names []string
	for _, f := range st.Filters {
		names = append(names, f.Service)
	}
	if want := []string{"locked", "proxy"}; !slices.Equal(names, want) {
		t.Fatalf("filtered services %v; want %v", names, want)
	}
	locked := got["locked"]
	wantLocked := Filter{
		Service: "locked", Protocol: spec.TCP, VIP: netip.MustParseAddr("192.0.2.60"), Port: 3306,
		AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("203.0.113.7/32"), netip.MustParsePrefix("198.51.100.0/24")},
		Masquerade: true,
		// Draining backends still carry connections: masqueraded too.
		Backends: []netip.AddrPort{netip.MustParseAddrPort("10.1.9.1:3306"), netip.MustParseAddrPort("10.1.9.2:3306"), netip.MustParseAddrPort("10.1.9.3:3306")},
	}
	if !reflect.DeepEqual(locked, wantLocked) {
		t.Errorf("locked filter:\n got %+v\nwant %+v", locked, wantLocked)
	}
	proxy := got["proxy"]
	if proxy.Masquerade || proxy.Backends != nil || len(proxy.AllowCIDRs) != 1 || proxy.AllowCIDRs[0].String() != "198.51.100.0/24" {
		t.Errorf("proxy filter = %+v; want allow_cidrs only, no masquerade (HAProxy proxies)", proxy)
	}
}
