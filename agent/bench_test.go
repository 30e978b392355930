package agent

import (
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/switchman-lb/switchman/render"
)

// BenchmarkFirstPass measures the user-space part of an agent's first pass
// over 2,000 definitions x 4 backends: parse and validate every
// definition, resolve conflicts and render (no driver).
//
//	go test -run '^$' -bench FirstPass -benchmem ./agent/
func BenchmarkFirstPass(b *testing.B) {
	src := newFakeSource()
	loadServices(src, 2000)
	for b.Loop() {
		a := New(slog.New(slog.DiscardHandler), src, nil, newFakeStatus(), nil, nil, testOptions())
		for _, n := range src.ServiceNames() {
			a.dirty[n] = true
		}
		a.evaluateDirty()
		if len(a.records) != 2000 {
			b.Fatalf("%d records", len(a.records))
		}
	}
}

// loadServices puts n JSON definitions of 4 backends each.
func loadServices(src *fakeSource, n int) {
	for i := range n {
		src.put(fmt.Sprintf("s%05d", i), benchDef(i, 0))
	}
}

// benchDef is definition i with backend port 8080+v (v varies a change).
func benchDef(i, v int) string {
	var bs []string
	for j := range 4 {
		bs = append(bs, fmt.Sprintf(`{"address":"10.%d.%d.%d","port":%d}`, 1+i/65536, (i/256)%256, (i%256+j)%256, 8080+v))
	}
	return fmt.Sprintf(`{"vip":"198.18.%d.%d","port":80,"health":{"protocol":"none"},"backends":[%s]}`, i/256, i%256, strings.Join(bs, ","))
}

// benchLoop is an agent with n services loaded and its first pass done,
// driven synchronously (no goroutines): what the loop itself spends.
func benchLoop(b *testing.B, n int, planes []Plane) (*Agent, *fakeSource, *fakeHealth) {
	src := newFakeSource()
	loadServices(src, n)
	h := newFakeHealth()
	a := New(slog.New(slog.DiscardHandler), src, planes, newFakeStatus(), h, nil, testOptions())
	src.TakeChanges()
	for _, name := range src.ServiceNames() {
		a.dirty[name] = true
	}
	a.evaluateDirty()
	a.firstSync()
	// Let the first Syncs (the guards', then the others') report, so the
	// timed loop measures changes only.
	for range 2 {
		for _, w := range a.workers {
			w.step(b.Context())
		}
		drainResults(a)
	}
	return a, src, h
}

// BenchmarkChange measures the loop's own work for one changed definition
// with 100, 2,000 and 10,000 services loaded: evaluate, render, dispatch
// and status. The cost must not grow with the number of services.
//
//	go test -run '^$' -bench 'Change|HealthFlip' -benchmem ./agent/
func BenchmarkChange(b *testing.B) {
	for _, n := range []int{100, 2000, 10000} {
		for _, withFakes := range []bool{false, true} {
			name := fmt.Sprintf("services=%d/drivers=none", n)
			var planes []Plane
			if withFakes {
				name = fmt.Sprintf("services=%d/drivers=fakes", n)
				planes = []Plane{{Driver: newFakeDriver("ipvs", render.PartIPVS, nil), Part: render.PartIPVS}, {Driver: newFakeDriver("netfilter", render.PartNetfilter, nil), Part: render.PartNetfilter, Guard: true}}
			}
			b.Run(name, func(b *testing.B) {
				a, src, _ := benchLoop(b, n, planes)
				i := 0
				for b.Loop() {
					i++
					src.put("s00042", benchDef(42, i%2))
					a.collect()
					a.evaluateDirty()
					for _, w := range a.workers {
						w.step(b.Context()) // the driver's share, in line
					}
					drainResults(a)
				}
			})
		}
	}
}

// BenchmarkHealthFlip measures the loop's work for one backend changing
// health with 100, 2,000 and 10,000 services loaded.
func BenchmarkHealthFlip(b *testing.B) {
	for _, n := range []int{100, 2000, 10000} {
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			a, _, h := benchLoop(b, n, nil)
			ref := render.BackendRef{Service: "s00042", Addr: netip.MustParseAddrPort("10.1.0.42:8080")}
			healthy := false
			for b.Loop() {
				h.flip(ref, healthy)
				healthy = !healthy
				a.collect()
				a.evaluateDirty()
			}
			if a.records["s00042"].gen < 2 {
				b.Fatal("the flip rendered nothing")
			}
		})
	}
}

// drainResults hands the loop every report the workers have sent.
func drainResults(a *Agent) {
	for {
		select {
		case r := <-a.results:
			a.handle(r)
		default:
			return
		}
	}
}
