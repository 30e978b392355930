package render

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// backendsN returns n backends 10.1.<i/250>.<i%250+1>:8080 with weight w.
func backendsN(n, w int) []SlotBackend {
	out := make([]SlotBackend, n)
	for i := range out {
		out[i] = SlotBackend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i / 250), byte(i%250 + 1)}), 8080), Weight: w}
	}
	return out
}

func countOwners(table []netip.AddrPort) map[netip.AddrPort]int {
	out := map[netip.AddrPort]int{}
	for _, a := range table {
		out[a]++
	}
	return out
}

func TestMaglevDeterministic(t *testing.T) {
	tests := []struct {
		name     string
		backends []SlotBackend
		m        int
	}{
		{"one", backendsN(1, 1), MaglevSize},
		{"five equal", backendsN(5, 1), MaglevSize},
		{"weighted", []SlotBackend{{netip.MustParseAddrPort("10.0.0.1:80"), 1}, {netip.MustParseAddrPort("10.0.0.2:80"), 3}, {netip.MustParseAddrPort("10.0.0.3:81"), 65535}}, MaglevSize},
		{"ipv6", []SlotBackend{{netip.MustParseAddrPort("[2001:db8::1]:443"), 2}, {netip.MustParseAddrPort("[2001:db8::2]:443"), 2}}, 13},
		{"large table", backendsN(40, 1), 65537},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := Maglev(tt.backends, tt.m)
			if len(a) != tt.m {
				t.Fatalf("table has %d entries, want %d", len(a), tt.m)
			}
			for i, e := range a {
				if !e.IsValid() {
					t.Fatalf("entry %d is empty", i)
				}
			}
			if b := Maglev(tt.backends, tt.m); !slices.Equal(a, b) {
				t.Fatal("the same input gave two different tables")
			}
			// Another host may list the backends in another order.
			r := rand.New(rand.NewPCG(1, 2))
			for range 5 {
				shuffled := slices.Clone(tt.backends)
				r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
				if c := Maglev(shuffled, tt.m); !slices.Equal(a, c) {
					t.Fatal("the same backends in another order gave another table")
				}
			}
		})
	}
}

func TestMaglevWeights(t *testing.T) {
	a, b, c, z := netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.2:80"), netip.MustParseAddrPort("10.0.0.3:80"), netip.MustParseAddrPort("10.0.0.4:80")
	tests := []struct {
		name     string
		backends []SlotBackend
		want     map[netip.AddrPort]float64 // share of the table
	}{
		{"equal", []SlotBackend{{a, 1}, {b, 1}, {c, 1}}, map[netip.AddrPort]float64{a: 1.0 / 3, b: 1.0 / 3, c: 1.0 / 3}},
		{"1:2:3", []SlotBackend{{a, 1}, {b, 2}, {c, 3}}, map[netip.AddrPort]float64{a: 1.0 / 6, b: 2.0 / 6, c: 3.0 / 6}},
		{"large weights", []SlotBackend{{a, 65535}, {b, 32767}}, map[netip.AddrPort]float64{a: 65535.0 / 98302, b: 32767.0 / 98302}},
		{"weight 0 is left out", []SlotBackend{{a, 1}, {b, 0}, {c, 1}}, map[netip.AddrPort]float64{a: 0.5, c: 0.5}},
		{"only weight 0", []SlotBackend{{z, 0}}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			table := Maglev(tt.backends, MaglevSize)
			if tt.want == nil {
				if table != nil {
					t.Fatalf("got a table of %d entries for no usable backend", len(table))
				}
				return
			}
			got := countOwners(table)
			if len(got) != len(tt.want) {
				t.Fatalf("owners %v, want %v", got, tt.want)
			}
			for addr, share := range tt.want {
				// Each turn claims exactly one entry and the turns follow
				// the weights exactly, so a count is within one of its
				// share.
				exact := share * MaglevSize
				if n := float64(got[addr]); n < exact-1 || n > exact+1 {
					t.Errorf("%s has %d entries, want %.1f +/- 1", addr, got[addr], exact)
				}
			}
		})
	}
}

// TestMaglevDisruption checks Maglev's point: when one of N backends goes,
// about 1/N of the entries move (those it held, plus a few others), never a
// reshuffle. How close to 1/N depends on the table being much larger than
// N (the paper's table is 65537 for this reason); the driver's 251 keeps
// the kernel maps small and is close for the few backends a service
// usually has.
func TestMaglevDisruption(t *testing.T) {
	tests := []struct {
		n, m     int
		maxRatio float64 // moved share / (1/N)
		removals int     // how many backends to try removing; 0: each
	}{
		{3, MaglevSize, 1.2, 0},
		{5, MaglevSize, 1.2, 0},
		{10, MaglevSize, 1.7, 0},
		{20, MaglevSize, 3, 0},
		{20, 65537, 1.1, 4},
		{50, 65537, 1.3, 4},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%d of %d entries", tt.n, tt.m), func(t *testing.T) {
			all := backendsN(tt.n, 1)
			before := Maglev(all, tt.m)
			ideal := 1 / float64(tt.n)
			tries := tt.n
			if tt.removals > 0 {
				tries = tt.removals
			}
			for gone := range tries {
				rest := slices.Delete(slices.Clone(all), gone, gone+1)
				after := Maglev(rest, tt.m)
				moved := 0
				for i := range before {
					if before[i] != after[i] {
						moved++
						continue
					}
					if before[i] == all[gone].Addr {
						t.Fatalf("entry %d still names the removed backend", i)
					}
				}
				share := float64(moved) / float64(tt.m)
				if share < ideal*0.9 || share > ideal*tt.maxRatio {
					t.Errorf("removing backend %d of %d moved %d of %d entries (%.3f), want %.3f to %.3f", gone, tt.n, moved, tt.m, share, ideal*0.9, ideal*tt.maxRatio)
				}
				// Adding it back restores the original table exactly.
				if back := Maglev(append(rest, all[gone]), tt.m); !slices.Equal(back, before) {
					t.Errorf("adding backend %d back did not restore the table", gone)
				}
			}
		})
	}
}
