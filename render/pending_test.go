package render

import (
	"net/netip"
	"testing"

	"github.com/switchman-lb/switchman/spec"
)

// TestPendingBackends: a backend without a first check result gets weight
// 0 and does not count as down for fail_open, so a new service goes
// 0,0,0 -> 1,0,0 -> 1,1,0 as its checks come in, never through fail-open.
func TestPendingBackends(t *testing.T) {
	s := &spec.Service{Name: "web", VIP: netip.MustParseAddr("192.0.2.1"), Port: 80, Driver: spec.DriverIPVS, FailOpen: true}
	var refs []BackendRef
	for _, a := range []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"} {
		b := spec.Backend{Address: netip.MustParseAddr(a), Port: 80, Weight: 5}
		s.Backends = append(s.Backends, b)
		refs = append(refs, BackendRef{Service: "web", Addr: b.AddrPort()})
	}
	tests := []struct {
		name        string
		healthy     map[BackendRef]bool
		pending     map[BackendRef]bool
		weights     []int
		failingOpen bool
	}{
		{"all pending", map[BackendRef]bool{refs[0]: false, refs[1]: false, refs[2]: false},
			map[BackendRef]bool{refs[0]: true, refs[1]: true, refs[2]: true}, []int{0, 0, 0}, false},
		{"one up, two pending", map[BackendRef]bool{refs[0]: true, refs[1]: false, refs[2]: false},
			map[BackendRef]bool{refs[1]: true, refs[2]: true}, []int{5, 0, 0}, false},
		{"two down, one pending", map[BackendRef]bool{refs[0]: false, refs[1]: false, refs[2]: false},
			map[BackendRef]bool{refs[2]: true}, []int{0, 0, 0}, false},
		{"all known down fails open", map[BackendRef]bool{refs[0]: false, refs[1]: false, refs[2]: false},
			nil, []int{5, 5, 5}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := Render(Input{Services: []*spec.Service{s}, Healthy: tc.healthy, Pending: tc.pending})
			rep := st.Services[0]
			if rep.FailingOpen != tc.failingOpen {
				t.Errorf("failing open %v, want %v", rep.FailingOpen, tc.failingOpen)
			}
			for i, d := range st.IPVS[0].Destinations {
				if d.Weight != tc.weights[i] {
					t.Errorf("%s weight %d, want %d", d.Address, d.Weight, tc.weights[i])
				}
			}
		})
	}
}
