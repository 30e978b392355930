package spec

import (
	"net/netip"
	"reflect"
	"testing"
	"time"
)

func mustParse(t *testing.T, name, doc string) *Service {
	t.Helper()
	s, err := Parse(name, []byte(doc))
	if err != nil {
		t.Fatalf("Parse(%s): %v", name, err)
	}
	return s
}

// TestDefaults checks every default of DESIGN.md on a minimal definition.
func TestDefaults(t *testing.T) {
	got := mustParse(t, "web", "vip: 192.0.2.10\nport: 8080\nbackends:\n  - address: 10.0.0.1\n")
	want := &Service{
		Name:        "web",
		VIP:         netip.MustParseAddr("192.0.2.10"),
		Port:        8080,
		Protocol:    TCP,
		Scheduler:   RoundRobin,
		Forwarding:  NAT,
		Persistence: 0,
		Backends: []Backend{{
			Address: netip.MustParseAddr("10.0.0.1"),
			Port:    8080, // the service port
			Weight:  1,
			Source:  "backends[0]",
		}},
		Health: Health{
			Protocol: HealthTCP,
			Port:     0,
			Interval: 2 * time.Second,
			Timeout:  1 * time.Second,
			Rise:     2,
			Fall:     3,
		},
		FailOpen:         true,
		Drain:            30 * time.Second,
		AllowCIDRs:       []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")},
		PreserveClientIP: true,
		Driver:           DriverIPVS,
		Group:            DefaultGroup,
		Mode:             ModeTCP,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("defaults:\n got %+v\nwant %+v", got, want)
	}
	if got.TLS != nil || got.SchedulerFlags != nil {
		t.Errorf("tls %v, scheduler flags %v; want none", got.TLS, got.SchedulerFlags)
	}
}

func TestDefaultsDependingOnOtherFields(t *testing.T) {
	v6 := mustParse(t, "web6", "vip: \"2001:db8::10\"\nport: 80\nbackends:\n  - address: \"fd00::1\"\n")
	if want := []netip.Prefix{netip.MustParsePrefix("::/0")}; !reflect.DeepEqual(v6.AllowCIDRs, want) {
		t.Errorf("v6 allow_cidrs = %v; want %v", v6.AllowCIDRs, want)
	}

	tls := mustParse(t, "api", minimal+"tls:\n  certificate: /etc/switchman/certs/api.pem\n")
	if tls.Driver != DriverHAProxy {
		t.Errorf("driver with tls = %s; want haproxy", tls.Driver)
	}
	if tls.TLS == nil || tls.TLS.Certificate != "/etc/switchman/certs/api.pem" || tls.TLS.CertificateKey != "" {
		t.Errorf("tls = %+v", tls.TLS)
	}

	for _, proto := range []string{"http", "https"} {
		h := mustParse(t, "web", minimal+"health:\n  protocol: "+proto+"\n")
		if h.Health.Path != "/" {
			t.Errorf("%s check path = %q; want /", proto, h.Health.Path)
		}
	}
	// An explicit null keeps the default.
	n := mustParse(t, "web", minimal+"protocol: null\nhealth: null\nallow_cidrs: null\n")
	if n.Protocol != TCP || n.Health.Interval != DefaultInterval || n.AllowCIDRs[0].String() != "0.0.0.0/0" {
		t.Errorf("nulls did not keep the defaults: %+v", n)
	}
}

// TestParseAccepts checks values that are valid, and what they become.
func TestParseAccepts(t *testing.T) {
	tests := []struct {
		name  string
		doc   string
		check func(t *testing.T, s *Service)
	}{
		{"v6 vip", "vip: \"2001:db8::10\"\nport: 443\nbackends:\n  - address: \"fd00::1\"\n", func(t *testing.T, s *Service) {
			if s.VIP != netip.MustParseAddr("2001:db8::10") {
				t.Errorf("vip = %s", s.VIP)
			}
		}},
		{"v4-mapped vip is unmapped", "vip: \"::ffff:192.0.2.10\"\nport: 80\n", func(t *testing.T, s *Service) {
			if !s.VIP.Is4() {
				t.Errorf("vip %s is not IPv4", s.VIP)
			}
		}},
		{"loopback vip and backend", "vip: 127.0.0.10\nport: 80\nbackends:\n  - address: 127.0.0.1\n", func(t *testing.T, s *Service) {
			if s.VIP.String() != "127.0.0.10" || s.Backends[0].Address.String() != "127.0.0.1" {
				t.Errorf("vip %s backends %v", s.VIP, s.Backends)
			}
		}},
		{"plain decimal numbers, zero and quoted leading zeros", "vip: 192.0.2.10\nport: 8080\nbackends:\n  - address: 10.0.0.1\n    weight: 0\n  - address: 10.0.0.2\n    port: 443\npersistence: \"0300s\"\n", func(t *testing.T, s *Service) {
			if s.Port != 8080 || s.Backends[0].Weight != 0 || s.Backends[1].Port != 443 || s.Persistence != 300*time.Second {
				t.Errorf("port %d backends %+v persistence %s", s.Port, s.Backends, s.Persistence)
			}
		}},
		{"mode http selects haproxy, no routes answer everything", minimal + "mode: http\n", func(t *testing.T, s *Service) {
			if s.Mode != ModeHTTP || s.Driver != DriverHAProxy || !reflect.DeepEqual(s.Routes, []Route{{PathPrefix: "/"}}) {
				t.Errorf("mode %q driver %q routes %+v", s.Mode, s.Driver, s.Routes)
			}
		}},
		{"mode tcp by default, no routes", minimal, func(t *testing.T, s *Service) {
			if s.Mode != ModeTCP || s.Routes != nil {
				t.Errorf("mode %q routes %+v", s.Mode, s.Routes)
			}
		}},
		{"routes normalized in definition order", minimal + "mode: http\ndriver: haproxy\nroutes:\n  - host: WWW.Example.COM\n    path_prefix: /api/\n  - host: \"*.example.com\"\n  - path_prefix: /static/v1\n  - host: xn--bcher-kva.example\n    path_prefix: /a%2Fb~c\n", func(t *testing.T, s *Service) {
			want := []Route{{"www.example.com", "/api"}, {"*.example.com", "/"}, {"", "/static/v1"}, {"xn--bcher-kva.example", "/a%2Fb~c"}}
			if !reflect.DeepEqual(s.Routes, want) {
				t.Errorf("routes %+v, want %+v", s.Routes, want)
			}
			if got := s.Routes[2].String(); got != "*/static/v1" {
				t.Errorf("String() = %q", got)
			}
		}},
		{"mode http with tls", minimal + "mode: http\ntls:\n  certificate: /etc/switchman/certs/www.pem\n", func(t *testing.T, s *Service) {
			if s.Mode != ModeHTTP || s.Driver != DriverHAProxy || s.TLS == nil {
				t.Errorf("mode %q driver %q tls %v", s.Mode, s.Driver, s.TLS)
			}
		}},
		{"health path with percent-encoding", minimal + "health:\n  protocol: http\n  path: /a%2Fb%7e?q=100%25\n", func(t *testing.T, s *Service) {
			if s.Health.Path != "/a%2Fb%7e?q=100%25" {
				t.Errorf("path = %q", s.Health.Path)
			}
		}},
		{"ports at the edges", "vip: 192.0.2.10\nport: 65535\nbackends:\n  - address: 10.0.0.1\n    port: 1\n", func(t *testing.T, s *Service) {
			if s.Port != 65535 || s.Backends[0].Port != 1 {
				t.Errorf("ports = %d, %d", s.Port, s.Backends[0].Port)
			}
		}},
		{"weights at the edges", "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n    weight: 0\n  - address: 10.0.0.2\n    weight: 65535\n", func(t *testing.T, s *Service) {
			if s.Backends[0].Weight != 0 || s.Backends[1].Weight != 65535 || s.Backends[1].Source != "backends[1]" {
				t.Errorf("backends = %+v", s.Backends)
			}
		}},
		{"persistence in minutes", minimal + "persistence: 5m\n", func(t *testing.T, s *Service) {
			if s.Persistence != 5*time.Minute {
				t.Errorf("persistence = %s", s.Persistence)
			}
		}},
		{"persistence at the limit", minimal + "persistence: 576h\n", func(t *testing.T, s *Service) {
			if s.Persistence != MaxPersistence {
				t.Errorf("persistence = %s", s.Persistence)
			}
		}},
		{"rise and fall at the edges", minimal + "health:\n  rise: 1\n  fall: 1000\n", func(t *testing.T, s *Service) {
			if s.Health.Rise != 1 || s.Health.Fall != 1000 {
				t.Errorf("health = %+v", s.Health)
			}
		}},
		{"https check with everything", minimal + "health:\n  protocol: https\n  port: 8443\n  path: /healthz?full=1\n  sni: api.example.com\n  verify: true\n  interval: 5s\n  timeout: 4900ms\n", func(t *testing.T, s *Service) {
			want := Health{Protocol: HealthHTTPS, Port: 8443, Path: "/healthz?full=1", SNI: "api.example.com", Verify: true, Interval: 5 * time.Second, Timeout: 4900 * time.Millisecond, Rise: 2, Fall: 3}
			if s.Health != want {
				t.Errorf("health = %+v; want %+v", s.Health, want)
			}
		}},
		{"udp check with payload", minimal + "protocol: udp\nhealth:\n  protocol: udp\n  payload: ping\n", func(t *testing.T, s *Service) {
			if s.Health.Payload != "ping" || s.Protocol != UDP {
				t.Errorf("payload %q protocol %s", s.Health.Payload, s.Protocol)
			}
		}},
		{"no health check", minimal + "health:\n  protocol: none\n", func(t *testing.T, s *Service) {
			if s.Health.Protocol != HealthNone {
				t.Errorf("health protocol = %s", s.Health.Protocol)
			}
		}},
		{"scheduler flags deduplicated", minimal + "scheduler: mh\nscheduler_flags: [mh-port, mh-fallback, mh-port]\n", func(t *testing.T, s *Service) {
			if !reflect.DeepEqual(s.SchedulerFlags, []string{"mh-port", "mh-fallback"}) {
				t.Errorf("flags = %v", s.SchedulerFlags)
			}
		}},
		{"sh flags", minimal + "scheduler: sh\nscheduler_flags: [sh-fallback, sh-port]\n", func(t *testing.T, s *Service) {
			if !reflect.DeepEqual(s.SchedulerFlags, []string{"sh-fallback", "sh-port"}) {
				t.Errorf("flags = %v", s.SchedulerFlags)
			}
		}},
		{"allow_cidrs masked, bare address is one host", minimal + "allow_cidrs: [198.51.100.7/24, 203.0.113.9, \" 10.0.0.0/8 \"]\n", func(t *testing.T, s *Service) {
			want := []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24"), netip.MustParsePrefix("203.0.113.9/32"), netip.MustParsePrefix("10.0.0.0/8")}
			if !reflect.DeepEqual(s.AllowCIDRs, want) {
				t.Errorf("allow_cidrs = %v; want %v", s.AllowCIDRs, want)
			}
		}},
		{"certificate_key", minimal + "tls:\n  certificate_key: /switchman/certs/api\n", func(t *testing.T, s *Service) {
			if s.TLS.CertificateKey != "/switchman/certs/api" || s.Driver != DriverHAProxy {
				t.Errorf("tls %+v driver %s", s.TLS, s.Driver)
			}
		}},
		{"haproxy without tls", minimal + "driver: haproxy\n", func(t *testing.T, s *Service) {
			if s.Driver != DriverHAProxy || s.TLS != nil {
				t.Errorf("driver %s tls %v", s.Driver, s.TLS)
			}
		}},
		{"document markers and an empty trailing document", "---\n" + minimal + "---\n# nothing here\n", func(t *testing.T, s *Service) {
			if s.Port != 80 {
				t.Errorf("port = %d", s.Port)
			}
		}},
		{"windows line ends and a byte-order mark", "\ufeffvip: 192.0.2.10\r\nport: 80\r\n", func(t *testing.T, s *Service) {
			if s.VIP.String() != "192.0.2.10" {
				t.Errorf("vip = %s", s.VIP)
			}
		}},
		{"no static backends", "vip: 192.0.2.10\nport: 80\n", func(t *testing.T, s *Service) {
			if len(s.Backends) != 0 {
				t.Errorf("backends = %v", s.Backends)
			}
		}},
		{"fail_open false, preserve_client_ip false, drain 0", minimal + "fail_open: false\npreserve_client_ip: false\ndrain: 0s\n", func(t *testing.T, s *Service) {
			if s.FailOpen || s.PreserveClientIP || s.Drain != 0 {
				t.Errorf("fail_open %v preserve %v drain %s", s.FailOpen, s.PreserveClientIP, s.Drain)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.check(t, mustParse(t, "web", tt.doc))
		})
	}
}

// TestJSONAndYAMLAgree parses one full definition written both ways.
func TestJSONAndYAMLAgree(t *testing.T) {
	yamlDoc := `
vip: 192.0.2.20
port: 443
protocol: tcp
scheduler: wrr
forwarding: nat
persistence: 60s
backends:
  - address: 10.0.1.1
    port: 8443
    weight: 3
  - address: 10.0.1.2
health:
  protocol: https
  path: /healthz
  sni: api.example.com
  interval: 3s
  timeout: 1s
  rise: 1
  fall: 2
fail_open: false
drain: 10s
allow_cidrs: [198.51.100.0/24]
preserve_client_ip: false
driver: ipvs
`
	jsonDoc := `{"vip":"192.0.2.20","port":443,"protocol":"tcp","scheduler":"wrr","forwarding":"nat",
"persistence":"60s","backends":[{"address":"10.0.1.1","port":8443,"weight":3},{"address":"10.0.1.2"}],
"health":{"protocol":"https","path":"/healthz","sni":"api.example.com","interval":"3s","timeout":"1s","rise":1,"fall":2},
"fail_open":false,"drain":"10s","allow_cidrs":["198.51.100.0/24"],"preserve_client_ip":false,"driver":"ipvs"}`
	y := mustParse(t, "api", yamlDoc)
	j := mustParse(t, "api", jsonDoc)
	if !reflect.DeepEqual(y, j) {
		t.Errorf("YAML and JSON differ:\nyaml %+v\njson %+v", y, j)
	}
	if y.Backends[1].Port != 443 || y.Backends[0].Weight != 3 || y.Persistence != time.Minute {
		t.Errorf("parsed %+v", y)
	}
}

func TestParseWithL4Driver(t *testing.T) {
	tests := []struct {
		name, doc  string
		l4         Driver
		wantDriver Driver
		wantGroup  string
	}{
		{name: "default is ipvs", doc: minimal, wantDriver: DriverIPVS, wantGroup: DefaultGroup},
		{name: "agent default nftables", doc: minimal, l4: DriverNFTables, wantDriver: DriverNFTables, wantGroup: DefaultGroup},
		{name: "named driver wins", doc: minimal + "driver: ipvs\n", l4: DriverNFTables, wantDriver: DriverIPVS, wantGroup: DefaultGroup},
		{name: "tls goes to haproxy", doc: minimal + "tls:\n  certificate: /etc/x.pem\n", l4: DriverNFTables, wantDriver: DriverHAProxy, wantGroup: DefaultGroup},
		{name: "group", doc: minimal + "ha_group: edge\n", wantDriver: DriverIPVS, wantGroup: "edge"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := ParseWith("web", []byte(tc.doc), Options{L4Driver: tc.l4})
			if err != nil {
				t.Fatal(err)
			}
			if s.Driver != tc.wantDriver || s.Group != tc.wantGroup {
				t.Fatalf("driver %q group %q, want %q %q", s.Driver, s.Group, tc.wantDriver, tc.wantGroup)
			}
		})
	}
}
