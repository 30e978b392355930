//go:build e2e

package e2e

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/e2e/internal/lab"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// coldStartTable is n rr services with four NAT destinations each, on VIPs
// in 198.18.0.0/15 (the benchmarking range), never reached by traffic.
func coldStartTable(n int) []render.L4Service {
	out := make([]render.L4Service, 0, n)
	for i := range n {
		v := netip.AddrFrom4([4]byte{198, 18, byte(i / 250), byte(i%250 + 1)})
		s := render.L4Service{Service: fmt.Sprintf("bench%d", i), Protocol: spec.TCP, Address: v, Port: 80, Scheduler: spec.RoundRobin}
		for j := range 4 {
			s.Destinations = append(s.Destinations, render.L4Destination{
				Address: netip.AddrFrom4([4]byte{10, 10, 0, byte(11 + j)}), Port: 80, Weight: 1, Forwarding: spec.NAT,
			})
		}
		out = append(out, s)
	}
	return out
}

// cpuTimes is user and system CPU time.
type cpuTimes struct{ user, sys time.Duration }

func (c cpuTimes) String() string {
	return fmt.Sprintf("user %v sys %v", c.user.Round(time.Millisecond), c.sys.Round(time.Millisecond))
}

// selfCPU returns this process's CPU time so far.
func selfCPU(t testing.TB) cpuTimes {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return cpuTimes{time.Duration(ru.Utime.Nano()), time.Duration(ru.Stime.Nano())}
}

func (c cpuTimes) sub(o cpuTimes) cpuTimes { return cpuTimes{c.user - o.user, c.sys - o.sys} }

// ipvsadmRestore feeds rules to ipvsadm -R and returns how long it took.
func ipvsadmRestore(t testing.TB, rules string) time.Duration {
	el, _ := ipvsadmRestoreCPU(t, rules)
	return el
}

// ipvsadmRestoreCPU is ipvsadmRestore that also returns ipvsadm's CPU time.
func ipvsadmRestoreCPU(t testing.TB, rules string) (time.Duration, cpuTimes) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "rules")
	if err := os.WriteFile(f, []byte(rules), 0o600); err != nil {
		t.Fatal(err)
	}
	in, err := os.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	cmd := exec.Command(lab.IPVSADMBin, "-R")
	cmd.Stdin = in
	start := time.Now()
	out, err := cmd.CombinedOutput()
	el := time.Since(start)
	if err != nil {
		t.Fatalf("ipvsadm -R: %v: %s", err, out)
	}
	return el, cpuTimes{cmd.ProcessState.UserTime(), cmd.ProcessState.SystemTime()}
}

// deleteRules turns -A lines into -D lines, to remove a restored table
// without flushing anything else.
func deleteRules(rules string) string {
	var b strings.Builder
	for _, l := range strings.Split(rules, "\n") {
		if strings.HasPrefix(l, "-A ") {
			f := strings.Fields(l)
			fmt.Fprintf(&b, "-D %s %s\n", f[1], f[2])
		}
	}
	return b.String()
}

func countServices(t testing.TB, prefix string) int {
	t.Helper()
	n := 0
	for _, l := range strings.Split(lab.MustRun(t, lab.IPVSADMBin, "-Ln"), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "TCP" && strings.HasPrefix(f[1], prefix) {
			n++
		}
	}
	return n
}

// TestIPVSColdStartFigures programs 2,000 rr services with 4 destinations
// each from an empty table with the driver (batched, and one request per
// call) and with ipvsadm -R, three times each, rotating who goes first, and
// logs the times and their ratio (no pass/fail on speed; it fails only
// when a table is not what it should be). Figures go to docs/bench/ipvs.md.
func TestIPVSColdStartFigures(t *testing.T) {
	lab.RequireLab(t)
	// A figure, not a pass/fail test: it runs only when named, as
	// `make bench-ipvs` does (e2e/lab/run.sh -run IPVSColdStart).
	onlyWhenNamed(t, "ColdStart")
	coldStartFigures(t, 2000, 3)
}

// onlyWhenNamed skips t unless -test.run names it (contains name).
func onlyWhenNamed(t *testing.T, name string) {
	if f := flag.Lookup("test.run"); f == nil || !strings.Contains(f.Value.String(), name) {
		t.Skipf("runs only when named: -run %s", name)
	}
}

// coldStartFigures times n services x 4 destinations cold, rounds times
// each way, in this one VM run.
func coldStartFigures(t *testing.T, n, rounds int) {
	table := coldStartTable(n)
	rules := render.IPVSRules(table)
	if c := countServices(t, "198.18."); c != 0 {
		t.Fatalf("%d services in 198.18.0.0/15 before the run", c)
	}
	t.Cleanup(func() {
		if countServices(t, "198.18.") != 0 {
			ipvsadmRestore(t, deleteRules(rules))
		}
	})
	ctx := context.Background()
	var drv, seq, adm []time.Duration
	driverRound := func(round int, batched bool) {
		d, k := driverAndKernel(t, t.TempDir(), batched)
		c0, start := selfCPU(t), time.Now()
		if errs := d.Sync(ctx, render.Split(&render.State{IPVS: table})); len(errs) != 0 {
			t.Fatalf("driver cold start: %d errors, e.g. %v", len(errs), firstErr(errs))
		}
		cold, cpu := time.Since(start), selfCPU(t).sub(c0)
		how := fmtStats(k.BatchStats())
		if batched {
			drv = append(drv, cold)
		} else {
			seq = append(seq, cold)
		}
		if c := countServices(t, "198.18."); c != n {
			t.Fatalf("driver programmed %d services, want %d", c, n)
		}
		writes := d.Writes()
		c0, start = selfCPU(t), time.Now()
		if errs := d.Sync(ctx, render.Split(&render.State{IPVS: table})); len(errs) != 0 {
			t.Fatalf("driver steady state: %v", firstErr(errs))
		}
		steady, steadyCPU := time.Since(start), selfCPU(t).sub(c0)
		start = time.Now()
		if errs := d.Sync(ctx, render.Split(&render.State{})); len(errs) != 0 {
			t.Fatalf("driver removal: %v", firstErr(errs))
		}
		removal := time.Since(start)
		t.Logf("round %d driver (%s): cold start %v (%s; %d writes, %.0f µs/write), unchanged re-apply %v (%s; %d writes), removal %v",
			round, how, cold.Round(time.Millisecond), cpu, writes, float64(cold.Microseconds())/float64(writes),
			steady.Round(time.Millisecond), steadyCPU, d.Writes()-writes-uint64(n), removal.Round(time.Millisecond))
	}
	admRound := func(round int) {
		el, cpu := ipvsadmRestoreCPU(t, rules)
		adm = append(adm, el)
		if c := countServices(t, "198.18."); c != n {
			t.Fatalf("ipvsadm -R programmed %d services, want %d", c, n)
		}
		del := ipvsadmRestore(t, deleteRules(rules))
		t.Logf("round %d ipvsadm -R: restore %v (%s), removal %v", round, el.Round(time.Millisecond), cpu, del.Round(time.Millisecond))
	}
	runs := []func(int){func(r int) { driverRound(r, true) }, admRound, func(r int) { driverRound(r, false) }}
	for round := range rounds {
		// Rotate who goes first, so none always gets the warmer VM.
		for i := range runs {
			runs[(round+i)%len(runs)](round)
		}
	}
	median := func(ds []time.Duration) time.Duration { s := slices.Clone(ds); slices.Sort(s); return s[len(s)/2] }
	t.Logf("FIGURE cold start %d services x 4 destinations (rr), median of %d: driver batched %v, one request per call %v, ipvsadm -R %v; batched/ipvsadm = %.2f, one-by-one/ipvsadm = %.2f",
		n, rounds, median(drv).Round(time.Millisecond), median(seq).Round(time.Millisecond), median(adm).Round(time.Millisecond),
		float64(median(drv))/float64(median(adm)), float64(median(seq))/float64(median(adm)))
}

// BenchmarkIPVSColdStart is the driver's cold start as a Go benchmark (run
// it in the lab with -test.bench IPVSColdStart -test.run '^$').
func BenchmarkIPVSColdStart(b *testing.B) {
	lab.RequireLab(b)
	table := coldStartTable(2000)
	ctx := context.Background()
	for b.Loop() {
		b.StopTimer()
		d := newIPVSDriver(b, b.TempDir())
		b.StartTimer()
		if errs := d.Sync(ctx, render.Split(&render.State{IPVS: table})); len(errs) != 0 {
			b.Fatal(firstErr(errs))
		}
		b.StopTimer()
		if errs := d.Sync(ctx, render.Split(&render.State{})); len(errs) != 0 {
			b.Fatal(firstErr(errs))
		}
		b.StartTimer()
	}
}

func firstErr(errs map[string]error) error {
	for name, err := range errs {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}
