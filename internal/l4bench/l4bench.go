// Package l4bench measures the agent's layer-4 data plane at scale, for
// the benchmarks (never a pass/fail test): N services x 4 backends put in
// etcd and programmed from empty by the real agent binary, then one
// backend weight changed at a time with the N loaded, each timed from the
// etcd put to the change visible in the kernel; for nf_tables also the
// same done the resync-everything way (the whole state re-rendered and
// applied with `nft -f` per change). Everything runs in a network
// namespace of its own: the agent, its etcd (in this process, listening
// on the namespace's loopback) and the kernel state it programs.
//
// It is used by `make bench-nftables` (bench/nftables, on the host) and by
// the lab's nf_tables-versus-IPVS run (e2e, in the QEMU VM).
package l4bench

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	gnft "github.com/google/nftables"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/internal/netns"
	"github.com/switchman-lb/switchman/internal/nsagent"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/watcher/embedded"
)

// Inside the benchmark's namespace.
const (
	etcdAddr    = "127.0.0.1:2379"
	etcdPeer    = "127.0.0.1:2380"
	metricsAddr = "127.0.0.1:9469"
	node        = "bench"
	backends    = 4
	port        = 80
)

// Config says what to measure.
type Config struct {
	// Agent is the switchman binary.
	Agent string
	// Driver is the data plane: nftables or ipvs.
	Driver spec.Driver
	// Services is how many services (x 4 backends) are loaded.
	Services int
	// Changes is how many one-weight changes are timed per side.
	Changes int
	// Budget bounds each side's series of changes; a side that runs out
	// stops early (the result says how many it made).
	Budget time.Duration
	// Resync also times the resync-everything way with `nft -f` (nftables
	// only; needs the nft binary): the cold start of the whole table, and
	// each change as a full re-render applied in one transaction.
	Resync bool
	// Logf reports progress.
	Logf func(format string, args ...any)
}

// Result holds the figures of one run.
type Result struct {
	Driver   spec.Driver
	Services int
	// Put is how long putting the definitions took.
	Put time.Duration
	// ColdInKernel is from the agent's exec to every service in the
	// kernel; ColdReady to the agent reporting all applied (metrics).
	ColdInKernel, ColdReady time.Duration
	// ColdWrites is the agent's data-plane writes by then.
	ColdWrites float64
	// RSSReady and RSSAfter are the agent's resident memory when ready
	// and after the changes.
	RSSReady, RSSAfter int64
	// Changes are the agent's put-to-visible times; ChangeWrites the
	// writes they took in all.
	Changes      []time.Duration
	ChangeWrites float64
	// ApplyMean is the mean time of the driver's Apply calls during the
	// changes, PassMean of the loop's own passes (both from the agent's
	// metrics); the rest of a change is the loop's debounce (50 ms),
	// etcd's watch and the poll.
	ApplyMean, PassMean time.Duration
	// ResyncCold is `nft -f` of the whole table from empty.
	ResyncCold time.Duration
	// Resync are the resync way's render-to-visible times, ResyncApply
	// the `nft -f` runs alone and ResyncRender the renders alone.
	Resync, ResyncApply, ResyncRender []time.Duration
}

// Pct returns the nearest-rank percentile p (0-100) of ds.
func Pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

// model is one benchmark service: a VIP in 198.18.0.0/15 and four
// backends in 10.100.0.0/14 that no traffic ever reaches, wrr (so that a
// weight changes the nf_tables selection map, as it changes the IPVS
// destination), no health check, no drain.
type model struct {
	name     string
	vip      netip.Addr
	backends [backends]netip.Addr
	weights  [backends]int
	driver   spec.Driver
}

func newModels(n int, driver spec.Driver) []model {
	out := make([]model, n)
	for i := range out {
		m := model{name: fmt.Sprintf("s%05d", i), vip: netip.AddrFrom4([4]byte{198, 18 + byte(i/62500), byte(i / 250 % 250), byte(i%250 + 1)}), driver: driver}
		for j := range backends {
			m.backends[j] = netip.AddrFrom4([4]byte{10, byte(100 + j), byte(i / 250 % 250), byte(i%250 + 1)})
			m.weights[j] = 1
		}
		out[i] = m
	}
	return out
}

func (m model) definition() string {
	bes := make([]map[string]any, backends)
	for j := range backends {
		bes[j] = map[string]any{"address": m.backends[j].String(), "port": port, "weight": m.weights[j]}
	}
	b, err := json.Marshal(map[string]any{"vip": m.vip.String(), "port": port, "protocol": "tcp", "scheduler": "wrr",
		"driver": string(m.driver), "backends": bes, "health": map[string]any{"protocol": "none"}, "drain": "0s"})
	if err != nil {
		panic(err) // strings and ints always marshal
	}
	return string(b)
}

// l4 renders the service as the agent does.
func (m model) l4() (render.L4Service, error) {
	p, err := spec.Parse(m.name, []byte(m.definition()))
	if err != nil {
		return render.L4Service{}, fmt.Errorf("definition of %s: %w", m.name, err)
	}
	st := render.RenderService(p, render.Input{Services: []*spec.Service{p}})
	if st.L4 == nil {
		return render.L4Service{}, fmt.Errorf("%s rendered no layer-4 service", m.name)
	}
	return *st.L4, nil
}

// changeList picks n changes spread over the services: service, backend.
func changeList(services, n int) [][2]int {
	out := make([][2]int, n)
	for i := range out {
		out[i] = [2]int{(i*797 + 13) % services, i % backends} // 797 is prime to 10,000 and 2,000
	}
	return out
}

// bench is one run.
type bench struct {
	cfg    Config
	ns     string
	dir    string
	etcd   *embedded.Server
	cli    *clientv3.Client
	agent  *nsagent.Agent
	nsFile *os.File
	nft    *gnft.Conn
	ipvs   *ipvs.Netlink
}

// Run runs the benchmark and returns its figures.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if cfg.Driver != spec.DriverNFTables && cfg.Driver != spec.DriverIPVS {
		return nil, fmt.Errorf("driver %q: want nftables or ipvs", cfg.Driver)
	}
	if cfg.Resync && cfg.Driver != spec.DriverNFTables {
		return nil, errors.New("the nft -f comparison is for nftables only")
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	b := &bench{cfg: cfg}
	defer b.close()
	if err := b.setup(); err != nil {
		return nil, err
	}
	return b.run(ctx)
}

func (b *bench) setup() error {
	r := make([]byte, 3)
	if _, err := rand.Read(r); err != nil {
		return err
	}
	b.ns = "swm-bench-" + hex.EncodeToString(r)
	if err := netns.Add(b.ns); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "switchman-l4bench-")
	if err != nil {
		return err
	}
	b.dir = dir
	if b.nsFile, err = os.Open(netns.Path(b.ns)); err != nil {
		return err
	}
	if b.cfg.Driver == spec.DriverNFTables {
		if b.nft, err = gnft.New(gnft.WithNetNSFd(int(b.nsFile.Fd())), gnft.AsLasting()); err != nil {
			return err
		}
	} else {
		b.ipvs = ipvs.NewNetlink(netns.Path(b.ns))
	}
	if b.etcd, err = nsagent.StartEtcd(b.ns, filepath.Join(dir, "etcd"), etcdAddr, etcdPeer); err != nil {
		return err
	}
	b.cli, err = nsagent.Client(b.ns, etcdAddr)
	if err != nil {
		return err
	}
	return nil
}

func (b *bench) close() {
	b.stopAgent()
	if b.cli != nil {
		b.cli.Close()
	}
	if b.etcd != nil {
		b.etcd.Close()
	}
	if b.nft != nil {
		b.nft.CloseLasting()
	}
	if b.ipvs != nil {
		b.ipvs.Close()
	}
	if b.nsFile != nil {
		b.nsFile.Close()
	}
	if b.ns != "" {
		_ = netns.Delete(b.ns)
	}
	if b.dir != "" {
		os.RemoveAll(b.dir)
	}
}

func (b *bench) run(ctx context.Context) (*Result, error) {
	cfg := b.cfg
	res := &Result{Driver: cfg.Driver, Services: cfg.Services}
	models := newModels(cfg.Services, cfg.Driver)

	if cfg.Resync {
		// The whole table with nft -f from empty, then gone again.
		ruleset, err := b.ruleset(models)
		if err != nil {
			return nil, err
		}
		start := time.Now()
		if err := b.nftApply(ctx, ruleset, false); err != nil {
			return nil, err
		}
		res.ResyncCold = time.Since(start)
		if err := b.checkKernel(ctx, models); err != nil {
			return nil, fmt.Errorf("after nft -f: %w", err)
		}
		cfg.Logf("nft -f of %d services x %d backends from empty: %s", cfg.Services, backends, ms(res.ResyncCold))
		if err := b.nftApply(ctx, "table ip switchman\ndelete table ip switchman\n", false); err != nil {
			return nil, err
		}
	}

	start := time.Now()
	var rev int64
	for i := 0; i < len(models); i += 100 {
		var ops []clientv3.Op
		for _, m := range models[i:min(i+100, len(models))] {
			ops = append(ops, clientv3.OpPut("/switchman/services/"+m.name, m.definition()))
		}
		resp, err := b.cli.Txn(ctx).Then(ops...).Commit()
		if err != nil {
			return nil, fmt.Errorf("etcd txn: %w", err)
		}
		rev = resp.Header.Revision
	}
	res.Put = time.Since(start)
	cfg.Logf("put %d definitions in %s (revision %d)", len(models), ms(res.Put), rev)

	// Cold start.
	start = time.Now()
	if err := b.startAgent(); err != nil {
		return nil, err
	}
	var m map[string]float64
	if err := b.poll(ctx, 20*time.Millisecond, 30*time.Minute, "the agent's cold start", func() error {
		if res.ColdInKernel == 0 {
			n, err := b.kernelServices()
			if err != nil {
				return err
			}
			if n == cfg.Services {
				res.ColdInKernel = time.Since(start)
			}
		}
		if res.ColdReady == 0 {
			mm, err := b.metrics()
			if err == nil && int(mm[`switchman_services{state="applied"}`]) == cfg.Services {
				res.ColdReady, m = time.Since(start), mm
			}
		}
		if res.ColdInKernel == 0 || res.ColdReady == 0 {
			return errors.New("not all services applied yet")
		}
		return nil
	}); err != nil {
		return nil, err
	}
	writes := func(m map[string]float64) float64 {
		return m[fmt.Sprintf(`switchman_dataplane_writes_total{driver=%q}`, cfg.Driver)]
	}
	res.ColdWrites = writes(m)
	res.RSSReady = rss(b.agent.Cmd.Process.Pid)
	cfg.Logf("agent cold start: every service in the kernel after %s, all applied (metrics) after %s, %v writes, RSS %d MiB",
		ms(res.ColdInKernel), ms(res.ColdReady), res.ColdWrites, res.RSSReady>>20)
	if err := b.checkKernel(ctx, models); err != nil {
		return nil, fmt.Errorf("after the agent's cold start: %w", err)
	}

	// One weight at a time through the agent.
	changes := changeList(cfg.Services, cfg.Changes)
	w0, m0 := res.ColdWrites, m
	if err := b.series("agent changes", models, changes, func() int { return len(res.Changes) }, func(s *model, l4 render.L4Service) error {
		begin := time.Now()
		resp, err := b.cli.Put(ctx, "/switchman/services/"+s.name, s.definition())
		if err != nil {
			return err
		}
		if err := b.poll(ctx, time.Millisecond, 2*time.Minute, "a weight change of "+s.name+" visible", func() error {
			return b.visible(ctx, l4)
		}); err != nil {
			return err
		}
		res.Changes = append(res.Changes, time.Since(begin))
		// The agent's pass is over before the next change.
		return b.poll(ctx, 5*time.Millisecond, 2*time.Minute, "the agent's pass over", func() error {
			mm, err := b.metrics()
			if err != nil {
				return err
			}
			if r := int64(mm["switchman_last_applied_revision"]); r < resp.Header.Revision {
				return fmt.Errorf("applied revision %d, want %d", r, resp.Header.Revision)
			}
			m = mm
			return nil
		})
	}); err != nil {
		return nil, err
	}
	res.ChangeWrites = writes(m) - w0
	res.ApplyMean = meanDelta(m0, m, fmt.Sprintf(`switchman_driver_duration_seconds_%%s{driver=%q,kind="apply"}`, cfg.Driver))
	res.PassMean = meanDelta(m0, m, "switchman_reconcile_duration_seconds_%s")
	res.RSSAfter = rss(b.agent.Cmd.Process.Pid)
	if err := b.checkKernel(ctx, models); err != nil {
		return nil, fmt.Errorf("after the agent's changes: %w", err)
	}
	cfg.Logf("agent: %d changes visible after p50 %s p99 %s (max %s), %v writes; driver Apply %s and loop pass %s on average; RSS %d MiB",
		len(res.Changes), ms(Pct(res.Changes, 50)), ms(Pct(res.Changes, 99)), ms(Pct(res.Changes, 100)), res.ChangeWrites,
		ms(res.ApplyMean), ms(res.PassMean), res.RSSAfter>>20)
	b.stopAgent()
	if !cfg.Resync {
		return res, nil
	}

	// The same changes the resync-everything way, from the initial table.
	models = newModels(cfg.Services, cfg.Driver)
	ruleset, err := b.ruleset(models)
	if err != nil {
		return nil, err
	}
	if err := b.nftApply(ctx, ruleset, true); err != nil {
		return nil, err
	}
	if err := b.series("resync changes", models, changes, func() int { return len(res.Resync) }, func(s *model, l4 render.L4Service) error {
		begin := time.Now()
		ruleset, err := b.ruleset(models)
		if err != nil {
			return err
		}
		rendered := time.Now()
		done := make(chan error, 1)
		go func() { done <- b.nftApply(ctx, ruleset, true) }()
		if err := b.poll(ctx, time.Millisecond, 5*time.Minute, "a re-rendered weight of "+s.name+" visible", func() error {
			return b.visible(ctx, l4)
		}); err != nil {
			return err
		}
		seen := time.Now()
		if err := <-done; err != nil {
			return err
		}
		res.Resync = append(res.Resync, seen.Sub(begin))
		res.ResyncRender = append(res.ResyncRender, rendered.Sub(begin))
		res.ResyncApply = append(res.ResyncApply, time.Since(rendered))
		return nil
	}); err != nil {
		return nil, err
	}
	if err := b.checkKernel(ctx, models); err != nil {
		return nil, fmt.Errorf("after the resync changes: %w", err)
	}
	cfg.Logf("resync (render + nft -f of the whole table): %d changes visible after p50 %s p99 %s; render p50 %s; nft -f p50 %s",
		len(res.Resync), ms(Pct(res.Resync, 50)), ms(Pct(res.Resync, 99)), ms(Pct(res.ResyncRender, 50)), ms(Pct(res.ResyncApply, 50)))
	return res, nil
}

// series runs fn for each change in turn, with the changed backend's
// weight raised in models and the service rendered, until the changes or
// the budget run out; done counts the changes made so far.
func (b *bench) series(side string, models []model, changes [][2]int, done func() int, fn func(s *model, l4 render.L4Service) error) error {
	start := time.Now()
	for _, c := range changes {
		if time.Since(start) > b.cfg.Budget {
			b.cfg.Logf("%s: budget %s used up after %d changes", side, b.cfg.Budget, done())
			return nil
		}
		s := &models[c[0]]
		s.weights[c[1]]++
		l4, err := s.l4()
		if err != nil {
			return err
		}
		if err := fn(s, l4); err != nil {
			return err
		}
	}
	return nil
}

// ruleset renders the whole state as `nft -f` input (what switchman plan
// prints).
func (b *bench) ruleset(models []model) (string, error) {
	all := make([]render.L4Service, len(models))
	for i, m := range models {
		l4, err := m.l4()
		if err != nil {
			return "", err
		}
		all[i] = l4
	}
	return render.NFTablesRuleset(all)
}

// nftApply runs `nft -f` with ruleset in the namespace; with replace, the
// ruleset replaces switchman's tables in the same transaction.
func (b *bench) nftApply(ctx context.Context, ruleset string, replace bool) error {
	if replace {
		var pre strings.Builder
		for _, line := range strings.Split(ruleset, "\n") {
			if strings.HasPrefix(line, "table ") {
				t := strings.TrimSuffix(strings.TrimSpace(line), " {")
				fmt.Fprintf(&pre, "%s\ndelete %s\n", t, t)
			}
		}
		ruleset = pre.String() + ruleset
	}
	f := filepath.Join(b.dir, "ruleset.nft")
	if err := os.WriteFile(f, []byte(ruleset), 0o600); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "nft", "-f", f)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := netns.Do(b.ns, func() error { return cmd.Run() }); err != nil {
		return fmt.Errorf("nft -f: %w: %s", err, out.String())
	}
	return nil
}

// kernelServices counts the services the kernel has.
func (b *bench) kernelServices() (int, error) {
	if b.nft != nil {
		els, err := b.nft.GetSetElements(&gnft.Set{Table: &gnft.Table{Name: render.NFTTable, Family: gnft.TableFamilyIPv4}, Name: render.NFTServicesMap})
		if errors.Is(err, syscall.ENOENT) {
			return 0, nil
		}
		return len(els), err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	svcs, err := b.ipvs.Services(ctx)
	return len(svcs), err
}

// visible reports whether the kernel has service l4 as rendered: for
// nf_tables its selection map, slot by slot; for IPVS its destinations'
// weights.
func (b *bench) visible(ctx context.Context, l4 render.L4Service) error {
	if b.nft != nil {
		els, err := b.nft.GetSetElements(&gnft.Set{Table: &gnft.Table{Name: render.NFTTable, Family: gnft.TableFamilyIPv4}, Name: "slots-" + l4.Service})
		if err != nil {
			return err
		}
		_, table := render.NFTSlots(l4)
		got := make([]netip.AddrPort, len(table))
		for _, e := range els {
			// A slot's data: the backend's address, then its port
			// (network order, padded to four bytes), as the driver
			// encodes it (drivers/nftables, elementKey and decodeKey).
			if len(e.Key) != 4 || len(e.Val) != 8 {
				return fmt.Errorf("slots-%s: element %x: %x", l4.Service, e.Key, e.Val)
			}
			i := int(binary.NativeEndian.Uint32(e.Key))
			if i >= len(got) {
				return fmt.Errorf("slots-%s: slot %d of %d", l4.Service, i, len(table))
			}
			got[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte(e.Val[:4])), binary.BigEndian.Uint16(e.Val[4:6]))
		}
		if len(els) != len(table) {
			return fmt.Errorf("slots-%s: %d slots, want %d", l4.Service, len(els), len(table))
		}
		for i, bk := range table {
			if got[i] != bk {
				return fmt.Errorf("slots-%s: slot %d is %s, want %s", l4.Service, i, got[i], bk)
			}
		}
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	dests, err := b.ipvs.Destinations(cctx, ipvs.Service{Protocol: ipvs.TCP, Address: l4.Address, Port: l4.Port})
	if err != nil {
		return err
	}
	if len(dests) != len(l4.Destinations) {
		return fmt.Errorf("%s: %d destinations, want %d", l4.Service, len(dests), len(l4.Destinations))
	}
	for _, want := range l4.Destinations {
		i := slices.IndexFunc(dests, func(d ipvs.Destination) bool { return d.Address == want.Address && d.Port == want.Port })
		if i < 0 || dests[i].Weight != want.Weight {
			return fmt.Errorf("%s: destination %s:%d not at weight %d", l4.Service, want.Address, want.Port, want.Weight)
		}
	}
	return nil
}

// checkKernel checks that the kernel holds every service as rendered.
func (b *bench) checkKernel(ctx context.Context, models []model) error {
	n, err := b.kernelServices()
	if err != nil {
		return err
	}
	if n != len(models) {
		return fmt.Errorf("the kernel has %d services, want %d", n, len(models))
	}
	for _, m := range models {
		l4, err := m.l4()
		if err != nil {
			return err
		}
		if err := b.visible(ctx, l4); err != nil {
			return err
		}
	}
	return nil
}

// startAgent runs the agent in the namespace on the in-process etcd.
func (b *bench) startAgent() (err error) {
	b.agent, err = nsagent.Start(b.ns, b.cfg.Agent, filepath.Join(b.dir, "agent.log"), syscall.SIGKILL, false,
		"--log-level", "warn", "agent",
		"--etcd-endpoints", "http://"+etcdAddr,
		"--node", node,
		"--data-dir", filepath.Join(b.dir, "data"),
		"--metrics-addr", metricsAddr,
		"--drivers", string(b.cfg.Driver),
		"--l4-driver", string(b.cfg.Driver),
		"--lease-ttl", "60s",
	)
	return err
}

func (b *bench) stopAgent() {
	if b.agent != nil {
		_ = b.agent.Stop(2 * time.Minute)
		b.agent = nil
	}
}

// poll calls cond every interval until it returns nil; it fails after
// timeout, or when the agent has exited.
func (b *bench) poll(ctx context.Context, interval, timeout time.Duration, what string, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if b.agent != nil {
			if exit := b.agent.Exited(); exit != nil {
				log, _ := os.ReadFile(filepath.Join(b.dir, "agent.log"))
				return fmt.Errorf("%s: %w: %s", what, exit, log)
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s: still not done after %s: %w", what, timeout, err)
		}
		time.Sleep(interval)
	}
}

func (b *bench) metrics() (map[string]float64, error) { return nsagent.Metrics(b.ns, metricsAddr) }

// meanDelta is the mean of a histogram between two scrapes: pattern
// names it with %s for "sum" and "count".
func meanDelta(before, after map[string]float64, pattern string) time.Duration {
	n := after[fmt.Sprintf(pattern, "count")] - before[fmt.Sprintf(pattern, "count")]
	if n <= 0 {
		return 0
	}
	return time.Duration((after[fmt.Sprintf(pattern, "sum")] - before[fmt.Sprintf(pattern, "sum")]) / n * float64(time.Second))
}

// rss returns a process's resident memory in bytes (0 when unknown).
func rss(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

func ms(d time.Duration) string { return d.Round(100 * time.Microsecond).String() }
