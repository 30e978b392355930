// Command health measures the health checker at scale and compares it with
// HAProxy's checks of the same targets: for each size N, N loopback TCP
// listeners (in a child process, so their CPU is not counted) are checked
// every interval first by the health package's Scheduler, then by HAProxy.
// It reports CPU per check, RSS, failed and late checks, and the
// scheduler's detection latency when listeners close.
//
// It runs in a network namespace of its own (unshare --net, so root), where
// the kernel's TCP ActiveOpens counter counts exactly the checks made: HAProxy
// completes no handshake at the server (it leaves the last ACK delayed and
// resets), so counting accepts would miss its checks. Each size runs in a
// process of its own, so one size's memory does not count in the next.
//
//	go run ./bench/health                  # 2,000 and 10,000 targets, 3 rounds of 20 s
//	go run ./bench/health -targets 10000 -window 30s -rounds 1
package main

import (
	"bufio"
	"context"
	"encoding/json"
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
	sizes    []int
	targets  int // of the size being run
	interval time.Duration
	timeout  time.Duration
	window   time.Duration
	warmup   time.Duration
	sample   int
	rounds   int
	haproxy  string

	cpuprofile string
}

func main() {
	var cfg config
	serve := flag.Bool("serve", false, "internal: run the listener child")
	inner := flag.Bool("inner", false, "internal: already in the private network namespace")
	one := flag.Bool("one", false, "internal: run one size (-targets) and print its result")
	sizes := flag.String("targets", "2000,10000", "numbers of targets (loopback listeners), comma-separated: one run each")
	flag.DurationVar(&cfg.interval, "interval", time.Second, "check interval")
	flag.DurationVar(&cfg.timeout, "timeout", 500*time.Millisecond, "check timeout")
	flag.DurationVar(&cfg.window, "window", 20*time.Second, "CPU measurement window (per round)")
	flag.DurationVar(&cfg.warmup, "warmup", 5*time.Second, "time after start before the window opens")
	flag.IntVar(&cfg.sample, "sample", 200, "targets whose listener is closed to measure detection latency")
	flag.IntVar(&cfg.rounds, "rounds", 3, "windows of each checker per size, alternating (switchman, HAProxy, switchman, ...), so that a change in the host's load weighs on both")
	flag.StringVar(&cfg.cpuprofile, "cpuprofile", "", "write a CPU profile of the scheduler's window to this file, -N.prof appended for each size N")
	flag.StringVar(&cfg.haproxy, "haproxy", "/usr/sbin/haproxy", "haproxy binary to compare with; empty to skip")
	flag.Parse()
	var err error
	for _, f := range strings.Split(*sizes, ",") {
		n, perr := strconv.Atoi(strings.TrimSpace(f))
		if perr != nil || n <= 0 {
			fmt.Fprintf(os.Stderr, "bench/health: -targets %q: %q is not a positive number\n", *sizes, f)
			os.Exit(2)
		}
		cfg.sizes = append(cfg.sizes, n)
	}
	cfg.targets = cfg.sizes[0]
	switch {
	case *serve:
		err = runChild(cfg.targets)
	case *one:
		err = runOne(cfg)
	case *inner:
		err = runSizes(cfg)
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
	Name   string
	CPU    time.Duration
	Wall   time.Duration
	Checks int64
	RSSKB  int64
	Child  time.Duration // the listener child's CPU, for context
	Failed int64         // failed checks in the window (all listeners are up)
	Late   int64         // checks started late (-1: not known)
}

func measure(name string, pid int, ch *child, d time.Duration) (window, error) {
	w := window{Name: name}
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
	w.Wall = time.Since(t0)
	w.CPU, w.Checks, w.Child = c1-c0, a1-a0, k1-k0
	w.RSSKB = statusKB(pid, "VmRSS")
	return w, nil
}

// perCheck is the CPU time per check.
func (w window) perCheck() time.Duration {
	if w.Checks == 0 {
		return 0
	}
	return w.CPU / time.Duration(w.Checks)
}

func (w window) row(targets int) string {
	late := "?"
	if w.Late >= 0 {
		late = strconv.FormatInt(w.Late, 10)
	}
	return fmt.Sprintf("| %d | %s | %.1f s | %.0f /s | %.2f s | %.1f %% | %.1f µs | %d MiB | %d | %s | %.1f %% |",
		targets, w.Name, w.Wall.Seconds(), float64(w.Checks)/w.Wall.Seconds(), w.CPU.Seconds(),
		100*w.CPU.Seconds()/w.Wall.Seconds(), float64(w.perCheck().Nanoseconds())/1000,
		w.RSSKB/1024, w.Failed, late, 100*w.Child.Seconds()/w.Wall.Seconds())
}

// result is one size's figures, handed from its process to the driver.
type result struct {
	Targets           int
	LoadStart         string
	LoadEnd           string
	Settled           time.Duration // the first round of checks, in the first window's run
	FirstDown         int
	Switchman         []window        // one per round
	HAProxy           []window        // one per round; none without -haproxy
	Latency           []time.Duration // sorted, measured in the first round
	DetectionDeadline time.Duration
}

// total adds up the windows of several rounds.
func total(ws []window) window {
	var t window
	for _, w := range ws {
		t.Name = w.Name
		t.CPU += w.CPU
		t.Wall += w.Wall
		t.Checks += w.Checks
		t.Child += w.Child
		t.Failed += w.Failed
		t.RSSKB = max(t.RSSKB, w.RSSKB)
		if w.Late < 0 || t.Late < 0 {
			t.Late = -1
		} else {
			t.Late += w.Late
		}
	}
	return t
}

// runSizes runs each size in a process of its own and prints one table.
func runSizes(cfg config) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	fmt.Printf("command: %s\n", strings.Join(append([]string{"bench/health"}, os.Args[1:]...), " "))
	var results []result
	for _, n := range cfg.sizes {
		args := []string{"-one", "-targets", strconv.Itoa(n)}
		flag.Visit(func(f *flag.Flag) {
			if f.Name != "targets" && f.Name != "inner" {
				args = append(args, "-"+f.Name+"="+f.Value.String())
			}
		})
		cmd := exec.Command(self, args...)
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			return err
		}
		if err := cmd.Start(); err != nil {
			return err
		}
		var r *result
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "RESULT "); ok {
				r = new(result)
				if err := json.Unmarshal([]byte(v), r); err != nil {
					return fmt.Errorf("%d targets: result: %w", n, err)
				}
				continue
			}
			fmt.Println(sc.Text())
		}
		if err := cmd.Wait(); err != nil {
			return fmt.Errorf("%d targets: %w", n, err)
		}
		if r == nil {
			return fmt.Errorf("%d targets: no result", n)
		}
		results = append(results, *r)
	}

	fmt.Println()
	fmt.Println("| targets | checker | window | checks | CPU time | CPU share | CPU per check | RSS | failed checks | late starts | listener child CPU |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range results {
		for i := range r.Switchman {
			fmt.Println(r.Switchman[i].row(r.Targets))
			if i < len(r.HAProxy) {
				fmt.Println(r.HAProxy[i].row(r.Targets))
			}
		}
	}
	fmt.Println()
	for _, r := range results {
		sw, hw := total(r.Switchman), total(r.HAProxy)
		fmt.Printf("%d targets: load average %s at start, %s at the end; first round settled in %v, %d first checks failed\n",
			r.Targets, r.LoadStart, r.LoadEnd, r.Settled.Round(time.Millisecond), r.FirstDown)
		fmt.Printf("  CPU per check over %d round(s): switchman %.1f µs", len(r.Switchman), float64(sw.perCheck().Nanoseconds())/1000)
		if hw.perCheck() > 0 {
			fmt.Printf(", HAProxy %.1f µs, switchman/HAProxy %.2f", float64(hw.perCheck().Nanoseconds())/1000, float64(sw.perCheck())/float64(hw.perCheck()))
		}
		fmt.Printf("; failed checks %d and %d, late starts %d\n", sw.Failed, hw.Failed, sw.Late)
		lat := r.Latency
		fmt.Printf("  detection latency (listener closed -> scheduler reports unhealthy, fall=1, %d targets): p50 %v, p90 %v, p99 %v, max %v\n",
			len(lat), pct(lat, 50), pct(lat, 90), pct(lat, 99), pct(lat, 100))
	}
	return nil
}

// ---- the run ----

// runOne measures one size and prints its result as a RESULT line.
func runOne(cfg config) error {
	r := result{Targets: cfg.targets, LoadStart: loadavg()}
	fmt.Printf("targets %d, interval %v, timeout %v, window %v, warmup %v, %d CPUs, load average %s\n",
		cfg.targets, cfg.interval, cfg.timeout, cfg.window, cfg.warmup, numCPU(), r.LoadStart)
	ch, err := startChild(cfg.targets)
	if err != nil {
		return err
	}
	defer ch.stop()

	for round := 1; round <= max(cfg.rounds, 1); round++ {
		if cfg.rounds > 1 {
			fmt.Printf("round %d of %d\n", round, cfg.rounds)
		}
		w, err := runScheduler(cfg, ch, &r, round == 1)
		if err != nil {
			return err
		}
		r.Switchman = append(r.Switchman, w)
		if cfg.haproxy != "" {
			w, err := runHAProxy(cfg, ch)
			if err != nil {
				return fmt.Errorf("haproxy: %w", err)
			}
			r.HAProxy = append(r.HAProxy, w)
		}
	}
	r.LoadEnd = loadavg()
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	fmt.Printf("RESULT %s\n", b)
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

// runScheduler runs the scheduler over the targets for one window (and,
// when detect is set, records the first round and the detection latency
// in r).
func runScheduler(cfg config, ch *child, r *result, detect bool) (window, error) {
	h := spec.Health{Protocol: spec.HealthTCP, Interval: cfg.interval, Timeout: cfg.timeout, Rise: 1, Fall: 1}
	// Ten services, as the agent would set them: one SetService each.
	const services = 10
	targets := make([]health.Target, cfg.targets)
	perService := make([][]health.Target, services)
	for i := range targets {
		name := fmt.Sprintf("svc%d", i%services)
		targets[i] = health.Target{Service: name, Addr: addrOf(i), Health: h}
		perService[i%services] = append(perService[i%services], targets[i])
	}
	reg := prometheus.NewRegistry()
	s := health.New(health.Options{Logger: slog.New(slog.DiscardHandler), Registerer: reg})
	for i, ts := range perService {
		s.SetService(fmt.Sprintf("svc%d", i), ts)
	}
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
		return window{}, fmt.Errorf("first round: %w", err)
	}
	settled := time.Since(start)
	firstDown := 0
	for _, k := range s.TakeChanged() { // every first result
		if st, _ := s.Status(k); !st.Healthy {
			firstDown++
		}
	}
	fmt.Printf("scheduler: first round of %d targets settled in %v, %d targets failed their first check (all listeners are up)\n",
		cfg.targets, settled.Round(time.Millisecond), firstDown)
	if detect {
		r.Settled, r.FirstDown = settled, firstDown
	}
	time.Sleep(cfg.warmup)
	if cfg.cpuprofile != "" && detect {
		f, err := os.Create(fmt.Sprintf("%s-%d.prof", cfg.cpuprofile, cfg.targets))
		if err != nil {
			return window{}, err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return window{}, err
		}
	}
	f0 := failures(reg)
	l0 := metricSum(reg, "switchman_health_checks_late_total", "")
	w, err := measure("switchman health", os.Getpid(), ch, cfg.window)
	pprof.StopCPUProfile()
	if err != nil {
		return w, err
	}
	w.Failed = int64(failures(reg) - f0)
	w.Late = int64(metricSum(reg, "switchman_health_checks_late_total", "") - l0)
	w.RSSKB = statusKB(os.Getpid(), "VmRSS")
	fmt.Printf("scheduler: %d failed checks in the window (all listeners up), %d checks started late (>100ms)\n", w.Failed, w.Late)
	if !detect {
		return w, nil
	}
	s.TakeChanged() // nothing should have flipped; start the detection clean

	// Detection latency: close sample listeners 5 ms apart and read when
	// the scheduler flipped each (TakeChanged names it, Status has its
	// LastTransition).
	idx := rand.Perm(cfg.targets)[:min(cfg.sample, cfg.targets)]
	closedAt := map[health.Key]time.Time{}
	for _, i := range idx {
		f, err := ch.call("close " + strconv.Itoa(i))
		if err != nil || len(f) != 3 {
			return w, fmt.Errorf("close: %q %v", f, err)
		}
		ns, _ := strconv.ParseInt(f[2], 10, 64)
		closedAt[targets[i].Key()] = time.Unix(0, ns)
		time.Sleep(5 * time.Millisecond)
	}
	r.DetectionDeadline = 10 * cfg.interval
	deadline := time.NewTimer(r.DetectionDeadline)
	defer deadline.Stop()
	var lat []time.Duration
	for len(lat) < len(closedAt) {
		select {
		case <-s.Changed():
		case <-deadline.C:
			for k := range closedAt {
				if st, _ := s.Status(k); st.Healthy {
					return w, fmt.Errorf("%d of %d closed listeners still healthy after %v, e.g. %s at %s: %+v",
						len(closedAt)-len(lat), len(closedAt), r.DetectionDeadline, k, time.Now().Format(time.StampMicro), st)
				}
			}
		}
		for _, k := range s.TakeChanged() {
			at, ok := closedAt[k]
			if !ok {
				st, _ := s.Status(k)
				return w, fmt.Errorf("%s flipped, but its listener is up: %+v", k, st)
			}
			if st, _ := s.Status(k); !st.Healthy {
				lat = append(lat, st.LastTransition.Sub(at))
			}
		}
	}
	slices.Sort(lat)
	r.Latency = lat
	for _, i := range idx {
		if _, err := ch.call("open " + strconv.Itoa(i)); err != nil {
			return w, err
		}
	}
	return w, nil
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
	sock := filepath.Join(dir, "stats.sock")
	fmt.Fprintf(&b, "global\n  maxconn %d\n  log stdout format raw local0 emerg\n  stats socket %s level admin\n\n", maxconn, sock)
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
	f0, ferr := haproxyFailedChecks(sock)
	w, err := measure("haproxy "+haproxyVersion(cfg.haproxy), cmd.Process.Pid, ch, cfg.window)
	w.Late = -1 // HAProxy does not count late checks
	if f1, ferr2 := haproxyFailedChecks(sock); ferr == nil && ferr2 == nil {
		w.Failed = f1 - f0
	} else {
		w.Failed = -1
		fmt.Printf("haproxy: failed checks not known: %v\n", errors.Join(ferr, ferr2))
	}
	select {
	case err := <-exited:
		exited <- err
		return w, fmt.Errorf("exited during the window: %v", err)
	default:
	}
	return w, err
}

// haproxyFailedChecks adds up the chkfail column of "show stat" (failed
// checks, per server) over every server.
func haproxyFailedChecks(sock string) (int64, error) {
	c, err := net.Dial("unix", sock)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, "show stat\n"); err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	col, sv := -1, -1
	var sum int64
	for sc.Scan() {
		f := strings.Split(sc.Text(), ",")
		if h, ok := strings.CutPrefix(sc.Text(), "# "); ok {
			for i, name := range strings.Split(h, ",") {
				switch name {
				case "chkfail":
					col = i
				case "svname":
					sv = i
				}
			}
			continue
		}
		if col < 0 || sv < 0 || len(f) <= col || f[sv] == "FRONTEND" || f[sv] == "BACKEND" || f[col] == "" {
			continue
		}
		n, err := strconv.ParseInt(f[col], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("show stat: chkfail %q: %w", f[col], err)
		}
		sum += n
	}
	if col < 0 {
		return 0, errors.New("show stat: no chkfail column")
	}
	return sum, sc.Err()
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
