package watcher

import (
	"maps"
	"slices"
	"testing"
)

func TestClassify(t *testing.T) {
	tests := []struct {
		key         string
		kind        int
		svc, member string
	}{
		{"/switchman/services/web", kindService, "web", ""},
		{"/switchman/services/a/b", kindService, "a/b", ""}, // refused later as not a DNS label, never ignored
		{"/switchman/services/../x", kindService, "../x", ""},
		{"/switchman/services/", kindOther, "", ""},
		{"/switchman/backends/web/m1", kindMember, "web", "m1"},
		{"/switchman/backends/web/m1/x", kindMember, "web", "m1/x"},
		{"/switchman/backends/web", kindOther, "", ""},
		{"/switchman/certs/api", kindOther, "", ""},
		{"/switchman/groups/default", kindOther, "", ""},
		{"/switchman/status/lb1/web", kindIgnored, "", ""},
		{"/switchman/nodes/lb1", kindIgnored, "", ""},
		{"/switchman/owners/default", kindIgnored, "", ""},
		{"/other/services/web", kindIgnored, "", ""},
	}
	for _, tc := range tests {
		kind, svc, member := classify("/switchman", tc.key)
		if kind != tc.kind || svc != tc.svc || member != tc.member {
			t.Errorf("classify(%q) = %d %q %q, want %d %q %q", tc.key, kind, svc, member, tc.kind, tc.svc, tc.member)
		}
	}
}

func TestStoreChanges(t *testing.T) {
	s := newStore()
	d := newChanges()
	kv := func(rev int64) KV { return KV{Value: []byte("x"), ModRevision: rev, CreateRevision: rev} }
	s.put("/switchman", "/switchman/services/web", kv(1), d)
	s.put("/switchman", "/switchman/backends/web/m1", kv(2), d)
	s.put("/switchman", "/switchman/certs/api", kv(3), d)
	if s.put("/switchman", "/switchman/status/lb1/web", kv(4), d) {
		t.Fatal("a status key counted as a change")
	}
	if got := slices.Sorted(maps.Keys(d.Services)); !slices.Equal(got, []string{"web"}) {
		t.Fatalf("changed services %v", got)
	}
	if !d.Other["/switchman/certs/api"] || len(d.Other) != 1 {
		t.Fatalf("changed other keys %v", d.Other)
	}

	// A relist that finds one member changed and one service new reports
	// exactly those.
	next := newStore()
	next.put("/switchman", "/switchman/services/web", kv(1))
	next.put("/switchman", "/switchman/backends/web/m1", kv(7))
	next.put("/switchman", "/switchman/certs/api", kv(3))
	next.put("/switchman", "/switchman/services/dns", kv(8))
	d2 := newChanges()
	if !s.diff(next, d2) {
		t.Fatal("diff found nothing")
	}
	if got := slices.Sorted(maps.Keys(d2.Services)); !slices.Equal(got, []string{"dns", "web"}) || len(d2.Other) != 0 {
		t.Fatalf("diff: services %v other %v", got, d2.Other)
	}
	if next.diff(next, newChanges()) {
		t.Fatal("a store differs from itself")
	}

	// Removing the last member drops the pool.
	d3 := newChanges()
	s.remove("/switchman", "/switchman/backends/web/m1", d3)
	if _, ok := s.members["web"]; ok || !d3.Services["web"] {
		t.Fatalf("member removal: pool %v, changes %v", s.members, d3.Services)
	}
}
