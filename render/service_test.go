package render

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/switchman-lb/switchman/spec"
)

func TestRenderServiceParts(t *testing.T) {
	parse := func(doc string, l4 spec.Driver) *spec.Service {
		t.Helper()
		s, err := spec.ParseWith("web", []byte(doc), spec.Options{L4Driver: l4})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	const base = "vip: 192.0.2.10\nport: 80\nbackends: [{address: 10.1.1.2}]\n"
	tests := []struct {
		name    string
		doc     string
		l4      spec.Driver
		parts   []string
		sysctls []string
		filter  bool // a netfilter Filter
		l4ACL   bool // allow_cidrs carried in L4
	}{
		{name: "ipvs", doc: base, parts: []string{PartIPVS, PartVIP},
			sysctls: []string{"net/ipv4/ip_forward", "net/ipv4/vs/expire_nodest_conn"}},
		{name: "ipvs with filter and masquerade", doc: base + "allow_cidrs: [198.51.100.0/24]\npreserve_client_ip: false\n",
			parts: []string{PartIPVS, PartNetfilter, PartVIP}, filter: true,
			sysctls: []string{"net/ipv4/ip_forward", "net/ipv4/vs/expire_nodest_conn", "net/ipv4/vs/conntrack"}},
		{name: "nftables carries its own filter", doc: base + "allow_cidrs: [198.51.100.0/24]\n", l4: spec.DriverNFTables,
			parts: []string{PartNFTables, PartVIP}, l4ACL: true, sysctls: []string{"net/ipv4/ip_forward"}},
		{name: "haproxy binds non-local", doc: base + "driver: haproxy\n", parts: []string{PartHAProxy, PartVIP},
			sysctls: []string{"net/ipv4/ip_nonlocal_bind"}},
		{name: "dr needs no forwarding", doc: "vip: 192.0.2.10\nport: 80\nforwarding: dr\nbackends: [{address: 10.1.1.2}]\n",
			parts: []string{PartIPVS, PartVIP}, sysctls: []string{"net/ipv4/vs/expire_nodest_conn"}},
		{name: "loopback vip needs no address", doc: "vip: 127.0.0.10\nport: 80\ndriver: haproxy\nbackends: [{address: 127.0.0.1, port: 8080}]\n",
			parts: []string{PartHAProxy, PartVIP}, sysctls: []string{"net/ipv4/ip_nonlocal_bind"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := RenderService(parse(tc.doc, tc.l4), Input{})
			var parts []string
			for _, p := range []string{PartIPVS, PartNFTables, PartHAProxy, PartNetfilter, PartVIP} {
				if _, ok := st.Part(p); ok {
					parts = append(parts, p)
				}
			}
			if !slices.Equal(parts, tc.parts) {
				t.Errorf("parts %v, want %v", parts, tc.parts)
			}
			if !slices.Equal(st.Sysctls, tc.sysctls) {
				t.Errorf("sysctls %v, want %v", st.Sysctls, tc.sysctls)
			}
			if (st.Filter != nil) != tc.filter {
				t.Errorf("filter %v, want %v", st.Filter, tc.filter)
			}
			if got := st.L4 != nil && st.L4.AllowCIDRs != nil; got != tc.l4ACL {
				t.Errorf("allow_cidrs in L4: %v, want %v", got, tc.l4ACL)
			}
			if st.Removed() {
				t.Error("a rendered service reports Removed")
			}
			if st.Group != spec.DefaultGroup {
				t.Errorf("group %q", st.Group)
			}
		})
	}
	if !(&ServiceState{Name: "x"}).Removed() {
		t.Error("an empty state is not Removed")
	}
	if v := RenderService(parse(base, ""), Input{}).VIP; v != netip.MustParseAddr("192.0.2.10") {
		t.Errorf("VIP %v", v)
	}
}
