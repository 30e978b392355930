//go:build nft_e2e

// Package nft is the host-native end-to-end suite of the agent on
// nf_tables: the real switchman binary in a load-balancer network
// namespace, a real etcd, backends and a client in namespaces of their
// own, and real traffic from the client deciding every case. It needs
// root and nothing but the host kernel (no IPVS, no QEMU):
//
//	make e2e-nft        (go test -tags nft_e2e ./e2e/nft/)
package nft

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	swlab "github.com/switchman-lb/switchman/e2e/internal/lab"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/switchman-lb/switchman/drivers/nftables"
	"github.com/switchman-lb/switchman/internal/netns"
	"github.com/switchman-lb/switchman/internal/netnstest"
	"github.com/switchman-lb/switchman/internal/nsagent"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/status"
	"github.com/switchman-lb/switchman/watcher/embedded"
)

// The topology, every part a namespace (swm-e2e-*):
//
//	client 192.0.2.2, .130 / fd00:c::2, ::82 --- lb 192.0.2.1 / fd00:c::1
//	lb br0 10.1.1.1/24, fd00:1::1/64 --- b1..b3 10.1.1.2-4, fd00:1::2-4, and
//	lonely 10.1.1.5 (no route back to the client)
//
// The client routes the VIPs (198.51.100.0/24, fd00:f::/64) through the
// lb, which holds no VIP address: nf_tables DNATs them in prerouting. The
// agent and etcd run in the lb namespace; etcd listens on its loopback.

const (
	node        = "nft-e2e"
	prefix      = "/switchman"
	etcdAddr    = "127.0.0.1:2379" // inside the lb namespace
	etcdPeer    = "127.0.0.1:2380"
	metricsAddr = "127.0.0.1:9469"
	bePort      = 8080
	// waitLong bounds any condition the suite waits for.
	waitLong = 60 * time.Second
	// leaseTTL is the agent's --lease-ttl.
	leaseTTL = 5 * time.Second
	// dropWait is how long a connection attempt that must be dropped is
	// given before it counts as dropped.
	dropWait = 1500 * time.Millisecond
)

// Client sources.
var (
	srcIn   = netip.MustParseAddr("192.0.2.2")
	srcOut  = netip.MustParseAddr("192.0.2.130") // outside 192.0.2.0/25
	srcIn6  = netip.MustParseAddr("fd00:c::2")
	srcOut6 = netip.MustParseAddr("fd00:c::82")
)

// Metric names the suite reads.
const (
	metricApplied  = `switchman_services{state="applied"}`
	metricWrites   = `switchman_dataplane_writes_total{driver="nftables"}`
	metricRevision = `switchman_last_applied_revision`
)

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// switchmanBin returns the agent binary: $SWITCHMAN_BIN, or one built
// from ./cmd/switchman once per run.
func switchmanBin(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("SWITCHMAN_BIN"); p != "" {
		abs, err := filepath.Abs(p)
		if err != nil {
			t.Fatal(err)
		}
		return abs
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "switchman-nft-e2e-")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "switchman")
		out, err := exec.Command("go", "build", "-o", builtBin, "../../cmd/switchman").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build ./cmd/switchman: %w\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

// TestMain removes the binary it built.
func TestMain(m *testing.M) {
	code := m.Run()
	if builtBin != "" {
		os.RemoveAll(filepath.Dir(builtBin))
	}
	os.Exit(code)
}

// backend is one backend namespace with an HTTP server (TCP) and a UDP
// server on port 8080, on its IPv4 and IPv6 address. Both answer
// "<name> <peer>"; /healthz answers 200, or 503 while down is set.
type backend struct {
	name   string
	ns     string
	v4, v6 netip.Addr
	down   atomic.Bool
}

// lab is one topology, etcd and agent for a top-level test.
type lab struct {
	t        *testing.T
	lb       string
	client   string
	backends map[string]*backend
	dir      string
	logPath  string
	cli      *clientv3.Client
	kernel   *nftables.Netlink // switchman's tables in the lb namespace

	mu    sync.Mutex
	etcd  *embedded.Server
	agent *nsagent.Agent
}

func newLab(t *testing.T) *lab {
	netnstest.Require(t, "nft:nftables")
	switchmanBin(t)
	l := &lab{t: t, backends: map[string]*backend{}, dir: t.TempDir()}
	l.logPath = filepath.Join(l.dir, "agent.log")
	l.lb = netnstest.New(t, "swm-e2e", "lb")
	l.client = netnstest.New(t, "swm-e2e", "cl")
	netnstest.Veth(t, l.client, "c0", l.lb, "l0")
	netnstest.Addr(t, l.client, "c0", "192.0.2.2/24", "192.0.2.130/24", "fd00:c::2/64", "fd00:c::82/64")
	netnstest.Addr(t, l.lb, "l0", "192.0.2.1/24", "fd00:c::1/64")
	netnstest.IP(t, "-n", l.lb, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "mcast_snooping", "0")
	netnstest.Addr(t, l.lb, "br0", "10.1.1.1/24", "fd00:1::1/64")
	netnstest.IP(t, "-n", l.lb, "link", "set", "br0", "up")
	netnstest.Sysctl(t, l.lb, "net/ipv4/ip_forward", "1")
	netnstest.Sysctl(t, l.lb, "net/ipv6/conf/all/forwarding", "1")
	netnstest.IP(t, "-n", l.client, "route", "add", "198.51.100.0/24", "via", "192.0.2.1")
	netnstest.IP(t, "-n", l.client, "-6", "route", "add", "fd00:f::/64", "via", "fd00:c::1")
	for i, name := range []string{"b1", "b2", "b3", "lonely"} {
		l.addBackend(name, i+2, name != "lonely")
	}

	f, err := os.Open(netns.Path(l.lb))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	l.kernel = nftables.NewNetlink(int(f.Fd()))
	t.Cleanup(func() { l.kernel.Close() })
	l.startEtcd()
	cli, err := nsagent.Client(l.lb, etcdAddr)
	if err != nil {
		t.Fatal(err)
	}
	l.cli = cli
	t.Cleanup(func() {
		l.stopAgent(t)
		if t.Failed() {
			t.Logf("last lines of the agent log %s:\n%s", l.logPath, tail(l.logPath, 60))
		}
		cli.Close()
		l.stopEtcd()
	})
	// The lb reaches every backend, and the client reaches the lb, before
	// any case counts connections.
	for _, b := range l.backends {
		for _, a := range []netip.Addr{b.v4, b.v6} {
			eventually(t, "backend "+a.String()+" from the lb", func() error {
				_, err := httpGet(l.lb, netip.Addr{}, netip.AddrPortFrom(a, bePort), "/healthz", time.Second)
				return err
			})
		}
	}
	return l
}

// addBackend starts backend namespace name with host number i on br0.
func (l *lab) addBackend(name string, i int, routeBack bool) {
	t := l.t
	b := &backend{name: name, ns: netnstest.New(t, "swm-e2e", name),
		v4: netip.AddrFrom4([4]byte{10, 1, 1, byte(i)}), v6: netip.MustParseAddr(fmt.Sprintf("fd00:1::%d", i))}
	dev := "v" + name
	netnstest.Veth(t, b.ns, "e0", l.lb, dev)
	netnstest.IP(t, "-n", l.lb, "link", "set", dev, "master", "br0")
	netnstest.Addr(t, b.ns, "e0", b.v4.String()+"/24", b.v6.String()+"/64")
	if routeBack {
		netnstest.IP(t, "-n", b.ns, "route", "add", "default", "via", "10.1.1.1")
		netnstest.IP(t, "-n", b.ns, "-6", "route", "add", "default", "via", "fd00:1::1")
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if b.down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s\n", name, peerOf(r.RemoteAddr))
	})
	var ln net.Listener
	var pc net.PacketConn
	if err := netns.Do(b.ns, func() (err error) {
		if ln, err = net.Listen("tcp", fmt.Sprintf("[::]:%d", bePort)); err != nil {
			return err
		}
		pc, err = net.ListenPacket("udp", fmt.Sprintf("[::]:%d", bePort))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln) //nolint:errcheck // ends with Close
	t.Cleanup(func() { srv.Close() })
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if n > 0 {
				pc.WriteTo([]byte(fmt.Sprintf("%s %s\n", name, peerOf(from.String()))), from)
			}
		}
	}()
	l.backends[name] = b
}

func peerOf(hostport string) string {
	ap, err := netip.ParseAddrPort(hostport)
	if err != nil {
		return hostport
	}
	return ap.Addr().Unmap().String()
}

// startEtcd starts etcd with its listeners in the lb namespace (on its
// loopback), on the lab's data dir: a restart keeps the data.
func (l *lab) startEtcd() {
	l.t.Helper()
	srv, err := nsagent.StartEtcd(l.lb, filepath.Join(l.dir, "etcd"), etcdAddr, etcdPeer)
	if err != nil {
		l.t.Fatal(err)
	}
	l.mu.Lock()
	l.etcd = srv
	l.mu.Unlock()
}

func (l *lab) stopEtcd() {
	l.mu.Lock()
	srv := l.etcd
	l.etcd = nil
	l.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// startAgent starts the agent binary in the lb namespace; its output goes
// to the lab's log file.
func (l *lab) startAgent(t testing.TB) {
	t.Helper()
	a, err := nsagent.Start(l.lb, switchmanBin(t), l.logPath, syscall.SIGKILL, false,
		"--log-level", "info", "agent",
		"--etcd-endpoints", "http://"+etcdAddr,
		"--prefix", prefix,
		"--node", node,
		"--data-dir", filepath.Join(l.dir, "data"),
		"--metrics-addr", metricsAddr,
		"--drivers", "nftables",
		"--l4-driver", "nftables",
		"--vip-cidrs", "198.51.100.0/24,fd00:f::/64",
		"--backend-cidrs", "10.1.1.0/24,fd00:1::/64",
		"--lease-ttl", leaseTTL.String(),
	)
	if err != nil {
		t.Fatal(err)
	}
	l.mu.Lock()
	l.agent = a
	l.mu.Unlock()
}

// stopAgent sends SIGTERM and waits for the agent to exit.
func (l *lab) stopAgent(t testing.TB) {
	t.Helper()
	l.mu.Lock()
	a := l.agent
	l.agent = nil
	l.mu.Unlock()
	if a != nil {
		if err := a.Stop(waitLong); err != nil {
			t.Errorf("stopping the agent: %v", err)
		}
	}
}

func (l *lab) restartAgent(t testing.TB) {
	t.Helper()
	l.stopAgent(t)
	l.startAgent(t)
}

// alive returns an error when the agent has exited.
func (l *lab) alive() error {
	l.mu.Lock()
	a := l.agent
	l.mu.Unlock()
	if a == nil {
		return errors.New("the agent is not running")
	}
	if err := a.Exited(); err != nil {
		return fmt.Errorf("%w\n%s", err, tail(l.logPath, 40))
	}
	return nil
}

// metrics scrapes the agent's /metrics.
func (l *lab) metrics() (map[string]float64, error) { return nsagent.Metrics(l.lb, metricsAddr) }

// metric waits until the agent serves its metrics and returns one.
func (l *lab) metric(t testing.TB, name string) float64 {
	t.Helper()
	var v float64
	eventually(t, "metric "+name, func() error {
		if err := l.alive(); err != nil {
			t.Fatal(err)
		}
		m, err := l.metrics()
		if err != nil {
			return err
		}
		var ok bool
		if v, ok = m[name]; !ok {
			return errors.New("not exported yet")
		}
		return nil
	})
	return v
}

// waitReady waits until a pass finished with n services applied.
func (l *lab) waitReady(t testing.TB, n int) {
	t.Helper()
	eventually(t, fmt.Sprintf("the agent ready with %d services applied", n), func() error {
		if err := l.alive(); err != nil {
			t.Fatal(err)
		}
		m, err := l.metrics()
		if err != nil {
			return err
		}
		if v, ok := m[metricApplied]; !ok || int(v) != n {
			return fmt.Errorf("%s = %v (exported: %v), want %d", metricApplied, v, ok, n)
		}
		return nil
	})
}

func etcdCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}

func (l *lab) put(t testing.TB, key, value string) {
	t.Helper()
	ctx, cancel := etcdCtx()
	defer cancel()
	if _, err := l.cli.Put(ctx, key, value); err != nil {
		t.Fatalf("etcd put %s: %v", key, err)
	}
}

// def is a service definition, written as JSON.
type def map[string]any

// putService writes a definition; the first put of a name registers a
// cleanup that deletes it and waits until the kernel and the status no
// longer have it.
func (l *lab) putService(t *testing.T, name string, d def) {
	t.Helper()
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	l.putRaw(t, name, string(b))
}

// putSame writes a service's definition again, unchanged, and returns
// the revision of the put.
func (l *lab) putSame(t *testing.T, name string) int64 {
	t.Helper()
	ctx, cancel := etcdCtx()
	defer cancel()
	resp, err := l.cli.Get(ctx, prefix+"/services/"+name)
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("get %s: %v", name, err)
	}
	put, err := l.cli.Put(ctx, prefix+"/services/"+name, string(resp.Kvs[0].Value))
	if err != nil {
		t.Fatal(err)
	}
	return put.Header.Revision
}

func (l *lab) putRaw(t *testing.T, name, value string) {
	t.Helper()
	ctx, cancel := etcdCtx()
	resp, err := l.cli.Get(ctx, prefix+"/services/"+name)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		t.Cleanup(func() { l.deleteService(t, name) })
	}
	l.put(t, prefix+"/services/"+name, value)
}

// deleteService deletes a service and waits until no chain of it is left
// in the kernel and its status is gone.
func (l *lab) deleteService(t testing.TB, name string) {
	t.Helper()
	ctx, cancel := etcdCtx()
	_, err := l.cli.Delete(ctx, prefix+"/services/"+name)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "service "+name+" gone from the kernel and the status", func() error {
		if err := l.alive(); err != nil {
			return nil // nothing to wait for
		}
		tables, err := l.kernel.Tables(context.Background())
		if err != nil {
			return err
		}
		for _, tb := range tables {
			for c := range tb.Chains {
				if owner, ok := render.NFTOwner(c); ok && owner == name {
					return fmt.Errorf("chain %s %s still there", tb.Family, c)
				}
			}
		}
		if _, ok, err := l.status(name); err != nil || ok {
			return fmt.Errorf("status still there (%v)", err)
		}
		return nil
	})
}

// status reads the agent's status of a service.
func (l *lab) status(name string) (status.Status, bool, error) {
	ctx, cancel := etcdCtx()
	defer cancel()
	resp, err := l.cli.Get(ctx, prefix+"/status/"+node+"/"+name)
	if err != nil || len(resp.Kvs) == 0 {
		return status.Status{}, false, err
	}
	var st status.Status
	err = json.Unmarshal(resp.Kvs[0].Value, &st)
	return st, true, err
}

// waitStatus polls a service's status until cond accepts it, failing at
// once if the agent died.
func (l *lab) waitStatus(t testing.TB, name, what string, cond func(status.Status) error) status.Status {
	t.Helper()
	return swlab.WaitStatusFrom(t, waitLong, name+": "+what, func() (status.Status, bool, error) {
		if err := l.alive(); err != nil {
			t.Fatal(err)
		}
		return l.status(name)
	}, cond)
}

// weights accepts an applied status whose backends have these weights
// (address -> weight; every backend listed, healthy when its weight is
// above 0).
func weights(want map[netip.Addr]int) func(status.Status) error {
	return func(st status.Status) error {
		if st.State != status.StateApplied {
			return fmt.Errorf("state %s: %s", st.State, st.Error)
		}
		if len(st.Backends) != len(want) {
			return fmt.Errorf("%d backends, want %d", len(st.Backends), len(want))
		}
		for _, b := range st.Backends {
			a, err := netip.ParseAddr(b.Address)
			if err != nil {
				return err
			}
			w, ok := want[a]
			if !ok || b.Weight != w || (w > 0 && !b.Healthy) {
				return fmt.Errorf("backend %s weight %d healthy %v, want weight %d (listed %v)", a, b.Weight, b.Healthy, w, ok)
			}
		}
		return nil
	}
}

// all returns the weights map with every named backend at weight w.
func (l *lab) all(w int, v6 bool, names ...string) map[netip.Addr]int {
	out := map[netip.Addr]int{}
	for _, n := range names {
		a := l.backends[n].v4
		if v6 {
			a = l.backends[n].v6
		}
		out[a] = w
	}
	return out
}

// members lists backends as definition entries with a weight each.
func (l *lab) members(v6 bool, ws map[string]int) []map[string]any {
	var out []map[string]any
	for _, n := range []string{"b1", "b2", "b3", "lonely"} {
		w, ok := ws[n]
		if !ok {
			continue
		}
		a := l.backends[n].v4
		if v6 {
			a = l.backends[n].v6
		}
		out = append(out, map[string]any{"address": a.String(), "port": bePort, "weight": w})
	}
	return out
}

// httpCheck is the health check of the cases: /healthz every second.
func httpCheck() map[string]any {
	return map[string]any{"protocol": "http", "path": "/healthz", "interval": "1s", "timeout": "500ms", "rise": 1, "fall": 2}
}

// hit makes one connection (TCP: an HTTP request; UDP: one datagram) from
// src in the client namespace to vip and returns the backend's name and
// the address the backend saw.
func (l *lab) hit(proto string, src netip.Addr, vip netip.AddrPort, timeout time.Duration) (name, peer string, err error) {
	var line string
	if proto == "udp" {
		line, err = udpGet(l.client, src, vip, timeout)
	} else {
		line, err = httpGet(l.client, src, vip, "/", timeout)
	}
	if err != nil {
		return "", "", err
	}
	name, peer, _ = strings.Cut(strings.TrimSpace(line), " ")
	return name, peer, nil
}

// hits makes n connections and returns who answered each, in order.
func (l *lab) hits(t testing.TB, proto string, src netip.Addr, vip netip.AddrPort, n int) []string {
	t.Helper()
	var out []string
	for range n {
		name, _, err := l.hit(proto, src, vip, 5*time.Second)
		if err != nil {
			t.Fatalf("%s %s from %s: %v", proto, vip, src, err)
		}
		out = append(out, name)
	}
	return out
}

// hitsRetrying makes connections until n were answered, trying again
// after one that timed out (at most n times), and returns who answered.
func (l *lab) hitsRetrying(t testing.TB, proto string, src netip.Addr, vip netip.AddrPort, n int) []string {
	t.Helper()
	var out []string
	for try := 0; len(out) < n; try++ {
		name, _, err := l.hit(proto, src, vip, 5*time.Second)
		var ne net.Error
		switch {
		case err == nil:
			out = append(out, name)
		case try < 2*n && errors.As(err, &ne) && ne.Timeout():
			t.Logf("%s %s from %s: a connection was lost; another: %v", proto, vip, src, err)
		default:
			t.Fatalf("%s %s from %s after %v: %v", proto, vip, src, out, err)
		}
	}
	return out
}

// dropped asserts that a connection attempt gets no answer at all.
func (l *lab) dropped(t testing.TB, what, proto string, src netip.Addr, vip netip.AddrPort) {
	t.Helper()
	_, _, err := l.hit(proto, src, vip, dropWait)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("%s: %v, want a timeout (dropped)", what, err)
	}
}

// httpGet sends GET path over a new connection from src (when valid) in
// namespace ns to dst and returns the body.
func httpGet(ns string, src netip.Addr, dst netip.AddrPort, path string, timeout time.Duration) (string, error) {
	d := &net.Dialer{Timeout: timeout}
	if src.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	c := &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return netns.Dial(ctx, ns, d, network, addr)
		}}}
	resp, err := c.Get("http://" + dst.String() + path)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return string(b), nil
}

// udpGet sends one datagram from src in namespace ns to dst and returns
// the answer.
func udpGet(ns string, src netip.Addr, dst netip.AddrPort, timeout time.Duration) (string, error) {
	d := &net.Dialer{Timeout: timeout, LocalAddr: &net.UDPAddr{IP: src.AsSlice()}}
	c, err := netns.Dial(context.Background(), ns, d, "udp", dst.String())
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("hello\n")); err != nil {
		return "", err
	}
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// nft runs nft in the lb namespace.
func (l *lab) nft(t testing.TB, args ...string) string {
	t.Helper()
	return netnstest.Exec(t, l.lb, append([]string{"nft"}, args...)...)
}

// eventually retries fn until it succeeds, for at most waitLong.
func eventually(t testing.TB, what string, fn func() error) {
	t.Helper()
	swlab.WaitFor(t, waitLong, what, fn)
}

func counts(names []string) map[string]int {
	out := map[string]int{}
	for _, n := range names {
		out[n]++
	}
	return out
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
