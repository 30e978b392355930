package lab

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/status"
)

// The single-agent scenarios' fixture: an in-process etcd (Etcd), the
// switchman agent binary as a child process in the root namespace (the
// load balancer of the single-host topology) that logs to a file and can
// be restarted on the same data dir, and cleanups that remove what each
// scenario wrote.

const (
	// AgentNode is the --node the fixture's agent runs as.
	AgentNode = "lab-e2e"
	// Prefix is the etcd prefix.
	Prefix = "/switchman"
	// AgentVIPInterface is the agent's dummy interface for VIPs.
	AgentVIPInterface = "switchman0"
)

// AgentLab is one etcd and one agent for a top-level test.
type AgentLab struct {
	Etcd  *Etcd
	Agent *Agent
	t     *testing.T
	dir   string

	mu sync.Mutex
	// tracked maps each service name a scenario wrote to the kernel keys
	// ("TCP 192.0.2.10:80") its definitions named, for the cleanup.
	tracked map[string]map[string]bool
}

// NewAgentLab starts etcd and the agent, and registers a cleanup that
// stops both (after the subtests' own cleanups have deleted their services).
func NewAgentLab(t *testing.T) *AgentLab {
	t.Helper()
	RequireLab(t)
	SwitchmanBin(t)
	// Registered first so it runs last, after the agent has stopped: the
	// agent leaves its data plane in place when it stops; the scenarios
	// deleted their services, so only the empty dummy interface is left.
	t.Cleanup(func() { _, _ = Run(0, IPBin, "link", "del", AgentVIPInterface) })
	l := NewEtcdLab(t, 150)
	l.StartAgent(t)
	l.WaitReady(t, 0)
	return l
}

// NewEtcdLab starts the in-process etcd on loopback, with no agent yet,
// and registers a cleanup that stops the agent (if started) and shows the
// last logLines lines of the agent log when the test failed.
func NewEtcdLab(t *testing.T, logLines int) *AgentLab {
	t.Helper()
	dir := t.TempDir()
	l := &AgentLab{t: t, dir: dir, Etcd: StartEtcd(t, "127.0.0.1"),
		Agent:   &Agent{LogPath: filepath.Join(dir, "agent.log"), MetricsAddr: FreeAddr(t, "127.0.0.1")},
		tracked: map[string]map[string]bool{}}
	t.Cleanup(func() {
		l.StopAgent(t)
		if t.Failed() {
			t.Logf("last lines of the agent log %s:\n%s", l.Agent.LogPath, TailFile(l.Agent.LogPath, logLines))
		}
	})
	return l
}

// Dir is the fixture's own temporary directory.
func (l *AgentLab) Dir() string { return l.dir }

// StartEtcd starts etcd again after StopEtcd.
func (l *AgentLab) StartEtcd() { l.Etcd.Start() }

// StopEtcd stops etcd under the running agent.
func (l *AgentLab) StopEtcd() { l.Etcd.Stop() }

// StartAgent starts the agent binary on the fixture's data dir.
func (l *AgentLab) StartAgent(t testing.TB) {
	t.Helper()
	l.SpawnAgent(t, "--log-level", "info", "agent",
		"--etcd-endpoints", l.Etcd.URL(),
		"--prefix", Prefix,
		"--node", AgentNode,
		"--data-dir", filepath.Join(l.dir, "data"),
		"--metrics-addr", l.Agent.MetricsAddr,
		"--drivers", "ipvs,vip,netfilter",
		"--vip-interface", AgentVIPInterface,
		"--vip-cidrs", VIPRange,
		"--resync", AgentResync.String(),
	)
}

// AgentResync is the agent's --resync in the lab: short, so that the
// repair path (the drivers' Sync, the IPVS read-back) runs often beside
// the changes the scenarios make.
const AgentResync = 5 * time.Second

// SpawnAgent runs the agent binary with args.
func (l *AgentLab) SpawnAgent(t testing.TB, args ...string) { l.Agent.Spawn(t, args...) }

// StopAgent stops the agent with SIGTERM.
func (l *AgentLab) StopAgent(t testing.TB) { l.Agent.Stop(t) }

// CheckAgentRunning fails the test when the agent process has exited.
func (l *AgentLab) CheckAgentRunning(t testing.TB) { l.Agent.Check(t) }

// Metrics scrapes the agent's /metrics.
func (l *AgentLab) Metrics() (map[string]float64, error) { return l.Agent.Metrics() }

// Metric names the scenarios read.
const (
	MetricApplied   = `switchman_services{state="applied"}`
	MetricIPVSWrite = `switchman_dataplane_writes_total{driver="ipvs"}`
)

// WaitReady waits until the agent has finished a pass with n services
// applied (switchman_services{state="applied"} == n).
func (l *AgentLab) WaitReady(t testing.TB, n int) {
	t.Helper()
	WaitFor(t, 2*WaitTimeout, fmt.Sprintf("the agent ready with %d services applied", n), func() error {
		l.CheckAgentRunning(t)
		m, err := l.Metrics()
		if err != nil {
			return err
		}
		v, ok := m[MetricApplied]
		if !ok {
			return errors.New("no " + MetricApplied + " yet (no reconcile pass finished)")
		}
		if int(v) != n {
			return fmt.Errorf("%s = %v, want %d", MetricApplied, v, n)
		}
		return nil
	})
}

// RestartAgent stops the agent and starts it again on the same data dir.
func (l *AgentLab) RestartAgent(t testing.TB) {
	t.Helper()
	l.StopAgent(t)
	l.StartAgent(t)
}

// Put writes key = value.
func (l *AgentLab) Put(t testing.TB, key, value string) { l.Etcd.Put(t, key, value) }

// Del deletes key, or every key under it when prefix is true.
func (l *AgentLab) Del(t testing.TB, key string, prefix bool) { l.Etcd.Del(t, key, prefix) }

// ServiceKey is the etcd key of a service definition.
func ServiceKey(name string) string { return Prefix + "/services/" + name }

// MemberKey is the etcd key of one pool member of a service.
func MemberKey(name, member string) string {
	return Prefix + "/backends/" + name + "/" + member
}

// StatusKey is the fixture agent's status key of a service.
func StatusKey(name string) string { return Prefix + "/status/" + AgentNode + "/" + name }

// SvcDef is a service definition written as JSON.
type SvcDef map[string]any

// BackendsDef lists lab backends as definition entries with port and
// weight.
func BackendsDef(port, weight int, bes ...Backend) []map[string]any {
	out := make([]map[string]any, len(bes))
	for i, b := range bes {
		out[i] = map[string]any{"address": b.Addr, "port": port, "weight": weight}
	}
	return out
}

// PutService writes a service definition. The first put of a name
// registers a cleanup that deletes the service and its pool, then waits
// until the kernel no longer has any IPVS service the test wrote under that
// name and the status key is gone, so scenarios stay independent.
func (l *AgentLab) PutService(t *testing.T, name string, def SvcDef) {
	t.Helper()
	b, err := json.Marshal(def)
	if err != nil {
		t.Fatal(err)
	}
	l.Put(t, ServiceKey(name), string(b))
	l.trackCleanup(t, name, def)
}

// PutRaw writes a definition as given (for rejected ones).
func (l *AgentLab) PutRaw(t *testing.T, name, def string) {
	t.Helper()
	l.Put(t, ServiceKey(name), def)
}

func (l *AgentLab) trackCleanup(t *testing.T, name string, def SvcDef) {
	key := ipvsKeyOfDef(def)
	l.mu.Lock()
	defer l.mu.Unlock()
	keys, seen := l.tracked[name]
	if !seen {
		keys = map[string]bool{}
		l.tracked[name] = keys
		t.Cleanup(func() { l.CleanupService(t, name) })
	}
	if key != "" {
		keys[key] = true
	}
}

// CleanupService deletes a service and its pool and waits until its kernel
// services and its status key are gone.
func (l *AgentLab) CleanupService(t *testing.T, name string) {
	l.Del(t, ServiceKey(name), false)
	l.Del(t, Prefix+"/backends/"+name+"/", true)
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
		if _, ok, err := l.Status(name); err != nil {
			return err
		} else if ok {
			return errors.New("status key still present")
		}
		return nil
	})
}

// ipvsKeyOfDef returns "TCP 192.0.2.10:80" for a definition.
func ipvsKeyOfDef(def SvcDef) string {
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

// Status reads the agent's status key of a service.
func (l *AgentLab) Status(name string) (status.Status, bool, error) {
	v, ok, err := l.Etcd.Get(StatusKey(name))
	if err != nil || !ok {
		return status.Status{}, false, err
	}
	var st status.Status
	if err := json.Unmarshal(v, &st); err != nil {
		return status.Status{}, true, fmt.Errorf("status %s: %w: %s", name, err, v)
	}
	return st, true, nil
}

// WaitStatus polls a service's status until cond accepts it.
func (l *AgentLab) WaitStatus(t testing.TB, timeout time.Duration, name, what string, cond func(status.Status) error) status.Status {
	t.Helper()
	return WaitStatusFrom(t, timeout, name+": "+what, func() (status.Status, bool, error) { return l.Status(name) }, cond)
}

// WaitStatusFrom polls read (a service's status, and whether its key
// exists) until cond accepts the status, and returns it. A refusal names
// the status it refused.
func WaitStatusFrom(t testing.TB, timeout time.Duration, what string, read func() (status.Status, bool, error), cond func(status.Status) error) status.Status {
	t.Helper()
	var last status.Status
	WaitFor(t, timeout, what, func() error {
		st, ok, err := read()
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

// WaitService waits for the service in the kernel with the given real
// servers and weights ("10.10.0.11:80" -> 1), and returns it.
func WaitService(t testing.TB, proto, addr string, weights map[string]int) L4Service {
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

// WeightsOf builds a WaitService map: every backend at port with weight w.
func WeightsOf(port, w int, bes ...Backend) map[string]int {
	out := make(map[string]int, len(bes))
	for _, b := range bes {
		out[IPVSHostPort(b.Addr, port)] = w
	}
	return out
}

// StatsConns reads a service's Conns counter (connections scheduled since
// the service was created) from ipvsadm -Ln --stats --exact.
func StatsConns(t testing.TB, proto, addr string) int {
	t.Helper()
	out := MustRun(t, IPVSADMBin, "-Ln", "--stats", "--exact")
	n, err := ParseStatsConns(out, proto, addr)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// WaitHTTP waits until url answers from the client namespace.
func WaitHTTP(t testing.TB, url string) {
	t.Helper()
	WaitFor(t, 0, url+" answering from the client", func() error {
		_, err := ClientGet(url)
		return err
	})
}

// HTTPCheck is the health section of the scenarios that are not about
// health: /healthz every 2 s with a 1.5 s timeout and fall 3, lenient
// enough that a stall of the emulated VM does not flap a backend.
func HTTPCheck() map[string]any {
	return map[string]any{"protocol": "http", "path": "/healthz", "interval": "2s", "timeout": "1500ms", "rise": 2, "fall": 3}
}

// Settings of FastHTTPCheck, the health scenarios' check.
const (
	FastInterval = time.Second
	FastFall     = 2
)

// FastHTTPCheck is the health scenarios' check: /healthz every 1 s,
// timeout 500 ms, fall 2, rise 2.
func FastHTTPCheck() map[string]any {
	return map[string]any{"protocol": "http", "path": "/healthz", "interval": "1s", "timeout": "500ms", "rise": 2, "fall": FastFall}
}

// WaitUp waits until the agent reports service name applied with every
// backend checked and healthy, then until the kernel shows it with the
// given real servers and weights. Waiting for the status first matters: a
// new service starts failing open (no backend checked yet, every weight
// configured), then its unchecked backends drop to weight 0 until their
// first check passes, so the kernel alone can match too early.
func (l *AgentLab) WaitUp(t testing.TB, name, proto, addr string, weights map[string]int) L4Service {
	t.Helper()
	l.WaitStatus(t, 0, name, "applied with every backend healthy", func(st status.Status) error {
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
	return WaitService(t, proto, addr, weights)
}

// WaitConns waits until a service's Conns counter reaches at least n and
// returns it. The kernel (6.1) folds its per-CPU counters into what
// ipvsadm --stats shows only every 2 s, so the counter lags the traffic.
func WaitConns(t testing.TB, proto, addr string, n int) int {
	t.Helper()
	var got int
	WaitFor(t, 30*time.Second, fmt.Sprintf("%s %s Conns >= %d", proto, addr, n), func() error {
		got = StatsConns(t, proto, addr)
		if got < n {
			return fmt.Errorf("Conns = %d", got)
		}
		return nil
	})
	return got
}
