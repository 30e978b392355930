// Command nftables measures the agent on nf_tables at scale, outside the
// pass/fail tests (figures: the nf_tables section of docs/BENCHMARKS.md):
// N services x 4 backends programmed from empty through the agent
// binary, then one backend weight changed at a time with the N loaded
// (from the etcd put to the change in the kernel's selection map),
// against the same table and changes applied the resync-everything way
// (render.NFTablesRuleset of the whole state, `nft -f` per change), and
// the agent's resident memory.
// It needs root; everything happens in a network namespace of its own.
//
//	go build -o bin/switchman ./cmd/switchman
//	go build -o bin/bench-nftables ./bench/nftables
//	sudo bin/bench-nftables -agent bin/switchman -services 10000 -changes 100
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	swagent "github.com/switchman-lb/switchman/agent"
	"github.com/switchman-lb/switchman/internal/l4bench"
	"github.com/switchman-lb/switchman/spec"
)

func main() {
	agent := flag.String("agent", "bin/switchman", "switchman binary")
	services := flag.Int("services", 10000, "services (x 4 backends) to load")
	changes := flag.Int("changes", 100, "one-weight changes to time, per side")
	budget := flag.Duration("budget", 15*time.Minute, "time limit of each side's changes")
	resync := flag.Bool("resync", true, "also time nft -f of the whole re-rendered table per change")
	flag.Parse()
	if err := run(*agent, *services, *changes, *budget, *resync); err != nil {
		fmt.Fprintln(os.Stderr, "bench-nftables:", err)
		os.Exit(1)
	}
}

func run(agent string, services, changes int, budget time.Duration, resync bool) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root: it creates a network namespace and programs nf_tables in it")
	}
	abs, err := filepath.Abs(agent)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	logf := func(format string, args ...any) {
		fmt.Printf("%s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
	}
	logf("load average at the start: %s", loadavg())
	res, err := l4bench.Run(ctx, l4bench.Config{Agent: abs, Driver: spec.DriverNFTables, Services: services,
		Changes: changes, Budget: budget, Resync: resync, Logf: logf})
	if err != nil {
		return err
	}
	logf("load average at the end: %s", loadavg())
	p := func(ds []time.Duration, q float64) time.Duration {
		return l4bench.Pct(ds, q).Round(100 * time.Microsecond)
	}
	fmt.Printf("\nFIGURES (%d services x 4 backends, wrr, nf_tables)\n", services)
	fmt.Printf("cold start through the agent: in the kernel after %s, all applied after %s, %v writes; nft -f of the same table from empty: %s\n",
		res.ColdInKernel.Round(time.Millisecond), res.ColdReady.Round(time.Millisecond), res.ColdWrites, res.ResyncCold.Round(time.Millisecond))
	fmt.Printf("one weight change, put to kernel: agent p50 %s p99 %s max %s (%d changes, %v writes in all; driver Apply %s, loop pass %s on average, loop debounce %s)\n",
		p(res.Changes, 50), p(res.Changes, 99), p(res.Changes, 100), len(res.Changes), res.ChangeWrites, res.ApplyMean.Round(100*time.Microsecond), res.PassMean.Round(10*time.Microsecond), swagent.DefaultDebounce)
	if len(res.Resync) > 0 {
		fmt.Printf("the same, full re-render + nft -f: p50 %s p99 %s (%d changes; render p50 %s, nft -f p50 %s); resync/agent p50 %.3gx, p99 %.3gx\n",
			p(res.Resync, 50).Round(time.Millisecond), p(res.Resync, 99).Round(time.Millisecond), len(res.Resync), p(res.ResyncRender, 50).Round(time.Millisecond), p(res.ResyncApply, 50).Round(time.Millisecond),
			ratio(res.Resync, res.Changes, 50), ratio(res.Resync, res.Changes, 99))
	}
	fmt.Printf("agent RSS: %d MiB when ready, %d MiB after the changes\n", res.RSSReady>>20, res.RSSAfter>>20)
	return nil
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	return strings.Join(f[:min(3, len(f))], " ")
}

// ratio is a's percentile q over b's, from unrounded values.
func ratio(a, b []time.Duration, q float64) float64 {
	return float64(l4bench.Pct(a, q)) / float64(l4bench.Pct(b, q))
}
