//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/switchman-lb/switchman/status"
	"github.com/switchman-lb/switchman/watcher"
	"github.com/switchman-lb/switchman/watcher/embedded"
)

// The agent scenarios' fixture: an etcd running inside the test process
// (so a test can stop and restart it under a running agent), a clientv3
// client for puts and reads, and the switchman agent binary as a child
// process that logs to a file and can be restarted on the same data dir.

const (
	// agentNode is the --node the fixture's agent runs as.
	agentNode = "lab-e2e"
	// agentPrefix is the etcd prefix.
	agentPrefix = "/switchman"
	// agentVIPInterface is the agent's dummy interface for VIPs.
	agentVIPInterface = "switchman0"
	// agentEtcdTimeout bounds one etcd call from the test.
	agentEtcdTimeout = 30 * time.Second
	// agentStopTimeout is how long a SIGTERMed agent may take to exit.
	agentStopTimeout = 60 * time.Second
)

// agentLab is one etcd and one agent for a top-level test.
type agentLab struct {
	t       *testing.T
	dir     string
	etcdDir string
	// clientURL and peerURL stay the same across etcd restarts.
	clientURL, peerURL string
	metricsAddr        string
	logPath            string

	mu   sync.Mutex
	etcd *embedded.Server
	cli  *clientv3.Client
	proc *agentProc
	// tracked maps each service name a scenario wrote to the kernel keys
	// ("TCP 192.0.2.10:80") its definitions named, for the cleanup.
	tracked map[string]map[string]bool
}

// agentProc is a running agent process.
type agentProc struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has exited and been reaped
	err  error         // cmd.Wait's result, valid after done
}

// newAgentLab starts etcd and the agent, and registers a cleanup that
// stops both (after the subtests' own cleanups have deleted their services).
func newAgentLab(t *testing.T) *agentLab {
	t.Helper()
	RequireLab(t)
	SwitchmanBin(t)
	// Registered first so it runs last, after the agent has stopped: the
	// agent leaves its data plane in place when it stops; the scenarios
	// deleted their services, so only the empty dummy interface is left.
	t.Cleanup(func() { _, _ = Run(0, IPBin, "link", "del", agentVIPInterface) })
	l := newEtcdLab(t, 150)
	l.startAgent(t)
	l.waitReady(t, 0)
	return l
}

// newEtcdLab starts the in-process etcd and a client, with no agent yet,
// and registers a cleanup that stops the agent (if started) and etcd and
// shows the last logLines lines of the agent log when the test failed.
func newEtcdLab(t *testing.T, logLines int) *agentLab {
	t.Helper()
	dir := t.TempDir()
	l := &agentLab{
		t:           t,
		dir:         dir,
		etcdDir:     filepath.Join(dir, "etcd"),
		clientURL:   "http://" + freeLoopbackAddr(t),
		peerURL:     "http://" + freeLoopbackAddr(t),
		metricsAddr: freeLoopbackAddr(t),
		logPath:     filepath.Join(dir, "agent.log"),
		tracked:     map[string]map[string]bool{},
	}
	l.startEtcd()
	cli, err := watcher.Connect(watcher.ConnOptions{Endpoints: []string{l.clientURL}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	l.cli = cli
	t.Cleanup(func() {
		l.stopAgent(t)
		if t.Failed() {
			t.Logf("last lines of the agent log %s:\n%s", l.logPath, TailFile(l.logPath, logLines))
		}
		_ = cli.Close()
		l.stopEtcd()
	})
	return l
}

// freeLoopbackAddr returns a 127.0.0.1 address with a port free right now.
func freeLoopbackAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// startEtcd starts the in-process etcd on the fixture's dir and URLs.
func (l *agentLab) startEtcd() {
	l.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	srv, err := embedded.Start(ctx, slog.New(slog.DiscardHandler), embedded.Options{
		Dir: l.etcdDir, ClientURL: l.clientURL, PeerURL: l.peerURL, Name: "e2e",
	})
	if err != nil {
		l.t.Fatalf("start etcd: %v", err)
	}
	l.mu.Lock()
	l.etcd = srv
	l.mu.Unlock()
}

// stopEtcd stops the in-process etcd (a no-op when it is stopped).
func (l *agentLab) stopEtcd() {
	l.mu.Lock()
	srv := l.etcd
	l.etcd = nil
	l.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// startAgent starts the agent binary on the fixture's data dir; its output
// is appended to the fixture's log file.
func (l *agentLab) startAgent(t testing.TB) {
	t.Helper()
	l.spawnAgent(t, "--log-level", "info", "agent",
		"--etcd-endpoints", l.clientURL,
		"--prefix", agentPrefix,
		"--node", agentNode,
		"--data-dir", filepath.Join(l.dir, "data"),
		"--metrics-addr", l.metricsAddr,
		"--drivers", "ipvs,vip,netfilter",
		"--vip-interface", agentVIPInterface,
		"--vip-cidrs", VIPRange,
	)
}

// spawnAgent runs the agent binary with args, its output appended to the
// fixture's log file, and records it so stopAgent and the metrics apply.
func (l *agentLab) spawnAgent(t testing.TB, args ...string) {
	t.Helper()
	logf, err := os.OpenFile(l.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(logf, "=== e2e: starting the agent at %s\n", time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(SwitchmanBin(t), args...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start agent: %v", err)
	}
	p := &agentProc{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	l.mu.Lock()
	l.proc = p
	l.mu.Unlock()
}

// stopAgent sends SIGTERM and waits for the agent to exit (SIGKILL after
// agentStopTimeout, which fails the test).
func (l *agentLab) stopAgent(t testing.TB) {
	t.Helper()
	l.mu.Lock()
	p := l.proc
	l.proc = nil
	l.mu.Unlock()
	if p == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		var ee *exec.ExitError
		if p.err != nil && !errors.As(p.err, &ee) {
			t.Errorf("agent: %v", p.err)
		} else if p.err != nil {
			t.Errorf("agent exited with %v after SIGTERM", p.err)
		}
	case <-time.After(agentStopTimeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		t.Errorf("agent did not exit within %s of SIGTERM; killed", agentStopTimeout)
	}
}

// checkAgentRunning fails the test when the agent process has exited.
func (l *agentLab) checkAgentRunning(t testing.TB) {
	t.Helper()
	l.mu.Lock()
	p := l.proc
	l.mu.Unlock()
	if p == nil {
		t.Fatal("the agent is not running")
	}
	select {
	case <-p.done:
		t.Fatalf("the agent exited: %v\n%s", p.err, TailFile(l.logPath, 40))
	default:
	}
}

// metrics scrapes the agent's /metrics and returns every sample as
// `name{labels}` -> value.
func (l *agentLab) metrics() (map[string]float64, error) {
	c := http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + l.metricsAddr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		out[line[:i]] = v
	}
	if err := sc.Err(); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return out, nil
}

// Metric names the scenarios read.
const (
	metricApplied   = `switchman_services{state="applied"}`
	metricIPVSWrite = `switchman_dataplane_writes_total{driver="ipvs"}`
)

// waitReady waits until the agent has finished a pass with n services
// applied (switchman_services{state="applied"} == n).
func (l *agentLab) waitReady(t testing.TB, n int) {
	t.Helper()
	WaitFor(t, 2*WaitTimeout, fmt.Sprintf("the agent ready with %d services applied", n), func() error {
		l.checkAgentRunning(t)
		m, err := l.metrics()
		if err != nil {
			return err
		}
		v, ok := m[metricApplied]
		if !ok {
			return errors.New("no " + metricApplied + " yet (no reconcile pass finished)")
		}
		if int(v) != n {
			return fmt.Errorf("%s = %v, want %d", metricApplied, v, n)
		}
		return nil
	})
}

// restartAgent stops the agent and starts it again on the same data dir.
func (l *agentLab) restartAgent(t testing.TB) {
	t.Helper()
	l.stopAgent(t)
	l.startAgent(t)
}

func etcdCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), agentEtcdTimeout)
}

// put writes key = value.
func (l *agentLab) put(t testing.TB, key, value string) {
	t.Helper()
	ctx, cancel := etcdCtx()
	defer cancel()
	if _, err := l.cli.Put(ctx, key, value); err != nil {
		t.Fatalf("etcd put %s: %v", key, err)
	}
}

// del deletes key, or every key under it when prefix is true.
func (l *agentLab) del(t testing.TB, key string, prefix bool) {
	t.Helper()
	ctx, cancel := etcdCtx()
	defer cancel()
	var opts []clientv3.OpOption
	if prefix {
		opts = append(opts, clientv3.WithPrefix())
	}
	if _, err := l.cli.Delete(ctx, key, opts...); err != nil {
		t.Fatalf("etcd delete %s: %v", key, err)
	}
}

func serviceKey(name string) string { return agentPrefix + "/services/" + name }

func memberKey(name, member string) string {
	return agentPrefix + "/backends/" + name + "/" + member
}

func statusKey(name string) string { return agentPrefix + "/status/" + agentNode + "/" + name }

// svcDef is a service definition written as JSON.
type svcDef map[string]any

// backendsDef lists lab backends as definition entries with port and
// weight.
func backendsDef(port, weight int, bes ...Backend) []map[string]any {
	out := make([]map[string]any, len(bes))
	for i, b := range bes {
		out[i] = map[string]any{"address": b.Addr, "port": port, "weight": weight}
	}
	return out
}

// putService writes a service definition. The first put of a name
// registers a cleanup that deletes the service and its pool, then waits
// until the kernel no longer has any IPVS service the test wrote under that
// name and the status key is gone, so scenarios stay independent.
func (l *agentLab) putService(t *testing.T, name string, def svcDef) {
	t.Helper()
	b, err := json.Marshal(def)
	if err != nil {
		t.Fatal(err)
	}
	l.put(t, serviceKey(name), string(b))
	l.trackCleanup(t, name, def)
}

// putRaw writes a definition as given (for rejected ones).
func (l *agentLab) putRaw(t *testing.T, name, def string) {
	t.Helper()
	l.put(t, serviceKey(name), def)
}

func (l *agentLab) trackCleanup(t *testing.T, name string, def svcDef) {
	key := ipvsKeyOfDef(def)
	l.mu.Lock()
	defer l.mu.Unlock()
	keys, seen := l.tracked[name]
	if !seen {
		keys = map[string]bool{}
		l.tracked[name] = keys
		t.Cleanup(func() { l.cleanupService(t, name) })
	}
	if key != "" {
		keys[key] = true
	}
}

// cleanupService deletes a service and its pool and waits until its kernel
// services and its status key are gone.
func (l *agentLab) cleanupService(t *testing.T, name string) {
	l.del(t, serviceKey(name), false)
	l.del(t, agentPrefix+"/backends/"+name+"/", true)
	l.mu.Lock()
	var want []string
	for k := range l.tracked[name] {
		want = append(want, k)
	}
	delete(l.tracked, name)
	l.mu.Unlock()
	WaitIPVS(t, 0, "service "+name+" gone from the kernel", func(svcs []L4Service) error {
		for _, k := range want {
			for _, s := range svcs {
				if s.Key() == k {
					return fmt.Errorf("%s still listed", k)
				}
			}
		}
		return nil
	})
	WaitFor(t, 0, "status of "+name+" gone", func() error {
		if _, ok, err := l.status(name); err != nil {
			return err
		} else if ok {
			return errors.New("status key still present")
		}
		return nil
	})
}

// ipvsKeyOfDef returns "TCP 192.0.2.10:80" for a definition.
func ipvsKeyOfDef(def svcDef) string {
	vip, _ := def["vip"].(string)
	port, _ := def["port"].(int)
	if vip == "" || port == 0 {
		return ""
	}
	proto := "tcp"
	if p, ok := def["protocol"].(string); ok {
		proto = p
	}
	return strings.ToUpper(proto) + " " + IPVSHostPort(vip, port)
}

// status reads the agent's status key of a service.
func (l *agentLab) status(name string) (status.Status, bool, error) {
	ctx, cancel := etcdCtx()
	defer cancel()
	resp, err := l.cli.Get(ctx, statusKey(name))
	if err != nil {
		return status.Status{}, false, err
	}
	if len(resp.Kvs) == 0 {
		return status.Status{}, false, nil
	}
	var st status.Status
	if err := json.Unmarshal(resp.Kvs[0].Value, &st); err != nil {
		return status.Status{}, true, fmt.Errorf("status %s: %w: %s", name, err, resp.Kvs[0].Value)
	}
	return st, true, nil
}

// waitStatus polls a service's status until cond accepts it.
func (l *agentLab) waitStatus(t testing.TB, timeout time.Duration, name, what string, cond func(status.Status) error) status.Status {
	t.Helper()
	var last status.Status
	WaitFor(t, timeout, name+": "+what, func() error {
		st, ok, err := l.status(name)
		if err != nil {
			return err
		}
		if !ok {
			return errors.New("no status key yet")
		}
		last = st
		if err := cond(st); err != nil {
			b, _ := json.Marshal(st)
			return fmt.Errorf("%w (status %s)", err, b)
		}
		return nil
	})
	return last
}

// waitApplied waits for state applied in the status and the service in
// the kernel with the given real servers and weights ("10.10.0.11:80" ->
// 1), and returns it.
func waitService(t testing.TB, proto, addr string, weights map[string]int) L4Service {
	t.Helper()
	var got L4Service
	WaitIPVS(t, 0, fmt.Sprintf("%s %s with real servers %v", proto, addr, weights), func(svcs []L4Service) error {
		s, ok := FindIPVSService(svcs, proto, addr)
		if !ok {
			return fmt.Errorf("%s %s not listed", proto, addr)
		}
		if len(s.Dests) != len(weights) {
			return fmt.Errorf("%d real servers, want %d", len(s.Dests), len(weights))
		}
		for a, w := range weights {
			d, ok := s.Dest(a)
			if !ok {
				return fmt.Errorf("real server %s missing", a)
			}
			if d.Weight != w {
				return fmt.Errorf("real server %s weight %d, want %d", a, d.Weight, w)
			}
		}
		got = s
		return nil
	})
	return got
}

// weightsOf builds a waitService map: every backend at port with weight w.
func weightsOf(port, w int, bes ...Backend) map[string]int {
	out := make(map[string]int, len(bes))
	for _, b := range bes {
		out[IPVSHostPort(b.Addr, port)] = w
	}
	return out
}

// statsConns reads a service's Conns counter (connections scheduled since
// the service was created) from ipvsadm -Ln --stats --exact.
func statsConns(t testing.TB, proto, addr string) int {
	t.Helper()
	out := MustRun(t, IPVSADMBin, "-Ln", "--stats", "--exact")
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 3 && f[0] == proto && f[1] == addr {
			n, err := strconv.Atoi(f[2])
			if err != nil {
				t.Fatalf("stats line %q: %v", sc.Text(), err)
			}
			return n
		}
	}
	t.Fatalf("%s %s not in ipvsadm -Ln --stats:\n%s", proto, addr, out)
	return 0
}

// waitHTTP waits until url answers from the client namespace.
func waitHTTP(t testing.TB, url string) {
	t.Helper()
	WaitFor(t, 0, url+" answering from the client", func() error {
		_, err := ClientGet(url)
		return err
	})
}

// httpCheck is the health section of the scenarios that are not about
// health: /healthz every 2 s with a 1.5 s timeout and fall 3, lenient
// enough that a stall of the emulated VM does not flap a backend.
func httpCheck() map[string]any {
	return map[string]any{"protocol": "http", "path": "/healthz", "interval": "2s", "timeout": "1500ms", "rise": 2, "fall": 3}
}

// Settings of fastHTTPCheck, the health scenarios' check.
const (
	fastInterval = time.Second
	fastFall     = 2
)

// fastHTTPCheck is the health scenarios' check: /healthz every 1 s,
// timeout 500 ms, fall 2, rise 2.
func fastHTTPCheck() map[string]any {
	return map[string]any{"protocol": "http", "path": "/healthz", "interval": "1s", "timeout": "500ms", "rise": 2, "fall": fastFall}
}

// waitUp waits until the agent reports service name applied with every
// backend checked and healthy, then until the kernel shows it with the
// given real servers and weights. Waiting for the status first matters: a
// new service starts failing open (no backend checked yet, every weight
// configured), then its unchecked backends drop to weight 0 until their
// first check passes, so the kernel alone can match too early.
func (l *agentLab) waitUp(t testing.TB, name, proto, addr string, weights map[string]int) L4Service {
	t.Helper()
	l.waitStatus(t, 0, name, "applied with every backend healthy", func(st status.Status) error {
		if st.State != status.StateApplied {
			return fmt.Errorf("state %s: %s", st.State, st.Error)
		}
		if len(st.Backends) == 0 {
			return errors.New("no backends")
		}
		for _, b := range st.Backends {
			if !b.Healthy {
				return fmt.Errorf("%s:%d not healthy", b.Address, b.Port)
			}
		}
		return nil
	})
	return waitService(t, proto, addr, weights)
}

// waitConns waits until a service's Conns counter reaches at least n and
// returns it. The kernel (6.1) folds its per-CPU counters into what
// ipvsadm --stats shows only every 2 s, so the counter lags the traffic.
func waitConns(t testing.TB, proto, addr string, n int) int {
	t.Helper()
	var got int
	WaitFor(t, 30*time.Second, fmt.Sprintf("%s %s Conns >= %d", proto, addr, n), func() error {
		got = statsConns(t, proto, addr)
		if got < n {
			return fmt.Errorf("Conns = %d", got)
		}
		return nil
	})
	return got
}
