package lab

import (
	"strings"
	"testing"
)

// TestParseIPVSList checks the ipvsadm -Ln parser on fixed output.
func TestParseIPVSList(t *testing.T) {
	const out = `IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  192.0.2.10:80 rr
  -> 10.10.0.11:80                Masq    1      0          3
  -> 10.10.0.12:80                Masq    0      2          0
UDP  [2001:db8:100::1]:53 mh (mh-fallback,mh-port) persistent 300 mask 255.255.255.0
  -> [fd00:10::11]:53             Route   5      0          0
FWM  7 wlc ops
`
	svcs, err := ParseIPVSList(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(svcs) != 3 {
		t.Fatalf("got %d services, want 3: %+v", len(svcs), svcs)
	}
	s := svcs[0]
	if s.Key() != "TCP 192.0.2.10:80" || s.Scheduler != "rr" || len(s.Dests) != 2 {
		t.Errorf("service 0: %+v", s)
	}
	if d, ok := s.Dest("10.10.0.12:80"); !ok || d.Weight != 0 || d.ActiveConn != 2 || ForwardingName(d.Forward) != "nat" {
		t.Errorf("dest 10.10.0.12:80: %+v %v", d, ok)
	}
	u := svcs[1]
	if u.Address != "[2001:db8:100::1]:53" || !u.HasFlag("mh-fallback") || !u.HasFlag("mh-port") ||
		u.Persistent != 300 || u.Netmask != "255.255.255.0" || u.Dests[0].Forward != "Route" || u.Dests[0].Weight != 5 {
		t.Errorf("service 1: %+v", u)
	}
	if f := svcs[2]; f.Protocol != "FWM" || f.Address != "7" || !f.OnePacket || len(f.Dests) != 0 {
		t.Errorf("service 2: %+v", f)
	}
	if _, err := ParseIPVSList("TCP 1.2.3.4:80 rr bogus\n"); err == nil {
		t.Error("unknown attribute accepted")
	}
	if got := IPVSHostPort("2001:db8::1", 80); got != "[2001:db8::1]:80" {
		t.Errorf("IPVSHostPort = %q", got)
	}
}

func TestParseStatsConns(t *testing.T) {
	const out = `IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes
  -> RemoteAddress:Port
TCP  192.0.2.10:80                      12       70       60     4660     7080
  -> 10.10.0.11:80                       6       35       30     2330     3540
UDP  192.0.2.10:53                       3        3        3      129      189
`
	tests := []struct {
		proto, addr string
		want        int
		wantErr     bool
	}{
		{"TCP", "192.0.2.10:80", 12, false},
		{"UDP", "192.0.2.10:53", 3, false},
		{"TCP", "192.0.2.10:53", 0, true},
		{"TCP", "10.10.0.11:80", 0, true}, // a real server line is not a service
	}
	for _, tt := range tests {
		got, err := ParseStatsConns(out, tt.proto, tt.addr)
		if got != tt.want || (err != nil) != tt.wantErr {
			t.Errorf("%s %s: %d, %v; want %d (error %v)", tt.proto, tt.addr, got, err, tt.want, tt.wantErr)
		}
	}
	if _, err := ParseStatsConns("TCP  192.0.2.10:80  many 1 1 1 1\n", "TCP", "192.0.2.10:80"); err == nil {
		t.Error("a counter that is not a number was accepted")
	}
}

func TestParseMetrics(t *testing.T) {
	m, err := ParseMetrics(strings.NewReader(`# HELP switchman_services Services by state.
# TYPE switchman_services gauge
switchman_services{state="applied"} 3
switchman_ha_owned_groups 1
garbage line without value x
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 2 || m[`switchman_services{state="applied"}`] != 3 || m["switchman_ha_owned_groups"] != 1 {
		t.Errorf("parsed %v", m)
	}
}
