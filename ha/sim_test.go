package ha

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/internal/clock"
)

// sim runs several agents' state machines against the fake etcd on a fake
// clock, with a network between them that tests can cut. Every etcd call
// is applied when the machine asks for it and answered after a latency;
// a cut-off call fails after the call timeout (Hold), as a hung RPC does.
// After every step it checks that no two live agents hold one group.
type sim struct {
	t      *testing.T
	clk    *clock.Fake
	etcd   *fakeEtcd
	timing Timing
	ttl    time.Duration
	groups []string

	agents map[string]*simAgent
	order  []string
	queue  []simEvent
	seq    int
	cut    map[string]bool // peer links, "a|b" with a < b
	// slow adds to the latency of one agent's etcd calls (a loaded host),
	// slowNext to the latency of its next read only.
	slow, slowNext map[string]time.Duration

	step, latency, netDelay time.Duration

	violations []string
	// spans are every agent's hold spans per group, for overlap checks.
	spans map[string][]span
}

type span struct {
	node       string
	start, end time.Time // end zero: still held
}

type simAgent struct {
	name, addr string
	m          *machine
	st         *fakeClient
	alive      bool
	held       map[string]bool
	// log records holds, drops and releases in order, with times.
	log        []simLog
	releasedAt time.Time
}

type simLog struct {
	at    time.Time
	what  string // hold, drop, released
	group string
}

type simEvent struct {
	at  time.Time
	seq int
	to  string
	ev  any
}

func newSim(t *testing.T, groups ...string) *sim {
	t.Helper()
	clk := clock.NewFake()
	return &sim{t: t, clk: clk, etcd: newFakeEtcd(clk.Now), timing: DefaultTiming(), ttl: DefaultLeaseTTL, groups: groups,
		agents: map[string]*simAgent{}, cut: map[string]bool{}, slow: map[string]time.Duration{}, slowNext: map[string]time.Duration{}, spans: map[string][]span{},
		step: time.Millisecond, latency: 2 * time.Millisecond, netDelay: time.Millisecond}
}

func (s *sim) now() time.Time { return s.clk.Now() }

func simLogger() *slog.Logger {
	if os.Getenv("HA_SIM_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// add starts an agent.
func (s *sim) add(name string) *simAgent { return s.addWith(name, s.timing) }

// addWith starts an agent with timing of its own.
func (s *sim) addWith(name string, timing Timing) *simAgent {
	a := &simAgent{name: name, addr: fmt.Sprintf("192.0.2.%d:7947", len(s.order)+1), st: s.etcd.client(name), alive: true, held: map[string]bool{}}
	cfg := config{node: name, prefix: "/switchman", addr: a.addr, ttl: s.ttl, t: timing, inc: uint64(len(s.order) + 1)}
	a.m = newMachine(cfg, simLogger().With("node", name), s.now())
	s.agents[name] = a
	s.order = append(s.order, name)
	s.handle(a, evGroups{groups: s.groups})
	return a
}

func linkKey(a, b string) string {
	if a > b {
		a, b = b, a
	}
	return a + "|" + b
}

// cutLink cuts (or heals) the heartbeat path between two agents.
func (s *sim) cutLink(a, b string, cut bool) { s.cut[linkKey(a, b)] = cut }

// isolate cuts an agent from etcd and from every peer.
func (s *sim) isolate(name string) {
	s.etcd.setCut(name, true)
	for _, o := range s.order {
		if o != name {
			s.cutLink(name, o, true)
		}
	}
}

// kill ends an agent as a dead host does: nothing more from it, and its
// addresses are gone with it.
func (s *sim) kill(name string) {
	a := s.agents[name]
	a.alive = false
	for g, h := range a.held {
		if h {
			s.closeSpan(g, name)
		}
	}
}

func (s *sim) closeSpan(group, node string) {
	sp := s.spans[group]
	for i := range sp {
		if sp[i].node == node && sp[i].end.IsZero() {
			sp[i].end = s.now()
		}
	}
}

func (s *sim) post(at time.Time, to string, ev any) {
	s.seq++
	s.queue = append(s.queue, simEvent{at: at, seq: s.seq, to: to, ev: ev})
}

func (s *sim) handle(a *simAgent, ev any) {
	if !a.alive {
		return
	}
	for _, eff := range a.m.handle(s.now(), ev) {
		s.exec(a, eff)
	}
}

// call runs one etcd call for a and answers it after the latency, or
// after the call timeout when a cannot reach etcd.
func (s *sim) call(a *simAgent, f func(ctx context.Context) (any, error)) {
	ev, err := f(context.Background())
	at := s.now().Add(s.latency + s.slow[a.name])
	if errors.Is(err, errUnreachable) {
		at = s.now().Add(s.timing.Hold)
	}
	s.post(at, a.name, ev)
}

func (s *sim) exec(a *simAgent, eff any) {
	now := s.now()
	switch f := eff.(type) {
	case effHold:
		if f.held == a.held[f.group] {
			return
		}
		a.held[f.group] = f.held
		if f.held {
			a.log = append(a.log, simLog{at: now, what: "hold", group: f.group})
			s.spans[f.group] = append(s.spans[f.group], span{node: a.name, start: now})
		} else {
			a.log = append(a.log, simLog{at: now, what: "drop", group: f.group})
			s.closeSpan(f.group, a.name)
		}
	case effSend:
		for _, addr := range f.addrs {
			for _, name := range s.order {
				b := s.agents[name]
				if b.addr == addr && b.alive && !s.cut[linkKey(a.name, b.name)] {
					s.post(now.Add(s.netDelay), b.name, evPacket{from: a.addr, data: f.data})
				}
			}
		}
	case effOwner, effClaim:
	case effReleased:
		a.releasedAt = now
		a.log = append(a.log, simLog{at: now, what: "released"})
	case effRead:
		extra := s.slowNext[a.name]
		delete(s.slowNext, a.name)
		s.slow[a.name] += extra
		defer func() { s.slow[a.name] -= extra }()
		s.call(a, func(ctx context.Context) (any, error) {
			ev := evRead{sent: f.sent, renew: f.renew}
			if f.renew != 0 {
				ev.renewErr = a.st.KeepAliveOnce(ctx, f.renew)
			}
			ev.rev, ev.kvs, ev.err = a.st.Read(ctx, f.prefixes...)
			return ev, ev.err
		})
	case effGrant:
		s.call(a, func(ctx context.Context) (any, error) {
			id, err := a.st.Grant(ctx, f.ttl)
			return evGrant{sent: f.sent, lease: id, err: err}, err
		})
	case effPut:
		s.call(a, func(ctx context.Context) (any, error) {
			err := a.st.Put(ctx, f.key, f.value, f.lease)
			return evPut{lease: f.lease, err: err}, err
		})
	case effCond:
		s.call(a, func(ctx context.Context) (any, error) {
			ev := evCond{group: f.group, kind: f.kind, sent: f.sent, lease: f.lease}
			switch f.kind {
			case "create":
				ev.ok, ev.kv, ev.err = a.st.Create(ctx, f.key, f.value, f.lease)
			case "replace":
				ev.ok, ev.kv, ev.err = a.st.Replace(ctx, f.key, f.modRev, f.value, f.lease)
			default:
				ev.ok, ev.kv, ev.err = a.st.Touch(ctx, f.key, f.value, f.lease)
			}
			return ev, ev.err
		})
	case effDelete:
		s.call(a, func(ctx context.Context) (any, error) {
			ev := evDelete{group: f.group, lease: f.lease, epoch: f.epoch}
			ev.ok, ev.rev, ev.err = a.st.Delete(ctx, f.key, f.lease)
			return ev, ev.err
		})
	case effLease:
		s.call(a, func(ctx context.Context) (any, error) {
			alive, err := a.st.LeaseAlive(ctx, f.lease)
			return evLease{group: f.group, lease: f.lease, alive: alive, err: err}, err
		})
	case effRevoke:
		s.call(a, func(ctx context.Context) (any, error) {
			return evRevoked{}, a.st.Revoke(ctx, f.lease)
		})
	default:
		s.t.Fatalf("unknown effect %T", eff)
	}
}

// tick advances the clock one step, delivers what is due and lets every
// agent evaluate, then checks that no group has two holders.
func (s *sim) tick() {
	s.clk.Advance(s.step)
	s.etcd.expire()
	now := s.now()
	for {
		sort.SliceStable(s.queue, func(i, j int) bool {
			if !s.queue[i].at.Equal(s.queue[j].at) {
				return s.queue[i].at.Before(s.queue[j].at)
			}
			return s.queue[i].seq < s.queue[j].seq
		})
		if len(s.queue) == 0 || s.queue[0].at.After(now) {
			break
		}
		e := s.queue[0]
		s.queue = s.queue[1:]
		s.handle(s.agents[e.to], e.ev)
	}
	for _, name := range s.order {
		s.handle(s.agents[name], evTick{})
	}
	s.check()
}

func (s *sim) check() {
	groups := map[string][]string{}
	for _, name := range s.order {
		a := s.agents[name]
		if !a.alive {
			continue
		}
		for g, h := range a.held {
			if h {
				groups[g] = append(groups[g], name)
			}
		}
	}
	for g, hs := range groups {
		if len(hs) > 1 && len(s.violations) < 10 {
			s.violations = append(s.violations, fmt.Sprintf("%v: group %s held by %v", s.now().Sub(time.Unix(1_000_000, 0)), g, hs))
		}
	}
}

// run advances the simulation by d.
func (s *sim) run(d time.Duration) {
	for end := s.now().Add(d); s.now().Before(end); {
		s.tick()
	}
}

// until advances until cond holds and returns how long that took; it
// fails the test after limit.
func (s *sim) until(limit time.Duration, what string, cond func() bool) time.Duration {
	s.t.Helper()
	start := s.now()
	for !cond() {
		if s.now().Sub(start) > limit {
			s.t.Fatalf("%s: not within %v (holders %v)", what, limit, s.holders())
		}
		s.tick()
	}
	return s.now().Sub(start)
}

// holders returns, per group, the live agents holding it.
func (s *sim) holders() map[string][]string {
	out := map[string][]string{}
	for _, name := range s.order {
		a := s.agents[name]
		for g, h := range a.held {
			if h && a.alive {
				out[g] = append(out[g], name)
			}
		}
	}
	return out
}

// holder returns the one live holder of group, or "".
func (s *sim) holder(group string) string {
	if h := s.holders()[group]; len(h) == 1 {
		return h[0]
	}
	return ""
}

// settle starts the named agents together and waits until each group has
// one holder.
func (s *sim) settle(names ...string) {
	s.t.Helper()
	for _, n := range names {
		s.add(n)
	}
	s.until(5*time.Second, "every group held", func() bool {
		for _, g := range s.groups {
			if s.holder(g) == "" {
				return false
			}
		}
		return true
	})
}

// safe fails the test if two live agents ever held one group at once, and
// checks the recorded spans the same way: a span starts no earlier than
// the one before it ended.
func (s *sim) safe() {
	s.t.Helper()
	if len(s.violations) > 0 {
		s.t.Fatalf("two holders: %v", s.violations)
	}
	for g, sp := range s.spans {
		for i := range sp {
			for j := range sp {
				if i == j || sp[i].node == sp[j].node {
					continue
				}
				ei := sp[i].end
				if ei.IsZero() {
					ei = s.now().Add(time.Hour)
				}
				if sp[j].start.Before(ei) && !sp[j].start.Before(sp[i].start) {
					s.t.Fatalf("group %s: %s held from %v while %s held %v-%v", g, sp[j].node, sp[j].start, sp[i].node, sp[i].start, sp[i].end)
				}
			}
		}
	}
}

// lastEvent returns the time of a's last log entry of what for group.
func (a *simAgent) lastEvent(what, group string) time.Time {
	for i := len(a.log) - 1; i >= 0; i-- {
		if a.log[i].what == what && a.log[i].group == group {
			return a.log[i].at
		}
	}
	return time.Time{}
}
