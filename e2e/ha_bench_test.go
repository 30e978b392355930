//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/e2e/internal/lab"
	"github.com/switchman-lb/switchman/internal/l4bench"
)

// haBenchRounds is how many failovers of each kind TestHAFigures makes.
const haBenchRounds = 20

// TestHAFigures measures failovers in the lab (docs/bench/ha.md): 20
// unplanned ones (the owner's agent SIGKILLed and its host's links down)
// and 20 planned ones (SIGTERM): the time from the kill to the first
// successful request from the client through the VIP, and the dual
// ownership a sampler sees. Before each failover the standby has been in
// contact with etcd for its whole regain time, as a standby that has run
// for a while has. It logs the figures and fails only when the group does
// not move or the sampler sees two holders.
func TestHAFigures(t *testing.T) {
	lab.RequireNamed(t, "HAFigures", "e2e/lab/run.sh -run HAFigures (make bench-ha)")
	h := lab.NewHALab(t)
	t.Cleanup(func() { h.LogHA(t) })
	const sampleEvery = 50 * time.Millisecond
	sampler := lab.StartSampler(sampleEvery)
	t.Cleanup(sampler.Stop)
	events, err := lab.WatchVIP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(events.Close)
	h.StartAll(t)
	prober, err := lab.StartProber(lab.HAVIP+":80", 20*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(prober.Stop)
	owner := ""
	lab.WaitFor(t, 0, "an owner", func() error {
		o, ok, err := h.Owner()
		if err == nil && !ok {
			err = fmt.Errorf("no owner yet")
		}
		owner = o.Node
		return err
	})
	h.WaitHolder(t, 0, owner)

	regain := 20 * h.Round // ha's Regain is 20 rounds
	var unplanned, planned, plannedGap []time.Duration
	var overlaps []time.Duration
	reads := haReads{}
	began := time.Now()
	lapses := map[string]int{}
	for i := range 2 * haBenchRounds {
		kind := "unplanned"
		if i >= haBenchRounds {
			kind = "planned"
		}
		// The owner now, whoever it is (under emulation an owner may
		// have dropped and the group moved since the last round).
		lab.WaitFor(t, 0, "an owner", func() error {
			o, ok, err := h.Owner()
			if err == nil && !ok {
				err = fmt.Errorf("no owner")
			}
			owner = o.Node
			return err
		})
		next := lab.Other(owner)
		h.WaitStandby(t, next, regain)
		h.WaitHolder(t, 0, owner)
		lab.WaitHTTP(t, "http://"+lab.HAVIP+"/")
		reads.add(h.Agents[owner])
		var start time.Time
		if kind == "unplanned" {
			start = h.Cut(t, owner)
		} else {
			start = time.Now()
			if err := h.Agents[owner].Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
		}
		h.WaitHolder(t, 0, next)
		var first time.Time
		lab.WaitFor(t, 0, "an answer through the VIP after the failover", func() error {
			from := start
			if kind == "planned" {
				// The old owner answers until it drops the VIP: count
				// from the drop, when only the new owner can answer.
				dropped, ok := events.Change(owner, false, start)
				if !ok {
					return fmt.Errorf("no drop of the VIP by %s seen yet", owner)
				}
				from = dropped
			}
			var ok bool
			if first, ok = prober.FirstOKAfter(from); !ok {
				return fmt.Errorf("no answer yet")
			}
			return nil
		})
		took := first.Sub(start)
		// Where the time went: when the VIP was dropped (planned) and
		// added by the new owner, and how many probes failed meanwhile.
		steps := ""
		if dropped, ok := events.Change(owner, false, start); ok && kind == "planned" {
			steps += fmt.Sprintf("dropped +%s, ", lab.Ms(dropped.Sub(start)))
		}
		if added, ok := events.Change(next, true, start); ok {
			steps += fmt.Sprintf("added +%s, ", lab.Ms(added.Sub(start)))
		}
		_, failed := prober.LongestGap(start, first)
		steps += fmt.Sprintf("%d probes failed", failed)
		for _, host := range lab.HAHosts {
			n := lab.CountLines(h.Agents[host.Name].LogPath, "etcd contact lost")
			t.Logf("%s: %d etcd contact lapses since the last failover", host.Name, n-lapses[host.Name])
			lapses[host.Name] = n
		}
		t.Logf("%s's claim: %s", next, lastLine(h.Agents[next].LogPath, "ha: claiming a group"))
		if kind == "unplanned" {
			unplanned = append(unplanned, took)
			t.Logf("%s %2d: %s -> %s, first answer %s after the host was cut off (%s)", kind, i%haBenchRounds+1, owner, next, lab.Ms(took), steps)
		} else {
			h.Agents[owner].Stop(t) // reaps it
			gap, _ := prober.LongestGap(start, first.Add(time.Second))
			planned, plannedGap = append(planned, took), append(plannedGap, gap)
			if dropped, ok := events.Change(owner, false, start); ok {
				if added, ok := events.Change(next, true, start); ok {
					overlaps = append(overlaps, max(0, dropped.Sub(added)))
				}
			}
			t.Logf("%s %2d: %s -> %s, first answer from %s %s after SIGTERM (%s), longest time without an answer %s",
				kind, i%haBenchRounds+1, owner, next, next, lab.Ms(took), steps, lab.Ms(gap))
		}
		// The old owner comes back as the standby.
		dead := owner
		owner = next
		if kind == "unplanned" {
			h.StartAgent(t, dead)
			lab.WaitFor(t, 0, dead+" holding nothing before its links come back", func() error {
				held, err := lab.HostHolds(dead, false)
				if err == nil && len(held) > 0 {
					err = fmt.Errorf("still %v", held)
				}
				return err
			})
			if err := lab.SetLinks(lab.HostNamed(dead), true); err != nil {
				t.Fatal(err)
			}
		} else {
			h.StartAgent(t, dead)
		}
		h.WaitServing(t, dead)
		h.WaitHolder(t, 0, owner)
	}
	sampler.Stop()
	for _, host := range lab.HAHosts {
		reads.add(h.Agents[host.Name])
	}
	total := 0
	for _, n := range lapses {
		total += n
	}
	samples, dual, errs, lastErr := sampler.Report()
	dualMs := time.Duration(len(dual)) * sampleEvery
	maxOverlap := time.Duration(0)
	for _, o := range overlaps {
		maxOverlap = max(maxOverlap, o)
	}
	t.Logf("sampler: %d samples every %v, %d errors (last %v)", samples, sampleEvery, errs, lastErr)
	t.Logf("FIGURE HA unplanned failover (SIGKILL + links down), %d runs, --ha-round %v --ha-lease-ttl %v: first answer after p50 %s p99 %s (min %s, max %s)",
		len(unplanned), h.Round, h.LeaseTTL, lab.Ms(l4bench.Pct(unplanned, 50)), lab.Ms(l4bench.Pct(unplanned, 99)),
		lab.Ms(l4bench.Pct(unplanned, 0)), lab.Ms(l4bench.Pct(unplanned, 100)))
	t.Logf("FIGURE HA planned hand-over (SIGTERM), %d runs: first answer from the new owner after p50 %s p99 %s; longest time without an answer p50 %s p99 %s",
		len(planned), lab.Ms(l4bench.Pct(planned, 50)), lab.Ms(l4bench.Pct(planned, 99)),
		lab.Ms(l4bench.Pct(plannedGap, 50)), lab.Ms(l4bench.Pct(plannedGap, 99)))
	t.Logf("FIGURE HA dual ownership: %d samples of %d (%v) saw an address on both hosts; largest overlap of the VIP in the address events of a planned hand-over %s",
		len(dual), samples, dualMs, lab.Ms(maxOverlap))
	t.Logf("FIGURE HA etcd reads: %.0f, p50 <= %s, p99 <= %s (histogram bucket bounds); %d etcd contact lapses in %v over both agents",
		reads["+Inf"], reads.quantile(0.5), reads.quantile(0.99), total, time.Since(began).Round(time.Second))
	if len(dual) > 0 {
		t.Errorf("two holders seen:\n%s", strings.Join(dual, "\n"))
	}
}

// haReads sums the agents' switchman_ha_etcd_read_seconds histograms: the
// cumulative count of each bucket, by its upper bound.
type haReads map[string]float64

// add adds the histogram of a's running process (scraped before it ends).
func (r haReads) add(a *lab.Agent) {
	m, err := a.Metrics()
	if err != nil {
		return
	}
	const prefix = `switchman_ha_etcd_read_seconds_bucket{le="`
	for k, v := range m {
		if le, ok := strings.CutPrefix(k, prefix); ok {
			r[strings.TrimSuffix(le, `"}`)] += v
		}
	}
}

// quantile returns the upper bound of the bucket that holds quantile q.
func (r haReads) quantile(q float64) string {
	type bucket struct {
		le    float64
		name  string
		count float64
	}
	var bs []bucket
	for name, c := range r {
		le, err := strconv.ParseFloat(name, 64)
		if err != nil {
			continue // +Inf parses; anything else is not a bound
		}
		bs = append(bs, bucket{le, name, c})
	}
	sort.Slice(bs, func(i, j int) bool { return bs[i].le < bs[j].le })
	for _, b := range bs {
		if b.count >= q*r["+Inf"] {
			return b.name + "s"
		}
	}
	return "?"
}

// lastLine returns the last line of path that contains substr.
func lastLine(path, substr string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(string(b), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], substr) {
			return lines[i]
		}
	}
	return "(none)"
}
