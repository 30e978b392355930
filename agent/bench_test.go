package agent

import (
	"fmt"
	"strings"
	"testing"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/watcher"
)

// BenchmarkFirstPass measures the user-space part of an agent's first pass
// over 2,000 definitions x 4 backends: parse and validate every definition,
// resolve conflicts and render (no driver).
//
//	go test -run '^$' -bench FirstPass -benchmem ./agent/
func BenchmarkFirstPass(b *testing.B) {
	snap := watcher.Snapshot{Services: map[string]watcher.KV{}}
	for i := 0; i < 2000; i++ {
		var bs []string
		for j := 0; j < 4; j++ {
			bs = append(bs, fmt.Sprintf(`{"address":"10.%d.%d.%d","port":8080}`, 1+i/65536, (i/256)%256, (i%256+j)%256))
		}
		def := fmt.Sprintf(`{"vip":"198.18.%d.%d","port":80,"health":{"protocol":"none"},"backends":[%s]}`, i/256, i%256, strings.Join(bs, ","))
		snap.Services[fmt.Sprintf("s%05d", i)] = watcher.KV{Value: []byte(def), CreateRevision: int64(i + 1), ModRevision: int64(i + 1)}
	}
	b.ResetTimer()
	for b.Loop() {
		services := inForce(newEvaluator("/switchman", nil).evaluate(snap))
		if st := render.Render(render.Input{Services: services}); len(st.IPVS) != 2000 {
			b.Fatalf("%d services rendered", len(st.IPVS))
		}
	}
}
