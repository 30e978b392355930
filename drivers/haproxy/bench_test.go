package haproxy

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// poolChanges returns n pool states, each one change (add, remove or
// reweight) away from the one before, over the given backends.
func poolChanges(backends []*nameServer, n int) [][]render.HAProxyServer {
	in := map[int]int{0: 1, 1: 1, 2: 1, 3: 1} // backend index -> weight
	var out [][]render.HAProxyServer
	for i := 0; len(out) < n; i++ {
		switch i % 3 {
		case 0: // add the first backend not in the pool
			for j := range backends {
				if _, ok := in[j]; !ok {
					in[j] = 1
					break
				}
			}
		case 1: // remove one, keeping at least two
			if len(in) > 2 {
				for j := range backends {
					if _, ok := in[(i+j)%len(backends)]; ok {
						delete(in, (i+j)%len(backends))
						break
					}
				}
			}
		case 2: // reweight one
			for j := range backends {
				if _, ok := in[(i+j)%len(backends)]; ok {
					in[(i+j)%len(backends)] = 1 + i%50
					break
				}
			}
		}
		var pool []render.HAProxyServer
		for j, b := range backends {
			if w, ok := in[j]; ok {
				pool = append(pool, b.server(w))
			}
		}
		out = append(out, pool)
	}
	return out
}

// load runs c client loops against vip until stopped and counts
// connections and failures.
type load struct {
	ok, failed atomic.Int64
	first      atomic.Value
	stop       chan struct{}
	wg         sync.WaitGroup
}

func startLoad(vip string, clients int, useTLS bool) *load {
	l := &load{stop: make(chan struct{})}
	ap := mustAddrPort(vip)
	for range clients {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				if _, _, err := ask(ap, useTLS); err != nil {
					l.failed.Add(1)
					l.first.CompareAndSwap(nil, err.Error())
				} else {
					l.ok.Add(1)
				}
			}
		}()
	}
	return l
}

func (l *load) end() { close(l.stop); l.wg.Wait() }

// BenchmarkPoolChanges applies 100 pool changes (adds, removes, weights)
// to a TLS service under a steady client load, once with the driver
// (runtime API) and once the confd way (re-render, haproxy -c, reload per
// change), and reports reloads, failed connections and the time per change
// of each. A removal goes as the agent makes it: the leaving servers at
// weight 0 first, until Connections reports them idle (the agent's drain),
// then without them; ms/change counts the driver's Applies, drain-ms the
// waits for the drains. Run it with
//
//	go test -run '^$' -bench BenchmarkPoolChanges -benchtime 1x ./drivers/haproxy/
func BenchmarkPoolChanges(b *testing.B) {
	requireHAProxy(b)
	const changes = 100
	backends := make([]*nameServer, 8)
	for i := range backends {
		backends[i] = startNameServer(b, fmt.Sprintf("b%d", i))
	}
	pools := poolChanges(backends, changes)
	for _, mode := range []string{"switchman", "confd"} {
		b.Run(mode, func(b *testing.B) {
			for range b.N {
				dir := shortDir(b)
				d := newRealDriver(b, dir)
				vip := freeVIP(b)
				certPEM, _ := makeCert(b, "bench")
				svc := render.HAProxyService{Name: "bench", Bind: vip, CertificateKey: "/k", CertificatePEM: certPEM, Scheduler: spec.RoundRobin, Servers: pools[0]}
				ctx := context.Background()
				if errs := d.Apply(ctx, states(svc)); len(errs) > 0 {
					b.Fatal(errs)
				}
				l := startLoad(vip.String(), 4, true)
				time.Sleep(200 * time.Millisecond) // warm up: let the load reach steady state
				reloads := uint64(0)
				var elapsed, drained time.Duration
				apply := func(servers []render.HAProxyServer) {
					svc.Servers = servers
					t0 := time.Now()
					if errs := d.Apply(ctx, states(svc)); len(errs) > 0 {
						b.Fatal(errs)
					}
					elapsed += time.Since(t0)
				}
				prev := pools[0]
				for _, pool := range pools {
					switch mode {
					case "switchman":
						if leaving := draining(prev, pool); len(leaving) > 0 {
							apply(slices.Concat(pool, leaving))
							t0 := time.Now()
							waitIdle(b, d, leaving)
							drained += time.Since(t0)
						}
						apply(pool)
					case "confd":
						svc.Servers = pool
						t0 := time.Now()
						if err := confdApply(ctx, d, svc); err != nil {
							b.Fatal(err)
						}
						elapsed += time.Since(t0)
						reloads++
					}
					prev = pool
				}
				time.Sleep(200 * time.Millisecond) // connections in flight at the last change
				l.end()
				if mode == "switchman" {
					reloads = d.Reloads()
				}
				b.ReportMetric(float64(reloads), "reloads")
				b.ReportMetric(float64(l.failed.Load()), "failed-conns")
				b.ReportMetric(float64(l.ok.Load()), "ok-conns")
				b.ReportMetric(float64(elapsed.Microseconds())/1000/changes, "ms/change")
				b.ReportMetric(float64(drained.Milliseconds()), "drain-ms")
				if f := l.first.Load(); f != nil {
					b.Logf("%s: first failure: %v", mode, f)
				}
				d.Close()
			}
		})
	}
}

// draining lists the servers of prev that are not in next, at weight 0:
// what the agent's drain keeps rendering until their connections end.
func draining(prev, next []render.HAProxyServer) []render.HAProxyServer {
	var out []render.HAProxyServer
	for _, s := range prev {
		if !slices.ContainsFunc(next, func(n render.HAProxyServer) bool { return n.Name == s.Name }) {
			s.Weight = 0
			out = append(out, s)
		}
	}
	return out
}

// waitIdle waits, as the agent's drain does, until Connections reports no
// connection left on the given servers (at most 5 s, a drain timeout).
func waitIdle(b *testing.B, d *Driver, servers []render.HAProxyServer) {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		conns, err := d.Connections(context.Background(), map[string]bool{"bench": true})
		if err != nil {
			b.Fatal(err)
		}
		busy := false
		for _, s := range servers {
			busy = busy || conns[render.BackendRef{Service: "bench", Addr: netip.AddrPortFrom(s.Address, s.Port)}] > 0
		}
		if !busy {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// confdApply is what a confd-style tool does per change: render the whole
// config, check it with haproxy -c, replace the file and reload.
func confdApply(ctx context.Context, d *Driver, svc render.HAProxyService) error {
	opts := d.base
	opts.Certificates = map[string]string{svc.Name: d.opts.Dir + "/certs/" + svc.Name + ".pem"}
	cfg, err := render.HAProxyConfig([]render.HAProxyService{svc}, opts)
	if err != nil {
		return err
	}
	return confdLoad(ctx, d, cfg)
}

// confdLoad replaces haproxy.cfg with cfg once haproxy -c accepts it, and
// reloads.
func confdLoad(ctx context.Context, d *Driver, cfg []byte) error {
	next := d.cfgPath + ".next"
	if err := os.WriteFile(next, cfg, 0o600); err != nil {
		return err
	}
	if err := d.proc.Validate(ctx, next); err != nil {
		return err
	}
	if err := os.Rename(next, d.cfgPath); err != nil {
		return err
	}
	return d.proc.Reload(ctx)
}

// benchDir holds BenchmarkApplyPoolChange's haproxy.cfg: /dev/shm, a
// tmpfs like /run where --haproxy-dir lives by default.
const benchDir = "/dev/shm"

// benchDriver is a driver on the fake runtime working in a directory under
// benchDir, with spare spare slots per http pool.
func benchDriver(b *testing.B, spare int) *Driver {
	dir, err := os.MkdirTemp(benchDir, "swbench")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	rt := newFakeRuntime()
	proc := &fakeProcess{rt: rt, cfgPath: dir + "/haproxy.cfg"}
	d, err := newDriver(Options{Dir: dir, Logger: discardLogger(), HTTPSpareSlots: spare}, rt, proc, dir+"/admin.sock")
	if err != nil {
		b.Fatal(err)
	}
	if err := d.makeDir(); err != nil {
		b.Fatal(err)
	}
	return d
}

// BenchmarkApplyPoolChange measures the driver's own work for one
// service's pool change (the fake runtime stands in for HAProxy) with
// 100, 2,000 and 10,000 services loaded.
func BenchmarkApplyPoolChange(b *testing.B) {
	for _, n := range []int{100, 2000, 10000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			d := benchDriver(b, 0)
			svcs := make([]render.HAProxyService, n)
			for i := range svcs {
				svcs[i] = render.HAProxyService{Name: fmt.Sprintf("s%05d", i), Bind: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 443),
					Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1), fsrv("10.0.0.2", 80, 1), fsrv("10.0.0.3", 80, 1), fsrv("10.0.0.4", 80, 1)}}
			}
			if errs := d.Sync(context.Background(), states(svcs...)); len(errs) > 0 {
				b.Fatal(errs)
			}
			svc := svcs[n/2]
			b.ResetTimer()
			for i := range b.N {
				svc.Servers = slices.Clone(svc.Servers)
				svc.Servers[0].Weight = 1 + i%2
				if errs := d.Apply(context.Background(), states(svc)); len(errs) > 0 {
					b.Fatal(errs)
				}
			}
		})
	}
}

// BenchmarkApplyRouteChange measures the driver's own work for one route
// change of one http service (the fake runtime stands in for HAProxy; the
// map file is written to /dev/shm) with 10, 1,000 and 5,000 http services
// sharing one vip:port.
func BenchmarkApplyRouteChange(b *testing.B) {
	for _, n := range []int{10, 1000, 5000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			d := benchDriver(b, 16)
			svcs := make([]render.HAProxyService, n)
			for i := range svcs {
				name := fmt.Sprintf("s%05d", i)
				svcs[i] = httpSvc(name, "192.0.2.80:80", name+".example.com/ www.example.com/"+name, fsrv("10.0.0.1", 80, 1), fsrv("10.0.0.2", 80, 1))
			}
			if errs := d.Sync(context.Background(), states(svcs...)); len(errs) > 0 {
				b.Fatal(errs)
			}
			svc := svcs[n/2]
			b.ResetTimer()
			for i := range b.N {
				svc.Routes = append(svc.Routes[:2:2], spec.Route{Host: "x.example.com", PathPrefix: "/" + strconv.Itoa(i%2)})
				if errs := d.Apply(context.Background(), states(svc)); len(errs) > 0 {
					b.Fatal(errs)
				}
			}
		})
	}
}
