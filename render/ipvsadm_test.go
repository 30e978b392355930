package render

import (
	"net/netip"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/spec"
)

func dest(addr string, w int, f spec.Forwarding) L4Destination {
	ap := netip.MustParseAddrPort(addr)
	return L4Destination{Address: ap.Addr(), Port: ap.Port(), Weight: w, Forwarding: f}
}

func TestIPVSRules(t *testing.T) {
	vip := netip.MustParseAddr("192.0.2.10")
	vip6 := netip.MustParseAddr("2001:db8::10")
	tests := []struct {
		name     string
		services []L4Service
		want     string
	}{
		{"none", nil, ""},
		{"service without destinations", []L4Service{{Protocol: spec.TCP, Address: vip, Port: 80, Scheduler: spec.RoundRobin}},
			"-A -t 192.0.2.10:80 -s rr\n"},
		{"nat tcp", []L4Service{{Protocol: spec.TCP, Address: vip, Port: 80, Scheduler: spec.WeightedRoundRobin, Destinations: []L4Destination{
			dest("10.1.1.2:8080", 1, spec.NAT), dest("10.1.1.3:8080", 0, spec.NAT)}}},
			"-A -t 192.0.2.10:80 -s wrr\n" +
				"-a -t 192.0.2.10:80 -r 10.1.1.2:8080 -m -w 1\n" +
				"-a -t 192.0.2.10:80 -r 10.1.1.3:8080 -m -w 0\n"},
		{"udp", []L4Service{{Protocol: spec.UDP, Address: vip, Port: 53, Scheduler: spec.WeightedLeastConnection, Destinations: []L4Destination{
			dest("10.1.2.2:53", 65535, spec.NAT)}}},
			"-A -u 192.0.2.10:53 -s wlc\n" +
				"-a -u 192.0.2.10:53 -r 10.1.2.2:53 -m -w 65535\n"},
		{"dr and tun", []L4Service{
			{Protocol: spec.TCP, Address: vip, Port: 80, Scheduler: spec.LeastConnection, Destinations: []L4Destination{dest("10.1.7.2:80", 2, spec.Direct)}},
			{Protocol: spec.TCP, Address: vip, Port: 81, Scheduler: spec.RoundRobin, Destinations: []L4Destination{dest("[2001:db8:100::5]:81", 1, spec.Tunnel)}},
		},
			"-A -t 192.0.2.10:80 -s lc\n" +
				"-a -t 192.0.2.10:80 -r 10.1.7.2:80 -g -w 2\n" +
				"-A -t 192.0.2.10:81 -s rr\n" +
				"-a -t 192.0.2.10:81 -r [2001:db8:100::5]:81 -i -w 1\n"},
		{"ipv6 in brackets", []L4Service{{Protocol: spec.TCP, Address: vip6, Port: 443, Scheduler: spec.RoundRobin, Destinations: []L4Destination{
			dest("[2001:db8:100::11]:8443", 1, spec.NAT)}}},
			"-A -t [2001:db8::10]:443 -s rr\n" +
				"-a -t [2001:db8::10]:443 -r [2001:db8:100::11]:8443 -m -w 1\n"},
		{"flags and persistence", []L4Service{{Protocol: spec.TCP, Address: vip, Port: 11211, Scheduler: spec.MaglevHashing,
			Flags: []string{"mh-fallback", "mh-port"}, Persistence: 300 * time.Second}},
			"-A -t 192.0.2.10:11211 -s mh -b mh-fallback,mh-port -p 300\n"},
		{"sh with one flag", []L4Service{{Protocol: spec.UDP, Address: vip, Port: 5060, Scheduler: spec.SourceHashing, Flags: []string{"sh-port"}}},
			"-A -u 192.0.2.10:5060 -s sh -b sh-port\n"},
		{"persistence of a day", []L4Service{{Protocol: spec.TCP, Address: vip, Port: 80, Scheduler: spec.RoundRobin, Persistence: 24 * time.Hour}},
			"-A -t 192.0.2.10:80 -s rr -p 86400\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := IPVSRules(tt.services); got != tt.want {
				t.Errorf("IPVSRules:\n got %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestServerName(t *testing.T) {
	tests := []struct {
		addr string
		port uint16
		want string
	}{
		{"10.1.1.2", 8443, "s10.1.1.2_8443"},
		{"2001:db8::1", 443, "s2001-db8--1_443"},
		{"::ffff:10.1.1.2", 80, "s--ffff-10.1.1.2_80"},
	}
	for _, tt := range tests {
		if got := ServerName(netip.MustParseAddr(tt.addr), tt.port); got != tt.want {
			t.Errorf("ServerName(%s, %d) = %q; want %q", tt.addr, tt.port, got, tt.want)
		}
	}
}
