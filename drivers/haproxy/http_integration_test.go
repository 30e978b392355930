package haproxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/render"
)

// webServer is an HTTP backend that answers every request with its name,
// the path it saw and the forwarded headers.
type webServer struct {
	name string
	srv  *http.Server
	addr netip.AddrPort
}

func startWebServer(t testing.TB, name string) *webServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	w := &webServer{name: name, addr: netip.MustParseAddrPort(ln.Addr().String())}
	w.srv = &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(rw, "%s %s xff=%s xfp=%s\n", name, r.URL.Path, r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Proto"))
	}), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = w.srv.Serve(ln) }()
	t.Cleanup(func() { _ = w.srv.Close() })
	return w
}

func (w *webServer) server(weight int) render.HAProxyServer {
	return render.HAProxyServer{Name: render.ServerName(w.addr.Addr(), w.addr.Port()), Address: w.addr.Addr(), Port: w.addr.Port(), Weight: weight}
}

// webClient sends requests to vip whatever the URL's host, with the
// Host header (and SNI) of the URL.
func webClient(vip netip.AddrPort, keepAlive bool) *http.Client {
	d := &net.Dialer{Timeout: 2 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", vip.String())
		},
		DisableKeepAlives: !keepAlive,
		// Test certificates are self-signed: the serial the client saw is
		// checked instead (see get).
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // self-signed test certificates
	}
	return &http.Client{Transport: tr, Timeout: 5 * time.Second}
}

// answer is one response: the backend's name (first word of the body),
// its status, and the serial of the certificate the client saw.
type answer struct {
	status int
	name   string
	body   string
	serial *big.Int
}

func get(c *http.Client, url string) (answer, error) {
	resp, err := c.Get(url)
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return answer{}, err
	}
	a := answer{status: resp.StatusCode, body: string(b)}
	if f := strings.Fields(a.body); len(f) > 0 && resp.StatusCode == 200 {
		a.name = f[0]
	}
	if resp.TLS != nil && len(resp.TLS.PeerCertificates) > 0 {
		a.serial = resp.TLS.PeerCertificates[0].SerialNumber
	}
	return a, nil
}

// webLoop requests urls round and round from several clients (with and
// without keep-alive) until stopped. A transport error or a 5xx answer is
// a failure; stable URLs must always be answered by their service.
type webLoop struct {
	stopC  chan struct{}
	wg     sync.WaitGroup
	total  atomic.Int64
	mu     sync.Mutex
	fails  []string
	latest map[string]answer
}

func startWebLoop(vip netip.AddrPort, urls []string, stable map[string]string) *webLoop {
	l := &webLoop{stopC: make(chan struct{}), latest: map[string]answer{}}
	for i, keep := range []bool{true, true, false} {
		c := webClient(vip, keep)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for j := i; ; j++ {
				select {
				case <-l.stopC:
					return
				default:
				}
				u := urls[j%len(urls)]
				a, err := get(c, u)
				l.total.Add(1)
				l.mu.Lock()
				switch {
				case err != nil:
					l.fails = append(l.fails, fmt.Sprintf("%s: %v", u, err))
				case a.status >= 500:
					l.fails = append(l.fails, fmt.Sprintf("%s: %d %q", u, a.status, a.body))
				case stable[u] != "" && a.name != stable[u]:
					l.fails = append(l.fails, fmt.Sprintf("%s: answered by %q (%d), want %q", u, a.name, a.status, stable[u]))
				}
				l.latest[u] = a
				l.mu.Unlock()
			}
		}()
	}
	return l
}

func (l *webLoop) stop() {
	select {
	case <-l.stopC:
	default:
		close(l.stopC)
	}
	l.wg.Wait()
}

// TestRealHTTPSharedVIP: two http services share one vip:port by host
// and by path; requests reach the right one, unmatched ones get 404, and
// the forwarded headers are set.
func TestRealHTTPSharedVIP(t *testing.T) {
	requireHAProxy(t)
	d := newRealDriver(t, shortDir(t))
	vip := freeVIP(t)
	www, api := startWebServer(t, "www"), startWebServer(t, "api")
	svcs := []render.HAProxyService{
		httpSvc("www", vip.String(), "www.test/", www.server(1)),
		httpSvc("api", vip.String(), "www.test/api api.test/ *.api.test/v1", api.server(1)),
	}
	if errs := apply(t, d, svcs...); len(errs) > 0 {
		t.Fatal(errs)
	}
	c := webClient(vip, true)
	port := fmt.Sprint(vip.Port())
	for _, tt := range []struct{ url, name string }{
		{"http://www.test/", "www"},
		{"http://WWW.Test:" + port + "/index.html", "www"},
		{"http://www.test/api", "api"},
		{"http://www.test/api/v1/users", "api"},
		{"http://www.test/apix", "www"},
		{"http://api.test/anything", "api"},
		{"http://eu.api.test/v1/x", "api"},
		{"http://eu.api.test/v2", ""},
		{"http://a.eu.api.test/v1", ""},
		{"http://other.test/", ""},
	} {
		a, err := get(c, tt.url)
		if err != nil {
			t.Fatalf("%s: %v", tt.url, err)
		}
		wantStatus := 200
		if tt.name == "" {
			wantStatus = 404
		}
		if a.status != wantStatus || a.name != tt.name {
			t.Errorf("%s: %d %q, want %d from %q", tt.url, a.status, a.body, wantStatus, tt.name)
		}
		if a.status == 200 && (!strings.Contains(a.body, "xff=127.0.0.1") || !strings.Contains(a.body, "xfp=http")) {
			t.Errorf("%s: forwarded headers missing: %q", tt.url, a.body)
		}
	}
	if d.Reloads() != 0 {
		t.Errorf("%d reloads", d.Reloads())
	}
}

// TestRealHTTPChangesWithoutReload: while clients keep requesting, routes
// are added, changed and removed, a pool changes and whole http services
// come and go: no request fails (a removed server finishes the requests it
// has) and the HAProxy worker never changes.
func TestRealHTTPChangesWithoutReload(t *testing.T) {
	requireHAProxy(t)
	d := newRealDriver(t, shortDir(t))
	vip := freeVIP(t)
	b := map[string]*webServer{}
	for _, n := range []string{"www", "api", "api2", "blog", "shop"} {
		b[n] = startWebServer(t, n)
	}
	www := httpSvc("www", vip.String(), "www.test/", b["www"].server(1))
	api := httpSvc("api", vip.String(), "www.test/api", b["api"].server(1))
	if errs := apply(t, d, www, api); len(errs) > 0 {
		t.Fatal(errs)
	}
	urls := []string{"http://www.test/", "http://www.test/api/x", "http://www.test/blog", "http://blog.test/", "http://shop.test/cart", "http://www.test/v2/x"}
	l := startWebLoop(vip, urls, map[string]string{"http://www.test/": "www"})
	defer l.stop()
	waitFor(t, "clients served", func() bool { return l.total.Load() > 30 })
	pids := workerPIDs(t, d)

	expect := func(what string, want map[string]string) {
		t.Helper()
		waitFor(t, what, func() bool {
			l.mu.Lock()
			defer l.mu.Unlock()
			for u, n := range want {
				a, ok := l.latest[u]
				if !ok || a.name != n || (n == "" && a.status != 404) {
					return false
				}
			}
			return true
		})
	}
	step := func(what string, states []*render.ServiceState, want map[string]string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if errs := d.Apply(ctx, states); len(errs) > 0 {
			t.Fatalf("%s: %v", what, errs)
		}
		l.mu.Lock()
		clear(l.latest)
		l.mu.Unlock()
		expect(what, want)
	}
	step("a route added", states(httpSvc("api", vip.String(), "www.test/api www.test/v2", b["api"].server(1))),
		map[string]string{"http://www.test/v2/x": "api", "http://www.test/api/x": "api"})
	step("a route changed", states(httpSvc("api", vip.String(), "www.test/api www.test/blog", b["api"].server(1))),
		map[string]string{"http://www.test/v2/x": "www", "http://www.test/blog": "api"})
	step("a route removed", states(httpSvc("api", vip.String(), "www.test/api", b["api"].server(1))),
		map[string]string{"http://www.test/blog": "www"})
	step("a service added", states(httpSvc("blog", vip.String(), "blog.test/ www.test/blog", b["blog"].server(1))),
		map[string]string{"http://blog.test/": "blog", "http://www.test/blog": "blog"})
	step("another service added", states(httpSvc("shop", vip.String(), "shop.test/", b["shop"].server(1))),
		map[string]string{"http://shop.test/cart": "shop"})
	step("a pool changed", states(httpSvc("api", vip.String(), "www.test/api", b["api2"].server(1))),
		map[string]string{"http://www.test/api/x": "api2"})
	step("a route moved", states(httpSvc("blog", vip.String(), "blog.test/", b["blog"].server(1)), httpSvc("shop", vip.String(), "shop.test/ www.test/blog", b["shop"].server(1))),
		map[string]string{"http://www.test/blog": "shop", "http://blog.test/": "blog"})
	step("a service removed", []*render.ServiceState{gone("blog")},
		map[string]string{"http://blog.test/": "", "http://www.test/blog": "shop"})
	step("another service removed", []*render.ServiceState{gone("shop")},
		map[string]string{"http://shop.test/cart": "", "http://www.test/blog": "www"})
	step("a service back in a freed slot", states(httpSvc("blog", vip.String(), "blog.test/", b["blog"].server(1))),
		map[string]string{"http://blog.test/": "blog"})

	// The periodic Sync reads everything back and finds nothing to fix.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	all := states(www, httpSvc("api", vip.String(), "www.test/api", b["api2"].server(1)), httpSvc("blog", vip.String(), "blog.test/", b["blog"].server(1)))
	if errs := d.Sync(ctx, all); len(errs) > 0 {
		t.Fatal(errs)
	}
	expect("after a Sync", map[string]string{"http://blog.test/": "blog", "http://www.test/api/x": "api2", "http://shop.test/cart": ""})
	l.stop()
	if got := workerPIDs(t, d); got != pids || d.Reloads() != 0 {
		t.Errorf("worker pids %s -> %s, %d reloads: HAProxy was reloaded", pids, got, d.Reloads())
	}
	// The server the pool change removed finished its requests in
	// maintenance and is deleted by a Sync once HAProxy holds no connection
	// to it: the Sync shuts down its sessions, but idle connections kept
	// for reuse are only closed by HAProxy's purge (half of them every
	// pool-purge-delay, 5 s), about 20 s here at worst.
	start := time.Now()
	waitWithin(t, "the removed server deleted by a Sync", 2*time.Minute, 250*time.Millisecond, func() bool {
		if errs := d.Sync(ctx, all); len(errs) > 0 {
			t.Fatal(errs)
		}
		st, err := d.rt.ServersState(ctx, d.layout.Slot("api"))
		if err != nil {
			t.Fatal(err)
		}
		return len(st) == 1 && st[0].Addr == b["api2"].addr && !st[0].Maint
	})
	t.Logf("removed server deleted %v after the Sync", time.Since(start).Round(time.Millisecond))
	if len(l.fails) > 0 {
		t.Fatalf("%d of %d requests failed, first: %v", len(l.fails), l.total.Load(), l.fails[0])
	}
	t.Logf("%d requests, none failed, worker pids %s throughout", l.total.Load(), pids)
}

// TestRealHTTPTLSBySNI: two services on one TLS vip:port, each with its
// certificate chosen by SNI; a client without SNI gets the default (the
// first service's); a third service's certificate joins at run time and
// leaves with it.
func TestRealHTTPTLSBySNI(t *testing.T) {
	requireHAProxy(t)
	d := newRealDriver(t, shortDir(t))
	vip := freeVIP(t)
	pemA, serialA := makeCert(t, "a.test")
	pemB, serialB := makeCert(t, "b.test")
	pemC, serialC := makeCert(t, "c.test")
	ba, bb, bc := startWebServer(t, "a"), startWebServer(t, "b"), startWebServer(t, "c")
	a := httpSvc("a", vip.String(), "a.test/", ba.server(1))
	a.CertificateKey, a.CertificatePEM = "/switchman/certs/a", pemA
	b := httpSvc("b", vip.String(), "b.test/", bb.server(1))
	b.CertificateKey, b.CertificatePEM = "/switchman/certs/b", pemB
	if errs := apply(t, d, a, b); len(errs) > 0 {
		t.Fatal(errs)
	}
	c := webClient(vip, false)
	check := func(url, name string, serial *big.Int) {
		t.Helper()
		ans, err := get(c, url)
		if err != nil {
			t.Fatalf("%s: %v", url, err)
		}
		if ans.name != name || ans.serial.Cmp(serial) != 0 {
			t.Errorf("%s: answered by %q (%d) with certificate %v; want %q with %v", url, ans.name, ans.status, ans.serial, name, serial)
		}
		if name != "" && !strings.Contains(ans.body, "xfp=https") {
			t.Errorf("%s: X-Forwarded-Proto not https: %q", url, ans.body)
		}
	}
	check("https://a.test/", "a", serialA)
	check("https://b.test/", "b", serialB)
	// No SNI (an IP address in the URL): the default certificate.
	noSNI := webClient(vip, false)
	ans, err := get(noSNI, "https://"+vip.String()+"/")
	if err != nil || ans.serial.Cmp(serialA) != 0 || ans.status != 404 {
		t.Errorf("without SNI: %d, certificate %v (%v); want 404 with a's certificate %v", ans.status, ans.serial, err, serialA)
	}
	pids := workerPIDs(t, d)

	cs := httpSvc("c", vip.String(), "c.test/", bc.server(1))
	cs.CertificateKey, cs.CertificatePEM = "/switchman/certs/c", pemC
	if errs := apply(t, d, cs); len(errs) > 0 {
		t.Fatal(errs)
	}
	check("https://c.test/", "c", serialC)
	check("https://a.test/", "a", serialA)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if errs := d.Apply(ctx, []*render.ServiceState{gone("c")}); len(errs) > 0 {
		t.Fatal(errs)
	}
	check("https://c.test/", "", serialA) // no route, default certificate
	check("https://b.test/", "b", serialB)
	if got := workerPIDs(t, d); got != pids || d.Reloads() != 0 {
		t.Errorf("worker pids %s -> %s, %d reloads", pids, got, d.Reloads())
	}
}

// TestRealHTTPRestartKeepsRoutes: routes and services changed at run time
// survive HAProxy dying (supervision starts it again from haproxy.cfg and
// the map files) and an agent restart (the next driver adopts HAProxy
// without a reload or a write).
func TestRealHTTPRestartKeepsRoutes(t *testing.T) {
	requireHAProxy(t)
	dir := shortDir(t)
	d := newRealDriver(t, dir)
	vip := freeVIP(t)
	www, api := startWebServer(t, "www"), startWebServer(t, "api")
	svcs := []render.HAProxyService{httpSvc("www", vip.String(), "www.test/", www.server(1))}
	if errs := apply(t, d, svcs...); len(errs) > 0 {
		t.Fatal(errs)
	}
	svcs = append(svcs, httpSvc("api", vip.String(), "www.test/api api.test/", api.server(2)))
	if errs := apply(t, d, svcs...); len(errs) > 0 || d.Reloads() != 0 {
		t.Fatalf("%v, %d reloads", errs, d.Reloads())
	}
	c := webClient(vip, false)
	answers := func() bool {
		for url, name := range map[string]string{"http://www.test/": "www", "http://www.test/api/v": "api", "http://api.test/": "api"} {
			if a, err := get(c, url); err != nil || a.name != name {
				return false
			}
		}
		return true
	}
	waitFor(t, "both services answer", answers)

	if err := syscallKill(masterPID(t, d)); err != nil {
		t.Fatal(err)
	}
	p := d.proc.(*execProcess)
	waitFor(t, "haproxy restarted", func() bool { return p.Restarts() == 1 && serving(p) })
	waitFor(t, "routes answer after the restart", answers)

	restarted := masterPID(t, d)
	p.release() // the agent exits; HAProxy keeps serving
	pids := workerPIDs(t, d)
	d2, err := New(Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d2.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if errs := d2.Sync(ctx, states(svcs...)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if d2.Reloads() != 0 || workerPIDs(t, d2) != pids || masterPID(t, d2) != restarted {
		t.Errorf("the adopting driver reloaded (%d reloads, workers %s -> %s)", d2.Reloads(), pids, workerPIDs(t, d2))
	}
	if !answers() {
		t.Error("routes lost by the adoption")
	}
	// And it changes routes at run time as the first driver did.
	svcs[1] = httpSvc("api", vip.String(), "api.test/", api.server(2))
	if errs := d2.Apply(ctx, states(svcs...)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if a, err := get(c, "http://www.test/api/v"); err != nil || a.name != "www" || d2.Reloads() != 0 {
		t.Errorf("after a route change by the adopting driver: %q %v, %d reloads", a.name, err, d2.Reloads())
	}
}
