//go:build e2e

package e2e

import (
	"context"
	"flag"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/internal/l4bench"
	"github.com/switchman-lb/switchman/spec"
)

// TestNFTablesVsIPVSFigures runs the same benchmark (internal/l4bench) for
// nf_tables and for IPVS in one VM run: 2,000 services x 4 backends (wrr)
// programmed from empty through the agent binary, then one weight changed
// at a time with the 2,000 loaded, from the etcd put to the change in the
// kernel. Each side runs in a namespace of its own. It logs the figures
// (docs/bench/nftables.md) and fails only when a table is wrong.
func TestNFTablesVsIPVSFigures(t *testing.T) {
	bin := labOnlyBin(t)
	if f := flag.Lookup("test.run"); f == nil || !strings.Contains(f.Value.String(), "NFTablesVsIPVS") {
		t.Skip("figures run only when named: e2e/lab/run.sh -run NFTablesVsIPVS")
	}
	const services, changes = 2000, 50
	results := map[spec.Driver][]*l4bench.Result{}
	// Two rounds, the order swapped in the second.
	for _, d := range []spec.Driver{spec.DriverNFTables, spec.DriverIPVS, spec.DriverIPVS, spec.DriverNFTables} {
		ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
		res, err := l4bench.Run(ctx, l4bench.Config{Agent: bin, Driver: d, Services: services, Changes: changes,
			Budget: 8 * time.Minute, Logf: func(f string, a ...any) { t.Logf("%s: %s", d, fmt.Sprintf(f, a...)) }})
		cancel()
		if err != nil {
			t.Fatalf("%s: %v", d, err)
		}
		results[d] = append(results[d], res)
	}
	p := l4bench.Pct
	for _, d := range []spec.Driver{spec.DriverNFTables, spec.DriverIPVS} {
		for i, r := range results[d] {
			t.Logf("FIGURE %s round %d, %d x 4: cold start in the kernel %s (ready %s, %v writes, RSS %d MiB); one weight change p50 %s p99 %s (%d changes, %v writes; driver Apply %s, loop pass %s on average)",
				d, i+1, services, r.ColdInKernel.Round(time.Millisecond), r.ColdReady.Round(time.Millisecond), r.ColdWrites, r.RSSReady>>20,
				p(r.Changes, 50).Round(time.Millisecond), p(r.Changes, 99).Round(time.Millisecond), len(r.Changes), r.ChangeWrites,
				r.ApplyMean.Round(100*time.Microsecond), r.PassMean.Round(100*time.Microsecond))
		}
	}
	sum := func(d spec.Driver, f func(*l4bench.Result) time.Duration) time.Duration {
		var s time.Duration
		for _, r := range results[d] {
			s += f(r)
		}
		return s
	}
	cold := func(r *l4bench.Result) time.Duration { return r.ColdInKernel }
	p50 := func(r *l4bench.Result) time.Duration { return p(r.Changes, 50) }
	p99 := func(r *l4bench.Result) time.Duration { return p(r.Changes, 99) }
	t.Logf("FIGURE nftables/ipvs (sums of both rounds): cold start %.2f, change p50 %.2f, change p99 %.2f",
		float64(sum(spec.DriverNFTables, cold))/float64(sum(spec.DriverIPVS, cold)),
		float64(sum(spec.DriverNFTables, p50))/float64(sum(spec.DriverIPVS, p50)),
		float64(sum(spec.DriverNFTables, p99))/float64(sum(spec.DriverIPVS, p99)))
}
