package spec

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

// fuzzSeeds are definitions that reach every branch of the validator; the
// checked-in corpus under testdata/fuzz/ adds inputs the fuzzer found.
var fuzzSeeds = []string{
	minimal,
	"vip: \"2001:db8::10\"\nport: 443\nbackends:\n  - address: \"fd00::1\"\n    port: 8443\n    weight: 0\n",
	`{"vip":"192.0.2.10","port":53,"protocol":"udp","scheduler":"wlc","health":{"protocol":"udp","payload":"ping"},"backends":[{"address":"10.0.0.1"}]}`,
	minimal + "tls:\n  certificate: /etc/switchman/certs/api.pem\nhealth:\n  protocol: https\n  sni: api.example.com\n  verify: true\n  path: /healthz\n",
	minimal + "scheduler: mh\nscheduler_flags: [mh-fallback, mh-port]\npersistence: 300s\n",
	minimal + "mode: http\nroutes:\n  - host: \"*.Example.com\"\n    path_prefix: /api/\n  - path_prefix: /a%2Fb\n",
	minimal + "forwarding: dr\nallow_cidrs: [198.51.100.0/24, 203.0.113.7]\npreserve_client_ip: false\n",
	minimal + "health:\n  interval: 1s\n  timeout: 1s\n  rise: 0\n",
	"vip: [1, {a: b}]\nport: {x: 1}\nbackends: [[], null, 3]\n",
	"a: &a [1,2]\nb: &b [*a,*a]\nc: [*b,*b]\n",
	"vip: 192.0.2.10\nport: 0120\nbackends:\n  - {address: 10.0.0.1, weight: 0x10}\n",
	"vip: \"::ffff:255.255.255.255\"\nport: 80\ndriver: nftables\nhealth: {protocol: http, path: \"/%zz\"}\n",
	"- 1\n- 2\n",
	"",
	"null",
}

// FuzzParse feeds arbitrary bytes to Parse: it must never panic, and any
// Service it returns must satisfy the invariants the drivers rely on.
func FuzzParse(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Parse("fuzz", data)
		if err != nil {
			if s != nil {
				t.Fatalf("Parse returned both a service and %v", err)
			}
			var list Errors
			if !errors.As(err, &list) || len(list) == 0 {
				t.Fatalf("error %v (%T) is not a non-empty spec.Errors", err, err)
			}
			return
		}
		checkInvariants(t, s)
		again, err := Parse("fuzz", data)
		if err != nil || !reflect.DeepEqual(s, again) {
			t.Fatalf("Parse is not deterministic: %+v, then %+v, %v", s, again, err)
		}
		if merged, err := Merge(s, nil); err == nil {
			checkInvariants(t, merged)
			if len(merged.Backends) == 0 {
				t.Fatal("Merge accepted an empty backend list")
			}
		}
	})
}

// FuzzParseMember feeds arbitrary bytes to ParseMember.
func FuzzParseMember(f *testing.F) {
	f.Add("m1", []byte(`{"address":"10.1.1.2","port":8080,"weight":1}`))
	f.Add("m2", []byte("address: \"fd00::2\"\nweight: 65535\n"))
	f.Add("M", []byte(`{"address":"10.1.1.2","port":0}`))
	f.Add("m3", []byte(`{"address":"10.1.1.2","port":"80","weight":1.5,"x":null}`))
	f.Add("m4", []byte(`[]`))
	f.Fuzz(func(t *testing.T, name string, data []byte) {
		m, err := ParseMember(name, data)
		if err != nil {
			if m != (Member{}) {
				t.Fatalf("ParseMember returned both %+v and %v", m, err)
			}
			return
		}
		if m.Name != name || ValidateName(name) != nil {
			t.Fatalf("member name %q accepted for %q", m.Name, name)
		}
		if !m.Address.IsValid() || m.Address.Zone() != "" || m.Address.Is4In6() || notUnicast(m.Address) != "" {
			t.Fatalf("member address %v accepted", m.Address)
		}
		if m.Weight < 0 || m.Weight > MaxWeight {
			t.Fatalf("member weight %d accepted", m.Weight)
		}
		// Merging a valid member into a valid service never panics.
		def := &Service{Name: "web", VIP: m.Address, Port: 80, Driver: DriverIPVS, Forwarding: NAT}
		if _, err := Merge(def, []Member{m, m}); err == nil {
			t.Fatal("Merge accepted the same member twice")
		}
	})
}

// checkInvariants fails t if s breaks a promise of a validated Service.
func checkInvariants(t *testing.T, s *Service) {
	t.Helper()
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("invariant broken: "+format+"\nservice: %+v", append(args, s)...)
	}
	if ValidateName(s.Name) != nil {
		fail("name %q", s.Name)
	}
	if !s.VIP.IsValid() || s.VIP.Zone() != "" || s.VIP.IsUnspecified() || s.VIP.IsMulticast() || s.VIP.Is4In6() || notUnicast(s.VIP) != "" {
		fail("vip %v", s.VIP)
	}
	if s.Port == 0 {
		fail("port 0")
	}
	if s.Protocol != TCP && s.Protocol != UDP {
		fail("protocol %q", s.Protocol)
	}
	switch s.Scheduler {
	case RoundRobin, WeightedRoundRobin, LeastConnection, WeightedLeastConnection, SourceHashing, MaglevHashing:
	default:
		fail("scheduler %q", s.Scheduler)
	}
	for _, fl := range s.SchedulerFlags {
		if !strings.HasPrefix(fl, string(s.Scheduler)+"-") {
			fail("flag %q with scheduler %s", fl, s.Scheduler)
		}
	}
	if s.Forwarding != NAT && s.Forwarding != Direct && s.Forwarding != Tunnel {
		fail("forwarding %q", s.Forwarding)
	}
	if s.Persistence < 0 || s.Persistence > MaxPersistence || s.Persistence%1e9 != 0 {
		fail("persistence %s", s.Persistence)
	}
	if s.Drain < 0 {
		fail("drain %s", s.Drain)
	}
	for _, b := range s.Backends {
		if !b.Address.IsValid() || b.Address.Zone() != "" || b.Address.Is4In6() || notUnicast(b.Address) != "" {
			fail("backend address %v", b.Address)
		}
		if b.Port == 0 || b.Weight < 0 || b.Weight > MaxWeight || b.Source == "" {
			fail("backend %+v", b)
		}
	}
	h := s.Health
	if h.Interval <= 0 || h.Timeout <= 0 || h.Timeout >= h.Interval {
		fail("health interval %s timeout %s", h.Interval, h.Timeout)
	}
	if h.Rise < 1 || h.Rise > 1000 || h.Fall < 1 || h.Fall > 1000 {
		fail("rise %d fall %d", h.Rise, h.Fall)
	}
	web := h.Protocol == HealthHTTP || h.Protocol == HealthHTTPS
	if web != (h.Path != "") || (h.SNI != "" && h.Protocol != HealthHTTPS) || (h.Payload != "" && h.Protocol != HealthUDP) {
		fail("health %+v", h)
	}
	if strings.ContainsAny(h.Path+h.SNI, " \r\n\"") || badEscape(h.Path) != "" {
		fail("health path %q sni %q", h.Path, h.SNI)
	}
	if len(s.AllowCIDRs) == 0 {
		fail("no allow_cidrs")
	}
	for _, p := range s.AllowCIDRs {
		if !p.IsValid() || p.Addr().Is4() != s.VIP.Is4() || p != p.Masked() {
			fail("allow_cidr %v", p)
		}
	}
	switch s.Driver {
	case DriverIPVS:
		if s.TLS != nil {
			fail("ipvs with tls")
		}
	case DriverNFTables:
		if s.TLS != nil || s.Scheduler == LeastConnection || s.Scheduler == WeightedLeastConnection || s.Forwarding == Tunnel {
			fail("nftables with tls %v, scheduler %s, forwarding %s", s.TLS, s.Scheduler, s.Forwarding)
		}
	case DriverHAProxy:
		if s.Protocol != TCP || s.Forwarding != NAT || len(s.SchedulerFlags) > 0 {
			fail("haproxy with %s/%s/%v", s.Protocol, s.Forwarding, s.SchedulerFlags)
		}
	default:
		fail("driver %q", s.Driver)
	}
	switch s.Mode {
	case ModeTCP:
		if s.Routes != nil {
			fail("routes in mode tcp")
		}
	case ModeHTTP:
		if s.Driver != DriverHAProxy || len(s.Routes) == 0 || len(s.Routes) > MaxRoutes {
			fail("mode http on %s with %d routes", s.Driver, len(s.Routes))
		}
	default:
		fail("mode %q", s.Mode)
	}
	seenRoutes := map[Route]bool{}
	for _, r := range s.Routes {
		// What reaches a map file or the runtime API: one token of host
		// characters and one of path characters.
		if seenRoutes[r] || r.Host != "" && !routeHostRE.MatchString(r.Host) || !strings.HasPrefix(r.PathPrefix, "/") ||
			r.PathPrefix != "/" && strings.HasSuffix(r.PathPrefix, "/") || strings.Contains(r.PathPrefix, "//") ||
			strings.ContainsFunc(r.PathPrefix, func(c rune) bool {
				return !strings.ContainsRune("/._~%-", c) && !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9')
			}) {
			fail("route %+v", r)
		}
		seenRoutes[r] = true
	}
	if s.TLS != nil {
		c, k := s.TLS.Certificate, s.TLS.CertificateKey
		if (c == "") == (k == "") {
			fail("tls %+v", s.TLS)
		}
		if p := c + k; !strings.HasPrefix(p, "/") || strings.ContainsAny(p, " \t\r\n;\"'#") || strings.Contains(p, "/../") || strings.HasSuffix(p, "/..") {
			fail("tls path %q", p)
		}
	}
}
