package ha_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/switchman-lb/switchman/ha"
	"github.com/switchman-lb/switchman/internal/etcdtest"
	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/watcher/embedded"
)

// hosts records which agent holds which group, as the address holders of
// several hosts would, and samples them every 10 ms.
type hosts struct {
	mu   sync.Mutex
	held map[string]map[string]bool // node -> group -> held
	dead map[string]bool
	// worst is the most holders the sampler saw for one group at once.
	worst   int
	seenTwo string
}

func newHosts() *hosts { return &hosts{held: map[string]map[string]bool{}, dead: map[string]bool{}} }

type hostHolder struct {
	h    *hosts
	node string
}

func (r hostHolder) Hold(group string, held bool, _ []spec.GroupAddress) {
	r.h.mu.Lock()
	defer r.h.mu.Unlock()
	if r.h.dead[r.node] {
		return
	}
	if r.h.held[r.node] == nil {
		r.h.held[r.node] = map[string]bool{}
	}
	r.h.held[r.node][group] = held
}

// die marks a host dead: its addresses are gone with it.
func (h *hosts) die(node string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.dead[node] = true
	delete(h.held, node)
}

func (h *hosts) holders(group string) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []string
	for node, groups := range h.held {
		if groups[group] {
			out = append(out, node)
		}
	}
	return out
}

func (h *hosts) sample(ctx context.Context, groups []string) {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, g := range groups {
			hs := h.holders(g)
			h.mu.Lock()
			if len(hs) > h.worst {
				h.worst = len(hs)
				if len(hs) > 1 {
					h.seenTwo = fmt.Sprintf("%s held by %v", g, hs)
				}
			}
			h.mu.Unlock()
		}
	}
}

func freeURL(t *testing.T) string { return "http://" + etcdtest.FreeAddr(t) }

type etcdServer struct {
	dir, client, peer string
	srv               *embedded.Server
}

func (e *etcdServer) start(t *testing.T) {
	t.Helper()
	if e.dir == "" {
		e.dir, e.client, e.peer = t.TempDir(), freeURL(t), freeURL(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	srv, err := embedded.Start(ctx, slog.New(slog.DiscardHandler), embedded.Options{Dir: e.dir, ClientURL: e.client, PeerURL: e.peer, Name: "ha"})
	if err != nil {
		t.Fatal(err)
	}
	e.srv = srv
}

// connect returns a client of endpoint that retries its connection at
// most every 500ms. With gRPC's default backoff (1s growing to 120s), a
// client may reconnect seconds after its peers once etcd is back, and an
// owner whose client reconnects more than Regain - Margin after its
// peers' drops by design (see the package documentation): that would make
// the tests of etcd outages depend on the backoff's jitter.
func connect(t *testing.T, endpoint string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 2 * time.Second, Logger: zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 500 * time.Millisecond}})}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// agent is one Elector in the test, with its own path to etcd.
type agent struct {
	node   string
	el     *ha.Elector
	proxy  *etcdtest.Proxy
	cancel context.CancelFunc
	done   chan struct{}
}

func startAgent(t *testing.T, node string, e *etcdServer, h *hosts, groups []string, reg prometheus.Registerer) *agent {
	t.Helper()
	p := etcdtest.NewProxy(t, strings.TrimPrefix(e.client, "http://"))
	cli := connect(t, p.URL())
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("node", node)
	el, err := ha.New(ha.Options{Node: node, Listen: "127.0.0.1:0", Store: ha.NewEtcd(cli), Holder: hostHolder{h: h, node: node}, Logger: log, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	el.SetGroups(groups)
	ctx, cancel := context.WithCancel(context.Background())
	a := &agent{node: node, el: el, proxy: p, cancel: cancel, done: make(chan struct{})}
	go func() { defer close(a.done); _ = el.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-a.done })
	return a
}

func waitFor(t *testing.T, limit time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > limit {
			t.Fatalf("%s: not within %v", what, limit)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

func one(h *hosts, group string) string {
	if hs := h.holders(group); len(hs) == 1 {
		return hs[0]
	}
	return ""
}

// TestElectorsWithEtcd runs three agents against a real etcd: exactly one
// holds; when its host dies another takes over; when the next owner loses
// etcd it drops and a third holds; a planned release hands over at once.
// A sampler every 10 ms never sees two holders.
func TestElectorsWithEtcd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd")
	}
	e := &etcdServer{}
	e.start(t)
	t.Cleanup(func() { e.srv.Close() })
	h := newHosts()
	groups := []string{"web"}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	go h.sample(ctx, groups)
	agents := map[string]*agent{}
	for _, n := range []string{"lb1", "lb2", "lb3"} {
		agents[n] = startAgent(t, n, e, h, groups, nil)
	}
	waitFor(t, 15*time.Second, "one holder", func() bool { return one(h, "web") != "" })
	first := one(h, "web")
	if o := agents[first].el.Owners()["web"]; o.Node != first {
		t.Fatalf("owner seen by %s: %+v", first, o)
	}

	// The owner's host dies.
	h.die(first)
	agents[first].cancel()
	took := waitFor(t, 15*time.Second, "takeover after a death", func() bool { return one(h, "web") != "" })
	second := one(h, "web")
	t.Logf("%s died; %s held after %v", first, second, took)

	// The next owner loses etcd but lives on.
	agents[second].proxy.SetCut(true)
	took = waitFor(t, 15*time.Second, "takeover from an owner without etcd", func() bool { o := one(h, "web"); return o != "" && o != second })
	third := one(h, "web")
	t.Logf("%s lost etcd; %s held after %v", second, third, took)
	agents[second].proxy.SetCut(false)

	// A planned stop hands over to the one left.
	waitFor(t, 15*time.Second, second+" back in contact", agents[second].el.EtcdContact)
	rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	if err := agents[third].el.Release(rctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "hand-over on release", func() bool { return one(h, "web") == second })
	t.Logf("%s released; %s held %v after the release began", third, second, time.Since(start))
	stop()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.worst > 1 {
		t.Fatalf("the sampler saw two holders: %s", h.seenTwo)
	}
}

// TestElectorsEtcdDown: etcd stops for everyone: the owner keeps its group,
// nobody else holds, and nothing moves when etcd is back.
func TestElectorsEtcdDown(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd")
	}
	e := &etcdServer{}
	e.start(t)
	h := newHosts()
	groups := []string{"web"}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	go h.sample(ctx, groups)
	agents := map[string]*agent{}
	for _, n := range []string{"lb1", "lb2"} {
		agents[n] = startAgent(t, n, e, h, groups, nil)
	}
	waitFor(t, 15*time.Second, "one holder", func() bool { return one(h, "web") != "" })
	owner := one(h, "web")
	epoch := agents[owner].el.Owners()["web"].Epoch
	e.srv.Close()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if o := one(h, "web"); o != owner {
			t.Fatalf("with etcd down the holder is %q, want %s", o, owner)
		}
		time.Sleep(10 * time.Millisecond)
	}
	e.start(t)
	t.Cleanup(func() { e.srv.Close() })
	waitFor(t, 30*time.Second, "contact again", func() bool {
		o := agents[owner].el.Owners()["web"]
		return o.Node == owner && o.Epoch == epoch && agents[owner].el.Owns("web")
	})
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if o := one(h, "web"); o != owner {
			t.Fatalf("after etcd came back the holder is %q, want %s", o, owner)
		}
	}
	stop()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.worst > 1 {
		t.Fatalf("the sampler saw two holders: %s", h.seenTwo)
	}
}

// TestElectorsRelease: between two healthy agents a planned stop hands
// both groups over, and the metrics follow. The time it takes is logged,
// not asserted (the simulation asserts it on the fake clock): a standby
// whose etcd reads were slow for a moment waits Regain before it claims.
func TestElectorsRelease(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd")
	}
	e := &etcdServer{}
	e.start(t)
	t.Cleanup(func() { e.srv.Close() })
	h := newHosts()
	groups := []string{"web", "db"}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	go h.sample(ctx, groups)
	agents := map[string]*agent{}
	regs := map[string]*prometheus.Registry{}
	for _, n := range []string{"lb1", "lb2"} {
		regs[n] = prometheus.NewRegistry()
		agents[n] = startAgent(t, n, e, h, groups, regs[n])
	}
	waitFor(t, 15*time.Second, "both groups held", func() bool { return one(h, "web") != "" && one(h, "db") != "" })
	owner := one(h, "web")
	standby := map[string]string{"lb1": "lb2", "lb2": "lb1"}[owner]
	// The standby claims only once it has had etcd for Regain.
	var since time.Time
	waitFor(t, 15*time.Second, "standby in contact for the regain time", func() bool {
		if !agents[standby].el.EtcdContact() {
			since = time.Time{}
			return false
		}
		if since.IsZero() {
			since = time.Now()
		}
		return time.Since(since) > ha.DefaultTiming().Regain
	})
	rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	if err := agents[owner].el.Release(rctx); err != nil {
		t.Fatal(err)
	}
	took := waitFor(t, 10*time.Second, "hand-over", func() bool { return one(h, "web") == standby && one(h, "db") == standby })
	t.Logf("planned hand-over of two groups: the standby held both %v after Release began, %v after it returned", time.Since(start), took)
	waitFor(t, 5*time.Second, "metrics", func() bool {
		return gauge(t, regs[standby], "switchman_ha_owned_groups") == 2 && gauge(t, regs[owner], "switchman_ha_owned_groups") == 0
	})
	if c := gauge(t, regs[standby], "switchman_ha_owner_changes_total"); c < 2 {
		t.Fatalf("owner changes seen by %s: %v, want at least 2", standby, c)
	}
	stop()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.worst > 1 {
		t.Fatalf("the sampler saw two holders: %s", h.seenTwo)
	}
}

// gauge sums the values of a metric family (every label set).
func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			sum += m.GetGauge().GetValue() + m.GetCounter().GetValue()
		}
	}
	return sum
}
