package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/switchman-lb/switchman/internal/etcdtest"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/status"
	"github.com/switchman-lb/switchman/watcher"
	"github.com/switchman-lb/switchman/watcher/embedded"
)

// recordingDriver is a fake data plane that keeps the IPVS services it was
// given, refuses what it is told to fail, and counts removals.
type recordingDriver struct {
	mu       sync.Mutex
	services map[string]render.L4Service
	fail     map[string]error
	applies  int
	syncs    int
	removals int
	conns    map[render.BackendRef]int
}

// Connections reports the connection counts the test set, as the IPVS
// driver reports ActiveConn+InActConn.
func (d *recordingDriver) Connections(context.Context, map[string]bool) (map[render.BackendRef]int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[render.BackendRef]int, len(d.conns))
	for k, v := range d.conns {
		out[k] = v
	}
	return out, nil
}

func (d *recordingDriver) setConns(ref render.BackendRef, n int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.conns[ref] = n
}

func newRecordingDriver() *recordingDriver {
	return &recordingDriver{services: map[string]render.L4Service{}, fail: map[string]error{}, conns: map[render.BackendRef]int{}}
}

func (d *recordingDriver) Name() string { return "recording" }

func (d *recordingDriver) Apply(_ context.Context, changed []*render.ServiceState) map[string]error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.applies++
	return d.apply(changed)
}

func (d *recordingDriver) Sync(_ context.Context, all []*render.ServiceState) map[string]error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.syncs++
	want := map[string]bool{}
	for _, s := range all {
		want[s.Name] = true
	}
	var gone []*render.ServiceState
	for name := range d.services {
		if !want[name] {
			gone = append(gone, &render.ServiceState{Name: name})
		}
	}
	return d.apply(append(all, gone...))
}

// apply sets or removes each service's IPVS part. d.mu is held.
func (d *recordingDriver) apply(states []*render.ServiceState) map[string]error {
	errs := map[string]error{}
	for _, st := range states {
		if err := d.fail[st.Name]; err != nil {
			errs[st.Name] = err
			continue
		}
		if st.L4 == nil {
			if _, ok := d.services[st.Name]; ok {
				delete(d.services, st.Name)
				d.removals++
			}
			continue
		}
		d.services[st.Name] = *st.L4
	}
	return errs
}

func (d *recordingDriver) get(name string) (render.L4Service, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s, ok := d.services[name]
	return s, ok
}

func (d *recordingDriver) snapshot() (map[string]render.L4Service, int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[string]render.L4Service, len(d.services))
	for k, v := range d.services {
		out[k] = v
	}
	return out, d.removals
}

func (d *recordingDriver) setFail(name string, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.fail[name] = err
}

func freeURL(t *testing.T) string { return "http://" + etcdtest.FreeAddr(t) }

type etcdFixture struct {
	dir, clientURL, peerURL string
	srv                     *embedded.Server
}

func startEtcd(t *testing.T, f *etcdFixture) {
	t.Helper()
	if f.dir == "" {
		f.dir, f.clientURL, f.peerURL = t.TempDir(), freeURL(t), freeURL(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	srv, err := embedded.Start(ctx, slog.New(slog.DiscardHandler), embedded.Options{Dir: f.dir, ClientURL: f.clientURL, PeerURL: f.peerURL, Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	f.srv = srv
}

func client(t *testing.T, endpoint string) *clientv3.Client {
	t.Helper()
	cli, err := watcher.Connect(watcher.ConnOptions{Endpoints: []string{endpoint}, DialTimeout: 2 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// harness is one agent wired to a real etcd through a cuttable proxy.
type harness struct {
	t      *testing.T
	etcd   *etcdFixture
	proxy  *etcdtest.Proxy
	admin  *clientv3.Client // talks to etcd directly, as an operator would
	driver *recordingDriver
	cancel context.CancelFunc
	done   chan struct{}
}

func newHarness(t *testing.T, leaseTTL time.Duration) *harness {
	t.Helper()
	h := &harness{t: t, etcd: &etcdFixture{}, driver: newRecordingDriver(), done: make(chan struct{})}
	startEtcd(t, h.etcd)
	t.Cleanup(func() { h.etcd.srv.Close() })
	h.proxy = etcdtest.NewProxy(t, strings.TrimPrefix(h.etcd.clientURL, "http://"))
	h.admin = client(t, h.etcd.clientURL)
	cli := client(t, h.proxy.URL())
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	w := watcher.New(cli, log, watcher.Options{Prefix: "/switchman", MinBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond})
	pub, err := status.NewPublisher(cli, log, "/switchman", "n1", status.Node{Version: "test"}, leaseTTL)
	if err != nil {
		t.Fatal(err)
	}
	a := New(log, w, []Plane{{Driver: h.driver, Part: render.PartIPVS}}, pub, nil, nil, Options{Policy: Policy{Prefix: "/switchman"}, Debounce: 20 * time.Millisecond, RetryMin: 50 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	var wg sync.WaitGroup
	for _, run := range []func(context.Context) error{w.Run, pub.Run, a.Run} {
		wg.Add(1)
		go func() { defer wg.Done(); _ = run(ctx) }()
	}
	go func() { wg.Wait(); close(h.done) }()
	t.Cleanup(h.stop)
	return h
}

func (h *harness) stop() {
	h.cancel()
	select {
	case <-h.done:
	case <-time.After(30 * time.Second):
		h.t.Error("agent did not stop within 30s")
	}
}

func (h *harness) put(key, val string) int64 {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := h.admin.Put(ctx, key, val)
	if err != nil {
		h.t.Fatal(err)
	}
	return resp.Header.Revision
}

func (h *harness) del(key string) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := h.admin.Delete(ctx, key); err != nil {
		h.t.Fatal(err)
	}
}

func (h *harness) status(name string) (status.Status, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := h.admin.Get(ctx, "/switchman/status/n1/"+name)
	if err != nil || len(resp.Kvs) == 0 {
		return status.Status{}, false
	}
	var st status.Status
	if err := json.Unmarshal(resp.Kvs[0].Value, &st); err != nil {
		h.t.Fatalf("status of %s is not JSON: %v", name, err)
	}
	return st, true
}

func svcJSON(vip string, port int, backends ...string) string {
	var bs []string
	for _, b := range backends {
		bs = append(bs, fmt.Sprintf(`{"address":%q}`, b))
	}
	return fmt.Sprintf(`{"vip":%q,"port":%d,"drain":"0s","backends":[%s]}`, vip, port, strings.Join(bs, ","))
}

func destinations(s render.L4Service) string {
	var out []string
	for _, d := range s.Destinations {
		out = append(out, fmt.Sprintf("%s:%d/%d", d.Address, d.Port, d.Weight))
	}
	return strings.Join(out, ",")
}

func wantService(h *harness, name, dests string) func() string {
	return func() string {
		s, ok := h.driver.get(name)
		if !ok {
			return name + " not applied"
		}
		if got := destinations(s); got != dests {
			return fmt.Sprintf("%s has %s, want %s", name, got, dests)
		}
		return ""
	}
}

func wantState(h *harness, name, state, errPart string) func() string {
	return func() string {
		st, ok := h.status(name)
		if !ok {
			return "no status key for " + name
		}
		if st.State != state || !strings.Contains(st.Error, errPart) {
			return fmt.Sprintf("status of %s is %s %q, want %s containing %q", name, st.State, st.Error, state, errPart)
		}
		return ""
	}
}

func TestPutUpdateDeleteAndRejection(t *testing.T) {
	h := newHarness(t, 10*time.Second)
	h.put("/switchman/services/web", svcJSON("192.0.2.10", 80, "10.1.1.2", "10.1.1.3"))
	h.put("/switchman/services/dns", `{"vip":"192.0.2.53","port":53,"protocol":"udp","backends":[{"address":"10.1.2.2"}]}`)
	eventually(t, "web applied", wantService(h, "web", "10.1.1.2:80/1,10.1.1.3:80/1"))
	eventually(t, "web status", wantState(h, "web", "applied", ""))

	// Update: one backend more, via a pool member.
	h.put("/switchman/backends/web/m1", `{"address":"10.1.1.4","weight":5}`)
	eventually(t, "pool member merged", wantService(h, "web", "10.1.1.2:80/1,10.1.1.3:80/1,10.1.1.4:80/5"))

	// A bad update is rejected, names field and value, and the last good
	// version stays in force; the other service is untouched.
	h.put("/switchman/services/web", `{"vip":"192.0.2.10","port":80,"backends":[{"address":"10.1.1.2","port":70000}]}`)
	eventually(t, "web rejected", wantState(h, "web", "rejected", "backends[0].port: 70000 is out of range 1-65535"))
	eventually(t, "last good kept", wantService(h, "web", "10.1.1.2:80/1,10.1.1.3:80/1,10.1.1.4:80/5"))
	if _, ok := h.driver.get("dns"); !ok {
		t.Fatal("dns was removed when web was rejected")
	}
	// A bad pool member is rejected too, naming the member key.
	h.put("/switchman/services/web", svcJSON("192.0.2.10", 80, "10.1.1.2"))
	eventually(t, "web fixed", wantService(h, "web", "10.1.1.2:80/1,10.1.1.4:80/5"))
	h.put("/switchman/backends/web/m2", `{"address":"not-an-ip"}`)
	eventually(t, "bad member rejected", wantState(h, "web", "rejected", `backends/web/m2: address: "not-an-ip" is not an IPv4 or IPv6 address`))
	eventually(t, "last good kept after bad member", wantService(h, "web", "10.1.1.2:80/1,10.1.1.4:80/5"))
	h.del("/switchman/backends/web/m2")
	eventually(t, "recovered", wantState(h, "web", "applied", ""))

	// A conflicting service loses to the older one and says who won.
	h.put("/switchman/services/web2", svcJSON("192.0.2.10", 80, "10.9.9.9"))
	eventually(t, "conflict", wantState(h, "web2", "rejected", `claimed by service "web"`))
	if _, ok := h.driver.get("web2"); ok {
		t.Fatal("the conflicting service was applied")
	}

	// A driver failure is reported as failed, then recovers.
	h.driver.setFail("dns", fmt.Errorf("kernel said no"))
	h.put("/switchman/services/dns", `{"vip":"192.0.2.53","port":53,"protocol":"udp","scheduler":"wrr","backends":[{"address":"10.1.2.2"}]}`)
	eventually(t, "dns failed", wantState(h, "dns", "failed", "recording: kernel said no"))
	h.driver.setFail("dns", nil)
	eventually(t, "dns retried", wantState(h, "dns", "applied", ""))

	// Delete removes the service and its status.
	h.del("/switchman/services/web")
	eventually(t, "web deleted", func() string {
		if _, ok := h.driver.get("web"); ok {
			return "web still applied"
		}
		if _, ok := h.status("web"); ok {
			return "web status still there"
		}
		return ""
	})
	// With web gone, web2 takes the address.
	eventually(t, "web2 takes over", wantService(h, "web2", "10.9.9.9:80/1"))
}

func TestCompactionWhileWatchCut(t *testing.T) {
	h := newHarness(t, 30*time.Second)
	h.put("/switchman/services/a", svcJSON("192.0.2.1", 80, "10.0.0.1"))
	h.put("/switchman/services/b", svcJSON("192.0.2.2", 80, "10.0.0.2"))
	eventually(t, "a applied", wantService(h, "a", "10.0.0.1:80/1"))
	eventually(t, "b applied", wantService(h, "b", "10.0.0.2:80/1"))

	h.proxy.SetCut(true)
	h.del("/switchman/services/a")
	h.put("/switchman/services/b", svcJSON("192.0.2.2", 80, "10.0.0.3"))
	rev := h.put("/switchman/services/c", svcJSON("192.0.2.3", 80, "10.0.0.4"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if _, err := h.admin.Compact(ctx, rev, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	cancel()
	// While cut off, the agent keeps what it had: nothing is removed.
	got, removals := h.driver.snapshot()
	if _, ok := got["a"]; !ok || removals != 0 {
		t.Fatalf("while etcd was unreachable the agent removed something: %v, %d removals", got, removals)
	}
	h.proxy.SetCut(false)
	eventually(t, "a gone after compaction", func() string {
		if _, ok := h.driver.get("a"); ok {
			return "a still applied"
		}
		return ""
	})
	eventually(t, "b updated", wantService(h, "b", "10.0.0.3:80/1"))
	eventually(t, "c added", wantService(h, "c", "10.0.0.4:80/1"))
}

func TestEtcdRestartKeepsDataPlane(t *testing.T) {
	h := newHarness(t, 30*time.Second)
	h.put("/switchman/services/a", svcJSON("192.0.2.1", 80, "10.0.0.1"))
	eventually(t, "a applied", wantService(h, "a", "10.0.0.1:80/1"))
	h.etcd.srv.Close()
	// etcd is down: the data plane keeps its state for a while.
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		if _, removals := h.driver.snapshot(); removals != 0 {
			t.Fatal("a service was removed while etcd was down")
		}
		time.Sleep(50 * time.Millisecond)
	}
	startEtcd(t, h.etcd)
	h.admin = client(t, h.etcd.clientURL)
	h.put("/switchman/services/b", svcJSON("192.0.2.2", 80, "10.0.0.2"))
	eventually(t, "b applied after restart", wantService(h, "b", "10.0.0.2:80/1"))
	if _, ok := h.driver.get("a"); !ok {
		t.Fatal("a was lost across the etcd restart")
	}
}

func TestLeaseExpiryRemovesStatus(t *testing.T) {
	h := newHarness(t, 2*time.Second)
	h.put("/switchman/services/a", svcJSON("192.0.2.1", 80, "10.0.0.1"))
	eventually(t, "status written", wantState(h, "a", "applied", ""))
	h.proxy.SetCut(true) // the agent can no longer keep its lease alive
	eventually(t, "status gone with the lease", func() string {
		if _, ok := h.status("a"); ok {
			return "status still present"
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if resp, err := h.admin.Get(ctx, "/switchman/nodes/n1"); err != nil || len(resp.Kvs) != 0 {
			return "node key still present"
		}
		return ""
	})
	if _, ok := h.driver.get("a"); !ok {
		t.Fatal("the data plane lost a service because its status lease expired")
	}
	h.proxy.SetCut(false)
	eventually(t, "status rewritten under a new lease", wantState(h, "a", "applied", ""))
}

func TestDrainBeforeRemoval(t *testing.T) {
	h := newHarness(t, 10*time.Second)
	def := `{"vip":"192.0.2.10","port":80,"drain":"%s","backends":[%s]}`
	both := `{"address":"10.1.1.2"},{"address":"10.1.1.3","weight":4}`
	h.put("/switchman/services/web", fmt.Sprintf(def, "10m", both))
	eventually(t, "applied", wantService(h, "web", "10.1.1.2:80/1,10.1.1.3:80/4"))
	gone := render.BackendRef{Service: "web", Addr: netip.MustParseAddrPort("10.1.1.3:80")}
	h.driver.setConns(gone, 1) // an open connection

	h.put("/switchman/services/web", fmt.Sprintf(def, "10m", `{"address":"10.1.1.2"}`))
	eventually(t, "removed backend drains at weight 0", wantService(h, "web", "10.1.1.2:80/1,10.1.1.3:80/0"))
	eventually(t, "status says draining", func() string {
		st, _ := h.status("web")
		for _, b := range st.Backends {
			if b.Address == "10.1.1.3" && b.Draining && b.Weight == 0 {
				return ""
			}
		}
		return fmt.Sprintf("status backends %+v", st.Backends)
	})
	// It comes back during the drain: restored with its weight, not recreated.
	h.put("/switchman/services/web", fmt.Sprintf(def, "10m", both))
	eventually(t, "restored", wantService(h, "web", "10.1.1.2:80/1,10.1.1.3:80/4"))
	h.put("/switchman/services/web", fmt.Sprintf(def, "10m", `{"address":"10.1.1.2"}`))
	eventually(t, "draining again", wantService(h, "web", "10.1.1.2:80/1,10.1.1.3:80/0"))
	// The connection closes: deleted long before the 10m drain is up.
	h.driver.setConns(gone, 0)
	eventually(t, "deleted once idle", wantService(h, "web", "10.1.1.2:80/1"))

	// A connection that never closes is cut off when the drain time is up.
	h.put("/switchman/services/web", fmt.Sprintf(def, "1s", both))
	eventually(t, "back", wantService(h, "web", "10.1.1.2:80/1,10.1.1.3:80/4"))
	h.driver.setConns(gone, 7)
	h.put("/switchman/services/web", fmt.Sprintf(def, "1s", `{"address":"10.1.1.2"}`))
	eventually(t, "deleted after the drain time", wantService(h, "web", "10.1.1.2:80/1"))
}
