package render

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/spec"
)

func TestHTTPMapKey(t *testing.T) {
	for _, tt := range []struct {
		route spec.Route
		key   string
	}{
		{spec.Route{Host: "www.example.com", PathPrefix: "/"}, "www.example.com/"},
		{spec.Route{Host: "www.example.com", PathPrefix: "/api"}, "www.example.com/api/"},
		{spec.Route{Host: "*.example.com", PathPrefix: "/a/b"}, "*.example.com/a/b/"},
		{spec.Route{PathPrefix: "/"}, "*/"},
		{spec.Route{PathPrefix: "/static%2Fv1"}, "*/static%2Fv1/"},
	} {
		if got := HTTPMapKey(tt.route); got != tt.key {
			t.Errorf("HTTPMapKey(%+v) = %q, want %q", tt.route, got, tt.key)
		}
		back, err := HTTPRouteOfKey(tt.key)
		if err != nil || back != tt.route {
			t.Errorf("HTTPRouteOfKey(%q) = %+v, %v; want %+v", tt.key, back, err, tt.route)
		}
	}
	// The renderer's own defence: nothing that is not a host and a path of
	// URL characters reaches a map or the runtime API.
	for _, bad := range []string{
		"www.example.com/api", "www.example.com/ be_x", "a.example.com/\nb be_x", "a.example.com/;clear map x/",
		"a.example.com/#/", "*.*.example.com/", "WWW.example.com/", "a.example.com//", "/", "a.example.com/a b/",
		"a.example.com/'/", `a.example.com/\/`,
	} {
		if err := CheckHTTPMapKey(bad); err == nil {
			t.Errorf("CheckHTTPMapKey(%q) accepted it", bad)
		}
	}
}

func TestLayoutHTTP(t *testing.T) {
	bind := "192.0.2.50:80"
	sticky := web("sticky", bind, "s.example.com/")
	sticky.Persistence = 30 * time.Second
	lc := web("lc", "192.0.2.51:80", "*/")
	lc.Scheduler = spec.LeastConnection
	tls := web("secure", "192.0.2.52:443", "x.example.com/")
	tls.Certificate = "/etc/x.pem"

	first, err := LayoutHTTP([]HAProxyService{web("b", bind, "b.example.com/"), web("a", bind, "a.example.com/"), sticky, lc, tls}, HTTPLayout{}, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	wantFE := []HTTPFrontend{{Bind: netip.MustParseAddrPort(bind)}, {Bind: netip.MustParseAddrPort("192.0.2.51:80")}, {Bind: netip.MustParseAddrPort("192.0.2.52:443"), TLS: true}}
	if !reflect.DeepEqual(first.Frontends, wantFE) {
		t.Errorf("frontends %+v, want %+v", first.Frontends, wantFE)
	}
	slots := func(l HTTPLayout) map[string][]string {
		out := map[string][]string{}
		for _, p := range l.Pools {
			out[p.Shape.Name()] = p.Slots
		}
		return out
	}
	// a, b, secure in rr (name order), 3 held + max(2, 3) spares.
	want := map[string][]string{"rr": {"a", "b", "secure", "", "", ""}, "lc": {"lc", "", ""}, "rrip30s": {"sticky", "", ""}}
	if got := slots(first); !reflect.DeepEqual(got, want) {
		t.Errorf("pools %v, want %v", got, want)
	}
	if got := first.Slot("b"); got != "be_http_rr_2" {
		t.Errorf("slot of b = %q", got)
	}

	// b leaves, c and d arrive: a keeps its slot, c takes b's, d the next
	// spare; with b's slot busy (its servers closing) c skips it.
	next, err := LayoutHTTP([]HAProxyService{web("a", bind, "a.example.com/"), web("d", bind, "d.example.com/"), web("c", bind, "c.example.com/"), tls}, first, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := slots(next)["rr"]; !reflect.DeepEqual(got, []string{"a", "c", "secure", "d", "", ""}) {
		t.Errorf("rr after a change: %v", got)
	}
	if next.Skeleton() == first.Skeleton() {
		t.Error("frontend 192.0.2.51:80 went away, the skeleton did not change")
	}
	busy, err := LayoutHTTP([]HAProxyService{web("a", bind, "a.example.com/"), web("c", bind, "c.example.com/"), tls}, first, 2, map[string]bool{"be_http_rr_2": true})
	if err != nil {
		t.Fatal(err)
	}
	if got := slots(busy)["rr"]; !reflect.DeepEqual(got, []string{"a", "", "secure", "c", "", ""}) {
		t.Errorf("rr with a busy slot: %v", got)
	}
	// Pools nobody uses stay; an unchanged set keeps its skeleton.
	if got := slots(busy)["lc"]; !reflect.DeepEqual(got, []string{"", "", ""}) {
		t.Errorf("unused lc pool: %v", got)
	}
	same, _ := LayoutHTTP([]HAProxyService{web("a", bind, "a.example.com/"), web("c", bind, "c.example.com/"), tls}, busy, 2, nil)
	if same.Skeleton() != busy.Skeleton() || !reflect.DeepEqual(same, busy) {
		t.Errorf("an unchanged set changed the layout:\n%+v\n%+v", busy, same)
	}

	// A pool that runs out grows once for everyone still to place.
	var many []HAProxyService
	for _, n := range []string{"a", "c", "e", "f", "g", "h", "i"} {
		many = append(many, web(n, bind, n+".example.com/"))
	}
	grown, err := LayoutHTTP(append(many, tls), busy, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	// 8 services in rr: grows to 8 + max(2, 8).
	if got := slots(grown)["rr"]; len(got) != 16 || got[0] != "a" || got[3] != "c" || got[2] != "secure" {
		t.Errorf("grown rr pool: %v", got)
	}
	// A service whose shape changes moves to the pool of its new shape.
	moved := web("a", bind, "a.example.com/")
	moved.Scheduler = spec.LeastConnection
	ml, _ := LayoutHTTP([]HAProxyService{moved, tls}, first, 2, nil)
	if ml.Slot("a") != "be_http_lc_1" || slots(ml)["rr"][0] != "" {
		t.Errorf("a moved to %q; rr %v", ml.Slot("a"), slots(ml)["rr"])
	}
}

func TestHTTPMapEntriesAndCertificates(t *testing.T) {
	bind := "192.0.2.50:443"
	a := web("a", bind, "www.example.com/", "*/")
	a.Certificate = "/etc/a.pem"
	b := web("b", bind, "www.example.com/api", "www.example.com/")
	b.CertificateKey = "/switchman/certs/b"
	c := web("c", bind, "c.example.com/")
	c.Certificate = "/etc/a.pem" // shared certificate: listed once
	svcs := []HAProxyService{c, b, a}
	l, err := LayoutHTTP(svcs, HTTPLayout{}, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	f := l.Frontends[0]
	m, err := HTTPMapEntries(l, f, svcs)
	if err != nil {
		t.Fatal(err)
	}
	// www.example.com/ is claimed twice: the first by name (a) keeps it.
	want := []HTTPMapEntry{{"www.example.com/api/", "be_http_rr_2"}, {"www.example.com/", "be_http_rr_1"}, {"c.example.com/", "be_http_rr_3"}, {"*/", "be_http_rr_1"}}
	if !reflect.DeepEqual(m, want) {
		t.Errorf("map %v, want %v", m, want)
	}
	o := goldenOpts()
	o.Certificates = map[string]string{"b": "/run/switchman/haproxy/certs/b.pem"}
	certs, err := HTTPCertificates(f, svcs, o)
	if err != nil || !reflect.DeepEqual(certs, []string{"/etc/a.pem", "/run/switchman/haproxy/certs/b.pem"}) {
		t.Errorf("certificates %v, %v", certs, err)
	}
	if _, err := HTTPCertificates(f, svcs, goldenOpts()); err == nil {
		t.Error("an etcd certificate without its file was listed")
	}
	evil := a
	evil.Certificate = "/etc/a.pem\n/etc/shadow"
	if _, err := HTTPCertificates(f, []HAProxyService{evil}, o); err == nil {
		t.Error("a certificate path with a newline reached a crt-list")
	}
	evil = a
	evil.Routes = []spec.Route{{Host: "x be_http_rr_9\nevil", PathPrefix: "/"}}
	if _, err := HTTPMapEntries(l, f, []HAProxyService{evil}); err == nil {
		t.Error("a host with a newline reached a map")
	}
}

// TestHAProxyConfigHTTPRefuses: a bind is never shared by tcp and http,
// and http values are checked like the rest.
func TestHAProxyConfigHTTPRefuses(t *testing.T) {
	tcp := HAProxyService{Name: "tcp", Bind: netip.MustParseAddrPort("192.0.2.50:80"), Servers: []HAProxyServer{srv("10.0.0.1", 80, 1)}}
	for name, svcs := range map[string][]HAProxyService{
		"tcp then http on one bind": {tcp, web("a", "192.0.2.50:80", "*/")},
		"http then tcp on one bind": {web("a", "192.0.2.50:80", "*/"), tcp},
		"route with a space":        {web("a", "192.0.2.50:80", "a.example.com/x y")},
		"server with a semicolon": {func() HAProxyService {
			s := web("a", "192.0.2.50:80", "*/")
			s.Servers[0].Name = "s1;shutdown"
			return s
		}()},
		"unknown scheduler": {func() HAProxyService { s := web("a", "192.0.2.50:80", "*/"); s.Scheduler = "random"; return s }()},
	} {
		if out, err := HAProxyConfig(svcs, goldenOpts()); err == nil {
			t.Errorf("%s: rendered without error:\n%s", name, out)
		}
	}
	if _, err := HAProxyConfig([]HAProxyService{web("a", "192.0.2.50:80", "*/"), web("b", "192.0.2.50:80", "b.example.com/")}, goldenOpts()); err != nil {
		t.Errorf("two http services on one bind: %v", err)
	}
	o := goldenOpts()
	o.StateDir = "/run/x dir"
	if _, err := HAProxyConfig([]HAProxyService{web("a", "192.0.2.50:80", "*/")}, o); err == nil || !strings.Contains(err.Error(), "state directory") {
		t.Errorf("a state directory with a space: %v", err)
	}
}

// FuzzHTTPMapKey: the byte-by-byte check of map keys accepts exactly what
// httpKeyRE does.
func FuzzHTTPMapKey(f *testing.F) {
	for _, s := range []string{"www.example.com/", "*.example.com/a/b/", "*/", "*/x%2F~_.-/", "a-.b/", "-a/", "*./", "a//", "a/b", "A/", "*.*.a/", "a/b c/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, key string) {
		if got, want := httpKey(key), httpKeyRE.MatchString(key); got != want {
			t.Fatalf("httpKey(%q) = %t, httpKeyRE says %t", key, got, want)
		}
	})
}
