package spec

import (
	"errors"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
)

func member(name, addr string, port uint16, weight int) Member {
	return Member{Name: name, Address: netip.MustParseAddr(addr), Port: port, Weight: weight}
}

func TestMerge(t *testing.T) {
	def := mustParse(t, "web", "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n    weight: 2\n")
	got, err := Merge(def, []Member{member("m1", "10.0.0.2", 0, 1), member("m2", "10.0.0.3", 8080, 0)})
	if err != nil {
		t.Fatal(err)
	}
	want := []Backend{
		{Address: netip.MustParseAddr("10.0.0.1"), Port: 80, Weight: 2, Source: "backends[0]"},
		{Address: netip.MustParseAddr("10.0.0.2"), Port: 80, Weight: 1, Source: "pool/m1"},
		{Address: netip.MustParseAddr("10.0.0.3"), Port: 8080, Weight: 0, Source: "pool/m2"},
	}
	if !reflect.DeepEqual(got.Backends, want) {
		t.Errorf("merged backends:\n got %+v\nwant %+v", got.Backends, want)
	}
	if len(def.Backends) != 1 {
		t.Errorf("Merge changed the definition's backends: %+v", def.Backends)
	}

	// A definition with no static backends is fine once the pool has members.
	empty := mustParse(t, "pool", "vip: 192.0.2.11\nport: 80\n")
	got, err = Merge(empty, []Member{member("a", "10.0.0.9", 0, 1)})
	if err != nil || len(got.Backends) != 1 {
		t.Fatalf("Merge(no statics, one member) = %+v, %v", got, err)
	}
}

func TestMergeAccepts(t *testing.T) {
	tests := []struct {
		name    string
		doc     string
		members []Member
	}{
		{"tun mixes families", "vip: 192.0.2.10\nport: 80\nforwarding: tun\nbackends:\n  - address: \"fd00::1\"\n", nil},
		{"haproxy mixes families", "vip: 192.0.2.10\nport: 80\ndriver: haproxy\nbackends:\n  - address: \"fd00::1\"\n    port: 8080\n", nil},
		{"nat translates ports", "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n    port: 8080\n", []Member{member("m", "10.0.0.2", 9090, 1)}},
		{"dr with equal ports", "vip: 192.0.2.10\nport: 80\nforwarding: dr\nbackends:\n  - address: 10.0.0.1\n    port: 80\n", []Member{member("m", "10.0.0.2", 0, 1)}},
		{"same address, other port", "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n  - address: 10.0.0.1\n    port: 81\n", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := Merge(mustParse(t, "web", tt.doc), tt.members); err != nil {
				t.Errorf("Merge: %v", err)
			}
		})
	}
}

func TestMergeRejects(t *testing.T) {
	tests := []struct {
		name    string
		doc     string
		members []Member
		path    string
		msg     []string
	}{
		{"empty merged list", "vip: 192.0.2.10\nport: 80\n", nil, "backends", []string{"empty", "backends/web/"}},
		{"empty list given", "vip: 192.0.2.10\nport: 80\nbackends: []\n", nil, "backends", []string{"empty"}},
		{"duplicate static", "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n  - address: 10.0.0.1\n    port: 80\n", nil,
			"backends[1]", []string{"10.0.0.1:80", "backends[0]"}},
		{"pool duplicates static", minimal, []Member{member("m1", "10.0.0.1", 0, 1)},
			"pool/m1", []string{"10.0.0.1:80", "backends[0]"}},
		{"pool duplicates pool", minimal, []Member{member("m1", "10.0.0.2", 80, 1), member("m2", "10.0.0.2", 0, 1)},
			"pool/m2", []string{"10.0.0.2:80", "pool/m1"}},
		{"v6 backend for v4 vip", "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: \"fd00::1\"\n", nil,
			"backends[0].address", []string{"fd00::1", "IPv6", "192.0.2.10", "IPv4", "tun"}},
		{"v4 pool member for v6 vip", "vip: \"2001:db8::10\"\nport: 80\nbackends:\n  - address: \"fd00::1\"\n", []Member{member("m1", "10.0.0.1", 0, 1)},
			"pool/m1.address", []string{"10.0.0.1", "IPv4", "2001:db8::10"}},
		{"dr port mismatch", "vip: 192.0.2.10\nport: 80\nforwarding: dr\nbackends:\n  - address: 10.0.0.1\n    port: 8080\n", nil,
			"backends[0].port", []string{"8080", "service port 80", "dr"}},
		{"tun pool port mismatch", "vip: 192.0.2.10\nport: 80\nforwarding: tun\nbackends:\n  - address: 10.0.0.1\n", []Member{member("m1", "10.0.0.2", 81, 1)},
			"pool/m1.port", []string{"81", "tun"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Merge(mustParse(t, "web", tt.doc), tt.members)
			if s != nil {
				t.Errorf("Merge returned a service along with the error")
			}
			wantFieldError(t, err, tt.path, tt.msg...)
		})
	}
}

func TestParseMember(t *testing.T) {
	m, err := ParseMember("m1", []byte(`{"address":"10.1.1.2","port":8080,"weight":3}`))
	if err != nil {
		t.Fatal(err)
	}
	if want := member("m1", "10.1.1.2", 8080, 3); m != want {
		t.Errorf("member = %+v; want %+v", m, want)
	}
	m, err = ParseMember("m2", []byte("address: \"fd00::2\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if want := member("m2", "fd00::2", 0, DefaultWeight); m != want {
		t.Errorf("member = %+v; want %+v (port 0 means the service port)", m, want)
	}

	tests := []struct {
		name, member, doc, path string
		msg                     []string
	}{
		{"empty", "m1", "", "", []string{"empty"}},
		{"not a mapping", "m1", `["10.0.0.1"]`, "", []string{"a list"}},
		{"bad name", "M_1", `{"address":"10.0.0.1"}`, "name", []string{`"M_1"`}},
		{"address missing", "m1", `{"port":80}`, "address", []string{"missing"}},
		{"address bad", "m1", `{"address":"10.0.0.300"}`, "address", []string{`"10.0.0.300"`}},
		{"address multicast", "m1", `{"address":"ff02::1"}`, "address", []string{`"ff02::1"`}},
		{"port out of range", "m1", `{"address":"10.0.0.1","port":70000}`, "port", []string{"70000 is out of range"}},
		{"port a string", "m1", `{"address":"10.0.0.1","port":"80"}`, "port", []string{`"80"`}},
		{"weight out of range", "m1", `{"address":"10.0.0.1","weight":-3}`, "weight", []string{"-3 is out of range"}},
		{"unknown field", "m1", `{"address":"10.0.0.1","adress":"x"}`, "adress", []string{"unknown field"}},
		{"duplicate key", "m1", `{"address":"10.0.0.1","address":"10.0.0.2"}`, "", []string{`"address"`, "already set"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := ParseMember(tt.member, []byte(tt.doc))
			if m != (Member{}) {
				t.Errorf("ParseMember returned %+v along with the error", m)
			}
			wantFieldError(t, err, tt.path, tt.msg...)
		})
	}
}

func claim(t *testing.T, name, vip string, port int, proto string, rev int64) Claim {
	t.Helper()
	doc := "vip: " + vip + "\nport: " + strconv.Itoa(port) + "\nprotocol: " + proto + "\nbackends:\n  - address: 10.0.0.1\n"
	return Claim{Service: mustParse(t, name, doc), CreateRevision: rev}
}

func TestResolveConflicts(t *testing.T) {
	t.Run("lower create revision wins", func(t *testing.T) {
		losers := ResolveConflicts([]Claim{
			claim(t, "newer", "192.0.2.10", 80, "tcp", 20),
			claim(t, "older", "192.0.2.10", 80, "tcp", 10),
		})
		if len(losers) != 1 || losers["newer"] == nil {
			t.Fatalf("losers = %v; want only newer", losers)
		}
		wantFieldError(t, Errors{asFieldError(t, losers["newer"])}, "vip", "192.0.2.10:80/tcp", `"older"`, "revision 10", "20")
	})
	t.Run("tie broken by name", func(t *testing.T) {
		losers := ResolveConflicts([]Claim{
			claim(t, "zeta", "192.0.2.10", 80, "tcp", 5),
			claim(t, "alpha", "192.0.2.10", 80, "tcp", 5),
		})
		if len(losers) != 1 || losers["zeta"] == nil {
			t.Fatalf("losers = %v; want only zeta", losers)
		}
		if !strings.Contains(losers["zeta"].Error(), `"alpha"`) {
			t.Errorf("error %q does not name the winner alpha", losers["zeta"])
		}
	})
	t.Run("three-way", func(t *testing.T) {
		losers := ResolveConflicts([]Claim{
			claim(t, "b", "192.0.2.10", 53, "udp", 30),
			claim(t, "c", "192.0.2.10", 53, "udp", 7),
			claim(t, "a", "192.0.2.10", 53, "udp", 12),
		})
		if len(losers) != 2 || losers["a"] == nil || losers["b"] == nil {
			t.Fatalf("losers = %v; want a and b", losers)
		}
		for _, n := range []string{"a", "b"} {
			if !strings.Contains(losers[n].Error(), `service "c"`) {
				t.Errorf("%s: error %q does not name the winner c", n, losers[n])
			}
		}
	})
	t.Run("no conflict across port, protocol or address", func(t *testing.T) {
		losers := ResolveConflicts([]Claim{
			claim(t, "a", "192.0.2.10", 80, "tcp", 1),
			claim(t, "b", "192.0.2.10", 80, "udp", 2),
			claim(t, "c", "192.0.2.10", 81, "tcp", 3),
			claim(t, "d", "192.0.2.11", 80, "tcp", 4),
			claim(t, "e", "\"2001:db8::10\"", 80, "tcp", 5),
		})
		if len(losers) != 0 {
			t.Errorf("losers = %v; want none", losers)
		}
	})
	t.Run("input order does not matter", func(t *testing.T) {
		a := claim(t, "a", "192.0.2.10", 80, "tcp", 9)
		b := claim(t, "b", "192.0.2.10", 80, "tcp", 3)
		l1, l2 := ResolveConflicts([]Claim{a, b}), ResolveConflicts([]Claim{b, a})
		if !reflect.DeepEqual(l1, l2) || l1["a"] == nil {
			t.Errorf("losers differ by order: %v vs %v", l1, l2)
		}
	})
	t.Run("mode http services share a key by route", func(t *testing.T) {
		web := func(name, routes string, rev int64) Claim {
			return Claim{Service: mustParse(t, name, minimal+"mode: http\nroutes: "+routes+"\n"), CreateRevision: rev}
		}
		claims := []Claim{
			web("late", "[{host: www.example.com, path_prefix: /api}]", 9),
			web("www", "[{host: www.example.com}]", 2),
			web("api", "[{host: www.example.com, path_prefix: /api/}]", 4),
			web("wild", "[{host: \"*.example.com\"}]", 5),
			claim(t, "tcp", "192.0.2.10", 80, "tcp", 7),
		}
		losers := ResolveConflicts(claims)
		if len(losers) != 2 || losers["late"] == nil || losers["tcp"] == nil {
			t.Fatalf("losers = %v; want late and tcp", losers)
		}
		wantFieldError(t, Errors{asFieldError(t, losers["late"])}, "routes[0]", "www.example.com/api", `service "api"`, "revision 4")
		wantFieldError(t, Errors{asFieldError(t, losers["tcp"])}, "vip", `service "www"`, "mode http")
		slices.Reverse(claims)
		if again := ResolveConflicts(claims); !reflect.DeepEqual(again, losers) {
			t.Errorf("losers differ by order: %v vs %v", again, losers)
		}
	})
	t.Run("input not reordered", func(t *testing.T) {
		in := []Claim{claim(t, "b", "192.0.2.10", 80, "tcp", 9), claim(t, "a", "192.0.2.10", 80, "tcp", 3)}
		ResolveConflicts(in)
		if in[0].Service.Name != "b" {
			t.Errorf("ResolveConflicts reordered its input")
		}
	})
}

func asFieldError(t *testing.T, err error) *FieldError {
	t.Helper()
	var fe *FieldError
	if !errors.As(err, &fe) {
		t.Fatalf("%v (%T) is not a *FieldError", err, err)
	}
	return fe
}
