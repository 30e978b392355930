package ipvs_test

import (
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

var (
	vip4 = netip.MustParseAddr("192.0.2.10")
	vip6 = netip.MustParseAddr("2001:db8::10")
	be1  = netip.MustParseAddr("10.1.1.1")
	be2  = netip.MustParseAddr("10.1.1.2")
	be3  = netip.MustParseAddr("10.1.1.3")
)

func svc(addr netip.Addr, port uint16, sched string) ipvs.Service {
	s := ipvs.Service{Protocol: ipvs.TCP, Address: addr, Port: port, Scheduler: sched, Netmask: 0xffffffff}
	if addr.Is6() {
		s.Netmask = 128
	}
	return s
}

func dst(addr netip.Addr, port uint16, w int, f ipvs.Forwarding) ipvs.Destination {
	return ipvs.Destination{Address: addr, Port: port, Weight: w, Forwarding: f}
}

// opStrings makes op lists easy to compare and to read in failures.
func opStrings(ops []ipvs.Op) []string {
	out := make([]string, len(ops))
	for i, o := range ops {
		out[i] = o.Owner + ": " + o.String()
	}
	return out
}

func TestDiff(t *testing.T) {
	web := svc(vip4, 80, "rr")
	webHashed := web
	webHashed.Flags |= ipvs.FlagHashed
	webWRR := svc(vip4, 80, "wrr")
	webMH := svc(vip4, 80, "mh")
	webMH.Flags = ipvs.FlagMHFallback | ipvs.FlagMHPort
	webPersist := web
	webPersist.Flags, webPersist.Timeout = ipvs.FlagPersistent, 300
	other := svc(vip4, 81, "rr")
	d1, d2, d3 := dst(be1, 80, 1, ipvs.Masq), dst(be2, 80, 1, ipvs.Masq), dst(be3, 80, 1, ipvs.Masq)
	d1w5 := dst(be1, 80, 5, ipvs.Masq)
	d1dr := dst(be1, 80, 1, ipvs.Route)
	owned := map[ipvs.Key]string{web.Key(): "web"}

	tests := []struct {
		name        string
		desired     []ipvs.Desired
		actual      map[ipvs.Key]ipvs.Observed
		owned       map[ipvs.Key]string
		want        []string
		wantRefused []string
	}{
		{
			name:    "cold start adds the service then its destinations",
			desired: []ipvs.Desired{{Name: "web", Service: web, Destinations: []ipvs.Destination{d1, d2}}},
			want: []string{
				"web: add-service 192.0.2.10:80/tcp rr flags=0x0 timeout=0",
				"web: add-destination 192.0.2.10:80/tcp 10.1.1.1:80 w=1 Masq",
				"web: add-destination 192.0.2.10:80/tcp 10.1.1.2:80 w=1 Masq",
			},
		},
		{
			name:    "nothing changed, hashed flag ignored",
			desired: []ipvs.Desired{{Name: "web", Service: web, Destinations: []ipvs.Destination{d1, d2}}},
			actual:  map[ipvs.Key]ipvs.Observed{web.Key(): {Service: webHashed, Destinations: []ipvs.Destination{d2, d1}}},
			owned:   owned,
		},
		{
			name:    "weight change is one destination update",
			desired: []ipvs.Desired{{Name: "web", Service: web, Destinations: []ipvs.Destination{d1w5, d2}}},
			actual:  map[ipvs.Key]ipvs.Observed{web.Key(): {Service: webHashed, Destinations: []ipvs.Destination{d1, d2}}},
			owned:   owned,
			want:    []string{"web: update-destination 192.0.2.10:80/tcp 10.1.1.1:80 w=5 Masq"},
		},
		{
			name:    "forwarding change is one destination update",
			desired: []ipvs.Desired{{Name: "web", Service: web, Destinations: []ipvs.Destination{d1dr}}},
			actual:  map[ipvs.Key]ipvs.Observed{web.Key(): {Service: web, Destinations: []ipvs.Destination{d1}}},
			owned:   owned,
			want:    []string{"web: update-destination 192.0.2.10:80/tcp 10.1.1.1:80 w=1 Route"},
		},
		{
			name:    "scheduler change is one service update",
			desired: []ipvs.Desired{{Name: "web", Service: webWRR, Destinations: []ipvs.Destination{d1}}},
			actual:  map[ipvs.Key]ipvs.Observed{web.Key(): {Service: webHashed, Destinations: []ipvs.Destination{d1}}},
			owned:   owned,
			want:    []string{"web: update-service 192.0.2.10:80/tcp wrr flags=0x0 timeout=0"},
		},
		{
			name:    "flags change is one service update",
			desired: []ipvs.Desired{{Name: "web", Service: webMH, Destinations: []ipvs.Destination{d1}}},
			actual:  map[ipvs.Key]ipvs.Observed{web.Key(): {Service: svc(vip4, 80, "mh"), Destinations: []ipvs.Destination{d1}}},
			owned:   owned,
			want:    []string{"web: update-service 192.0.2.10:80/tcp mh flags=0x18 timeout=0"},
		},
		{
			name:    "persistence change is one service update",
			desired: []ipvs.Desired{{Name: "web", Service: webPersist, Destinations: []ipvs.Destination{d1}}},
			actual:  map[ipvs.Key]ipvs.Observed{web.Key(): {Service: webHashed, Destinations: []ipvs.Destination{d1}}},
			owned:   owned,
			want:    []string{"web: update-service 192.0.2.10:80/tcp rr flags=0x1 timeout=300"},
		},
		{
			name:    "destinations added and removed, others kept",
			desired: []ipvs.Desired{{Name: "web", Service: web, Destinations: []ipvs.Destination{d2, d3}}},
			actual:  map[ipvs.Key]ipvs.Observed{web.Key(): {Service: web, Destinations: []ipvs.Destination{d1, d2}}},
			owned:   owned,
			want: []string{
				"web: add-destination 192.0.2.10:80/tcp 10.1.1.3:80 w=1 Masq",
				"web: delete-destination 192.0.2.10:80/tcp 10.1.1.1:80 w=1 Masq",
			},
		},
		{
			name:   "owned service no longer desired is deleted",
			actual: map[ipvs.Key]ipvs.Observed{web.Key(): {Service: web}},
			owned:  owned,
			want:   []string{": delete-service 192.0.2.10:80/tcp rr flags=0x0 timeout=0"},
		},
		{
			name:    "foreign service not desired is left alone",
			desired: []ipvs.Desired{{Name: "web", Service: web}},
			actual:  map[ipvs.Key]ipvs.Observed{web.Key(): {Service: web}, other.Key(): {Service: other, Destinations: []ipvs.Destination{d3}}},
			owned:   owned,
		},
		{
			name:        "foreign service at the desired key is refused and untouched",
			desired:     []ipvs.Desired{{Name: "web", Service: webWRR, Destinations: []ipvs.Destination{d1}}},
			actual:      map[ipvs.Key]ipvs.Observed{web.Key(): {Service: web, Destinations: []ipvs.Destination{d3}}},
			wantRefused: []string{"web"},
		},
		{
			name:    "service moving to another port: old deleted first, new added",
			desired: []ipvs.Desired{{Name: "web", Service: other, Destinations: []ipvs.Destination{d1}}},
			actual:  map[ipvs.Key]ipvs.Observed{web.Key(): {Service: web, Destinations: []ipvs.Destination{d1}}},
			owned:   owned,
			want: []string{
				": delete-service 192.0.2.10:80/tcp rr flags=0x0 timeout=0",
				"web: add-service 192.0.2.10:81/tcp rr flags=0x0 timeout=0",
				"web: add-destination 192.0.2.10:81/tcp 10.1.1.1:80 w=1 Masq",
			},
		},
		{
			name:    "owned but gone from the kernel is added again",
			desired: []ipvs.Desired{{Name: "web", Service: web, Destinations: []ipvs.Destination{d1}}},
			owned:   owned,
			want: []string{
				"web: add-service 192.0.2.10:80/tcp rr flags=0x0 timeout=0",
				"web: add-destination 192.0.2.10:80/tcp 10.1.1.1:80 w=1 Masq",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ops, refused := ipvs.Diff(tt.desired, tt.actual, tt.owned)
			if got := opStrings(ops); !slices.Equal(got, tt.want) {
				t.Errorf("ops:\n got %q\nwant %q", got, tt.want)
			}
			var names []string
			for n, err := range refused {
				names = append(names, n)
				var fe *ipvs.ForeignServiceError
				if !errors.As(err, &fe) {
					t.Errorf("refused %s: %v is not a ForeignServiceError", n, err)
				}
			}
			slices.Sort(names)
			if !slices.Equal(names, tt.wantRefused) {
				t.Errorf("refused %v, want %v", names, tt.wantRefused)
			}
		})
	}
}

func TestForeignServiceErrorMessage(t *testing.T) {
	err := &ipvs.ForeignServiceError{Key: ipvs.Key{Protocol: ipvs.TCP, Address: vip4, Port: 80}}
	want := "192.0.2.10:80/tcp exists in the kernel and was not created by switchman; remove it or pick another vip:port"
	if err.Error() != want {
		t.Errorf("got %q, want %q", err.Error(), want)
	}
}

func TestDesiredFrom(t *testing.T) {
	base := func(m func(*render.L4Service)) render.L4Service {
		s := render.L4Service{Service: "web", Protocol: spec.TCP, Address: vip4, Port: 80, Scheduler: spec.RoundRobin,
			Destinations: []render.L4Destination{{Address: be1, Port: 8080, Weight: 3, Forwarding: spec.NAT}}}
		if m != nil {
			m(&s)
		}
		return s
	}
	want := func(m func(*ipvs.Desired)) ipvs.Desired {
		d := ipvs.Desired{Name: "web", Service: svc(vip4, 80, "rr"), Destinations: []ipvs.Destination{dst(be1, 8080, 3, ipvs.Masq)}}
		if m != nil {
			m(&d)
		}
		return d
	}
	tests := []struct {
		name string
		in   render.L4Service
		want ipvs.Desired
	}{
		{"rr nat v4 tcp", base(nil), want(nil)},
		{"wrr", base(func(s *render.L4Service) { s.Scheduler = spec.WeightedRoundRobin }), want(func(d *ipvs.Desired) { d.Service.Scheduler = "wrr" })},
		{"lc", base(func(s *render.L4Service) { s.Scheduler = spec.LeastConnection }), want(func(d *ipvs.Desired) { d.Service.Scheduler = "lc" })},
		{"wlc", base(func(s *render.L4Service) { s.Scheduler = spec.WeightedLeastConnection }), want(func(d *ipvs.Desired) { d.Service.Scheduler = "wlc" })},
		{"sh with sh-fallback,sh-port", base(func(s *render.L4Service) {
			s.Scheduler, s.Flags = spec.SourceHashing, []string{spec.FlagSHFallback, spec.FlagSHPort}
		}), want(func(d *ipvs.Desired) { d.Service.Scheduler, d.Service.Flags = "sh", ipvs.FlagSched1|ipvs.FlagSched2 })},
		{"sh with sh-port", base(func(s *render.L4Service) {
			s.Scheduler, s.Flags = spec.SourceHashing, []string{spec.FlagSHPort}
		}), want(func(d *ipvs.Desired) { d.Service.Scheduler, d.Service.Flags = "sh", ipvs.FlagSched2 })},
		{"mh with mh-fallback,mh-port", base(func(s *render.L4Service) {
			s.Scheduler, s.Flags = spec.MaglevHashing, []string{spec.FlagMHFallback, spec.FlagMHPort}
		}), want(func(d *ipvs.Desired) { d.Service.Scheduler, d.Service.Flags = "mh", 0x08|0x10 })},
		{"mh with mh-fallback", base(func(s *render.L4Service) {
			s.Scheduler, s.Flags = spec.MaglevHashing, []string{spec.FlagMHFallback}
		}), want(func(d *ipvs.Desired) { d.Service.Scheduler, d.Service.Flags = "mh", 0x08 })},
		{"dr", base(func(s *render.L4Service) { s.Destinations[0].Forwarding = spec.Direct }), want(func(d *ipvs.Desired) { d.Destinations[0].Forwarding = ipvs.Route })},
		{"tun", base(func(s *render.L4Service) { s.Destinations[0].Forwarding = spec.Tunnel }), want(func(d *ipvs.Desired) { d.Destinations[0].Forwarding = ipvs.Tunnel })},
		{"udp", base(func(s *render.L4Service) { s.Protocol = spec.UDP }), want(func(d *ipvs.Desired) { d.Service.Protocol = ipvs.UDP })},
		{"persistence rounds up to whole seconds", base(func(s *render.L4Service) { s.Persistence = 1500 * time.Millisecond }),
			want(func(d *ipvs.Desired) { d.Service.Flags, d.Service.Timeout = ipvs.FlagPersistent, 2 })},
		{"persistence 5m", base(func(s *render.L4Service) { s.Persistence = 5 * time.Minute }),
			want(func(d *ipvs.Desired) { d.Service.Flags, d.Service.Timeout = ipvs.FlagPersistent, 300 })},
		{"ipv6 netmask is a prefix length", base(func(s *render.L4Service) {
			s.Address = vip6
			s.Destinations[0].Address = netip.MustParseAddr("2001:db8::1")
		}), want(func(d *ipvs.Desired) {
			d.Service = svc(vip6, 80, "rr")
			d.Destinations[0].Address = netip.MustParseAddr("2001:db8::1")
		})},
		{"v4-mapped addresses are unmapped", base(func(s *render.L4Service) {
			s.Address = netip.AddrFrom16(vip4.As16())
		}), want(nil)},
		{"weight 0 kept", base(func(s *render.L4Service) { s.Destinations[0].Weight = 0 }), want(func(d *ipvs.Desired) { d.Destinations[0].Weight = 0 })},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, bad := ipvs.DesiredFrom([]render.L4Service{tt.in})
			if len(bad) != 0 || len(got) != 1 {
				t.Fatalf("got %v, errors %v", got, bad)
			}
			if got[0].Name != tt.want.Name || got[0].Service != tt.want.Service || !slices.Equal(got[0].Destinations, tt.want.Destinations) {
				t.Errorf("got  %+v\nwant %+v", got[0], tt.want)
			}
		})
	}
	if _, bad := ipvs.DesiredFrom([]render.L4Service{base(func(s *render.L4Service) { s.Flags = []string{"bogus"} })}); bad["web"] == nil {
		t.Error("an unknown flag was accepted")
	}
}
