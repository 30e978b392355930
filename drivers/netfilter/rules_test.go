package netfilter

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

func rulesOf(names ...string) []rule {
	var out []rule
	for _, n := range names {
		out = append(out, rule{"-s", n, "-j", "RETURN"})
	}
	return out
}

func TestDiffOrdered(t *testing.T) {
	tests := []struct {
		name      string
		current   []string
		desired   []string
		wantOps   int  // -1: any number
		noDeletes bool // every op is an insert or append
	}{
		{name: "empty to rules", current: nil, desired: []string{"a", "b", "DROP"}, wantOps: 3, noDeletes: true},
		{name: "same", current: []string{"a", "b", "DROP"}, desired: []string{"a", "b", "DROP"}, wantOps: 0},
		{name: "insert before drop", current: []string{"a", "DROP"}, desired: []string{"a", "b", "DROP"}, wantOps: 1, noDeletes: true},
		{name: "insert first", current: []string{"b", "DROP"}, desired: []string{"a", "b", "DROP"}, wantOps: 1, noDeletes: true},
		{name: "replace one", current: []string{"a", "b", "DROP"}, desired: []string{"a", "c", "DROP"}, wantOps: 2},
		{name: "remove one", current: []string{"a", "b", "DROP"}, desired: []string{"a", "DROP"}, wantOps: 1},
		{name: "to nothing", current: []string{"a", "DROP"}, desired: nil, wantOps: 2},
		{name: "swapped", current: []string{"b", "a"}, desired: []string{"a", "b"}, wantOps: -1},
		{name: "duplicate kept rule", current: []string{"a", "a", "DROP"}, desired: []string{"a", "DROP"}, wantOps: -1},
		{name: "duplicates and order", current: []string{"DROP", "a", "DROP"}, desired: []string{"a", "DROP"}, wantOps: -1},
		{name: "drop first", current: []string{"DROP", "a"}, desired: []string{"a", "DROP"}, wantOps: -1},
		{name: "foreign rule inside", current: []string{"a", "x", "DROP"}, desired: []string{"a", "DROP"}, wantOps: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cur, want := rulesOf(tc.current...), rulesOf(tc.desired...)
			ops := diffOrdered(cur, want)
			got, err := applyOps(cur, ops)
			if err != nil {
				t.Fatalf("ops %v do not apply: %v", ops, err)
			}
			if !equalRules(got, want) {
				t.Fatalf("after %v: %v, want %v", ops, got, want)
			}
			if tc.wantOps >= 0 && len(ops) != tc.wantOps {
				t.Errorf("%d ops %v, want %d", len(ops), ops, tc.wantOps)
			}
			if tc.noDeletes {
				for _, o := range ops {
					if o.kind == opDelete {
						t.Errorf("unexpected delete %v", o)
					}
				}
			}
		})
	}
}

// TestDiffOrderedRandom checks on random lists (with repeats and foreign
// rules in current) that the ops always give exactly desired.
func TestDiffOrderedRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	pool := []string{"a", "b", "c", "d", "e", "DROP"}
	for i := range 5000 {
		var current []string
		for range rng.IntN(7) {
			current = append(current, pool[rng.IntN(len(pool))])
		}
		perm := rng.Perm(len(pool))
		desired := make([]string, 0, len(pool))
		for _, p := range perm[:rng.IntN(len(pool)+1)] {
			desired = append(desired, pool[p])
		}
		ops := diffOrdered(rulesOf(current...), rulesOf(desired...))
		got, err := applyOps(rulesOf(current...), ops)
		if err != nil || !equalRules(got, rulesOf(desired...)) {
			t.Fatalf("case %d: %v -> %v: ops %v gave %v, %v", i, current, desired, ops, got, err)
		}
	}
}

func TestDiffSet(t *testing.T) {
	tests := []struct {
		name             string
		current, desired []string
		skip             string
		wantAppend       []string
		wantDelete       []string
	}{
		{name: "add", current: []string{"a"}, desired: []string{"a", "b"}, wantAppend: []string{"b"}},
		{name: "same in other order", current: []string{"b", "a"}, desired: []string{"a", "b"}},
		{name: "remove and duplicate", current: []string{"a", "a", "c"}, desired: []string{"a"}, wantDelete: []string{"a", "c"}},
		{name: "skip leaves a rule alone", current: []string{"a", "s"}, desired: []string{"b"}, skip: "s", wantAppend: []string{"b"}, wantDelete: []string{"a"}},
		{name: "skip does not add", current: nil, desired: []string{"s"}, skip: "s"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			skip := func(r rule) bool { return r[1] == tc.skip }
			ops := diffSet(rulesOf(tc.current...), rulesOf(tc.desired...), skip)
			var app, del []string
			for _, o := range ops {
				switch o.kind {
				case opAppend:
					app = append(app, o.rule[1])
				case opDelete:
					del = append(del, o.rule[1])
				default:
					t.Errorf("unexpected %v", o)
				}
			}
			if !slices.Equal(app, tc.wantAppend) || !slices.Equal(del, tc.wantDelete) {
				t.Errorf("appends %v deletes %v, want %v %v", app, del, tc.wantAppend, tc.wantDelete)
			}
		})
	}
}

func TestParseTable(t *testing.T) {
	lines := []string{
		"-P INPUT ACCEPT",
		"-N SWITCHMAN-FILTER",
		"-N SWITCHMAN-S-ABC",
		`-A INPUT -m comment --comment "switchman" -j SWITCHMAN-FILTER`,
		`-A SWITCHMAN-FILTER -d 192.0.2.10/32 -p tcp -m tcp --dport 443 -m comment --comment "switchman:web" -j SWITCHMAN-S-ABC`,
		`-A SWITCHMAN-FILTER -m comment --comment "two words \"q\"" -j DROP`,
		"",
	}
	got, err := parseTable(lines)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"INPUT", "SWITCHMAN-FILTER", "SWITCHMAN-S-ABC"}; !slices.Equal(got.chains, want) {
		t.Errorf("chains %v, want %v", got.chains, want)
	}
	want := []string{
		"-d 192.0.2.10/32 -p tcp -m tcp --dport 443 -m comment --comment switchman:web -j SWITCHMAN-S-ABC",
		`-m comment --comment two words "q" -j DROP`,
	}
	rules := got.rules["SWITCHMAN-FILTER"]
	if len(rules) != len(want) {
		t.Fatalf("got %d rules %v", len(rules), rules)
	}
	for i := range want {
		if rules[i].String() != want[i] {
			t.Errorf("rule %d: %q, want %q", i, rules[i].String(), want[i])
		}
	}
	if rules[1][3] != `two words "q"` {
		t.Errorf("quoted word split wrong: %q", rules[1])
	}
	if s := rules[0].service(); s != "web" {
		t.Errorf("service %q, want web", s)
	}
	if s := got.rules["INPUT"][0].service(); s != "" {
		t.Errorf("base jump attributed to %q", s)
	}
	for _, bad := range [][]string{
		{"-N X", `-A X -m comment --comment "open`},
		{"-A Y -j DROP"},
		{"-Z X"},
	} {
		if _, err := parseTable(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestServiceChainName(t *testing.T) {
	long := strings.Repeat("a", 63)
	names := map[string]bool{}
	for _, s := range []string{"web", "web2", long, "a"} {
		c := serviceChain(s)
		if len(c) > 28 {
			t.Errorf("%s: chain %q is %d characters, iptables allows 28", s, c, len(c))
		}
		if !strings.HasPrefix(c, serviceChainPrefix) {
			t.Errorf("%s: chain %q lacks the prefix", s, c)
		}
		if names[c] {
			t.Errorf("chain %q repeats", c)
		}
		names[c] = true
		if serviceChain(s) != c {
			t.Errorf("%s: chain name not stable", s)
		}
	}
}
