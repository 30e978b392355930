package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/switchman-lb/switchman/internal/netns"
	"github.com/switchman-lb/switchman/internal/nsagent"
	"github.com/switchman-lb/switchman/status"
)

// The demo builds a load balancer, three backends and a client out of
// network namespaces of its own (swm-demo-*), runs this binary's agent in
// the load balancer's namespace on its embedded etcd, puts a service for
// the backends and sends requests from the client, printing who answers.
// Nothing outside its namespaces is touched and no traffic leaves them:
// the agent's nf_tables tables (or IPVS services) live in the load
// balancer's namespace and go with it.

const (
	demoNS       = "swm-demo"            // namespaces: swm-demo-lb, -client, -be1..3
	demoDir      = "/run/switchman-demo" // the agent's data, its log and pid
	demoLock     = "/run/switchman-demo.lock"
	demoVIP      = "203.0.113.10" // TEST-NET-3, on the load balancer's lo
	demoPort     = 80
	demoBEPort   = 8080
	demoService  = "demo"
	demoNode     = "demo"
	demoLBAddr   = "192.0.2.1"    // the backends' bridge
	demoCLAddr   = "198.51.100.2" // the client
	demoCLGW     = "198.51.100.1"
	demoEtcd     = "127.0.0.1:2379" // inside swm-demo-lb
	demoStopWait = 30 * time.Second
)

// demoBackend is one backend namespace and its address on the bridge.
type demoBackend struct{ name, addr string }

func demoBackends() []demoBackend {
	return []demoBackend{{"be1", "192.0.2.11"}, {"be2", "192.0.2.12"}, {"be3", "192.0.2.13"}}
}

func demoNamespace(role string) string { return demoNS + "-" + role }

func demoNamespaces() []string {
	out := []string{demoNamespace("lb"), demoNamespace("client")}
	for _, b := range demoBackends() {
		out = append(out, demoNamespace(b.name))
	}
	return out
}

func demoCommand() *cli.Command {
	return &cli.Command{
		Name:  "demo",
		Usage: "balance real requests over three backends, all in network namespaces of its own (root; Ctrl-C removes everything)",
		Description: "Builds a load balancer, three backends and a client out of network namespaces (swm-demo-*), runs the agent\n" +
			"with its embedded etcd in the load balancer's namespace, puts a service for the backends and prints which\n" +
			"backend answers each request. Only its own namespaces are touched. A second run first removes what an\n" +
			"interrupted one left.",
		Flags: []cli.Flag{
			&cli.IntFlag{Name: "seconds", Usage: "stop after this many seconds of requests and check that the answers rotate over the backends (0: until Ctrl-C)", EnvVars: env("seconds")},
			&cli.DurationFlag{Name: "interval", Value: 500 * time.Millisecond, Usage: "time between requests", EnvVars: env("interval")},
		},
		Before: noArgs,
		Action: runDemo,
	}
}

func runDemo(c *cli.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("demo needs root: it creates network namespaces and programs nf_tables or IPVS in them (sudo make demo)")
	}
	if c.Int("seconds") < 0 || c.Duration("interval") <= 0 {
		return fmt.Errorf("--seconds %d and --interval %s must be positive", c.Int("seconds"), c.Duration("interval"))
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find this binary to run its agent: %w", err)
	}
	ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	lock, err := demoTakeLock()
	if err != nil {
		return err
	}
	defer lock.Close()

	d := &demo{out: c.App.Writer, self: self}
	if err := d.removeLeftovers(); err != nil {
		return err
	}
	defer d.cleanup()
	if err := d.build(); err != nil {
		return err
	}
	if err := d.serveBackends(); err != nil {
		return err
	}
	if err := d.startAgent(); err != nil {
		return err
	}
	driver, err := d.putService(ctx)
	if err != nil {
		return err
	}
	d.intro(driver)
	answers, failed := d.requests(ctx, time.Duration(c.Int("seconds"))*time.Second, c.Duration("interval"))
	if c.Int("seconds") == 0 {
		return nil
	}
	if err := demoCheck(answers, failed); err != nil {
		return err
	}
	d.say("demo check: %d answers, taking turns over the %d backends", len(answers), len(demoBackends()))
	return nil
}

// demoTakeLock makes sure one demo runs at a time.
func demoTakeLock() (*os.File, error) {
	f, err := os.OpenFile(demoLock, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("another switchman demo is running (it holds %s); stop it first", demoLock)
		}
		return nil, fmt.Errorf("lock %s: %w", demoLock, err)
	}
	return f, nil
}

// demo is one run of the demo.
type demo struct {
	out     io.Writer
	self    string
	servers []*http.Server
	agent   *nsagent.Agent
	etcd    *clientv3.Client
}

func (d *demo) say(format string, args ...any) { fmt.Fprintf(d.out, format+"\n", args...) }

// removeLeftovers stops the agent and removes the namespaces that an
// interrupted run left behind.
func (d *demo) removeLeftovers() error {
	if pid, ok := demoLeftoverAgent(); ok {
		d.say("stopping the agent an earlier demo left running (pid %d)", pid)
		_ = syscall.Kill(pid, syscall.SIGTERM)
		deadline := time.Now().Add(demoStopWait)
		for demoAlive(pid) && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if demoAlive(pid) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	for _, ns := range demoNamespaces() {
		if netns.Exists(ns) {
			d.say("removing network namespace %s left by an earlier demo", ns)
			if err := netns.Delete(ns); err != nil {
				return err
			}
		}
	}
	if err := os.RemoveAll(demoDir); err != nil {
		return err
	}
	return os.MkdirAll(demoDir, 0o700)
}

// demoLeftoverAgent returns the pid of an agent an earlier demo started
// and that still runs: the pid in its pid file, if that process is this
// demo's agent (its command line names the demo's data dir).
func demoLeftoverAgent() (int, bool) {
	b, err := os.ReadFile(filepath.Join(demoDir, "agent.pid"))
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return 0, false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return 0, false
	}
	args := strings.Split(string(cmdline), "\x00")
	return pid, slices.Contains(args, "agent") && slices.Contains(args, filepath.Join(demoDir, "data"))
}

func demoAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// A zombie has exited; the field after the command name is the state.
	_, rest, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(rest, "Z")
}

// build creates the namespaces:
//
//	swm-demo-client 198.51.100.2 --- 198.51.100.1 swm-demo-lb (the agent; VIP 203.0.113.10 on lo)
//	swm-demo-lb br0 192.0.2.1/24 --- swm-demo-be1..3 192.0.2.11-13 (default route via 192.0.2.1)
func (d *demo) build() error {
	lb, client := demoNamespace("lb"), demoNamespace("client")
	steps := [][]string{
		{"netns", "add", lb}, {"netns", "add", client},
		{"-n", lb, "link", "set", "lo", "up"}, {"-n", client, "link", "set", "lo", "up"},
		{"-n", lb, "addr", "add", demoVIP + "/32", "dev", "lo"},
		{"-n", lb, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "mcast_snooping", "0"},
		{"-n", lb, "addr", "add", demoLBAddr + "/24", "dev", "br0"},
		{"-n", lb, "link", "set", "br0", "up"},
		{"-n", client, "link", "add", "eth0", "type", "veth", "peer", "name", "client", "netns", lb},
		{"-n", client, "addr", "add", demoCLAddr + "/24", "dev", "eth0"},
		{"-n", client, "link", "set", "eth0", "up"},
		{"-n", client, "route", "add", "default", "via", demoCLGW},
		{"-n", lb, "addr", "add", demoCLGW + "/24", "dev", "client"},
		{"-n", lb, "link", "set", "client", "up"},
	}
	for _, b := range demoBackends() {
		ns := demoNamespace(b.name)
		steps = append(steps,
			[]string{"netns", "add", ns},
			[]string{"-n", ns, "link", "set", "lo", "up"},
			[]string{"-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", b.name, "netns", lb},
			[]string{"-n", ns, "addr", "add", b.addr + "/24", "dev", "eth0"},
			[]string{"-n", ns, "link", "set", "eth0", "up"},
			[]string{"-n", ns, "route", "add", "default", "via", demoLBAddr},
			[]string{"-n", lb, "link", "set", b.name, "master", "br0"},
			[]string{"-n", lb, "link", "set", b.name, "up"},
		)
	}
	for _, s := range steps {
		if _, err := netns.IP(s...); err != nil {
			return err
		}
	}
	// The load balancer forwards between the client and the backends.
	return netns.Do(lb, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644)
	})
}

// serveBackends starts an HTTP server in each backend namespace: / answers
// with the backend's name, /healthz with ok.
func (d *demo) serveBackends() error {
	for _, b := range demoBackends() {
		var ln net.Listener
		if err := netns.Do(demoNamespace(b.name), func() (err error) {
			ln, err = net.Listen("tcp", net.JoinHostPort(b.addr, strconv.Itoa(demoBEPort)))
			return err
		}); err != nil {
			return fmt.Errorf("backend %s: %w", b.name, err)
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
		mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, b.name+"\n") })
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		d.servers = append(d.servers, srv)
		go srv.Serve(ln) //nolint:errcheck // ends with Close
	}
	return nil
}

// startAgent runs this binary's agent in the load balancer's namespace,
// on its embedded etcd, in a process group of its own (so Ctrl-C reaches
// the demo, which stops it in order). It gets SIGTERM if the demo dies.
func (d *demo) startAgent() error {
	a, err := nsagent.Start(demoNamespace("lb"), d.self, filepath.Join(demoDir, "agent.log"), syscall.SIGTERM, true,
		"--log-level", "info", "agent",
		"--node", demoNode,
		"--data-dir", filepath.Join(demoDir, "data"),
		// The VIP is on the namespace's lo already (the demo put it there),
		// so no address driver is needed; auto serves the service with
		// IPVS where the kernel has it, nf_tables otherwise.
		"--drivers", "ipvs,nftables",
		"--l4-driver", "auto",
		"--vip-cidrs", demoVIP+"/32",
		"--backend-cidrs", "192.0.2.0/24",
	)
	if err != nil {
		return err
	}
	d.agent = a
	return os.WriteFile(filepath.Join(demoDir, "agent.pid"), []byte(strconv.Itoa(a.Cmd.Process.Pid)+"\n"), 0o600)
}

// putService writes the service and its three pool members to the agent's
// etcd and waits until the agent reports it applied with every backend
// healthy; it returns the driver that serves it.
func (d *demo) putService(ctx context.Context) (string, error) {
	cli, err := nsagent.Client(demoNamespace("lb"), demoEtcd)
	if err != nil {
		return "", err
	}
	d.etcd = cli
	def := fmt.Sprintf(`{"vip": %q, "port": %d, "scheduler": "rr",
 "health": {"protocol": "http", "path": "/healthz", "interval": "1s", "timeout": "800ms"}}`, demoVIP, demoPort)
	puts := [][2]string{{"/switchman/services/" + demoService, def}}
	for _, b := range demoBackends() {
		puts = append(puts, [2]string{"/switchman/backends/" + demoService + "/" + b.name,
			fmt.Sprintf(`{"address": %q, "port": %d}`, b.addr, demoBEPort)})
	}
	d.say("starting the agent (log: %s) and putting service %s for %s:%d with three backends", filepath.Join(demoDir, "agent.log"), demoService, demoVIP, demoPort)
	start := time.Now()
	for _, kv := range puts {
		if err := d.untilDone(ctx, 2*time.Minute, "etcd put "+kv[0], func(ctx context.Context) error {
			_, err := cli.Put(ctx, kv[0], kv[1])
			return err
		}); err != nil {
			return "", err
		}
	}
	var st status.Status
	err = d.untilDone(ctx, 2*time.Minute, "the service applied with its three backends healthy", func(ctx context.Context) error {
		resp, err := cli.Get(ctx, "/switchman/status/"+demoNode+"/"+demoService)
		if err != nil {
			return err
		}
		if len(resp.Kvs) == 0 {
			return errors.New("no status yet")
		}
		if err := json.Unmarshal(resp.Kvs[0].Value, &st); err != nil {
			return err
		}
		healthy := 0
		for _, b := range st.Backends {
			if b.Healthy && b.Weight > 0 {
				healthy++
			}
		}
		if st.State != status.StateApplied || healthy != len(demoBackends()) {
			return fmt.Errorf("state %s, %d of %d backends healthy %s", st.State, healthy, len(demoBackends()), st.Error)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	d.say("applied by the %s driver %.1fs later", st.Driver, time.Since(start).Seconds())
	return string(st.Driver), nil
}

// untilDone retries fn until it succeeds, the agent exits, ctx ends or
// timeout passes.
func (d *demo) untilDone(ctx context.Context, timeout time.Duration, what string, fn func(context.Context) error) error {
	deadline := time.Now().Add(timeout)
	for {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := fn(cctx)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-d.agent.Done():
			return fmt.Errorf("the agent exited; see %s", filepath.Join(demoDir, "agent.log"))
		case <-ctx.Done():
			return fmt.Errorf("%s: interrupted", what)
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not done after %s: %w (agent log: %s)", what, timeout, err, filepath.Join(demoDir, "agent.log"))
		}
	}
}

func (d *demo) intro(driver string) {
	lb := demoNamespace("lb")
	inspect := "nft list table ip switchman"
	if driver == "ipvs" {
		inspect = "ipvsadm -Ln"
	}
	d.say(`
  client   %s  %s sends GET http://%s/
  lb       %s      the agent (%s) and its etcd on %s, VIP %s on lo
  backends %s-be1..3  192.0.2.11-13:%d answer with their name

In another terminal, as root:
  ip netns exec %s %s
  ip netns exec %s %s status
  ip netns exec %s etcdctl put /switchman/backends/%s/be2 '{"address":"192.0.2.12","port":%d,"weight":0}'
Ctrl-C stops the demo and removes its namespaces, with everything in them.
`, demoNamespace("client"), demoCLAddr, demoVIP, lb, driver, demoEtcd, demoVIP, demoNS, demoBEPort,
		lb, inspect, lb, d.self, lb, demoService, demoBEPort)
}

// requests sends one request every interval from the client namespace, a
// new connection each, and prints who answered; it stops when ctx ends
// or, with a positive limit, after limit.
func (d *demo) requests(ctx context.Context, limit, interval time.Duration) (answers []string, failed int) {
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return netns.Dial(ctx, demoNamespace("client"), nil, network, addr)
		},
	}}
	if limit > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, limit)
		defer cancel()
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	url := fmt.Sprintf("http://%s/", demoVIP)
	for i := 1; ; i++ {
		who, err := demoGet(ctx, client, url)
		switch {
		case ctx.Err() != nil:
			return answers, failed
		case err != nil:
			failed++
			d.say("%s  #%-3d %s  -> error: %v", time.Now().Format("15:04:05.000"), i, url, err)
		default:
			answers = append(answers, who)
			d.say("%s  #%-3d %s  -> %s", time.Now().Format("15:04:05.000"), i, url, who)
		}
		select {
		case <-ctx.Done():
			return answers, failed
		case <-d.agent.Done():
			d.say("the agent exited; see %s", filepath.Join(demoDir, "agent.log"))
			return answers, failed + 1
		case <-tick.C:
		}
	}
}

func demoGet(ctx context.Context, c *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1024))
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// demoCheck accepts the answers of a timed run when no request failed,
// every backend answered, and they took turns in a fixed order (rr).
func demoCheck(answers []string, failed int) error {
	n := len(demoBackends())
	if failed > 0 {
		return fmt.Errorf("demo check: %d requests failed", failed)
	}
	if len(answers) < 2*n {
		return fmt.Errorf("demo check: %d answers, want at least %d", len(answers), 2*n)
	}
	seen := map[string]bool{}
	for _, a := range answers[:n] {
		seen[a] = true
	}
	if len(seen) != n {
		return fmt.Errorf("demo check: the first %d answers %v are not %d different backends", n, answers[:n], n)
	}
	for i := n; i < len(answers); i++ {
		if answers[i] != answers[i-n] {
			return fmt.Errorf("demo check: answer %d is %s, want %s: the backends did not take turns (%v)", i+1, answers[i], answers[i-n], answers)
		}
	}
	return nil
}

// cleanup stops the agent, the backends and removes the namespaces (and
// with them the agent's tables or IPVS services).
func (d *demo) cleanup() {
	if d.etcd != nil {
		d.etcd.Close()
	}
	if d.agent != nil {
		if err := d.agent.Stop(demoStopWait); err != nil {
			d.say("cleanup: %v", err)
		}
	}
	for _, s := range d.servers {
		s.Close()
	}
	var removed []string
	for _, ns := range demoNamespaces() {
		if netns.Exists(ns) {
			if err := netns.Delete(ns); err != nil {
				d.say("cleanup: %v", err)
				continue
			}
			removed = append(removed, ns)
		}
	}
	_ = os.RemoveAll(filepath.Join(demoDir, "data"))
	_ = os.Remove(filepath.Join(demoDir, "agent.pid"))
	if len(removed) > 0 {
		d.say("demo stopped: agent stopped, namespaces %s removed (agent log kept in %s)", strings.Join(removed, " "), filepath.Join(demoDir, "agent.log"))
	}
}
