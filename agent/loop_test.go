package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/status"
)

func ipvsPlane(d *fakeDriver) Plane { return Plane{Driver: d, Part: render.PartIPVS} }

func TestOneEventTouchesOneService(t *testing.T) {
	src := newFakeSource()
	for i := range 100 {
		src.put(fmt.Sprintf("s%d", i), def(i, "", "10.200.0.1", "10.200.0.2"))
	}
	d := newFakeDriver("ipvs", render.PartIPVS, nil)
	nf := newFakeDriver("netfilter", render.PartNetfilter, nil)
	l := startLoop(t, src, []Plane{ipvsPlane(d), {Driver: nf, Part: render.PartNetfilter, Guard: true}}, testOptions())
	eventually(t, "all applied", func() string {
		for i := range 100 {
			if _, ok := l.status.get(fmt.Sprintf("s%d", i)); !ok {
				return fmt.Sprintf("s%d has no status", i)
			}
		}
		return ""
	})
	if applies, syncs, _, _ := d.counts(); applies != 0 || syncs != 1 {
		t.Fatalf("first pass: %d applies, %d syncs; want one sync and no apply", applies, syncs)
	}
	d.reset()
	nf.reset()
	gens := map[string]uint64{}
	for n, r := range l.a.records {
		gens[n] = r.gen
	}
	sets := func() int { l.status.mu.Lock(); defer l.status.mu.Unlock(); return l.status.sets }
	before := sets()
	src.put("s42", def(42, "", "10.200.0.1", "10.200.0.3"))
	eventually(t, "s42 changed", func() string {
		p, _ := d.holds("s42")
		if !strings.Contains(fmt.Sprint(p), "10.200.0.3") {
			return fmt.Sprintf("s42 holds %v", p)
		}
		return ""
	})
	applies, syncs, writes, applied := d.counts()
	if applies != 1 || syncs != 0 || writes != 1 || len(applied) != 1 || applied["s42"] != 1 {
		t.Fatalf("one change cost %d applies, %d syncs, %d writes, services %v; want one apply of s42", applies, syncs, writes, applied)
	}
	if a, s, _, _ := nf.counts(); a+s != 0 {
		t.Fatalf("netfilter, whose part did not change, was called %d times", a+s)
	}
	eventually(t, "status of s42", func() string {
		if n := sets() - before; n != 1 {
			return fmt.Sprintf("%d status writes", n)
		}
		return ""
	})
	for n, r := range l.a.records {
		if n != "s42" && r.gen != gens[n] {
			t.Fatalf("%s rendered again (generation %d, was %d)", n, r.gen, gens[n])
		}
	}
}

func TestHealthFlipTouchesOneService(t *testing.T) {
	src := newFakeSource()
	for i := range 20 {
		src.put(fmt.Sprintf("s%d", i), def(i, "", "10.200.0.1", "10.200.0.2"))
	}
	d := newFakeDriver("ipvs", render.PartIPVS, nil)
	l := startLoop(t, src, []Plane{ipvsPlane(d)}, testOptions())
	eventually(t, "applied", l.wantState("s19", status.StateApplied, ""))
	d.reset()
	l.health.flip(render.BackendRef{Service: "s7", Addr: netip.MustParseAddrPort("10.200.0.2:80")}, false)
	eventually(t, "weight 0", func() string {
		p, _ := d.holds("s7")
		if l4, ok := p.(render.L4Service); !ok || l4.Destinations[1].Weight != 0 {
			return fmt.Sprintf("s7 holds %v", p)
		}
		return ""
	})
	if _, _, _, applied := d.counts(); len(applied) != 1 {
		t.Fatalf("a health flip of s7 handed %v to the driver", applied)
	}
}

func TestConflictReevaluatesBothClaimants(t *testing.T) {
	src := newFakeSource()
	src.put("a", def(1, "", "10.200.0.1"))
	src.put("b", def(1, "", "10.200.0.2"))
	d := newFakeDriver("ipvs", render.PartIPVS, nil)
	l := startLoop(t, src, []Plane{ipvsPlane(d)}, testOptions())
	eventually(t, "a applied", l.wantState("a", status.StateApplied, ""))
	eventually(t, "b refused", l.wantState("b", status.StateRejected, `claimed by service "a"`))
	eventually(t, "b not programmed", holds(d, "b", false))
	src.del("a")
	eventually(t, "b takes the address", l.wantState("b", status.StateApplied, ""))
	eventually(t, "b programmed", holds(d, "b", true))
	eventually(t, "a removed", holds(d, "a", false))
	// b moves away: a newcomer on the old key is not blocked by anyone.
	src.put("c", def(1, "", "10.200.0.3"))
	eventually(t, "c refused while b holds the key", l.wantState("c", status.StateRejected, `claimed by service "b"`))
	src.put("b", def(2, "", "10.200.0.2"))
	eventually(t, "c applied once b moved", l.wantState("c", status.StateApplied, ""))
}

func TestFailingDriverRetriesAloneWhileOthersConverge(t *testing.T) {
	src := newFakeSource()
	src.put("l4", def(1, "", "10.200.0.1"))
	src.put("web", def(2, `"driver":"haproxy",`, "10.200.0.2"))
	ipvs := newFakeDriver("ipvs", render.PartIPVS, nil)
	hap := newFakeDriver("haproxy", render.PartHAProxy, nil)
	hap.setFail("web", errors.New("cannot bind socket"))
	l := startLoop(t, src, []Plane{ipvsPlane(ipvs), {Driver: hap, Part: render.PartHAProxy}}, testOptions())
	eventually(t, "web failed", l.wantState("web", status.StateFailed, "haproxy: cannot bind socket"))
	eventually(t, "l4 applied", l.wantState("l4", status.StateApplied, ""))
	eventually(t, "web retried with its own backoff", func() string {
		if _, _, _, applied := hap.counts(); applied["web"] < 3 {
			return fmt.Sprintf("%d retries", applied["web"])
		}
		return ""
	})
	// A slow haproxy holds back nothing of the IPVS service.
	release := make(chan struct{})
	hap.setBlock("web", release)
	src.put("web", def(2, `"driver":"haproxy",`, "10.200.0.9"))
	src.put("l4", def(1, "", "10.200.0.5"))
	eventually(t, "l4 converged while haproxy is stuck", func() string {
		p, _ := ipvs.holds("l4")
		if !strings.Contains(fmt.Sprint(p), "10.200.0.5") {
			return fmt.Sprintf("l4 holds %v", p)
		}
		return ""
	})
	if _, _, _, applied := ipvs.counts(); applied["web"] != 0 {
		t.Fatal("the IPVS driver was handed the HAProxy service")
	}
	hap.setFail("web", nil)
	close(release)
	eventually(t, "web applied once haproxy recovers", l.wantState("web", status.StateApplied, ""))
}

func TestPeriodicSyncRepairsDrift(t *testing.T) {
	src := newFakeSource()
	src.put("a", def(1, "", "10.200.0.1"))
	d := newFakeDriver("ipvs", render.PartIPVS, nil)
	opts := testOptions()
	opts.Resync = 50 * time.Millisecond
	l := startLoop(t, src, []Plane{ipvsPlane(d)}, opts)
	eventually(t, "applied", l.wantState("a", status.StateApplied, ""))
	d.mu.Lock()
	delete(d.held, "a") // someone removed it behind the agent's back
	d.mu.Unlock()
	eventually(t, "repaired by a sync", holds(d, "a", true))
}

func TestGuardOrder(t *testing.T) {
	src := newFakeSource()
	j := &journal{}
	nf := newFakeDriver("netfilter", render.PartNetfilter, j)
	ipvs := newFakeDriver("ipvs", render.PartIPVS, j)
	planes := []Plane{ipvsPlane(ipvs), {Driver: nf, Part: render.PartNetfilter, Guard: true}}
	l := startLoop(t, src, planes, testOptions())
	restricted := `"allow_cidrs":["198.51.100.0/24"],`

	src.put("a", def(1, restricted, "10.200.0.1"))
	eventually(t, "a applied", l.wantState("a", status.StateApplied, ""))
	if got, want := j.list(), []string{"netfilter set a", "ipvs set a"}; !slices.Equal(got, want) {
		t.Fatalf("order %v, want %v (the filter before exposure)", got, want)
	}

	// A filter that cannot be installed keeps the service unexposed.
	nf.setFail("b", errors.New("no such iptables extension"))
	src.put("b", def(2, restricted, "10.200.0.2"))
	eventually(t, "b failed", l.wantState("b", status.StateFailed, "netfilter: no such iptables extension"))
	time.Sleep(100 * time.Millisecond) // a few retries go by
	if _, ok := ipvs.holds("b"); ok {
		t.Fatal("b was exposed without its filter")
	}
	nf.setFail("b", nil)
	eventually(t, "b exposed once filtered", holds(ipvs, "b", true))

	// Removal: exposure withdrawn before the filter.
	n := len(j.list())
	src.del("a")
	eventually(t, "a gone", holds(nf, "a", false))
	if got, want := j.list()[n:], []string{"ipvs drop a", "netfilter drop a"}; !slices.Equal(got, want) {
		t.Fatalf("removal order %v, want %v", got, want)
	}
}

func TestFirstPassFailsClosedWithoutFilter(t *testing.T) {
	src := newFakeSource()
	src.put("a", def(1, `"allow_cidrs":["198.51.100.0/24"],`, "10.200.0.1"))
	nf := newFakeDriver("netfilter", render.PartNetfilter, nil)
	ipvs := newFakeDriver("ipvs", render.PartIPVS, nil)
	ipvs.held["a"] = "left by the last run"
	nf.setFail("a", errors.New("iptables is missing"))
	l := startLoop(t, src, []Plane{ipvsPlane(ipvs), {Driver: nf, Part: render.PartNetfilter, Guard: true}}, testOptions())
	eventually(t, "a failed", l.wantState("a", status.StateFailed, "iptables is missing"))
	eventually(t, "a withdrawn while unfiltered", holds(ipvs, "a", false))
}

func TestRestartWritesNothing(t *testing.T) {
	src := newFakeSource()
	for i := range 10 {
		src.put(fmt.Sprintf("s%d", i), def(i, "", "10.200.0.1"))
	}
	d := newFakeDriver("ipvs", render.PartIPVS, nil)
	l := startLoop(t, src, []Plane{ipvsPlane(d)}, testOptions())
	eventually(t, "applied", l.wantState("s9", status.StateApplied, ""))
	l.stop()
	d.reset()
	// The new agent's checker starts with every backend pending: its
	// first round decides before anything is programmed.
	h := newFakeHealth()
	h.firstRound = true
	l2 := startLoopWith(t, src, []Plane{ipvsPlane(d)}, testOptions(), h)
	eventually(t, "applied again", l2.wantState("s9", status.StateApplied, ""))
	if applies, syncs, writes, _ := d.counts(); applies != 0 || syncs != 1 || writes != 0 {
		t.Fatalf("restart: %d applies, %d syncs, %d writes; want one sync writing nothing", applies, syncs, writes)
	}
}

func TestLastGoodSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	log := slog.New(slog.DiscardHandler)
	src := newFakeSource()
	src.put("web", def(1, "", "10.200.0.1", "10.200.0.2"))
	d := newFakeDriver("ipvs", render.PartIPVS, nil)
	lg, restored, err := OpenLastGood(dir, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = lg.Run(ctx) }()
	opts := testOptions()
	opts.LastGood, opts.Restored = lg, restored
	l := startLoop(t, src, []Plane{ipvsPlane(d)}, opts)
	eventually(t, "applied", l.wantState("web", status.StateApplied, ""))
	<-lg.Flushed()
	l.stop()

	// While the agent is down, someone writes a bad version.
	src.put("web", `{"vip":"192.0.2.10","port":70000}`)
	lg2, restored2, err := OpenLastGood(dir, log)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := restored2["web"]; !ok {
		t.Fatalf("no last good version on disk: %v", restored2)
	}
	d.reset()
	opts.LastGood, opts.Restored = lg2, restored2
	l2 := startLoop(t, src, []Plane{ipvsPlane(d)}, opts)
	eventually(t, "rejected, last good in force", l2.wantState("web", status.StateRejected, "the last good version (revision 1) stays in force"))
	if _, syncs, writes, _ := d.counts(); syncs != 1 || writes != 0 {
		t.Fatalf("restart with a bad version: %d syncs, %d writes; want the last good version kept with no write", syncs, writes)
	}
	if _, ok := d.holds("web"); !ok {
		t.Fatal("the service was torn down")
	}
}

func TestRequiredPartWithoutDriverFails(t *testing.T) {
	src := newFakeSource()
	src.put("a", def(1, "", "10.200.0.1"))
	hap := newFakeDriver("haproxy", render.PartHAProxy, nil)
	l := startLoop(t, src, []Plane{{Driver: hap, Part: render.PartHAProxy}}, testOptions())
	eventually(t, "a failed", l.wantState("a", status.StateFailed, "no ipvs driver runs on this agent"))
}

func TestDrainEndsWithConnections(t *testing.T) {
	src := newFakeSource()
	withDrain := func(b ...string) string {
		return strings.Replace(def(1, "", b...), `"drain":"0s"`, `"drain":"1h"`, 1)
	}
	src.put("web", withDrain("10.200.0.1", "10.200.0.2"))
	d := newFakeDriver("ipvs", render.PartIPVS, nil)
	ref := render.BackendRef{Service: "web", Addr: netip.MustParseAddrPort("10.200.0.2:80")}
	d.conns[ref] = 2
	l := startLoop(t, src, []Plane{ipvsPlane(d)}, testOptions())
	eventually(t, "applied", l.wantState("web", status.StateApplied, ""))
	dests := func() string {
		p, _ := d.holds("web")
		l4, _ := p.(render.L4Service)
		var out []string
		for _, x := range l4.Destinations {
			out = append(out, fmt.Sprintf("%s/%d", x.Address, x.Weight))
		}
		return strings.Join(out, ",")
	}
	src.put("web", withDrain("10.200.0.1"))
	eventually(t, "draining at weight 0", func() string {
		if got := dests(); got != "10.200.0.1/1,10.200.0.2/0" {
			return got
		}
		return ""
	})
	d.mu.Lock()
	d.conns[ref] = 0
	d.mu.Unlock()
	eventually(t, "deleted once idle", func() string {
		if got := dests(); got != "10.200.0.1/1" {
			return got
		}
		return ""
	})
}

func TestOddKeyNamesAreRefusedNotIgnored(t *testing.T) {
	src := newFakeSource()
	src.put("a/b", def(1, "", "10.200.0.1"))
	src.put("../x", def(2, "", "10.200.0.2"))
	d := newFakeDriver("ipvs", render.PartIPVS, nil)
	l := startLoop(t, src, []Plane{ipvsPlane(d)}, testOptions())
	eventually(t, "a/b refused", l.wantState("a/b", status.StateRejected, `name: "a/b" is not a DNS label`))
	eventually(t, "../x refused", l.wantState("../x", status.StateRejected, `name: "../x" is not a DNS label`))
	if _, ok := d.holds("a/b"); ok {
		t.Fatal("a/b was programmed")
	}
}

type groupRecorder struct {
	mu   sync.Mutex
	last []string
	n    int
}

func (g *groupRecorder) SetGroups(groups []string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.last, g.n = groups, g.n+1
}

func (g *groupRecorder) get() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.last
}

func TestGroupsFollowServicesInForce(t *testing.T) {
	src := newFakeSource()
	src.put("a", def(1, `"ha_group":"edge",`, "10.200.0.1"))
	src.put("b", def(2, "", "10.200.0.2"))
	g := &groupRecorder{}
	opts := testOptions()
	opts.Groups = g
	d := newFakeDriver("ipvs", render.PartIPVS, nil)
	l := startLoop(t, src, []Plane{ipvsPlane(d)}, opts)
	want := func(groups ...string) func() string {
		return func() string {
			if got := g.get(); !slices.Equal(got, groups) {
				return fmt.Sprintf("groups %v, want %v", got, groups)
			}
			return ""
		}
	}
	eventually(t, "both groups", want("default", "edge"))
	src.put("b", def(2, `"ha_group":"edge",`, "10.200.0.2"))
	eventually(t, "default gone", want("edge"))
	src.put("a", `{"vip":"bad"}`) // rejected: its last good version stays, in edge
	eventually(t, "a rejected", l.wantState("a", status.StateRejected, "vip"))
	src.del("a")
	src.del("b")
	eventually(t, "no group", want())
}
