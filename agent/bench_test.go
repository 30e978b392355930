package agent

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/status"
	"github.com/switchman-lb/switchman/watcher"
)

// BenchmarkFirstPass measures the user-space part of an agent's first pass
// over 2,000 definitions x 4 backends: parse and validate every definition,
// resolve conflicts and render (no driver).
//
//	go test -run '^$' -bench FirstPass -benchmem ./agent/
func BenchmarkFirstPass(b *testing.B) {
	snap := benchSnapshot(2000)
	b.ResetTimer()
	for b.Loop() {
		services := inForce(newEvaluator("/switchman", nil).evaluate(snap))
		if st := render.Render(render.Input{Services: services}); len(st.IPVS) != 2000 {
			b.Fatalf("%d services rendered", len(st.IPVS))
		}
	}
}

// benchSnapshot is n JSON definitions of 4 backends each.
func benchSnapshot(n int) watcher.Snapshot {
	snap := watcher.Snapshot{Services: map[string]watcher.KV{}}
	for i := 0; i < n; i++ {
		var bs []string
		for j := 0; j < 4; j++ {
			bs = append(bs, fmt.Sprintf(`{"address":"10.%d.%d.%d","port":8080}`, 1+i/65536, (i/256)%256, (i%256+j)%256))
		}
		def := fmt.Sprintf(`{"vip":"198.18.%d.%d","port":80,"health":{"protocol":"none"},"backends":[%s]}`, i/256, i%256, strings.Join(bs, ","))
		snap.Services[fmt.Sprintf("s%05d", i)] = watcher.KV{Value: []byte(def), CreateRevision: int64(i + 1), ModRevision: int64(i + 1)}
	}
	return snap
}

type staticSource struct{ snap watcher.Snapshot }

func (s staticSource) Snapshot() watcher.Snapshot { return s.snap }
func (staticSource) Changed() <-chan struct{}     { return nil }
func (staticSource) Synced() bool                 { return true }

type discardStatus struct{}

func (discardStatus) Publish(map[string]status.Status) {}

// BenchmarkSteadyPass measures one reconcile pass over 2,000 unchanged
// definitions (parses cached), without drivers: what every health or pool
// change costs the loop itself.
//
//	go test -run '^$' -bench SteadyPass -benchmem ./agent/
func BenchmarkSteadyPass(b *testing.B) {
	snap := benchSnapshot(2000)
	a := New(slog.New(slog.DiscardHandler), staticSource{snap}, nil, discardStatus{}, nil, nil, Options{})
	a.reconcile(context.Background())
	b.ResetTimer()
	for b.Loop() {
		a.reconcile(context.Background())
	}
}
