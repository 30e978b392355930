// Command health measures the health checker at scale and compares it with
// HAProxy's checks of the same targets: N loopback TCP listeners (in a child
// process, so their CPU is not counted), checked every interval first by
// the health package's Scheduler, then by HAProxy. It reports CPU per check,
// RSS, and the scheduler's detection latency when listeners close.
//
// It runs in a network namespace of its own (unshare --net, so root), where
// the kernel's TCP ActiveOpens counter counts exactly the checks made: HAProxy
// completes no handshake at the server (it leaves the last ACK delayed and
// resets), so counting accepts would miss its checks.
//
//	go run ./bench/health -targets 10000 -window 30s
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/switchman-lb/switchman/health"
	"github.com/switchman-lb/switchman/spec"
)

// clkTck is USER_HZ, the unit of utime and stime in /proc/<pid>/stat; 100
// on every Linux architecture Go supports.
const clkTck = 100

type config struct {
	targets  int
	interval time.Duration
	timeout  time.Duration
	window   time.Duration
	warmup   time.Duration
	sample   int
	haproxy  string

	cpuprofile string
}

func main() {
	var cfg config
	serve := flag.Bool("serve", false, "internal: run the listener child")
	inner := flag.Bool("inner", false, "internal: already in the private network namespace")
	flag.IntVar(&cfg.targets, "targets", 10000, "number of targets (loopback listeners)")
	flag.DurationVar(&cfg.interval, "interval", time.Second, "check interval")
	flag.DurationVar(&cfg.timeout, "timeout", 500*time.Millisecond, "check timeout")
	flag.DurationVar(&cfg.window, "window", 30*time.Second, "CPU measurement window")
	flag.DurationVar(&cfg.warmup, "warmup", 5*time.Second, "time after start before the window opens")
	flag.IntVar(&cfg.sample, "sample", 200, "targets whose listener is closed to measure detection latency")
	flag.StringVar(&cfg.cpuprofile, "cpuprofile", "", "write a CPU profile of the scheduler's window to this file")
	flag.StringVar(&cfg.haproxy, "haproxy", "/usr/sbin/haproxy", "haproxy binary to compare with; empty to skip")
	flag.Parse()
	var err error
	switch {
	case *serve:
		err = runChild(cfg.targets)
	case *inner:
		err = run(cfg)
	default:
		err = reexecInNetns()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench/health:", err)
		os.Exit(1)
	}
}

// addrOf spreads targets over 127.10.0.0/16 and 100 ports, so that no
// address:port pair carries many checks (ephemeral ports, TIME_WAIT).
func addrOf(i int) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 10, byte(i / 250), byte(i%250 + 1)}), uint16(30000+i%100))
}

// reexecInNetns runs this program again with -inner in a new network
// namespace with only a loopback interface; it goes away with the process.
func reexecInNetns() error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root: it runs in a network namespace of its own (unshare --net)")
	}
	script := `ip link set lo up && exec "$0" -inner "$@"`
	cmd := exec.Command("unshare", append([]string{"--net", "--", "sh", "-c", script, self}, os.Args[1:]...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	return cmd.Run()
}

// activeOpens returns the network namespace's TCP ActiveOpens counter:
// connects started, one per TCP check.
func activeOpens() (int64, error) {
	b, err := os.ReadFile("/proc/net/snmp")
	if err != nil {
		return 0, err
	}
	var names []string
	for _, line := range strings.Split(string(b), "\n") {
		v, ok := strings.CutPrefix(line, "Tcp: ")
		if !ok {
			continue
		}
		if names == nil {
			names = strings.Fields(v)
			continue
		}
		for i, f := range strings.Fields(v) {
			if i < len(names) && names[i] == "ActiveOpens" {
				return strconv.ParseInt(f, 10, 64)
			}
		}
	}
	return 0, errors.New("no Tcp ActiveOpens in /proc/net/snmp")
}

// ---- listener child ----

// runChild listens on every target address, accepts connections and
// closes each when the peer does. Commands on stdin, one per line:
// "close I" (reply "closed I <unix ns>") and "open I" ("opened I").
func runChild(n int) error {
	ls := make([]net.Listener, n)
	serve := func(l net.Listener) {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, _ = io.Copy(io.Discard, c)
				c.Close()
			}()
		}
	}
	listen := func(i int) error {
		l, err := net.Listen("tcp", addrOf(i).String())
		if err != nil {
			return err
		}
		ls[i] = l
		go serve(l)
		return nil
	}
	for i := range n {
		if err := listen(i); err != nil {
			return err
		}
	}
	out := bufio.NewWriter(os.Stdout)
	fmt.Fprintln(out, "ready")
	out.Flush()
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		switch {
		case len(f) == 2 && f[0] == "close":
			i, _ := strconv.Atoi(f[1])
			ls[i].Close()
			fmt.Fprintln(out, "closed", i, time.Now().UnixNano())
		case len(f) == 2 && f[0] == "open":
			i, _ := strconv.Atoi(f[1])
			if err := listen(i); err != nil {
				return err
			}
			fmt.Fprintln(out, "opened", i)
		default:
			return fmt.Errorf("child: bad command %q", in.Text())
		}
		out.Flush()
	}
	return in.Err()
}

// child is the orchestrator's handle on the listener process.
type child struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
	mu  sync.Mutex
}

func startChild(n int) (*child, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, "-serve", "-targets", strconv.Itoa(n))
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	outp, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &child{cmd: cmd, in: in, out: bufio.NewScanner(outp)}
	if line, err := c.read(); err != nil || line != "ready" {
		return nil, fmt.Errorf("listener child: %q, %v", line, err)
	}
	return c, nil
}

func (c *child) read() (string, error) {
	if !c.out.Scan() {
		if c.out.Err() != nil {
			return "", c.out.Err()
		}
		return "", io.ErrUnexpectedEOF
	}
	return c.out.Text(), nil
}

// call sends one command and returns the reply's fields.
func (c *child) call(cmd string) ([]string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := fmt.Fprintln(c.in, cmd); err != nil {
		return nil, err
	}
	line, err := c.read()
	return strings.Fields(line), err
}

func (c *child) stop() {
	c.in.Close()
	_ = c.cmd.Wait()
}

// ---- measurements ----

// cpuTime returns a process's user+system CPU time from /proc/<pid>/stat.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	// After the command: state is field 3, utime 14, stime 15.
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(ut+st) * time.Second / clkTck, nil
}

// statusKB returns a field of /proc/<pid>/status in kB (VmRSS, VmHWM).
func statusKB(pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return -1
}

// window is the CPU and check count of one process over the window.
type window struct {
	name   string
	cpu    time.Duration
	wall   time.Duration
	checks int64
	rssKB  int64
	child  time.Duration // the listener child's CPU, for context
}

func measure(name string, pid int, ch *child, d time.Duration) (window, error) {
	w := window{name: name}
	c0, err := cpuTime(pid)
	if err != nil {
		return w, err
	}
	k0, _ := cpuTime(ch.cmd.Process.Pid)
	a0, err := activeOpens()
	if err != nil {
		return w, err
	}
	t0 := time.Now()
	time.Sleep(d)
	c1, err := cpuTime(pid)
	if err != nil {
		return w, err
	}
	k1, _ := cpuTime(ch.cmd.Process.Pid)
	a1, err := activeOpens()
	if err != nil {
		return w, err
	}
	w.wall = time.Since(t0)
	w.cpu, w.checks, w.child = c1-c0, a1-a0, k1-k0
	w.rssKB = statusKB(pid, "VmRSS")
	return w, nil
}

func (w window) String() string {
	rate := float64(w.checks) / w.wall.Seconds()
	per := time.Duration(0)
	if w.checks > 0 {
		per = w.cpu / time.Duration(w.checks)
	}
	return fmt.Sprintf("| %s | %.1f s | %.0f /s | %.2f s | %.1f %% | %v | %d MiB | %.1f %% |",
		w.name, w.wall.Seconds(), rate, w.cpu.Seconds(), 100*w.cpu.Seconds()/w.wall.Seconds(),
		per.Round(100*time.Nanosecond), w.rssKB/1024, 100*w.child.Seconds()/w.wall.Seconds())
}

// ---- the run ----

func run(cfg config) error {
	fmt.Printf("targets %d, interval %v, timeout %v, window %v, warmup %v, %d CPUs, load average %s\n",
		cfg.targets, cfg.interval, cfg.timeout, cfg.window, cfg.warmup, numCPU(), loadavg())
	ch, err := startChild(cfg.targets)
	if err != nil {
		return err
	}
	defer ch.stop()

	sw, lat, err := runScheduler(cfg, ch)
	if err != nil {
		return err
	}
	var hw *window
	if cfg.haproxy != "" {
		w, err := runHAProxy(cfg, ch)
		if err != nil {
			return fmt.Errorf("haproxy: %w", err)
		}
		hw = &w
	}

	fmt.Printf("load average at the end: %s\n\n", loadavg())
	fmt.Println("| checker | window | checks | CPU time | CPU share | CPU per check | RSS | listener child CPU |")
	fmt.Println("|---|---|---|---|---|---|---|---|")
	fmt.Println(sw)
	if hw != nil {
		fmt.Println(hw)
	}
	fmt.Println()
	fmt.Printf("detection latency (listener closed -> scheduler reports unhealthy, fall=1, %d targets): p50 %v, p90 %v, p99 %v, max %v\n",
		len(lat), pct(lat, 50), pct(lat, 90), pct(lat, 99), pct(lat, 100))
	return nil
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func numCPU() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(b), "\nprocessor") + 1
}

func pct(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	i := (len(d)*p+99)/100 - 1
	return d[max(0, min(i, len(d)-1))].Round(time.Millisecond)
}

func runScheduler(cfg config, ch *child) (window, []time.Duration, error) {
	h := spec.Health{Protocol: spec.HealthTCP, Interval: cfg.interval, Timeout: cfg.timeout, Rise: 1, Fall: 1}
	targets := make([]health.Target, cfg.targets)
	for i := range targets {
		targets[i] = health.Target{Service: fmt.Sprintf("svc%d", i%10), Addr: addrOf(i), Health: h}
	}
	reg := prometheus.NewRegistry()
	s := health.New(health.Options{Logger: slog.New(slog.DiscardHandler), Registerer: reg})
	s.Update(targets)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
	defer scancel()
	start := time.Now()
	if err := s.WaitSettled(sctx); err != nil {
		return window{}, nil, fmt.Errorf("first round: %w", err)
	}
	fmt.Printf("scheduler: first round of %d targets settled in %v\n", cfg.targets, time.Since(start).Round(time.Millisecond))
	firstDown := 0
	for _, st := range s.Snapshot() {
		if !st.Healthy {
			firstDown++
		}
	}
	fmt.Printf("scheduler: %d targets failed their first check (all listeners are up)\n", firstDown)
	time.Sleep(cfg.warmup)
	if cfg.cpuprofile != "" {
		f, err := os.Create(cfg.cpuprofile)
		if err != nil {
			return window{}, nil, err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return window{}, nil, err
		}
	}
	f0 := failures(reg)
	w, err := measure("switchman health", os.Getpid(), ch, cfg.window)
	pprof.StopCPUProfile()
	fmt.Printf("scheduler: %.0f failed checks in the window (all listeners up), %.0f checks started late (>100ms)\n", failures(reg)-f0, metricSum(reg, "switchman_health_checks_late_total", ""))
	if err != nil {
		return w, nil, err
	}
	w.rssKB = statusKB(os.Getpid(), "VmRSS")

	// Detection latency: close sample listeners 5 ms apart and read when
	// the scheduler flipped each (Status.LastTransition).
	idx := rand.Perm(cfg.targets)[:min(cfg.sample, cfg.targets)]
	closedAt := map[health.Key]time.Time{}
	for _, i := range idx {
		f, err := ch.call("close " + strconv.Itoa(i))
		if err != nil || len(f) != 3 {
			return w, nil, fmt.Errorf("close: %q %v", f, err)
		}
		ns, _ := strconv.ParseInt(f[2], 10, 64)
		closedAt[targets[i].Key()] = time.Unix(0, ns)
		time.Sleep(5 * time.Millisecond)
	}
	deadline := time.Now().Add(10 * cfg.interval)
	var lat []time.Duration
	for {
		lat = lat[:0]
		snap := s.Snapshot()
		for k, at := range closedAt {
			if st := snap[k]; !st.Healthy {
				lat = append(lat, st.LastTransition.Sub(at))
			}
		}
		if len(lat) == len(closedAt) || time.Now().After(deadline) {
			break
		}
		select {
		case <-s.Changed():
		case <-time.After(100 * time.Millisecond):
		}
	}
	if len(lat) != len(closedAt) {
		return w, nil, fmt.Errorf("%d of %d closed listeners still healthy after %v", len(closedAt)-len(lat), len(closedAt), 10*cfg.interval)
	}
	slices.Sort(lat)
	for _, i := range idx {
		if _, err := ch.call("open " + strconv.Itoa(i)); err != nil {
			return w, nil, err
		}
	}
	return w, lat, nil
}

// failures returns the failed checks counted so far.
func failures(reg *prometheus.Registry) float64 {
	return metricSum(reg, "switchman_health_checks_total", "failure")
}

// metricSum adds up a counter family's series, those with a label of
// value result when result is set.
func metricSum(reg *prometheus.Registry, name, result string) float64 {
	mfs, err := reg.Gather()
	if err != nil {
		return -1
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			ok := result == ""
			for _, l := range m.GetLabel() {
				if l.GetName() == "result" && l.GetValue() == result {
					ok = true
				}
			}
			if ok {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

func runHAProxy(cfg config, ch *child) (window, error) {
	dir, err := os.MkdirTemp("", "bench-health-haproxy-")
	if err != nil {
		return window{}, err
	}
	defer os.RemoveAll(dir)
	var b strings.Builder
	// HAProxy wants about 2 x maxconn + servers descriptors and refuses to
	// start beyond RLIMIT_NOFILE (Go has raised the soft limit to the hard
	// one, which this process may not raise): fit maxconn under it. Checks
	// do not count against maxconn.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return window{}, err
	}
	maxconn := (int(lim.Cur) - cfg.targets - 200) / 2
	if maxconn < 100 {
		return window{}, fmt.Errorf("RLIMIT_NOFILE %d is too low for %d servers", lim.Cur, cfg.targets)
	}
	fmt.Fprintf(&b, "global\n  maxconn %d\n  log stdout format raw local0 emerg\n\n", maxconn)
	fmt.Fprintf(&b, "defaults\n  mode tcp\n  timeout connect %dms\n  timeout check %dms\n  timeout client 5s\n  timeout server 5s\n\n",
		cfg.timeout.Milliseconds(), cfg.timeout.Milliseconds())
	// HAProxy will not start without a listener: one frontend on an unused
	// loopback address, never connected to.
	fmt.Fprintf(&b, "frontend fe\n  bind 127.10.255.254:39999\n  default_backend be0\n\n")
	const perBackend = 1000
	for i := range cfg.targets {
		if i%perBackend == 0 {
			fmt.Fprintf(&b, "backend be%d\n  default-server check inter %dms rise 1 fall 1\n", i/perBackend, cfg.interval.Milliseconds())
		}
		fmt.Fprintf(&b, "  server s%d %s\n", i, addrOf(i))
	}
	path := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return window{}, err
	}
	if out, err := exec.Command(cfg.haproxy, "-c", "-q", "-f", path).CombinedOutput(); err != nil {
		return window{}, fmt.Errorf("config check: %v: %s", err, out)
	}
	cmd := exec.Command(cfg.haproxy, "-db", "-q", "-f", path)
	cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
	if err := cmd.Start(); err != nil {
		return window{}, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Kill()
		<-exited
	}()
	select { // HAProxy spreads its first checks over one interval
	case err := <-exited:
		exited <- err
		return window{}, fmt.Errorf("exited at start: %v", err)
	case <-time.After(cfg.warmup):
	}
	w, err := measure("haproxy "+haproxyVersion(cfg.haproxy), cmd.Process.Pid, ch, cfg.window)
	select {
	case err := <-exited:
		exited <- err
		return w, fmt.Errorf("exited during the window: %v", err)
	default:
	}
	return w, err
}

func haproxyVersion(bin string) string {
	out, err := exec.Command(bin, "-v").Output()
	if err != nil {
		return ""
	}
	f := strings.Fields(string(out))
	if len(f) >= 3 {
		return f[2]
	}
	return ""
}
