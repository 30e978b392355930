package agent

import (
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/switchman-lb/switchman/watcher"
)

func TestEvaluator(t *testing.T) {
	kv := func(rev, create int64, v string) watcher.KV {
		return watcher.KV{Value: []byte(v), ModRevision: rev, CreateRevision: create}
	}
	in := func(rev, create int64, v string) Input { return Input{Def: kv(rev, create, v), Exists: true} }
	good := `{"vip":"192.0.2.10","port":80,"backends":[{"address":"10.1.1.2"}]}`
	good2 := `{"vip":"192.0.2.10","port":80,"backends":[{"address":"10.1.1.3"}]}`
	other := `{"vip":"192.0.2.11","port":80,"backends":[{"address":"10.1.1.2"}]}`
	bad := `{"vip":"192.0.2.10","port":70000}`
	// httpSvc is a mode http service on 192.0.2.10:80 with the given
	// routes (a JSON list, or "" for none) and extra fields.
	httpSvc := func(routes, extra string) string {
		if routes != "" {
			extra += `"routes":` + routes + `,`
		}
		return `{"vip":"192.0.2.10","port":80,"mode":"http",` + extra + `"backends":[{"address":"10.1.1.2"}]}`
	}
	type step struct {
		name string
		in   Input
	}
	tests := []struct {
		name     string
		policy   Policy
		secrets  map[string]string
		steps    []step
		want     map[string]string // name -> "in force at REV" or "rejected: TEXT" or "gone"
		affected []string          // names the last step reports
	}{
		{name: "valid", steps: []step{{"web", in(5, 5, good)}},
			want: map[string]string{"web": "in force at 5"}, affected: []string{"web"}},
		{name: "bad update keeps the last good version", steps: []step{{"web", in(5, 5, good)}, {"web", in(6, 5, bad)}},
			want: map[string]string{"web": "in force at 5; rejected: port: 70000"}},
		{name: "a bad new service has nothing in force", steps: []step{{"web", in(6, 6, bad)}},
			want: map[string]string{"web": "rejected: port: 70000"}},
		{name: "deleted", steps: []step{{"web", in(5, 5, good)}, {"web", Input{}}},
			want: map[string]string{"web": "gone"}},
		{name: "pool members merged, revision is the highest", steps: []step{{"web", Input{Def: kv(5, 5, good), Exists: true,
			Members: map[string]watcher.KV{"m1": kv(9, 9, `{"address":"10.1.1.9"}`)}}}},
			want: map[string]string{"web": "in force at 9"}},
		{name: "a bad member names its key", steps: []step{{"web", Input{Def: kv(5, 5, good), Exists: true,
			Members: map[string]watcher.KV{"m1": kv(9, 9, `{"address":"x"}`)}}}},
			want: map[string]string{"web": `rejected: backends/web/m1: address: "x"`}},
		{name: "the first created keeps a contested key", steps: []step{{"b", in(7, 7, good2)}, {"a", in(8, 3, good)}},
			want:     map[string]string{"a": "in force at 8", "b": `rejected: vip: 192.0.2.10:80/tcp is already claimed by service "a"`},
			affected: []string{"b", "a"}},
		{name: "the loser takes over when the winner moves away", steps: []step{{"a", in(3, 3, good)}, {"b", in(7, 7, good2)}, {"a", in(8, 3, other)}},
			want:     map[string]string{"a": "in force at 8", "b": "in force at 7"},
			affected: []string{"b", "a"}},
		{name: "a refused update keeps its claim", steps: []step{{"a", in(3, 3, good)}, {"b", in(7, 7, good2)}, {"a", in(8, 3, bad)}},
			want: map[string]string{"a": "in force at 3; rejected: port", "b": `rejected: vip: 192.0.2.10:80/tcp is already claimed by service "a"`}},
		// Mode http services share a vip:port when their routes do not overlap.
		{name: "http services share a vip:port by host", steps: []step{{"www", in(3, 3, httpSvc(`[{"host":"www.example.com"}]`, ""))}, {"api", in(4, 4, httpSvc(`[{"host":"API.example.com"}]`, ""))}},
			want: map[string]string{"www": "in force at 3", "api": "in force at 4"}, affected: []string{"www", "api"}},
		{name: "http services share a host by path", steps: []step{{"www", in(3, 3, httpSvc(`[{"host":"www.example.com"}]`, ""))}, {"api", in(4, 4, httpSvc(`[{"host":"www.example.com","path_prefix":"/api"}]`, ""))}},
			want: map[string]string{"www": "in force at 3", "api": "in force at 4"}},
		{name: "an exact host and a wildcard do not overlap", steps: []step{{"wild", in(3, 3, httpSvc(`[{"host":"*.example.com"}]`, ""))}, {"www", in(4, 4, httpSvc(`[{"host":"www.example.com"}]`, ""))}},
			want: map[string]string{"wild": "in force at 3", "www": "in force at 4"}},
		{name: "an overlapping route goes to the service created first", steps: []step{{"b", in(7, 7, httpSvc(`[{"host":"b.example.com"},{"host":"www.example.com","path_prefix":"/api/"}]`, ""))}, {"a", in(8, 3, httpSvc(`[{"host":"www.example.com","path_prefix":"/api"}]`, ""))}},
			want:     map[string]string{"a": "in force at 8", "b": `rejected: routes[1]: www.example.com/api on 192.0.2.10:80/tcp is already claimed by service "a" (created at revision 3, before this one at 7)`},
			affected: []string{"a", "b"}},
		{name: "a wildcard claimed twice", steps: []step{{"a", in(3, 3, httpSvc(`[{"host":"*.Example.com"}]`, ""))}, {"b", in(4, 4, httpSvc(`[{"host":"*.example.com"}]`, ""))}},
			want: map[string]string{"a": "in force at 3", "b": `rejected: routes[0]: *.example.com/ on 192.0.2.10:80/tcp is already claimed by service "a"`}},
		{name: "no routes is every host and path", steps: []step{{"a", in(3, 3, httpSvc("", ""))}, {"b", in(4, 4, httpSvc(`[{"path_prefix":"/"}]`, ""))}, {"c", in(5, 5, httpSvc(`[{"path_prefix":"/c"}]`, ""))}},
			want: map[string]string{"a": "in force at 3", "b": `rejected: routes[0]: */ on 192.0.2.10:80/tcp is already claimed by service "a"`, "c": "in force at 5"}},
		{name: "the loser takes over the route its winner gives up", steps: []step{{"a", in(3, 3, httpSvc(`[{"host":"www.example.com"}]`, ""))}, {"b", in(7, 7, httpSvc(`[{"host":"www.example.com"}]`, ""))}, {"a", in(9, 3, httpSvc(`[{"host":"old.example.com"}]`, ""))}},
			want:     map[string]string{"a": "in force at 9", "b": "in force at 7"},
			affected: []string{"a", "b"}},
		{name: "the loser of a route keeps none of its other routes", steps: []step{{"a", in(3, 3, httpSvc(`[{"host":"x.example.com"}]`, ""))}, {"b", in(4, 4, httpSvc(`[{"host":"y.example.com"},{"host":"x.example.com"}]`, ""))}, {"c", in(5, 5, httpSvc(`[{"host":"y.example.com"}]`, ""))}},
			want: map[string]string{"a": "in force at 3", "b": `rejected: routes[1]: x.example.com/ on 192.0.2.10:80/tcp is already claimed by service "a"`, "c": "in force at 5"}},
		{name: "an http service cannot share a tcp service's vip:port", steps: []step{{"tcp", in(3, 3, good)}, {"web", in(4, 4, httpSvc("", ""))}},
			want: map[string]string{"tcp": "in force at 3", "web": `rejected: vip: 192.0.2.10:80/tcp is already claimed by service "tcp" (created at revision 3, before this one at 4)`}},
		{name: "a tcp service cannot share an http service's vip:port", steps: []step{{"web", in(3, 3, httpSvc("", ""))}, {"tcp", in(4, 4, good)}},
			want: map[string]string{"web": "in force at 3", "tcp": `rejected: vip: 192.0.2.10:80/tcp is already claimed by service "web" (created at revision 3, before this one at 4), which serves it in mode http; only mode http services share a vip:port`}},
		{name: "http services sharing a vip:port agree on TLS", steps: []step{{"plain", in(3, 3, httpSvc(`[{"host":"a.example.com"}]`, ""))}, {"secure", in(4, 4, httpSvc(`[{"host":"b.example.com"}]`, `"tls":{"certificate":"/etc/b.pem"},`))}},
			want: map[string]string{"plain": "in force at 3", "secure": `rejected: tls: 192.0.2.10:80/tcp is served by service "plain" (created at revision 3, before this one at 4) without TLS`}},
		{name: "http services with their own certificates share a vip:port", steps: []step{{"a", in(3, 3, httpSvc(`[{"host":"a.example.com"}]`, `"tls":{"certificate":"/etc/a.pem"},`))}, {"b", in(4, 4, httpSvc(`[{"host":"b.example.com"}]`, `"tls":{"certificate":"/etc/b.pem"},`))}},
			want: map[string]string{"a": "in force at 3", "b": "in force at 4"}},
		{name: "http services sharing a vip:port allow the same ranges", steps: []step{{"a", in(3, 3, httpSvc(`[{"host":"a.example.com"}]`, `"allow_cidrs":["10.0.0.0/8","192.168.0.0/16"],`))}, {"b", in(4, 4, httpSvc(`[{"host":"b.example.com"}]`, `"allow_cidrs":["192.168.0.0/16","10.0.0.0/8"],`))}, {"c", in(5, 5, httpSvc(`[{"host":"c.example.com"}]`, ""))}},
			want: map[string]string{"a": "in force at 3", "b": "in force at 4", "c": `rejected: allow_cidrs: [0.0.0.0/0] differs from [10.0.0.0/8 192.168.0.0/16] of service "a"`}},
		{name: "a refused update of a route keeps nothing of the service", steps: []step{{"a", in(3, 3, httpSvc(`[{"host":"a.example.com"}]`, ""))}, {"b", in(4, 4, httpSvc(`[{"host":"b.example.com"}]`, ""))}, {"b", in(6, 4, httpSvc(`[{"host":"a.example.com"}]`, ""))}},
			want:     map[string]string{"a": "in force at 3", "b": `rejected: routes[0]: a.example.com/ on 192.0.2.10:80/tcp is already claimed by service "a"`},
			affected: []string{"a", "b"}},
		{name: "vip outside --vip-cidrs", policy: Policy{VIPCIDRs: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}},
			steps: []step{{"web", in(5, 5, good)}},
			want:  map[string]string{"web": "rejected: vip: 192.0.2.10 is outside the ranges this agent may serve (--vip-cidrs 198.51.100.0/24)"}},
		{name: "backend outside --backend-cidrs", policy: Policy{BackendCIDRs: []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")}},
			steps: []step{{"web", in(5, 5, good)}},
			want:  map[string]string{"web": "rejected: backends[0].address: 10.1.1.2 is outside the ranges backends may use (--backend-cidrs 10.9.0.0/16)"}},
		{name: "loopback backend refused by --backend-cidrs", policy: Policy{BackendCIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}},
			steps: []step{{"web", in(5, 5, `{"vip":"192.0.2.10","port":80,"backends":[{"address":"127.0.0.1","port":2379}]}`)}},
			want:  map[string]string{"web": "rejected: backends[0].address: 127.0.0.1 is outside"}},
		{name: "certificate key outside the prefix", steps: []step{{"api", in(5, 5, `{"vip":"192.0.2.10","port":443,"tls":{"certificate_key":"/elsewhere/api"},"backends":[{"address":"10.1.1.2"}]}`)}},
			want: map[string]string{"api": `rejected: tls.certificate_key: "/elsewhere/api" is outside the agent's prefix /switchman/`}},
		{name: "certificate key missing", secrets: map[string]string{},
			steps: []step{{"api", in(5, 5, `{"vip":"192.0.2.10","port":443,"tls":{"certificate_key":"/switchman/certs/api"},"backends":[{"address":"10.1.1.2"}]}`)}},
			want:  map[string]string{"api": `rejected: tls.certificate_key: "/switchman/certs/api" does not exist in etcd`}},
		{name: "certificate key present", secrets: map[string]string{"/switchman/certs/api": "PEM"},
			steps: []step{{"api", in(5, 5, `{"vip":"192.0.2.10","port":443,"tls":{"certificate_key":"/switchman/certs/api"},"backends":[{"address":"10.1.1.2"}]}`)}},
			want:  map[string]string{"api": "in force at 5"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.policy.Prefix == "" {
				tc.policy.Prefix = "/switchman"
			}
			var secret func(string) ([]byte, bool)
			if tc.secrets != nil {
				secret = func(k string) ([]byte, bool) {
					v, ok := tc.secrets[k]
					return []byte(v), ok
				}
			}
			e := NewEvaluator(tc.policy, secret)
			var affected []string
			for _, s := range tc.steps {
				affected = e.Update(s.name, s.in)
			}
			for name, want := range tc.want {
				v := e.Verdict(name)
				var got []string
				if v.InForce != nil {
					got = append(got, "in force at "+strconv.FormatInt(v.Revision, 10))
				}
				if v.Rejected != nil {
					got = append(got, "rejected: "+v.Rejected.Error())
				}
				if !v.Exists && v.InForce == nil && v.Rejected == nil {
					got = append(got, "gone")
				}
				g := strings.Join(got, "; ")
				if !strings.Contains(g, want) || strings.HasPrefix(want, "in force") != strings.HasPrefix(g, "in force") {
					t.Errorf("%s: %q, want %q", name, g, want)
				}
			}
			if tc.affected != nil {
				for _, n := range tc.affected {
					if !strings.Contains(" "+strings.Join(affected, " ")+" ", " "+n+" ") {
						t.Errorf("last step affected %v, want %v among them", affected, tc.affected)
					}
				}
			}
		})
	}
}

func TestEvaluatorRestore(t *testing.T) {
	e := NewEvaluator(Policy{Prefix: "/switchman"}, nil)
	good := Input{Def: watcher.KV{Value: []byte(`{"vip":"192.0.2.10","port":80,"backends":[{"address":"10.1.1.2"}]}`), ModRevision: 4, CreateRevision: 2}, Exists: true}
	if err := e.Restore("web", good); err != nil {
		t.Fatal(err)
	}
	e.Update("web", Input{Def: watcher.KV{Value: []byte(`{"vip":"nope"}`), ModRevision: 9, CreateRevision: 2}, Exists: true})
	v := e.Verdict("web")
	if v.InForce == nil || v.Revision != 4 || v.Rejected == nil {
		t.Fatalf("after a restore and a bad update: %+v", v)
	}
	// A record that the current policy refuses is not restored.
	strict := NewEvaluator(Policy{Prefix: "/switchman", VIPCIDRs: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}}, nil)
	if err := strict.Restore("web", good); err == nil {
		t.Fatal("restored a version the policy refuses")
	}
}
