//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/switchman-lb/switchman/e2e/internal/lab"
	"github.com/switchman-lb/switchman/internal/l4bench"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// The convergence figures (docs/bench/convergence.md): the agent binary
// against etcd with 2,000 services, compared in the same VM run with what a
// resync-everything tool does (ipvsadm -C, then ipvsadm -R of the whole
// re-rendered table).

const (
	convServices = 2000
	// convSmall is the size of the small table the same changes are made
	// against first: the cost of one change must not grow with the number
	// of services loaded (issue 11).
	convSmall    = 20
	convBackends = 4
	convPort     = 80
	// convChanges is the number of one-weight changes per side.
	convChanges = 50
	// convNode is the agent's --node.
	convNode = "lab"
	// convPhaseBudget bounds each side's series of changes; a side that
	// runs out stops early and the figures say how many changes it made.
	convPhaseBudget = 10 * time.Minute
	// convLongWait bounds a cold start or a restart.
	convLongWait = 10 * time.Minute
	// convChangeWait bounds one change becoming visible.
	convChangeWait = 2 * time.Minute
)

// Metrics of the agent's reconcile loop the figures read.
const (
	convMetricPasses    = "switchman_reconcile_duration_seconds_count"
	convMetricPassSum   = "switchman_reconcile_duration_seconds_sum"
	convMetricSyncs     = `switchman_driver_duration_seconds_count{driver="ipvs",kind="sync"}`
	convMetricSyncSum   = `switchman_driver_duration_seconds_sum{driver="ipvs",kind="sync"}`
	convMetricReadBacks = "switchman_ipvs_readbacks_total"
	convMetricReadBack  = "switchman_ipvs_readback_seconds"
	convMetricRevision  = "switchman_last_applied_revision"
)

// convService is one benchmark service: a VIP in 198.18.0.0/15 on port 80
// and four NAT backends in 10.0.0.0/8 that no traffic ever reaches.
type convService struct {
	name     string
	vip      netip.Addr
	backends [convBackends]netip.Addr
	weights  [convBackends]int
}

func convModel(n int) []convService {
	out := make([]convService, n)
	for i := range out {
		s := convService{
			name: fmt.Sprintf("conv%04d", i),
			vip:  netip.AddrFrom4([4]byte{198, 18, byte(i / 250), byte(i%250 + 1)}),
		}
		for j := range convBackends {
			s.backends[j] = netip.AddrFrom4([4]byte{10, byte(100 + j), byte(i / 250), byte(i%250 + 1)})
			s.weights[j] = 1
		}
		out[i] = s
	}
	return out
}

// definition is the service's etcd value: rr, NAT, no health check, no
// drain.
func (s convService) definition() []byte {
	bes := make([]map[string]any, convBackends)
	for j := range convBackends {
		bes[j] = map[string]any{"address": s.backends[j].String(), "port": convPort, "weight": s.weights[j]}
	}
	b, err := json.Marshal(map[string]any{
		"vip": s.vip.String(), "port": convPort, "protocol": "tcp", "scheduler": "rr", "forwarding": "nat",
		"backends": bes, "health": map[string]any{"protocol": "none"}, "drain": "0s",
	})
	if err != nil {
		panic(err) // a map of strings and ints always marshals
	}
	return b
}

func (s convService) vipPort() string { return lab.IPVSHostPort(s.vip.String(), convPort) }

func (s convService) dest(j int) string { return lab.IPVSHostPort(s.backends[j].String(), convPort) }

// convChange is one change: backend j of service svc gets weight w.
type convChange struct{ svc, j int }

// convChangeList picks n changes spread over a table of size services
// (distinct services while n <= size).
func convChangeList(n, size int) []convChange {
	out := make([]convChange, n)
	for i := range out {
		out[i] = convChange{svc: (i*797 + 13) % size, j: i % convBackends} // 797 is prime to 2000 and 20
	}
	return out
}

// convParsed parses every definition as the agent would.
func convParsed(t testing.TB, model []convService) []*spec.Service {
	t.Helper()
	out := make([]*spec.Service, len(model))
	for i, s := range model {
		p, err := spec.Parse(s.name, s.definition())
		if err != nil {
			t.Fatalf("definition of %s: %v", s.name, err)
		}
		out[i] = p
	}
	return out
}

// convWant is the kernel table a render should give: "TCP vip:port" ->
// real server -> weight.
func convWant(st *render.State) map[string]map[string]int {
	out := make(map[string]map[string]int, len(st.IPVS))
	for _, s := range st.IPVS {
		d := make(map[string]int, len(s.Destinations))
		for _, x := range s.Destinations {
			d[lab.IPVSHostPort(x.Address.String(), int(x.Port))] = x.Weight
		}
		out[strings.ToUpper(string(s.Protocol))+" "+lab.IPVSHostPort(s.Address.String(), int(s.Port))] = d
	}
	return out
}

// convCheckKernel compares the whole kernel table (ipvsadm -Ln) with want:
// the same services, real servers, weights and masquerading, nothing else.
func convCheckKernel(t testing.TB, what string, want map[string]map[string]int) {
	t.Helper()
	out, err := lab.Run(5*time.Minute, lab.IPVSADMBin, "-Ln")
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	svcs, err := lab.ParseIPVSList(out)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	var bad []string
	seen := map[string]bool{}
	for _, s := range svcs {
		seen[s.Key()] = true
		w, ok := want[s.Key()]
		if !ok {
			bad = append(bad, s.Key()+" listed, not wanted")
			continue
		}
		if s.Scheduler != "rr" || len(s.Dests) != len(w) {
			bad = append(bad, fmt.Sprintf("%s: scheduler %s, %d real servers, want rr and %d", s.Key(), s.Scheduler, len(s.Dests), len(w)))
			continue
		}
		for _, d := range s.Dests {
			if ww, ok := w[d.Address]; !ok || ww != d.Weight || d.Forward != "Masq" {
				bad = append(bad, fmt.Sprintf("%s: real server %s %s weight %d, want Masq weight %d (wanted: %v)", s.Key(), d.Address, d.Forward, d.Weight, ww, ok))
			}
		}
	}
	for k := range want {
		if !seen[k] {
			bad = append(bad, k+" missing")
		}
	}
	if len(bad) > 0 {
		t.Fatalf("%s: the kernel table is wrong in %d places, e.g.:\n%s", what, len(bad), strings.Join(bad[:min(len(bad), 10)], "\n"))
	}
}

// convProcCount counts the kernel's virtual services and real servers from
// /proc/net/ip_vs (the kernel's own listing, one read, no netlink).
func convProcCount() (svcs, dests int, err error) {
	f, err := os.Open("/proc/net/ip_vs")
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fl := strings.Fields(sc.Text())
		switch {
		case len(fl) == 0:
		case fl[0] == "TCP" || fl[0] == "UDP":
			svcs++
		case fl[0] == "->" && fl[1] != "RemoteAddress:Port":
			dests++
		}
	}
	return svcs, dests, sc.Err()
}

// convWeightVisible reads one service with ipvsadm -Ln -t and reports
// whether real server dest has weight w.
func convWeightVisible(vipPort, dest string, w int) bool {
	out, err := lab.Run(30*time.Second, lab.IPVSADMBin, "-Ln", "-t", vipPort)
	if err != nil {
		return false // not there (yet), e.g. between ipvsadm -C and -R
	}
	svcs, err := lab.ParseIPVSList(out)
	if err != nil || len(svcs) != 1 {
		return false
	}
	d, ok := svcs[0].Dest(dest)
	return ok && d.Weight == w
}

// convWaitWeight polls until real server dest of vipPort has weight w and
// returns when it saw it. It polls every 10 ms (each poll is an ipvsadm
// run, a few ms of emulated fork and exec).
func convWaitWeight(t testing.TB, vipPort, dest string, w int, alive func() error) time.Time {
	t.Helper()
	deadline := time.Now().Add(convChangeWait)
	for {
		if convWeightVisible(vipPort, dest, w) {
			return time.Now()
		}
		if alive != nil {
			if err := alive(); err != nil {
				t.Fatal(err)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s real server %s: weight %d not visible after %s", vipPort, dest, w, convChangeWait)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// convStartAgent starts the agent binary as the figures run it (IPVS driver
// only, logging warnings to a file) and records it in the fixture, so the
// fixture's StopAgent, CheckAgentRunning and Metrics apply.
func convStartAgent(t testing.TB, l *lab.AgentLab, dataDir string) {
	t.Helper()
	l.SpawnAgent(t, "--log-level", "warn", "agent",
		"--etcd-endpoints", l.Etcd.URL(),
		"--prefix", lab.Prefix,
		"--drivers", "ipvs",
		"--l4-driver", "ipvs",
		"--data-dir", dataDir,
		"--node", convNode,
		"--metrics-addr", l.Agent.MetricsAddr,
		"--resync", convResync.String(),
	)
}

// convResync is the agent's --resync here: short, so that the IPVS
// read-back of every service runs several times while the changes are
// timed (with the default 30 s a phase of changes could miss it).
const convResync = 2 * time.Second

// convPollEvery calls cond every interval until it returns nil, and fails
// the test with its last error after timeout. Unlike WaitFor it does not
// back off, so the time it returns is within one interval of the
// condition becoming true.
func convPollEvery(t testing.TB, interval, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: still not true after %s: %v", what, timeout, err)
		}
		time.Sleep(interval)
	}
}

// convAgentChange raises backend j's weight of s by one through etcd and
// returns the time from the put to the kernel showing it, then waits for
// the agent's pass over it (n services loaded) and returns that scrape.
func convAgentChange(t testing.TB, l *lab.AgentLab, s *convService, j, n int) (time.Duration, map[string]float64) {
	t.Helper()
	s.weights[j]++
	ctx, cancel := lab.EtcdCtx()
	resp, err := l.Etcd.Client().Put(ctx, lab.ServiceKey(s.name), string(s.definition()))
	cancel()
	if err != nil {
		t.Fatalf("etcd put: %v", err)
	}
	put := time.Now()
	seen := convWaitWeight(t, s.vipPort(), s.dest(j), s.weights[j], func() error { return l.Agent.Alive() })
	return seen.Sub(put), convWaitMetrics(t, l, convChangeWait, "the agent's pass over", convReady(resp.Header.Revision, n))
}

// convWaitMetrics scrapes /metrics every 50 ms until cond accepts a
// scrape, and returns it.
func convWaitMetrics(t testing.TB, l *lab.AgentLab, timeout time.Duration, what string, cond func(map[string]float64) error) map[string]float64 {
	t.Helper()
	var got map[string]float64
	convPollEvery(t, 50*time.Millisecond, timeout, what, func() error {
		if err := l.Agent.Alive(); err != nil {
			t.Fatal(err)
		}
		m, err := l.Metrics()
		if err != nil {
			return err
		}
		if err := cond(m); err != nil {
			return err
		}
		got = m
		return nil
	})
	return got
}

// convAgentCPU returns the running agent's user and system CPU time so far
// (/proc/PID/stat, in clock ticks of 10 ms).
func convAgentCPU(t testing.TB, l *lab.AgentLab) cpuTimes {
	t.Helper()
	pid := l.Agent.PID()
	if pid == 0 {
		t.Fatal("the agent is not running")
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// The fields after the command name, which is in parentheses: state is
	// the first, utime the 12th and stime the 13th.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		t.Fatalf("short /proc/PID/stat: %q", b)
	}
	tick := func(s string) time.Duration {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatalf("/proc/PID/stat field %q: %v", s, err)
		}
		return time.Duration(n) * 10 * time.Millisecond
	}
	return cpuTimes{tick(f[11]), tick(f[12])}
}

// convStartTimes is how long an agent start took, from the exec.
type convStartTimes struct {
	ready    time.Duration // READY=1 on the notify socket: every service applied
	inKernel bool          // the whole table was in /proc/net/ip_vs at READY=1 (cold start)
	cpu      cpuTimes      // the agent's CPU time at READY=1
	writes   float64       // IPVS writes when ready
	phases   []string      // the agent's own account of its first pass
}

func (s convStartTimes) String() string {
	k := ""
	if s.inKernel {
		k = " (whole table in the kernel then)"
	}
	return fmt.Sprintf("ready (READY=1) %s%s, agent CPU %s, %v IPVS writes; its first pass: %s",
		lab.Ms(s.ready), k, s.cpu, s.writes, strings.Join(s.phases, ", "))
}

// convTimedStart starts the agent and times it until it says it is ready
// (sd_notify READY=1, sent once every driver applied every service),
// without polling it meanwhile: a /metrics scrape of 2,000 services costs
// the emulated CPUs more than a whole poll interval, and would be counted
// against the agent. After READY=1 it checks that the first pass applied
// every service up to etcd revision rev and, with cold set, that the
// whole table is in /proc/net/ip_vs.
func convTimedStart(t testing.TB, l *lab.AgentLab, dataDir string, rev int64, cold bool, n int) convStartTimes {
	t.Helper()
	var st convStartTimes
	sock := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	l.Agent.Env = []string{"NOTIFY_SOCKET=" + sock}
	defer func() { l.Agent.Env = nil }()
	start := time.Now()
	convStartAgent(t, l, dataDir)
	buf := make([]byte, 4096)
	for {
		if err := conn.SetReadDeadline(start.Add(convLongWait)); err != nil {
			t.Fatal(err)
		}
		k, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("no READY=1 from the agent within %v: %v", convLongWait, err)
		}
		if slices.Contains(strings.Split(string(buf[:k]), "\n"), "READY=1") {
			st.ready = time.Since(start)
			break
		}
	}
	st.cpu = convAgentCPU(t, l)
	if cold {
		s, d, err := convProcCount()
		if err != nil {
			t.Fatal(err)
		}
		if s != n || d != n*convBackends {
			t.Fatalf("at READY=1 the kernel holds %d services and %d real servers, want %d and %d", s, d, n, n*convBackends)
		}
		st.inKernel = true
	}
	m, err := l.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	if err := convReady(rev, n)(m); err != nil {
		t.Fatalf("after READY=1: %v", err)
	}
	st.writes = m[lab.MetricIPVSWrite]
	for _, p := range []string{"etcd_list", "evaluate_and_render", "health_first_round", "drivers", "total"} {
		if v, ok := m[`switchman_first_pass_seconds{phase="`+p+`"}`]; ok {
			st.phases = append(st.phases, fmt.Sprintf("%s %s", p, lab.Ms(time.Duration(v*float64(time.Second)))))
		}
	}
	return st
}

// convReady accepts a scrape once a pass has finished with every service
// applied and, when rev > 0, the definitions up to etcd revision rev.
func convReady(rev int64, n int) func(map[string]float64) error {
	return func(m map[string]float64) error {
		if m[convMetricPasses] < 1 {
			return errors.New("no reconcile pass finished yet")
		}
		if v := m[lab.MetricApplied]; int(v) != n {
			return fmt.Errorf("%s = %v, want %d", lab.MetricApplied, v, n)
		}
		if v := m[convMetricRevision]; rev > 0 && int64(v) < rev {
			return fmt.Errorf("%s = %v, want >= %d", convMetricRevision, v, rev)
		}
		return nil
	}
}

// writeRules writes ipvsadm -R input to a file and returns its path.
func writeRules(t testing.TB, rules string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "rules")
	if err := os.WriteFile(p, []byte(rules), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// convRestore clears the whole IPVS table (ipvsadm -C) when flushFirst is set,
// then feeds rules to ipvsadm -R; it returns when each step finished.
func convRestore(rulesPath string, flushFirst bool) (cleared, restored time.Time, err error) {
	if flushFirst {
		if out, err := exec.Command(lab.IPVSADMBin, "-C").CombinedOutput(); err != nil {
			return time.Time{}, time.Time{}, fmt.Errorf("ipvsadm -C: %w: %s", err, out)
		}
	}
	cleared = time.Now()
	in, err := os.Open(rulesPath)
	if err != nil {
		return cleared, time.Time{}, err
	}
	defer in.Close()
	cmd := exec.Command(lab.IPVSADMBin, "-R")
	cmd.Stdin = in
	if out, err := cmd.CombinedOutput(); err != nil {
		return cleared, time.Time{}, fmt.Errorf("ipvsadm -R: %w: %s", err, out)
	}
	return cleared, time.Now(), nil
}

// TestConvergenceFigures measures, in the lab VM, the agent binary against
// an etcd holding 2,000 services x 4 backends: its cold start, how fast one
// weight change reaches the kernel, and a restart with nothing changed;
// and, in the same run, the same cold start and changes done the
// resync-everything way (ipvsadm -C + ipvsadm -R of the whole re-rendered
// table). It logs the figures and fails only when a table is wrong.
// Figures go to docs/bench/convergence.md.
func TestConvergenceFigures(t *testing.T) {
	lab.RequireLab(t)
	// A figure, not a pass/fail test: it runs only when named.
	lab.RequireNamed(t, "Convergence", "e2e/lab/run.sh -run Convergence")
	lab.SwitchmanBin(t)
	// The comparison flushes the table with ipvsadm -C: refuse to run when
	// anything is in it.
	if n, _, err := convProcCount(); err != nil || n != 0 {
		t.Fatalf("the IPVS table must be empty before the run (ipvsadm -C flushes it): %d services, %v", n, err)
	}
	t.Cleanup(func() { _, _ = lab.Run(5*time.Minute, lab.IPVSADMBin, "-C") })

	l := lab.NewEtcdLab(t, 60)
	flush := func() {
		if out, err := lab.Run(5*time.Minute, lab.IPVSADMBin, "-C"); err != nil {
			t.Fatal(out, err)
		}
	}

	// 0. The same one-weight changes with a small table loaded, in the
	// same VM run: the cost of a change must not grow with the table.
	smallLat := convChangesOnSmallTable(t, l)
	flush()

	model := convModel(convServices)
	parsed := convParsed(t, model)
	initial := render.Render(render.Input{Services: parsed})
	if len(initial.IPVS) != convServices {
		t.Fatalf("render gave %d IPVS services, want %d", len(initial.IPVS), convServices)
	}
	initialWant := convWant(initial)
	initialRules := render.IPVSRules(initial.IPVS)

	// The definitions, 100 puts per transaction.
	start := time.Now()
	var lastRev int64
	for i := 0; i < len(model); i += 100 {
		var ops []clientv3.Op
		for _, s := range model[i:min(i+100, len(model))] {
			ops = append(ops, clientv3.OpPut(lab.ServiceKey(s.name), string(s.definition())))
		}
		ctx, cancel := lab.EtcdCtx()
		resp, err := l.Etcd.Client().Txn(ctx).Then(ops...).Commit()
		cancel()
		if err != nil {
			t.Fatalf("etcd txn: %v", err)
		}
		lastRev = resp.Header.Revision
	}
	t.Logf("put %d definitions in %d txns in %s (revision %d)", len(model), (len(model)+99)/100, lab.Ms(time.Since(start)), lastRev)

	// 1. Cold start, two rounds, alternating who goes first: the agent
	// (a fresh data dir each round) from its exec to the whole table in
	// the kernel (counted in /proc/net/ip_vs), and ipvsadm -R of the same
	// render from an empty table. The agent of the last round stays up.
	var agentCold, admCold []time.Duration
	agentRound := func(round int) {
		st := convTimedStart(t, l, filepath.Join(l.Dir(), fmt.Sprintf("data%d", round)), lastRev, true, convServices)
		convCheckKernel(t, "after the agent's cold start", initialWant)
		agentCold = append(agentCold, st.ready)
		t.Logf("round %d agent cold start: %s", round, st)
	}
	admRound := func(round int) {
		el, cpu := ipvsadmRestoreCPU(t, initialRules)
		convCheckKernel(t, "after ipvsadm -R", initialWant)
		admCold = append(admCold, el)
		t.Logf("round %d ipvsadm -R cold start: %s (%s)", round, lab.Ms(el), cpu)
	}
	agentRound(0)
	l.StopAgent(t)
	flush()
	admRound(0)
	flush()
	admRound(1)
	flush()
	agentRound(1)
	dataDir := filepath.Join(l.Dir(), "data1")
	m, err := l.Metrics()
	if err != nil {
		t.Fatal(err)
	}

	// 2. Convergence: one weight change per put, from the put returning to
	// the kernel showing it. Before the next change the agent's pass must
	// be over (the applied revision reached the put's), so changes do not
	// queue behind each other.
	changes := convChangeList(convChanges, convServices)
	var agentLat []time.Duration
	m0 := m
	phase := time.Now()
	for _, c := range changes {
		if time.Since(phase) > convPhaseBudget {
			t.Logf("agent changes: budget %s used up after %d changes", convPhaseBudget, len(agentLat))
			break
		}
		var took time.Duration
		took, m = convAgentChange(t, l, &model[c.svc], c.j, convServices)
		agentLat = append(agentLat, took)
	}
	afterChanges := render.Render(render.Input{Services: convParsed(t, model)})
	convCheckKernel(t, "after the agent's changes", convWant(afterChanges))
	passes := m[convMetricPasses] - m0[convMetricPasses]
	t.Logf("agent changes: %d in %s, visible after p50 %s p99 %s (min %s, max %s); %v passes, %.0f ms per pass on average, %v IPVS writes",
		len(agentLat), lab.Ms(time.Since(phase)), lab.Ms(l4bench.Pct(agentLat, 50)), lab.Ms(l4bench.Pct(agentLat, 99)), lab.Ms(l4bench.Pct(agentLat, 0)), lab.Ms(l4bench.Pct(agentLat, 100)),
		passes, 1000*(m[convMetricPassSum]-m0[convMetricPassSum])/max(passes, 1), m[lab.MetricIPVSWrite]-m0[lab.MetricIPVSWrite])
	syncs := m[convMetricSyncs] - m0[convMetricSyncs]
	t.Logf("meanwhile (--resync %s): %v IPVS Syncs, %.0f ms each on average; %v read-backs of every service, the last %.0f ms",
		convResync, syncs, 1000*(m[convMetricSyncSum]-m0[convMetricSyncSum])/max(syncs, 1),
		m[convMetricReadBacks]-m0[convMetricReadBacks], 1000*m[convMetricReadBack])

	// 3. Restart with nothing changed: SIGTERM, start on the same data dir,
	// until a pass has finished with every service applied.
	l.StopAgent(t)
	restart := convTimedStart(t, l, dataDir, 0, false, convServices)
	convCheckKernel(t, "after the restart", convWant(afterChanges))
	t.Logf("agent restart, nothing changed: %s", restart)
	l.StopAgent(t)

	// The resync side starts from the initial table, like the agent did.
	flush()
	if _, _, err := convRestore(writeRules(t, initialRules), false); err != nil {
		t.Fatal(err)
	}

	// 2b. The same changes the resync-everything way: re-render the whole
	// table, ipvsadm -C, ipvsadm -R, from the start of the render to the
	// change visible (the same poller as above).
	model2 := convModel(convServices)
	parsed2 := convParsed(t, model2)
	rulesPath := filepath.Join(t.TempDir(), "rules")
	var resLat, resFull, resRender, resGap []time.Duration
	var last *render.State
	phase = time.Now()
	for _, c := range changes {
		if time.Since(phase) > convPhaseBudget {
			t.Logf("resync changes: budget %s used up after %d changes", convPhaseBudget, len(resLat))
			break
		}
		s := &model2[c.svc]
		s.weights[c.j]++
		begin := time.Now()
		p, err := spec.Parse(s.name, s.definition())
		if err != nil {
			t.Fatal(err)
		}
		parsed2[c.svc] = p
		last = render.Render(render.Input{Services: parsed2})
		if err := os.WriteFile(rulesPath, []byte(render.IPVSRules(last.IPVS)), 0o600); err != nil {
			t.Fatal(err)
		}
		rendered := time.Now()
		type result struct {
			cleared, restored time.Time
			err               error
		}
		done := make(chan result, 1)
		go func() {
			cl, re, err := convRestore(rulesPath, true)
			done <- result{cl, re, err}
		}()
		seen := convWaitWeight(t, s.vipPort(), s.dest(c.j), s.weights[c.j], nil)
		r := <-done
		if r.err != nil {
			t.Fatal(r.err)
		}
		resLat = append(resLat, seen.Sub(begin))
		resFull = append(resFull, r.restored.Sub(begin))
		resRender = append(resRender, rendered.Sub(begin))
		resGap = append(resGap, r.restored.Sub(r.cleared))
	}
	if last != nil {
		convCheckKernel(t, "after the resync changes", convWant(last))
	}
	t.Logf("resync changes (render + ipvsadm -C + ipvsadm -R): %d, visible after p50 %s p99 %s (min %s, max %s); whole table back after p50 %s p99 %s; render p50 %s; table incomplete (ipvsadm -R running) p50 %s",
		len(resLat), lab.Ms(l4bench.Pct(resLat, 50)), lab.Ms(l4bench.Pct(resLat, 99)), lab.Ms(l4bench.Pct(resLat, 0)), lab.Ms(l4bench.Pct(resLat, 100)),
		lab.Ms(l4bench.Pct(resFull, 50)), lab.Ms(l4bench.Pct(resFull, 99)), lab.Ms(l4bench.Pct(resRender, 50)), lab.Ms(l4bench.Pct(resGap, 50)))

	t.Logf("FIGURE cold start %d x %d (rr, NAT), 2 rounds: agent %s, %s; ipvsadm -R %s, %s; agent/ipvsadm (sums) = %.2f",
		convServices, convBackends, lab.Ms(agentCold[0]), lab.Ms(agentCold[1]), lab.Ms(admCold[0]), lab.Ms(admCold[1]),
		float64(agentCold[0]+agentCold[1])/float64(admCold[0]+admCold[1]))
	t.Logf("FIGURE one weight change with %d services loaded: agent p50 %s p99 %s (%d changes); resync (ipvsadm -C + -R) p50 %s p99 %s (%d changes); resync/agent p50 = %.1f, p99 = %.1f",
		convServices, lab.Ms(l4bench.Pct(agentLat, 50)), lab.Ms(l4bench.Pct(agentLat, 99)), len(agentLat),
		lab.Ms(l4bench.Pct(resLat, 50)), lab.Ms(l4bench.Pct(resLat, 99)), len(resLat),
		float64(l4bench.Pct(resLat, 50))/float64(l4bench.Pct(agentLat, 50)), float64(l4bench.Pct(resLat, 99))/float64(l4bench.Pct(agentLat, 99)))
	t.Logf("FIGURE restart with nothing changed: ready after %s, %v IPVS writes", lab.Ms(restart.ready), restart.writes)
	t.Logf("FIGURE one weight change, %d vs %d services loaded (same VM run): p50 %s vs %s (ratio %.2f), p99 %s vs %s (ratio %.2f)",
		convServices, convSmall, lab.Ms(l4bench.Pct(agentLat, 50)), lab.Ms(l4bench.Pct(smallLat, 50)),
		float64(l4bench.Pct(agentLat, 50))/float64(l4bench.Pct(smallLat, 50)),
		lab.Ms(l4bench.Pct(agentLat, 99)), lab.Ms(l4bench.Pct(smallLat, 99)),
		float64(l4bench.Pct(agentLat, 99))/float64(l4bench.Pct(smallLat, 99)))
}

// convChangesOnSmallTable loads convSmall services, starts the agent, makes
// convChanges one-weight changes (each from the put returning to the
// kernel showing it), then stops the agent and deletes the services. It
// returns the latencies.
func convChangesOnSmallTable(t *testing.T, l *lab.AgentLab) []time.Duration {
	t.Helper()
	model := convModel(convSmall)
	var ops []clientv3.Op
	for _, s := range model {
		ops = append(ops, clientv3.OpPut(lab.ServiceKey(s.name), string(s.definition())))
	}
	ctx, cancel := lab.EtcdCtx()
	resp, err := l.Etcd.Client().Txn(ctx).Then(ops...).Commit()
	cancel()
	if err != nil {
		t.Fatalf("etcd txn: %v", err)
	}
	st := convTimedStart(t, l, filepath.Join(l.Dir(), "small"), resp.Header.Revision, true, convSmall)
	t.Logf("small table (%d services) cold start: %s", convSmall, st)
	var lat []time.Duration
	for _, c := range convChangeList(convChanges, convSmall) {
		took, _ := convAgentChange(t, l, &model[c.svc], c.j, convSmall)
		lat = append(lat, took)
	}
	t.Logf("small table changes: %d, visible after p50 %s p99 %s (min %s, max %s)", len(lat),
		lab.Ms(l4bench.Pct(lat, 50)), lab.Ms(l4bench.Pct(lat, 99)), lab.Ms(l4bench.Pct(lat, 0)), lab.Ms(l4bench.Pct(lat, 100)))
	l.StopAgent(t)
	ctx, cancel = lab.EtcdCtx()
	_, err = l.Etcd.Client().Delete(ctx, lab.ServiceKey(""), clientv3.WithPrefix())
	cancel()
	if err != nil {
		t.Fatalf("etcd delete: %v", err)
	}
	return lat
}
