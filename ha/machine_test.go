package ha

import (
	"fmt"
	"testing"
	"time"
)

func TestSimOneOwner(t *testing.T) {
	for _, offset := range []time.Duration{0, 7 * time.Millisecond, 50 * time.Millisecond, 400 * time.Millisecond} {
		t.Run(offset.String(), func(t *testing.T) {
			s := newSim(t, "web")
			for _, n := range []string{"lb1", "lb2", "lb3"} {
				s.add(n)
				s.run(offset)
			}
			s.until(5*time.Second, "one holder", func() bool { return s.holder("web") != "" })
			s.run(3 * time.Second)
			s.safe()
			h := s.holder("web")
			kv, ok := s.etcd.get("/switchman/owners/web")
			if !ok || parseOwner(&kv).node != h {
				t.Fatalf("holder %q, owner key %s", h, kv.Value)
			}
		})
	}
}

// ownerOf returns the owner key of group as etcd holds it.
func (s *sim) ownerOf(group string) *owner {
	kv, ok := s.etcd.get("/switchman/owners/" + group)
	if !ok {
		return nil
	}
	return parseOwner(&kv)
}

// TestSimRenewalFails: the owner's lease renewals fail while its reads
// still work (etcd drops renewals, a known server fault). It must drop
// before the lease can run out on the etcd side, measured on the fake
// clock, and the standby takes over only after that.
func TestSimRenewalFails(t *testing.T) {
	s := newSim(t, "web")
	s.settle("lb1", "lb2")
	old := s.holder("web")
	a := s.agents[old]
	lease := a.m.lease
	s.etcd.failRenew(old, true)
	s.until(10*time.Second, "lease expired", func() bool { _, ok := s.etcd.expired[lease]; return ok })
	expired := s.etcd.expired[lease]
	drop := a.lastEvent("drop", "web")
	if drop.IsZero() || !drop.Before(expired.Add(-s.timing.Margin+s.step)) {
		t.Fatalf("dropped at %v, lease expired at %v: not a margin before", drop, expired)
	}
	s.until(3*time.Second, "someone holds", func() bool { return s.holder("web") != "" })
	s.safe()
}

// TestSimOwnerIsolated: the owner loses etcd but still hears its peer,
// which has etcd: it drops Hold after its last confirmed read, and the
// peer takes over after that, well before the lease could run out.
func TestSimOwnerIsolated(t *testing.T) {
	for _, peersToo := range []bool{false, true} {
		t.Run(map[bool]string{false: "etcd only", true: "etcd and peers"}[peersToo], func(t *testing.T) {
			s := newSim(t, "web")
			s.settle("lb1", "lb2")
			old := s.holder("web")
			a := s.agents[old]
			cutAt := s.now()
			if peersToo {
				s.isolate(old)
			} else {
				s.etcd.setCut(old, true)
			}
			s.until(time.Second, "old owner drops", func() bool { return !a.held["web"] })
			if late := a.lastEvent("drop", "web").Sub(a.m.groups["web"].confirmed); late > s.timing.Hold+s.step {
				t.Fatalf("dropped %v after the last confirmed read was sent; hold is %v", late, s.timing.Hold)
			}
			took := s.until(3*time.Second, "a new holder", func() bool { h := s.holder("web"); return h != "" && h != old })
			s.safe()
			if total := s.now().Sub(cutAt); total >= s.ttl {
				t.Fatalf("takeover took %v, not within the lease TTL %v", total, s.ttl)
			}
			t.Logf("new holder after %v", s.now().Sub(cutAt)-0*took)
		})
	}
}

// TestSimSteadyWrites: in steady state agents only read; the owner key is
// not rewritten (touches happen only while a peer cannot be heard).
func TestSimSteadyWrites(t *testing.T) {
	s := newSim(t, "web")
	s.settle("lb1", "lb2", "lb3")
	s.run(2 * time.Second)
	n := len(s.etcd.writes)
	s.run(5 * time.Second)
	if w := s.etcd.writes[n:]; len(w) > 0 {
		t.Fatalf("%d writes in 5s of steady state, first %+v", len(w), w[0])
	}
	s.safe()
}

// TestSimStandbyIsolated: a standby without etcd claims nothing and the
// owner keeps its group.
func TestSimStandbyIsolated(t *testing.T) {
	s := newSim(t, "web")
	s.settle("lb1", "lb2")
	owner := s.holder("web")
	standby := "lb1"
	if owner == "lb1" {
		standby = "lb2"
	}
	s.isolate(standby)
	s.run(5 * time.Second)
	if s.holder("web") != owner || s.ownerOf("web").node != owner {
		t.Fatalf("owner moved from %s: holder %q", owner, s.holder("web"))
	}
	s.safe()
}

// TestSimEtcdDownForAll: etcd goes away for everyone: the owner keeps its
// addresses the whole time, nobody claims, and nothing moves once etcd is
// back.
func TestSimEtcdDownForAll(t *testing.T) {
	s := newSim(t, "web", "db")
	s.settle("lb1", "lb2", "lb3")
	before := map[string]string{"web": s.holder("web"), "db": s.holder("db")}
	epoch := map[string]int64{"web": s.ownerOf("web").epoch, "db": s.ownerOf("db").epoch}
	s.etcd.setDown(true)
	for i := 0; i < 10000; i++ {
		s.tick()
		for g, h := range before {
			if s.holder(g) != h {
				t.Fatalf("%v after etcd went down: %s held by %v, want %s", time.Duration(i)*s.step, g, s.holders()[g], h)
			}
		}
	}
	s.etcd.setDown(false)
	for i := 0; i < 5000; i++ {
		s.tick()
		for g, h := range before {
			if s.holder(g) != h {
				t.Fatalf("%v after etcd came back: %s held by %v, want %s", time.Duration(i)*s.step, g, s.holders()[g], h)
			}
		}
	}
	for g := range before {
		if o := s.ownerOf(g); o == nil || o.node != before[g] || o.epoch != epoch[g] {
			t.Fatalf("%s: owner key %+v, want %s epoch %d", g, o, before[g], epoch[g])
		}
	}
	s.safe()
}

// TestSimAloneWithoutEtcd: etcd is gone and no peer can be heard: the
// owner must assume it is the one cut off and drops at its deadline.
func TestSimAloneWithoutEtcd(t *testing.T) {
	s := newSim(t, "web")
	s.settle("lb1", "lb2")
	owner := s.holder("web")
	s.etcd.setDown(true)
	s.cutLink("lb1", "lb2", true)
	s.until(time.Second, "owner drops", func() bool { return !s.agents[owner].held["web"] })
	s.run(3 * time.Second)
	if h := s.holders()["web"]; len(h) != 0 {
		t.Fatalf("held by %v with etcd down", h)
	}
	s.safe()
}

// TestSimKilled: the owner's host dies; a standby holds well within the
// lease TTL, through the heartbeats' fast path.
func TestSimKilled(t *testing.T) {
	s := newSim(t, "web")
	s.settle("lb1", "lb2", "lb3")
	old := s.holder("web")
	s.kill(old)
	took := s.until(s.ttl, "a new holder", func() bool { return s.holder("web") != "" })
	if limit := s.timing.Silence + s.timing.Hold + s.timing.Margin + 3*s.timing.Stagger; took > limit {
		t.Fatalf("takeover took %v, want at most %v", took, limit)
	}
	t.Logf("takeover after %v", took)
	s.safe()
}

// TestSimKeyDeleted: an operator deletes the owner key. The owner drops at
// its next read; whoever claims next holds only after that.
func TestSimKeyDeleted(t *testing.T) {
	s := newSim(t, "web")
	s.settle("lb1", "lb2")
	old := s.holder("web")
	if !s.etcd.adminDelete("/switchman/owners/web") {
		t.Fatal("no owner key")
	}
	at := s.now()
	s.until(time.Second, "old owner drops or reclaims", func() bool { return s.ownerOf("web") != nil })
	s.until(2*time.Second, "a holder", func() bool { return s.holder("web") != "" })
	s.run(2 * time.Second)
	s.safe()
	if d := s.agents[old].lastEvent("drop", "web"); !d.IsZero() && d.Sub(at) > s.timing.Round+s.timing.Hold {
		t.Fatalf("old owner dropped %v after the key was deleted", d.Sub(at))
	}
}

// TestSimRace: two agents that cannot hear each other both see the group
// free and claim in the same instant: etcd lets exactly one win.
func TestSimRace(t *testing.T) {
	s := newSim(t, "web")
	s.cutLink("lb1", "lb2", true)
	s.add("lb1")
	s.add("lb2")
	s.until(3*time.Second, "one holder", func() bool { return s.holder("web") != "" })
	s.run(2 * time.Second)
	creates := 0
	for _, w := range s.etcd.writes {
		if w.op == "create" && w.key == "/switchman/owners/web" {
			creates++
		}
	}
	if creates != 1 {
		t.Fatalf("%d successful claims, want 1", creates)
	}
	if h := s.holders()["web"]; len(h) != 1 {
		t.Fatalf("holders %v", h)
	}
	s.safe()
}

// TestSimRelease: on SIGTERM the owner deletes its key first, then drops
// the addresses, and the standby holds at once.
func TestSimRelease(t *testing.T) {
	s := newSim(t, "web")
	s.settle("lb1", "lb2")
	old := s.holder("web")
	a := s.agents[old]
	lease := a.m.lease
	s.handle(a, evRelease{})
	start := s.now()
	took := s.until(time.Second, "the standby holds", func() bool { h := s.holder("web"); return h != "" && h != old })
	var deleted time.Time
	for _, w := range s.etcd.writes {
		if w.client == old && w.op == "delete" && w.key == "/switchman/owners/web" {
			deleted = w.at
		}
	}
	dropped := a.lastEvent("drop", "web")
	if deleted.IsZero() || dropped.Before(deleted) {
		t.Fatalf("key deleted at %v, addresses dropped at %v: want the key first", deleted, dropped)
	}
	if took > 100*time.Millisecond {
		t.Fatalf("hand-over took %v", took)
	}
	s.until(time.Second, "release done", func() bool { return !a.releasedAt.IsZero() })
	if _, ok := s.etcd.revoked[lease]; !ok {
		t.Fatalf("lease %x not revoked", lease)
	}
	t.Logf("planned hand-over in %v (from %v)", took, start)
	s.safe()
}

// TestSimCatchesOverlap is the control for every other test here: with an
// owner whose hold deadline is longer than what the others wait out (a
// misconfiguration), the simulation does see two holders.
func TestSimCatchesOverlap(t *testing.T) {
	s := newSim(t, "web")
	slow := s.timing
	slow.Hold = 1200 * time.Millisecond
	s.addWith("lb1", slow)
	s.until(3*time.Second, "lb1 holds", func() bool { return s.holder("web") == "lb1" })
	s.add("lb2")
	s.run(2 * time.Second)
	s.isolate("lb1")
	s.run(3 * time.Second)
	if len(s.violations) == 0 {
		t.Fatal("no overlap seen with an owner holding 1.2s against a 0.5s wait")
	}
}

// TestSimNoPreemptByDefault: a more preferred agent that comes back does
// not take the group from its owner unless preempt is set.
func TestSimPreemption(t *testing.T) {
	for _, preempt := range []bool{false, true} {
		t.Run(map[bool]string{false: "default", true: "preempt"}[preempt], func(t *testing.T) {
			s := newSim(t, "web")
			s.etcd.adminPut("/switchman/groups/web", fmt.Sprintf(`{"nodes":["lb2","lb1"],"preempt":%v}`, preempt))
			s.settle("lb1")
			s.run(time.Second)
			s.add("lb2")
			s.run(5 * time.Second)
			want := "lb1"
			if preempt {
				want = "lb2"
			}
			if h := s.holder("web"); h != want {
				t.Fatalf("holder %q, want %s", h, want)
			}
			s.safe()
		})
	}
}

// TestSimNodesList: an agent outside the group's nodes never owns it, and
// hands it over when the list changes to leave it out.
func TestSimNodesList(t *testing.T) {
	s := newSim(t, "web")
	s.settle("lb1", "lb2")
	owner := s.holder("web")
	other := map[string]string{"lb1": "lb2", "lb2": "lb1"}[owner]
	s.etcd.adminPut("/switchman/groups/web", fmt.Sprintf(`{"nodes":[%q]}`, other))
	s.until(3*time.Second, "hand-over to the listed node", func() bool { return s.holder("web") == other })
	s.run(2 * time.Second)
	s.safe()
	if h := s.holder("web"); h != other {
		t.Fatalf("holder %q, want %s", h, other)
	}
}

// TestSimSpread: agents that start together spread groups by rendezvous
// hashing, each group going to its first-ranked agent.
func TestSimSpread(t *testing.T) {
	var groups []string
	for i := range 12 {
		groups = append(groups, fmt.Sprintf("g%d", i))
	}
	s := newSim(t, groups...)
	s.settle("lb1", "lb2", "lb3")
	s.run(time.Second)
	count := map[string]int{}
	for _, g := range groups {
		h := s.holder(g)
		count[h]++
		best := ""
		for _, n := range []string{"lb1", "lb2", "lb3"} {
			if best == "" || rendezvous(g, n) > rendezvous(g, best) {
				best = n
			}
		}
		if h != best {
			t.Errorf("%s held by %s, rendezvous prefers %s", g, h, best)
		}
	}
	for _, n := range []string{"lb1", "lb2", "lb3"} {
		if count[n] == 0 {
			t.Errorf("%s holds no group: %v", n, count)
		}
	}
	t.Logf("groups per agent: %v", count)
	s.safe()
}

// TestSimPeerPartition: the agents cannot hear each other but both reach
// etcd: the owner keeps its group (its key rewrites show etcd it is
// alive), with no takeover back and forth.
func TestSimPeerPartition(t *testing.T) {
	s := newSim(t, "web", "db")
	s.settle("lb1", "lb2")
	before := map[string]string{"web": s.holder("web"), "db": s.holder("db")}
	s.cutLink("lb1", "lb2", true)
	s.run(10 * time.Second)
	for g, h := range before {
		if s.holder(g) != h {
			t.Fatalf("%s moved from %s to %q during a peer partition", g, h, s.holder(g))
		}
	}
	s.cutLink("lb1", "lb2", false)
	s.run(2 * time.Second)
	s.safe()
}

// TestSimFastPathAfterIsolation: the owner is cut off from etcd and peers
// and stays alive: the standby takes over through the fast path, and its
// hold starts no earlier than the old owner's ended, on the fake clock.
func TestSimFastPathAfterIsolation(t *testing.T) {
	s := newSim(t, "web")
	s.settle("lb1", "lb2", "lb3")
	old := s.holder("web")
	s.isolate(old)
	at := s.now()
	s.until(s.ttl, "a new holder", func() bool { h := s.holder("web"); return h != "" && h != old })
	dropped := s.agents[old].lastEvent("drop", "web")
	newHolder := s.holder("web")
	held := s.agents[newHolder].lastEvent("hold", "web")
	if held.Before(dropped) {
		t.Fatalf("%s held at %v before %s dropped at %v", newHolder, held, old, dropped)
	}
	t.Logf("old owner dropped %v after the cut; new owner held %v after (gap %v)", dropped.Sub(at), held.Sub(at), held.Sub(dropped))
	s.safe()
}

// settledPair starts lb1 and lb2 with one group, web, and lets them run
// past every start-up wait; it returns the owner and the standby.
func settledPair(t *testing.T) (s *sim, owner, standby string) {
	t.Helper()
	s = newSim(t, "web")
	s.settle("lb1", "lb2")
	s.run(3 * time.Second)
	owner = s.holder("web")
	return s, owner, map[string]string{"lb1": "lb2", "lb2": "lb1"}[owner]
}

// lapse makes name's etcd calls slow for long enough that its contact
// lapses (it tells its peers it has no etcd), then fast again, and waits
// until it is in contact.
func (s *sim) lapse(name string) {
	s.t.Helper()
	a := s.agents[name]
	s.slow[name] = 3 * s.timing.Round
	s.until(time.Second, name+"'s contact lapses", func() bool { return !a.m.etcdOK(s.now()) })
	s.until(time.Second, name+" says it has no etcd", func() bool { return a.m.noEtcdSeq > 0 })
	delete(s.slow, name)
	s.until(time.Second, name+" in contact again", func() bool { return a.m.etcdOK(s.now()) })
}

// TestSimLapseThenKilled: a standby whose etcd reads were slow for a
// moment (a loaded host) told its peers it had no etcd. The owner, which
// had etcd all along, clears those reports, so when the owner's host dies
// soon after, the standby takes over through the fast path without
// waiting Regain after its lapse.
func TestSimLapseThenKilled(t *testing.T) {
	s, old, standby := settledPair(t)
	s.lapse(standby)
	sb := s.agents[standby]
	s.until(time.Second, "the owner clears the standby's reports", func() bool { return !sb.m.mayKeep(old) })
	sinceLapse := s.now().Sub(sb.m.since)
	s.kill(old)
	took := s.until(s.ttl, "a new holder", func() bool { return s.holder("web") != "" })
	if limit := s.timing.Silence + s.timing.Hold + s.timing.Margin + 3*s.timing.Stagger; took > limit {
		t.Fatalf("takeover took %v, want at most %v (the standby regained etcd %v before the kill)", took, limit, sinceLapse)
	}
	if sinceLapse+took >= s.timing.Regain {
		t.Fatalf("the standby regained etcd %v before the kill and held %v after it: not before Regain %v, the test shows nothing", sinceLapse, took, s.timing.Regain)
	}
	t.Logf("standby regained etcd %v before the kill; held %v after it", sinceLapse, took)
	s.safe()
}

// TestSimLapseThenRelease: a planned hand-over right after the standby's
// contact lapsed: the owner says it released the group and dropped its
// addresses, so the standby claims at once.
func TestSimLapseThenRelease(t *testing.T) {
	s, old, standby := settledPair(t)
	s.lapse(standby)
	if !s.agents[standby].m.mayKeep(old) {
		t.Fatal("the owner cleared the standby's reports already: the test would show nothing")
	}
	s.handle(s.agents[old], evRelease{})
	took := s.until(time.Second, "the standby holds", func() bool { return s.holder("web") == standby })
	if took > 100*time.Millisecond {
		t.Fatalf("hand-over took %v after the standby's lapse", took)
	}
	s.safe()
}

// TestSimKeepAfterLapse: etcd goes down for everyone and comes back for
// the standby only, while the two cannot hear each other any more. The
// owner keeps its addresses on the strength of the standby's last "no
// etcd" heartbeat, which it never cleared: the standby must wait Regain
// before it takes over, and never holds while the owner keeps.
func TestSimKeepAfterLapse(t *testing.T) {
	s, old, standby := settledPair(t)
	s.etcd.setDown(true)
	s.run(time.Second)
	if !s.agents[old].held["web"] {
		t.Fatal("the owner dropped while etcd was down for everyone")
	}
	s.etcd.setCut(old, true)
	s.cutLink(old, standby, true)
	s.etcd.setDown(false)
	back := s.now()
	s.until(5*time.Second, "the standby holds", func() bool { return s.agents[standby].held["web"] })
	s.safe()
	if took := s.now().Sub(back); took < s.timing.Regain-s.timing.Margin {
		t.Fatalf("the standby held %v after etcd came back, before the owner's keep could end", took)
	}
	if dropped := s.agents[old].lastEvent("drop", "web"); dropped.IsZero() || dropped.Sub(back) < s.timing.Hold {
		t.Fatalf("the owner dropped at %v, etcd came back at %v: it did not keep", dropped, back)
	}
	t.Logf("etcd back for the standby only: the owner dropped %v later, the standby held %v later",
		s.agents[old].lastEvent("drop", "web").Sub(back), s.agents[standby].lastEvent("hold", "web").Sub(back))
}

// TestSimOneSlowRead: one of the owner's reads takes most of the hold
// deadline to come back. The reads after it go out on time and confirm
// the key, so the owner keeps its addresses throughout.
func TestSimOneSlowRead(t *testing.T) {
	s, owner, _ := settledPair(t)
	a := s.agents[owner]
	s.slowNext[owner] = s.timing.Hold - s.timing.Round/2
	from := s.now()
	s.run(2 * time.Second)
	if d := a.lastEvent("drop", "web"); d.After(from) {
		t.Fatalf("the owner dropped %v after its slow read was sent", d.Sub(from))
	}
	if s.holder("web") != owner {
		t.Fatalf("holder %q, want %s", s.holder("web"), owner)
	}
	s.safe()
}

// TestSimRenewalLagsAfterOutage: etcd comes back for everyone after an
// outage, and the owner's reads work again before its renewals do. The
// owner keeps its group meanwhile (keep mode), and nothing moves.
func TestSimRenewalLagsAfterOutage(t *testing.T) {
	s, owner, _ := settledPair(t)
	s.etcd.setDown(true)
	s.run(4 * time.Second)
	s.etcd.failRenew(owner, true)
	s.etcd.setDown(false)
	s.run(time.Second)
	s.etcd.failRenew(owner, false)
	s.run(2 * time.Second)
	if d := s.agents[owner].lastEvent("drop", "web"); !d.IsZero() {
		t.Fatalf("the owner dropped at %v", d)
	}
	if h := s.holder("web"); h != owner {
		t.Fatalf("holder %q, want %s", h, owner)
	}
	s.safe()
}
