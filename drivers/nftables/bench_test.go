package nftables_test

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/switchman-lb/switchman/drivers/nftables"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// wrrServices returns n services with 4 backends each (wrr, weight 1),
// VIPs in 198.18.0.0/15 and backends in 10.100-103.0.0/16, named s00000...
func wrrServices(n int) []render.L4Service {
	services := make([]render.L4Service, n)
	for i := range services {
		vip := netip.AddrFrom4([4]byte{198, 18, byte(i / 250), byte(i%250 + 1)})
		var dests []render.L4Destination
		for j := range 4 {
			dests = append(dests, nfdest(netip.AddrFrom4([4]byte{10, byte(100 + j), byte(i / 250), byte(i%250 + 1)}), 1))
		}
		services[i] = l4(fmt.Sprintf("s%05d", i), netip.AddrPortFrom(vip, 80).String(), spec.TCP, spec.WeightedRoundRobin, dests...)
	}
	return services
}

// weightChange changes one backend weight of a service in services, a
// different one each round i, and returns its new state (Generation i+2,
// so that it differs from the loaded states' 1).
func weightChange(services []render.L4Service, i int) *render.ServiceState {
	s := &services[(i*797+13)%len(services)]
	s.Destinations = slices.Clone(s.Destinations)
	s.Destinations[i%4].Weight++
	st := state(*s)
	st.Generation = uint64(i + 2)
	return st
}

// nullKernel takes every transaction and keeps nothing: with it, a
// benchmark measures the driver's own work.
type nullKernel struct {
	gen    uint32
	handle uint64
}

func (k *nullKernel) Tables(context.Context) (map[render.NFTFamily]*nftables.Table, error) {
	return map[render.NFTFamily]*nftables.Table{}, nil
}

func (k *nullKernel) Commit(_ context.Context, ops []nftables.Op) ([]uint64, error) {
	k.gen++
	handles := make([]uint64, len(ops))
	for i, op := range ops {
		if op.Kind == nftables.AddRule || op.Kind == nftables.ReplaceRule {
			k.handle++
			handles[i] = k.handle
		}
	}
	return handles, nil
}

func (k *nullKernel) Generation(context.Context) (uint32, error) { return k.gen, nil }

func (k *nullKernel) Connections(context.Context, nftables.ConnKey) (map[netip.AddrPort]int, error) {
	return nil, nil
}

// BenchmarkApplyWeightChange is the driver's own work (no kernel) for one
// backend weight change of one service (one Apply) with 100, 2,000 and
// 10,000 services x 4 backends (wrr) loaded: it should not grow with the
// services loaded.
//
//	go test -run '^$' -bench ApplyWeightChange ./drivers/nftables/
func BenchmarkApplyWeightChange(b *testing.B) {
	bySize(b, func(b *testing.B, d *nftables.Driver, n int) {
		services := wrrServices(n)
		syncAll(b, d, services)
		b.ReportAllocs()
		applyWeightChanges(b, d, services)
	})
}

// bySize runs fn as sub-benchmarks with 100, 2,000 and 10,000 services,
// each with a driver of its own on a nullKernel.
func bySize(b *testing.B, fn func(b *testing.B, d *nftables.Driver, n int)) {
	for _, n := range []int{100, 2000, 10000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			d, err := nftables.New(nftables.Config{Kernel: &nullKernel{}})
			if err != nil {
				b.Fatal(err)
			}
			fn(b, d, n)
		})
	}
}

// BenchmarkApplyAddRemove is the driver's own work (no kernel) for one
// service added to 100, 2,000 and 10,000 services x 4 backends loaded
// (wrr), and removed again: two Applies per op.
//
//	go test -run '^$' -bench ApplyAddRemove ./drivers/nftables/
func BenchmarkApplyAddRemove(b *testing.B) {
	bySize(b, func(b *testing.B, d *nftables.Driver, n int) {
		services := wrrServices(n + 1)
		syncAll(b, d, services[:n])
		extra := state(services[n])
		gone := &render.ServiceState{Name: extra.Name}
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			for _, st := range []*render.ServiceState{extra, gone} {
				if errs := d.Apply(b.Context(), []*render.ServiceState{st}); len(errs) > 0 {
					b.Fatal(errs)
				}
			}
		}
	})
}

// syncAll brings d to services (each at Generation 1) with one Sync.
func syncAll(tb testing.TB, d *nftables.Driver, services []render.L4Service) {
	tb.Helper()
	states := make([]*render.ServiceState, len(services))
	for i := range services {
		states[i] = state(services[i])
		states[i].Generation = 1
	}
	if errs := d.Sync(tb.Context(), states); len(errs) > 0 {
		tb.Fatalf("Sync: %d errors, e.g. %v", len(errs), errs[states[0].Name])
	}
}

// applyWeightChanges times b.N weight changes of services loaded in d,
// one Apply each, and reports the writes per change.
func applyWeightChanges(b *testing.B, d *nftables.Driver, services []render.L4Service) {
	w0 := d.Writes()
	b.ResetTimer()
	for i := range b.N {
		if errs := d.Apply(b.Context(), []*render.ServiceState{weightChange(services, i)}); len(errs) > 0 {
			b.Fatal(errs)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(d.Writes()-w0)/float64(b.N), "writes/op")
}
