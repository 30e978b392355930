package haproxy

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

func requireHAProxy(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("haproxy"); err != nil {
		t.Skip("haproxy is not installed (apt-get install haproxy): skipping the real-HAProxy test")
	}
}

// makeCert returns a self-signed certificate and key as PEM, with cn as
// its subject, and the certificate's serial.
func makeCert(t testing.TB, cn string) ([]byte, *big.Int) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	out := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return append(out, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})...), serial
}

// nameServer is a TCP backend that answers every connection with its name.
type nameServer struct {
	name string
	ln   net.Listener
	wg   sync.WaitGroup
}

func startNameServer(t testing.TB, name string) *nameServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &nameServer{name: name, ln: ln}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.WriteString(c, name+"\n")
			}()
		}
	}()
	t.Cleanup(s.stop)
	return s
}

func (s *nameServer) stop() { s.ln.Close(); s.wg.Wait() }

func (s *nameServer) server(weight int) render.HAProxyServer {
	ap := netip.MustParseAddrPort(s.ln.Addr().String())
	return render.HAProxyServer{Name: render.ServerName(ap.Addr(), ap.Port()), Address: ap.Addr(), Port: ap.Port(), Weight: weight}
}

// freeVIP picks a loopback address in 127.77.0.0/24 and a free port on it.
func freeVIP(t testing.TB) netip.AddrPort {
	t.Helper()
	for i := 0; i < 20; i++ {
		n, _ := rand.Int(rand.Reader, big.NewInt(250))
		a := netip.AddrFrom4([4]byte{127, 77, 0, byte(n.Int64() + 2)})
		ln, err := net.Listen("tcp", netip.AddrPortFrom(a, 0).String())
		if err != nil {
			continue
		}
		ap := netip.MustParseAddrPort(ln.Addr().String())
		ln.Close()
		return ap
	}
	t.Fatal("no free port on 127.77.0.0/24")
	return netip.AddrPort{}
}

// shortDir is a temporary directory with a short path: Unix socket paths
// are limited to 108 bytes.
func shortDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "swhx")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// ask makes one TLS (or plain) connection and returns the backend's name
// and the certificate serial the client saw.
func ask(vip netip.AddrPort, useTLS bool) (string, *big.Int, error) {
	d := net.Dialer{Timeout: 2 * time.Second}
	raw, err := d.Dial("tcp", vip.String())
	if err != nil {
		return "", nil, err
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(3 * time.Second))
	var c net.Conn = raw
	var serial *big.Int
	if useTLS {
		tc := tls.Client(raw, &tls.Config{InsecureSkipVerify: true}) // self-signed test certificate, checked by serial below
		if err := tc.Handshake(); err != nil {
			return "", nil, err
		}
		serial = tc.ConnectionState().PeerCertificates[0].SerialNumber
		c = tc
	}
	b, err := io.ReadAll(c)
	if err != nil && len(b) == 0 {
		return "", serial, err
	}
	name := strings.TrimSpace(string(b))
	if name == "" {
		return "", serial, fmt.Errorf("empty answer")
	}
	return name, serial, nil
}

// clientLoop makes connections one after another until stopped, counting
// failures and answers per backend.
type clientLoop struct {
	vip    netip.AddrPort
	tls    bool
	stopC  chan struct{}
	done   chan struct{}
	mu     sync.Mutex
	hits   map[string]int
	last   []string // the most recent answers
	serial *big.Int
	fails  []error
	total  atomic.Int64
	once   sync.Once
}

func startClients(vip netip.AddrPort, useTLS bool) *clientLoop {
	c := &clientLoop{vip: vip, tls: useTLS, stopC: make(chan struct{}), done: make(chan struct{}), hits: map[string]int{}}
	go func() {
		defer close(c.done)
		for {
			select {
			case <-c.stopC:
				return
			default:
			}
			name, serial, err := ask(vip, useTLS)
			c.total.Add(1)
			c.mu.Lock()
			if err != nil {
				c.fails = append(c.fails, err)
			} else {
				c.hits[name]++
				c.last = append(c.last, name)
				if len(c.last) > 20 {
					c.last = c.last[1:]
				}
				c.serial = serial
			}
			c.mu.Unlock()
		}
	}()
	return c
}

func (c *clientLoop) stop() { c.once.Do(func() { close(c.stopC) }); <-c.done }

// waitFor polls cond until it holds, failing the test after a generous
// deadline.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	waitWithin(t, what, 20*time.Second, 20*time.Millisecond, cond)
}

// waitWithin polls cond every period until it holds; the test fails
// after limit.
func waitWithin(t testing.TB, what string, limit, period time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(period)
	}
}

// recent reports whether the last n answers satisfy pred.
func (c *clientLoop) recent(n int, pred func(name string) bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.last) < n {
		return false
	}
	for _, name := range c.last[len(c.last)-n:] {
		if !pred(name) {
			return false
		}
	}
	return true
}

func (c *clientLoop) resetRecent() {
	c.mu.Lock()
	c.last = nil
	c.mu.Unlock()
}

func workerPIDs(t testing.TB, d *Driver) string {
	t.Helper()
	p := d.proc.(*execProcess)
	st, err := p.showProc(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprint(st.workers)
}

// serving reports whether the HAProxy p supervises runs a worker (a
// killed master's old worker may still answer the admin socket for a
// while: the master CLI tells them apart).
func serving(p *execProcess) bool {
	p.mu.Lock()
	cur := p.cur
	p.mu.Unlock()
	st, err := p.showProc(context.Background())
	return cur != nil && err == nil && st.master == cur.pid && len(st.workers) > 0 && p.Running(context.Background())
}

// masterPID is the pid of the HAProxy master the driver supervises.
func masterPID(t testing.TB, d *Driver) int {
	t.Helper()
	p := d.proc.(*execProcess)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cur == nil {
		t.Fatal("no supervised haproxy")
	}
	return p.cur.pid
}

func newRealDriver(t testing.TB, dir string) *Driver {
	t.Helper()
	d, err := New(Options{Dir: dir, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	return d
}

func apply(t testing.TB, d *Driver, svcs ...render.HAProxyService) map[string]error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return d.Apply(ctx, states(svcs...))
}

func TestRealHAProxyPoolChangesWithoutReload(t *testing.T) {
	requireHAProxy(t)
	dir := shortDir(t)
	d := newRealDriver(t, dir)
	vip := freeVIP(t)
	certA, serialA := makeCert(t, "a.test")
	b1, b2, b3 := startNameServer(t, "b1"), startNameServer(t, "b2"), startNameServer(t, "b3")
	svc := render.HAProxyService{Name: "web", Bind: vip, CertificateKey: "/switchman/certs/web", CertificatePEM: certA,
		Scheduler: spec.RoundRobin, Servers: []render.HAProxyServer{b1.server(1), b2.server(1)}}
	if errs := apply(t, d, svc); len(errs) > 0 {
		t.Fatalf("apply: %v", errs)
	}
	info, err := os.Stat(dir + "/certs/web.pem")
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("certificate file: %v %v", info, err)
	}

	c := startClients(vip, true)
	defer c.stop()
	waitFor(t, "both backends answer", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.hits["b1"] > 0 && c.hits["b2"] > 0
	})
	c.mu.Lock()
	if c.serial.Cmp(serialA) != 0 {
		t.Errorf("client saw certificate %v, want %v", c.serial, serialA)
	}
	c.mu.Unlock()
	pids := workerPIDs(t, d)

	step := func(what string, servers []render.HAProxyServer, until func(string) bool) {
		t.Helper()
		svc.Servers = servers
		if errs := apply(t, d, svc); len(errs) > 0 {
			t.Fatalf("%s: %v", what, errs)
		}
		c.resetRecent()
		waitFor(t, what, func() bool { return c.recent(12, until) })
	}
	// Add b3.
	step("b3 added", []render.HAProxyServer{b1.server(1), b2.server(1), b3.server(1)}, func(string) bool { return true })
	waitFor(t, "b3 answers", func() bool { c.mu.Lock(); defer c.mu.Unlock(); return c.hits["b3"] > 0 })
	// b2 fails: the health checker sets its weight to 0, then it dies.
	step("b2 at weight 0", []render.HAProxyServer{b1.server(1), b2.server(0), b3.server(1)}, func(n string) bool { return n != "b2" })
	b2.stop()
	// Reweight: b3 gets almost everything.
	step("b3 weighted up", []render.HAProxyServer{b1.server(1), b2.server(0), b3.server(100)}, func(string) bool { return true })
	// Remove b1 and b2.
	step("b1 and b2 removed", []render.HAProxyServer{b3.server(100)}, func(n string) bool { return n == "b3" })
	b1.stop()

	st, err := d.rt.ServersState(context.Background(), "be_web")
	if err != nil || len(st) != 1 || st[0].Weight != 100 || st[0].Maint {
		t.Errorf("servers after changes: %+v, %v", st, err)
	}

	// Certificate change: hot-swapped, no reload.
	certB, serialB := makeCert(t, "b.test")
	svc.CertificatePEM = certB
	if errs := apply(t, d, svc); len(errs) > 0 {
		t.Fatalf("certificate change: %v", errs)
	}
	waitFor(t, "the new certificate is served", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.serial.Cmp(serialB) == 0
	})
	if got, _ := os.ReadFile(dir + "/certs/web.pem"); !bytes.Contains(got, bytes.Split(certB, []byte("\n"))[1]) {
		t.Error("certificate file on disk not updated")
	}

	// Hostile definitions: refused by spec.Parse, and by the driver.
	for _, raw := range []string{
		"vip: 127.77.0.9\nport: 443\ntls:\n  certificate: \"/etc/a.pem\\n    server evil 192.0.2.1:80\"\nbackends: [{address: 127.0.0.1}]\n",
		"vip: 127.77.0.9\nport: 443\ntls:\n  certificate: \"/etc/a.pem;del server be_web/x\"\nbackends: [{address: 127.0.0.1}]\n",
		"vip: 127.77.0.9\nport: 443\ntls:\n  certificate_key: \"/k #\"\nbackends: [{address: 127.0.0.1}]\n",
	} {
		if _, err := spec.Parse("evil", []byte(raw)); err == nil {
			t.Errorf("spec.Parse accepted %q", raw)
		}
	}
	evil := render.HAProxyService{Name: "evil\n    server x 192.0.2.1:80", Bind: freeVIP(t), Servers: []render.HAProxyServer{b3.server(1)}}
	evil2 := render.HAProxyService{Name: "evil2", Bind: freeVIP(t), Certificate: "/tmp/x.pem crt /etc/shadow", Servers: []render.HAProxyServer{b3.server(1)}}
	evil3 := render.HAProxyService{Name: "evil3", Bind: freeVIP(t), Servers: []render.HAProxyServer{{Name: "s1;shutdown sessions server be_web/x", Address: netip.MustParseAddr("127.0.0.1"), Port: 1, Weight: 1}}}
	errs := apply(t, d, svc, evil, evil2, evil3)
	if errs[evil.Name] == nil || errs["evil2"] == nil || errs["evil3"] == nil || errs["web"] != nil {
		t.Errorf("hostile services: %v", errs)
	}
	c.resetRecent()
	waitFor(t, "web still served", func() bool { return c.recent(5, func(n string) bool { return n == "b3" }) })
	if cfg, _ := os.ReadFile(dir + "/haproxy.cfg"); strings.Contains(string(cfg), "evil") || strings.Contains(string(cfg), "192.0.2.1") {
		t.Errorf("hostile values reached haproxy.cfg:\n%s", cfg)
	}

	if got := d.Reloads(); got != 0 {
		t.Errorf("%d reloads for pool and certificate changes, want 0", got)
	}
	if got := workerPIDs(t, d); got != pids {
		t.Errorf("worker pids changed from %s to %s: HAProxy was reloaded", pids, got)
	}

	// A structural change (a second service) reloads once, seamlessly.
	vip2 := freeVIP(t)
	plain := render.HAProxyService{Name: "plain", Bind: vip2, Scheduler: spec.LeastConnection, Servers: []render.HAProxyServer{b3.server(1)}}
	if errs := apply(t, d, plain, svc); len(errs) > 0 {
		t.Fatalf("structural change: %v", errs)
	}
	if got := d.Reloads(); got != 1 {
		t.Errorf("%d reloads after adding a service, want 1", got)
	}
	if name, _, err := ask(vip2, false); err != nil || name != "b3" {
		t.Errorf("new plain service: %q %v", name, err)
	}
	c.resetRecent()
	waitFor(t, "web served after the reload", func() bool { return c.recent(10, func(n string) bool { return n == "b3" }) })
	if st, err := d.rt.ServersState(context.Background(), "be_web"); err != nil || len(st) != 1 || st[0].Weight != 100 {
		t.Errorf("servers after reload: %+v, %v", st, err)
	}

	c.stop()
	if len(c.fails) > 0 {
		t.Errorf("%d of %d requests failed, first: %v", len(c.fails), c.total.Load(), c.fails[0])
	}
	t.Logf("%d requests, answers %v", c.total.Load(), c.hits)
}

// TestRealHAProxyRestartAndAdopt kills HAProxy's master: the driver starts
// it again from the on-disk config, which holds the runtime-added servers.
// Then the agent "exits" (supervision ends, HAProxy keeps serving) and a
// second driver on the same directory adopts the running HAProxy: its
// first Sync reloads nothing and writes nothing. When the adopted master
// dies, the second driver brings HAProxy back (issue 10, item 8).
func TestRealHAProxyRestartAndAdopt(t *testing.T) {
	requireHAProxy(t)
	dir := shortDir(t)
	d := newRealDriver(t, dir)
	vip := freeVIP(t)
	b1, b2 := startNameServer(t, "b1"), startNameServer(t, "b2")
	svc := render.HAProxyService{Name: "tcp", Bind: vip, Scheduler: spec.SourceHashing, Servers: []render.HAProxyServer{b1.server(1)}}
	if errs := apply(t, d, svc); len(errs) > 0 {
		t.Fatal(errs)
	}
	svc.Servers = []render.HAProxyServer{b2.server(7)} // runtime change
	if errs := apply(t, d, svc); len(errs) > 0 {
		t.Fatal(errs)
	}
	master := masterPID(t, d)
	if err := syscallKill(master); err != nil {
		t.Fatal(err)
	}
	p := d.proc.(*execProcess)
	waitFor(t, "haproxy restarted", func() bool { return p.Restarts() == 1 && serving(p) })
	waitFor(t, "b2 serves after the restart", func() bool { n, _, err := ask(vip, false); return err == nil && n == "b2" })

	// The agent exits: HAProxy keeps serving, unsupervised.
	restarted := masterPID(t, d)
	p.release()
	pids := workerPIDs(t, d)
	cfg, err := os.Stat(dir + "/haproxy.cfg")
	if err != nil {
		t.Fatal(err)
	}

	// A second driver (the agent restarted) adopts the running HAProxy.
	d2, err := New(Options{Dir: dir, RestartBackoff: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d2.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if errs := d2.Sync(ctx, states(svc)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if d2.Reloads() != 0 || workerPIDs(t, d2) != pids {
		t.Errorf("adopting driver reloaded (%d reloads, workers %s -> %s)", d2.Reloads(), pids, workerPIDs(t, d2))
	}
	if cfg2, err := os.Stat(dir + "/haproxy.cfg"); err != nil || !os.SameFile(cfg, cfg2) || !cfg2.ModTime().Equal(cfg.ModTime()) {
		t.Errorf("the adopting Sync rewrote haproxy.cfg (%v)", err)
	}
	svc.Servers = []render.HAProxyServer{b1.server(3), b2.server(7)}
	if errs := d2.Apply(ctx, states(svc)); len(errs) > 0 {
		t.Fatal(errs)
	}
	st, err := d2.rt.ServersState(ctx, "be_tcp")
	if err != nil || len(st) != 2 {
		t.Fatalf("servers: %+v %v", st, err)
	}
	conns, err := d2.Connections(ctx, map[string]bool{"tcp": true})
	if err != nil || len(conns) != 2 {
		t.Errorf("connections: %v %v", conns, err)
	}

	// The adopted master dies: the second driver starts HAProxy again.
	adopted := masterPID(t, d2)
	if adopted != restarted {
		t.Fatalf("the second driver supervises pid %d, want the running master %d", adopted, restarted)
	}
	if err := syscallKill(adopted); err != nil {
		t.Fatal(err)
	}
	p2 := d2.proc.(*execProcess)
	waitFor(t, "the adopted haproxy started again", func() bool { return p2.Restarts() == 1 && serving(p2) })
	if got := masterPID(t, d2); got == adopted {
		t.Errorf("master pid %d unchanged", got)
	}
	seen := map[string]bool{}
	waitFor(t, "both servers answer after the restart", func() bool {
		if n, _, err := ask(vip, false); err == nil {
			seen[n] = true
		}
		return seen["b2"] // source hashing: one client address reaches one server
	})
	// The next pass reads back what the restarted HAProxy holds.
	if errs := d2.Apply(ctx, states(svc)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if st, err := d2.rt.ServersState(ctx, "be_tcp"); err != nil || len(st) != 2 {
		t.Errorf("servers after the restart: %+v %v", st, err)
	}
}

// holdPort holds a TCP port on loopback, as another program would (etcd
// on 127.0.0.1:2379), until the test ends or release is called.
func holdPort(t testing.TB) (netip.AddrPort, func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return netip.MustParseAddrPort(ln.Addr().String()), func() { ln.Close() }
}

// quick is how long a bind failure may take to be reported: generous, and
// far below the ~20 s a failed reload used to block for.
const quick = 10 * time.Second

// TestRealHAProxyBindFailure (issue 10, defect 4): a service whose port is
// taken fails alone, with the bind cause, quickly, at a start and while
// HAProxy runs; the other services keep answering, nothing is reloaded
// for it, and it is loaded once the port is free.
func TestRealHAProxyBindFailure(t *testing.T) {
	requireHAProxy(t)
	d := newRealDriver(t, shortDir(t))
	b1 := startNameServer(t, "b1")
	taken, release := holdPort(t)
	good := render.HAProxyService{Name: "good", Bind: freeVIP(t), Servers: []render.HAProxyServer{b1.server(1)}}
	bad := render.HAProxyService{Name: "bad", Bind: taken, Servers: []render.HAProxyServer{b1.server(1)}}
	wantBindError := func(what string, errs map[string]error, took time.Duration) {
		t.Helper()
		err := errs["bad"]
		if !errors.Is(err, syscall.EADDRINUSE) || !strings.Contains(fmt.Sprint(err), "cannot bind socket "+taken.String()) {
			t.Errorf("%s: error of bad = %v; want the bind cause", what, err)
		}
		if len(errs) != 1 {
			t.Errorf("%s: errors %v; want one for bad only", what, errs)
		}
		if took > quick {
			t.Errorf("%s took %v", what, took)
		}
		t.Logf("%s: bad failed in %v: %v", what, took, err)
	}

	t0 := time.Now()
	errs := apply(t, d, good, bad)
	wantBindError("start", errs, time.Since(t0))
	if name, _, err := ask(good.Bind, false); err != nil || name != "b1" {
		t.Fatalf("good does not answer: %q %v", name, err)
	}

	c := startClients(good.Bind, false)
	defer c.stop()
	waitFor(t, "clients served", func() bool { return c.total.Load() > 5 })
	pids := workerPIDs(t, d)
	t0 = time.Now()
	errs = apply(t, d, bad)
	wantBindError("retry alone", errs, time.Since(t0))
	if d.Reloads() != 0 || workerPIDs(t, d) != pids {
		t.Errorf("HAProxy was reloaded for a bind that fails (%d reloads)", d.Reloads())
	}
	other := render.HAProxyService{Name: "other", Bind: freeVIP(t), Servers: []render.HAProxyServer{b1.server(1)}}
	t0 = time.Now()
	errs = apply(t, d, bad, other)
	wantBindError("with another new service", errs, time.Since(t0))
	if name, _, err := ask(other.Bind, false); err != nil || name != "b1" || d.Reloads() != 1 {
		t.Errorf("other: %q %v, %d reloads", name, err, d.Reloads())
	}

	release()
	if errs := apply(t, d, bad); len(errs) > 0 {
		t.Fatalf("bad after its port was freed: %v", errs)
	}
	if name, _, err := ask(taken, false); err != nil || name != "b1" {
		t.Errorf("bad does not answer: %q %v", name, err)
	}
	c.stop()
	if len(c.fails) > 0 {
		t.Errorf("good failed %d of %d connections, first: %v", len(c.fails), c.total.Load(), c.fails[0])
	}
}

// blindProbe is the real process with a probe that finds nothing wrong:
// HAProxy itself refuses the bind, as when a port is taken between the
// probe and the reload.
type blindProbe struct{ *execProcess }

func (blindProbe) ProbeBind(netip.AddrPort) error { return nil }

// TestRealHAProxyRefusedReload: when HAProxy refuses a reload (here a bind
// the probe missed), the refusal is known as soon as the master counts it
// as failed, HAProxy's own words reach the service's error and name the
// service (by the line of haproxy.cfg), the other changes are loaded, and
// the old workers serve on. (While it retries a bind that fails, HAProxy
// 2.6 pauses the old workers' listeners for about 2 s, refusing
// connections: that is why binds are probed before a reload.)
func TestRealHAProxyRefusedReload(t *testing.T) {
	requireHAProxy(t)
	d := newRealDriver(t, shortDir(t))
	d.proc = blindProbe{d.proc.(*execProcess)}
	b1 := startNameServer(t, "b1")
	taken, _ := holdPort(t)
	good := render.HAProxyService{Name: "good", Bind: freeVIP(t), Servers: []render.HAProxyServer{b1.server(1)}}
	if errs := apply(t, d, good); len(errs) > 0 {
		t.Fatal(errs)
	}
	c := startClients(good.Bind, false)
	defer c.stop()
	waitFor(t, "clients served", func() bool { return c.total.Load() > 5 })

	bad := render.HAProxyService{Name: "bad", Bind: taken, Servers: []render.HAProxyServer{b1.server(1)}}
	other := render.HAProxyService{Name: "other", Bind: freeVIP(t), Servers: []render.HAProxyServer{b1.server(1)}}
	t0 := time.Now()
	errs := apply(t, d, bad, other)
	took := time.Since(t0)
	t.Logf("a refused reload and a good one took %v: %v", took, errs["bad"])
	if err := errs["bad"]; !errors.Is(err, ErrReloadFailed) || !strings.Contains(fmt.Sprint(err), "cannot bind socket") || len(errs) != 1 {
		t.Errorf("errors %v; want bad refused with HAProxy's words, and nothing else", errs)
	}
	if took > quick {
		t.Errorf("a refused reload and a good one took %v", took)
	}
	if d.Reloads() != 1 {
		t.Errorf("%d reloads, want 1 (other)", d.Reloads())
	}
	if name, _, err := ask(other.Bind, false); err != nil || name != "b1" {
		t.Errorf("other: %q %v", name, err)
	}
	c.resetRecent()
	waitFor(t, "good served by the old workers after the refusal", func() bool { return c.recent(10, func(n string) bool { return n == "b1" }) })
	c.stop()
	t.Logf("good: %d of %d connections refused while HAProxy retried the bind", len(c.fails), c.total.Load())
}

// holdServer is a backend that keeps every connection open until the
// client closes it.
func holdServer(t testing.TB) (netip.AddrPort, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var open atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			open.Add(1)
			go func() {
				defer open.Add(-1)
				defer c.Close()
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	return netip.MustParseAddrPort(ln.Addr().String()), &open
}

// TestRealHAProxyRemovalDoesNotWait (issue 11, one drain): a server that
// leaves the desired pool with a connection still open is removed by
// Apply at once, its connection shut down, without a poll for it to end.
func TestRealHAProxyRemovalDoesNotWait(t *testing.T) {
	requireHAProxy(t)
	d := newRealDriver(t, shortDir(t))
	b1 := startNameServer(t, "b1")
	hold, open := holdServer(t)
	held := render.HAProxyServer{Name: render.ServerName(hold.Addr(), hold.Port()), Address: hold.Addr(), Port: hold.Port(), Weight: 1}
	svc := render.HAProxyService{Name: "web", Bind: freeVIP(t), Servers: []render.HAProxyServer{held}}
	if errs := apply(t, d, svc); len(errs) > 0 {
		t.Fatal(errs)
	}
	conn, err := net.DialTimeout("tcp", svc.Bind.String(), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	waitFor(t, "the connection reaches the backend", func() bool { return open.Load() == 1 })
	waitFor(t, "Connections counts the open connection", func() bool {
		conns, err := d.Connections(context.Background(), map[string]bool{"web": true})
		return err == nil && conns[render.BackendRef{Service: "web", Addr: hold}] == 1
	})

	svc.Servers = []render.HAProxyServer{b1.server(1)}
	t0 := time.Now()
	if errs := apply(t, d, svc); len(errs) > 0 {
		t.Fatal(errs)
	}
	t.Logf("removal with an open connection took %v", time.Since(t0))
	st, err := d.rt.ServersState(context.Background(), "be_web")
	if err != nil || len(st) != 1 || st[0].Name != b1.server(1).Name {
		t.Errorf("servers after the removal: %+v %v", st, err)
	}
	waitFor(t, "the removed server's connection is shut down", func() bool { return open.Load() == 0 })
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); err == nil {
		t.Error("the client's connection to the removed server is still open")
	}
}

// TestRealHAProxyAttach: attached to a HAProxy the operator runs on
// Dir/haproxy.cfg (with its own sockets), the driver loads structure
// through the operator's master socket, changes pools through the admin
// socket, and neither supervises nor stops it.
func TestRealHAProxyAttach(t *testing.T) {
	requireHAProxy(t)
	dir := shortDir(t)
	admin, master := dir+"/op-admin.sock", dir+"/op-master.sock"
	cfg, err := render.HAProxyConfig(nil, baseOptions(dir, admin))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir+"/haproxy.cfg", cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	op := exec.Command("haproxy", "-W", "-db", "-f", dir+"/haproxy.cfg", "-S", master+",mode,600")
	if err := op.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = op.Wait(); close(exited) }()
	t.Cleanup(func() { _ = op.Process.Kill(); <-exited })
	running := func() bool {
		_, err := cliExchange(context.Background(), admin, time.Second, "show info", nil, false)
		return err == nil
	}
	waitFor(t, "the operator's haproxy answers", running)

	d, err := New(Options{Dir: dir, AttachSocket: admin, AttachMasterSocket: master})
	if err != nil {
		t.Fatal(err)
	}
	b1, b2 := startNameServer(t, "b1"), startNameServer(t, "b2")
	svc := render.HAProxyService{Name: "web", Bind: freeVIP(t), Servers: []render.HAProxyServer{b1.server(1)}}
	if errs := apply(t, d, svc); len(errs) > 0 {
		t.Fatal(errs)
	}
	if name, _, err := ask(svc.Bind, false); err != nil || name != "b1" || d.Reloads() != 1 {
		t.Fatalf("web: %q %v, %d reloads", name, err, d.Reloads())
	}
	svc.Servers = []render.HAProxyServer{b2.server(1)}
	if errs := apply(t, d, svc); len(errs) > 0 {
		t.Fatal(errs)
	}
	waitFor(t, "b2 serves", func() bool { n, _, err := ask(svc.Bind, false); return err == nil && n == "b2" })
	if d.Reloads() != 1 {
		t.Errorf("%d reloads for a pool change", d.Reloads())
	}
	d.Close()
	if !running() {
		t.Fatal("Close stopped the operator's haproxy")
	}
	// It dies: the driver does not start it; the next structural change
	// fails, naming the operator's master socket.
	_ = op.Process.Kill()
	<-exited
	svc.Scheduler = spec.LeastConnection
	errs := apply(t, d, svc)
	if err := errs["web"]; !errors.Is(err, syscall.ECONNREFUSED) || !strings.Contains(err.Error(), master) {
		t.Errorf("error of web = %v; want the master socket refusing", err)
	}
	if running() {
		t.Error("the driver started an attached haproxy")
	}
}

// TestMissingHAProxyBinary: every HAProxy service gets an error that says
// what is missing and how to fix it.
func TestMissingHAProxyBinary(t *testing.T) {
	d, err := New(Options{Bin: "/nonexistent/haproxy-" + strconv.Itoa(os.Getpid()), Dir: shortDir(t)})
	if err != nil {
		t.Fatal(err)
	}
	errs := d.Apply(context.Background(), states(render.HAProxyService{Name: "a"}, render.HAProxyService{Name: "b"}))
	for _, n := range []string{"a", "b"} {
		if errs[n] == nil || !strings.Contains(errs[n].Error(), "apt-get install haproxy") || !strings.Contains(errs[n].Error(), "--haproxy-bin") {
			t.Errorf("%s: %v", n, errs[n])
		}
	}
}

func syscallKill(pid int) error { return syscall.Kill(pid, syscall.SIGKILL) }

func mustAddrPort(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
