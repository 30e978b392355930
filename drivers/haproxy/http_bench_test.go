package haproxy

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/render"
)

// httpChange is one change of the http benchmark: the new state of one
// service.
type httpChange struct {
	svc     render.HAProxyService
	service bool // a whole new service (else a route change)
}

// httpChanges returns routeChanges route changes over the services of
// base (a route added, changed, removed, in turn) and newServices new
// services, interleaved: one new service after every routeChanges /
// newServices route changes.
func httpChanges(base []render.HAProxyService, backends []*webServer, routeChanges, newServices int) []httpChange {
	cur := map[string]render.HAProxyService{}
	for _, s := range base {
		cur[s.Name] = s
	}
	bind := base[0].Bind.String()
	var out []httpChange
	added := 0
	for i := 0; i < routeChanges; i++ {
		s := cur[base[i%len(base)].Name]
		first := strings.Fields(routesString(s))[0] // the stable route
		var routes string
		switch (i / len(base)) % 3 {
		case 0: // add two routes
			routes = fmt.Sprintf("%s x%d.test/ www.test/p%d", first, i, i)
		case 1: // change one
			routes = fmt.Sprintf("%s x%d.test/ www.test/q%d", first, i-len(base), i)
		case 2: // remove both
			routes = first
		}
		s = httpSvc(s.Name, bind, routes, s.Servers...)
		cur[s.Name] = s
		out = append(out, httpChange{svc: s})
		if newServices > 0 && (i+1)%(routeChanges/newServices) == 0 && added < newServices {
			n := fmt.Sprintf("new%03d", added)
			out = append(out, httpChange{svc: httpSvc(n, bind, n+".test/", backends[added%len(backends)].server(1)), service: true})
			added++
		}
	}
	return out
}

func routesString(s render.HAProxyService) string {
	var parts []string
	for _, r := range s.Routes {
		h := r.Host
		if h == "" {
			h = "*"
		}
		parts = append(parts, h+r.PathPrefix)
	}
	return strings.Join(parts, " ")
}

// BenchmarkHTTPChanges applies 1,000 route changes and 100 new http
// services to one shared vip:port under a steady client load, once with
// the driver (runtime API: maps and spare slots) and once the confd way
// (re-render haproxy.cfg and the maps, haproxy -c, reload per change, as
// the Kontena load balancer does), and reports per way: reloads, failed
// and answered requests, the time per route change and per new service,
// and the memory of HAProxy's current worker at the end. The driver's way
// runs a second time without the clients (switchman-noload), whose load
// saturates the machine's 2 cores, for its time per change alone. A request fails
// on a transport error, a 5xx answer, or a stable route answered by
// another service. Run it with
//
//	go test -run '^$' -bench BenchmarkHTTPChanges -benchtime 1x -timeout 30m ./drivers/haproxy/
func BenchmarkHTTPChanges(b *testing.B) {
	requireHAProxy(b)
	const routeChanges, newServices, services = 1000, 100, 10
	backends := make([]*webServer, 4)
	for i := range backends {
		backends[i] = startWebServer(b, fmt.Sprintf("b%d", i))
	}
	for _, mode := range []string{"switchman", "switchman-noload", "confd"} {
		b.Run(mode, func(b *testing.B) {
			for range b.N {
				dir := shortDir(b)
				d := newRealDriver(b, dir)
				vip := freeVIP(b)
				var base []render.HAProxyService
				stable := map[string]string{}
				var urls []string
				for i := range services {
					n := fmt.Sprintf("svc%02d", i)
					base = append(base, httpSvc(n, vip.String(), n+".test/", backends[i%len(backends)].server(1)))
					u := "http://" + n + ".test/"
					stable[u], urls = backends[i%len(backends)].name, append(urls, u)
				}
				changes := httpChanges(base, backends, routeChanges, newServices)
				for i := 0; i < 20; i++ { // routes that come and go
					urls = append(urls, fmt.Sprintf("http://x%d.test/", i*7), fmt.Sprintf("http://www.test/p%d", i*7))
				}
				ctx := context.Background()
				if errs := d.Apply(ctx, states(base...)); len(errs) > 0 {
					b.Fatal(errs)
				}
				cur := map[string]render.HAProxyService{}
				for _, s := range base {
					cur[s.Name] = s
				}
				l := &webLoop{stopC: make(chan struct{})} // no clients: the time per change alone
				if mode != "switchman-noload" {
					l = startWebLoop(vip, urls, stable)
					waitFor(b, "clients served", func() bool { return l.total.Load() > 100 })
				}
				pids := workerPIDs(b, d)
				var routeTime, serviceTime time.Duration
				for _, c := range changes {
					cur[c.svc.Name] = c.svc
					t0 := time.Now()
					switch mode {
					case "switchman", "switchman-noload":
						if errs := d.Apply(ctx, states(c.svc)); len(errs) > 0 {
							b.Fatal(errs)
						}
					case "confd":
						if err := confdHTTPApply(ctx, d, cur); err != nil {
							b.Fatal(err)
						}
					}
					if c.service {
						serviceTime += time.Since(t0)
					} else {
						routeTime += time.Since(t0)
					}
				}
				time.Sleep(200 * time.Millisecond) // requests in flight at the last change
				l.stop()
				reloads := float64(d.Reloads())
				if mode == "confd" {
					reloads = float64(len(changes))
				} else if got := workerPIDs(b, d); got != pids {
					b.Errorf("worker pids changed from %s to %s", pids, got)
				}
				b.ReportMetric(reloads, "reloads")
				b.ReportMetric(float64(len(l.fails)), "failed-reqs")
				b.ReportMetric(float64(l.total.Load()-int64(len(l.fails))), "ok-reqs")
				b.ReportMetric(float64(routeTime.Microseconds())/1000/routeChanges, "ms/route-change")
				b.ReportMetric(float64(serviceTime.Microseconds())/1000/newServices, "ms/new-service")
				b.ReportMetric(workerRSS(b, d), "worker-MB")
				if len(l.fails) > 0 {
					b.Logf("%s: first failure: %s", mode, l.fails[0])
				}
				d.Close()
			}
		})
	}
}

// workerRSS is the resident memory of HAProxy's current worker, in MiB.
func workerRSS(b *testing.B, d *Driver) float64 {
	st, err := d.proc.(*execProcess).showProc(context.Background())
	if err != nil || len(st.workers) == 0 {
		b.Fatalf("show proc: %v", err)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", st.workers[0]))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(status), "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[0] == "VmRSS:" {
			kb, _ := strconv.Atoi(f[1])
			return float64(kb) / 1024
		}
	}
	return 0
}

// confdHTTPApply is what a confd-style tool does per change: render the
// whole configuration (haproxy.cfg and the routing maps) from every
// service, check it with haproxy -c, replace the files and reload.
func confdHTTPApply(ctx context.Context, d *Driver, cur map[string]render.HAProxyService) error {
	opts := d.base
	opts.HTTPSpareSlots = 1 // a full render needs no spare slots
	var svcs []render.HAProxyService
	for _, s := range cur {
		svcs = append(svcs, s)
	}
	head, parts, layout, err := render.HAProxyConfigParts(svcs, opts)
	if err != nil {
		return err
	}
	cfg := head
	for _, p := range parts {
		cfg = append(cfg, p.Text...)
	}
	files, err := render.HTTPFiles(layout, svcs, opts)
	if err != nil {
		return err
	}
	for _, f := range files {
		if err := os.WriteFile(f.Path, f.Content, 0o600); err != nil {
			return err
		}
	}
	return confdLoad(ctx, d, cfg)
}
