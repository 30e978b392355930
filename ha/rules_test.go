package ha

import (
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestHoldRule checks the hold rule on its own, case by case.
func TestHoldRule(t *testing.T) {
	tm := DefaultTiming()
	t0 := time.Unix(1_000_000, 0)
	ms := time.Millisecond
	cases := []struct {
		name      string
		confirmed time.Duration // relative to t0; -1: never
		renewed   time.Duration
		lastOK    time.Duration
		holdAt    time.Duration
		held      bool
		keep      bool // every peer says it has no etcd
		now       time.Duration
		want      bool
	}{
		{name: "just confirmed", confirmed: 0, now: 100 * ms, want: true},
		{name: "deadline from the send time", confirmed: 0, now: tm.Hold - ms, want: true},
		{name: "past the deadline", confirmed: 0, now: tm.Hold, want: false},
		{name: "never confirmed", confirmed: -1, now: 0, want: false},
		{name: "renewal too old", confirmed: 2900 * ms, renewed: 0, now: 3000 * ms, want: false},
		{name: "renewal recent enough", confirmed: 2800 * ms, renewed: 0, now: 2800*ms + 50*ms, want: true},
		{name: "waiting out a takeover", confirmed: 0, holdAt: 200 * ms, now: 100 * ms, want: false},
		{name: "keep mode keeps", confirmed: 0, lastOK: 0, held: true, keep: true, now: 5 * time.Second, want: true},
		{name: "keep mode never starts a hold", confirmed: 0, lastOK: 0, held: false, keep: true, now: 5 * time.Second, want: false},
		{name: "keep mode needs the group confirmed at the last contact", confirmed: 0, lastOK: 100 * ms, held: true, keep: true, now: 5 * time.Second, want: false},
		{name: "no keep without the peers", confirmed: 0, lastOK: 0, held: true, now: 5 * time.Second, want: false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := newMachine(config{node: "lb1", prefix: "/switchman", ttl: DefaultLeaseTTL, t: tm}, slog.New(slog.DiscardHandler), t0)
			m.members = map[string]string{"lb1": "192.0.2.1:1", "lb2": "192.0.2.2:1"}
			p := &peer{node: "lb2", addr: "192.0.2.2:1", known: t0}
			if tc.keep {
				p.noEtcd = t0.Add(tc.now - 10*ms)
			}
			m.peers["lb2"] = p
			m.renewedAt, m.lastOK = t0.Add(tc.renewed), t0.Add(tc.lastOK)
			g := &group{name: "web", held: tc.held, holdAt: t0.Add(tc.holdAt)}
			if tc.confirmed >= 0 {
				g.confirmed = t0.Add(tc.confirmed)
			}
			if got := m.mayHold(g, t0.Add(tc.now)); got != tc.want {
				t.Fatalf("mayHold = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestTimingCheck(t *testing.T) {
	ok := DefaultTiming()
	if err := ok.check(DefaultLeaseTTL); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		ttl  time.Duration
		edit func(*Timing)
		msg  string
	}{
		{name: "ttl below etcd's minimum", ttl: time.Second, msg: "minimum"},
		{name: "hold under two rounds", edit: func(t *Timing) { t.Hold = 150 * time.Millisecond }, msg: "two rounds"},
		{name: "hold too long for the ttl", edit: func(t *Timing) { t.Hold = 1400 * time.Millisecond }, msg: "half the lease TTL"},
		{name: "regain too short", edit: func(t *Timing) { t.Regain = 300 * time.Millisecond }, msg: "regain"},
		{name: "zero", edit: func(t *Timing) { t.Stagger = 0 }, msg: "stagger"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tm := DefaultTiming()
			if tc.edit != nil {
				tc.edit(&tm)
			}
			ttl := tc.ttl
			if ttl == 0 {
				ttl = DefaultLeaseTTL
			}
			err := tm.check(ttl)
			if err == nil || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("error %v, want one about %q", err, tc.msg)
			}
		})
	}
}

func TestDecodeHeartbeat(t *testing.T) {
	for _, tc := range []struct {
		in string
		ok bool
	}{
		{`{"v":1,"node":"lb1","inc":1,"seq":2,"etcd":true,"groups":{"web":"hold"}}`, true},
		{`{"v":2,"node":"lb1"}`, false},
		{`{"v":1}`, false},
		{`not json`, false},
	} {
		_, err := decodeHeartbeat([]byte(tc.in))
		if (err == nil) != tc.ok {
			t.Errorf("%s: error %v", tc.in, err)
		}
	}
}

// TestRendezvousSpread: rendezvous hashing gives every one of three nodes
// a fair share of many groups, and removing a node moves only its groups.
func TestRendezvousSpread(t *testing.T) {
	nodes := []string{"lb1", "lb2", "lb3"}
	best := func(g string, nodes []string) string {
		b := nodes[0]
		for _, n := range nodes[1:] {
			if rendezvous(g, n) > rendezvous(g, b) {
				b = n
			}
		}
		return b
	}
	count := map[string]int{}
	for i := range 300 {
		g := "g" + strings.Repeat("x", i%7) + string(rune('a'+i%26)) + time.Duration(i).String()
		b := best(g, nodes)
		count[b]++
		if b != "lb3" && best(g, nodes[:2]) != b {
			t.Fatalf("%s moved from %s when lb3 left", g, b)
		}
	}
	for _, n := range nodes {
		if count[n] < 70 {
			t.Fatalf("uneven spread: %v", count)
		}
	}
}

// TestKeepReports: which "no etcd" reports of a peer count for keep mode,
// which the agent clears in its heartbeats, and when a claimer must still
// fear that an owner keeps on the strength of its own reports.
func TestKeepReports(t *testing.T) {
	tm := DefaultTiming()
	t0 := time.Unix(1_000_000, 0)
	ms := time.Millisecond
	cases := []struct {
		name   string
		report time.Duration // when the peer's last report was heard; -1: never
		lastOK time.Duration // send time of this agent's last successful read
		// renewed: send time of its last successful renewal; -1: as lastOK
		renewed time.Duration
		now     time.Duration
		counts  bool
	}{
		{name: "heard after the last read", report: 100 * ms, lastOK: 50 * ms, renewed: -1, now: 300 * ms, counts: true},
		{name: "heard before the last read", report: 100 * ms, lastOK: 150 * ms, renewed: -1, now: 300 * ms},
		{name: "heard with the last read", report: 100 * ms, lastOK: 100 * ms, renewed: -1, now: 300 * ms},
		{name: "heard before the last read but after the last renewal", report: 100 * ms, lastOK: 150 * ms, renewed: 50 * ms, now: 300 * ms, counts: true},
		{name: "heard before the last renewal but after the last read", report: 100 * ms, lastOK: 50 * ms, renewed: 150 * ms, now: 300 * ms, counts: true},
		{name: "too old", report: 100 * ms, lastOK: 0, renewed: -1, now: 100*ms + tm.keepFor() + ms},
		{name: "never", report: -1, lastOK: 0, renewed: -1, now: 300 * ms},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := newMachine(config{node: "lb1", prefix: "/switchman", ttl: DefaultLeaseTTL, t: tm, inc: 1}, slog.New(slog.DiscardHandler), t0)
			m.members = map[string]string{"lb1": "192.0.2.1:1", "lb2": "192.0.2.2:1"}
			p := &peer{node: "lb2", addr: "192.0.2.2:1", known: t0, inc: 7, seq: 42}
			if tc.report >= 0 {
				p.noEtcd = t0.Add(tc.report)
			}
			m.peers["lb2"] = p
			m.lastOK, m.renewedAt = t0.Add(tc.lastOK), t0.Add(tc.lastOK)
			if tc.renewed >= 0 {
				m.renewedAt = t0.Add(tc.renewed)
			}
			now := t0.Add(tc.now)
			if got := m.counts(p, now); got != tc.counts {
				t.Fatalf("counts = %v, want %v", got, tc.counts)
			}
			if got := m.keepMode(now); got != tc.counts {
				t.Fatalf("keepMode = %v, want %v", got, tc.counts)
			}
			c, ok := m.cleared(now)["lb2"]
			if wantClear := tc.report >= 0 && !tc.counts; ok != wantClear || (ok && c != (seqNote{Inc: 7, Seq: 42})) {
				t.Fatalf("cleared lb2: %+v %v, want cleared %v up to inc 7 seq 42", c, ok, wantClear)
			}
		})
	}
}

// TestMayKeep: a claimer waits Regain after its lapse unless the owner
// cleared the last heartbeat in which it said it had no etcd.
func TestMayKeep(t *testing.T) {
	cases := []struct {
		name      string
		owner     string
		noEtcdSeq uint64
		cleared   uint64
		want      bool
	}{
		{name: "never said no etcd", owner: "lb2", noEtcdSeq: 0, want: false},
		{name: "not cleared", owner: "lb2", noEtcdSeq: 10, cleared: 0, want: true},
		{name: "cleared an earlier lapse only", owner: "lb2", noEtcdSeq: 10, cleared: 9, want: true},
		{name: "cleared", owner: "lb2", noEtcdSeq: 10, cleared: 10, want: false},
		{name: "cleared past it", owner: "lb2", noEtcdSeq: 10, cleared: 15, want: false},
		{name: "an unknown owner", owner: "lb3", noEtcdSeq: 10, cleared: 15, want: true},
		{name: "itself", owner: "lb1", noEtcdSeq: 10, want: false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := newMachine(config{node: "lb1", prefix: "/switchman", ttl: DefaultLeaseTTL, t: DefaultTiming(), inc: 1}, slog.New(slog.DiscardHandler), time.Unix(1_000_000, 0))
			m.peers["lb2"] = &peer{node: "lb2", cleared: tc.cleared}
			m.noEtcdSeq = tc.noEtcdSeq
			if got := m.mayKeep(tc.owner); got != tc.want {
				t.Fatalf("mayKeep(%s) = %v, want %v", tc.owner, got, tc.want)
			}
		})
	}
}
