package ha

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/switchman-lb/switchman/internal/clock"
	"github.com/switchman-lb/switchman/spec"
)

// Holder holds the addresses of the groups this agent owns. Hold is called
// synchronously, from one goroutine, each time this agent starts or stops
// holding a group, and again with held true when a held group's floating
// addresses change. It must add or remove the group's VIPs and its
// floating addresses at once, and announce what it added without blocking
// (announcements go on in the background): the safety of the hand-over
// counts the time Hold takes within Timing.Margin.
type Holder interface {
	Hold(group string, held bool, floating []spec.GroupAddress)
}

// Defaults for Options.
const (
	DefaultPrefix   = "/switchman"
	DefaultLeaseTTL = 3 * time.Second
	// DefaultPort is the UDP port of the heartbeats when none is given.
	DefaultPort = 7947
)

// Options configure an Elector.
type Options struct {
	// Node is this agent's name (--node).
	Node string
	// Prefix is the etcd prefix (DefaultPrefix).
	Prefix string
	// LeaseTTL is the TTL of the agent's own HA lease (--ha-lease-ttl,
	// DefaultLeaseTTL; at least 2s, etcd's minimum).
	LeaseTTL time.Duration
	// Listen is the UDP address heartbeats arrive on, e.g. 10.0.0.1:7947
	// (an address of the HA interface); port 0 picks one.
	Listen string
	// Advertise is the address peers send heartbeats to (default: the
	// address Listen bound, which then must not be unspecified).
	Advertise string
	Store     Store
	Holder    Holder
	Clock     clock.Clock  // clock.Real{} when nil
	Logger    *slog.Logger // discarded when nil
	Timing    Timing       // DefaultTiming() when zero
	// Registerer receives the ha metrics; nil registers none.
	Registerer prometheus.Registerer
}

// Elector decides, with etcd as the only arbiter, which agent owns each HA
// group, and tells its Holder when this agent starts and stops holding a
// group. See the package documentation for the rules.
type Elector struct {
	opts Options
	clk  clock.Clock
	log  *slog.Logger
	conn *net.UDPConn
	m    *machine
	addr string

	events  chan any
	wake    chan struct{}
	release chan chan struct{}
	done    chan struct{}

	mu      sync.Mutex
	groups  []string
	setG    bool
	owners  map[string]Owner
	held    []string
	contact bool
	running bool

	metrics *metrics
}

// New returns an Elector that listens for heartbeats on opts.Listen.
func New(opts Options) (*Elector, error) {
	if err := spec.ValidateNode(opts.Node); err != nil {
		return nil, fmt.Errorf("ha: %w", err)
	}
	if opts.Store == nil || opts.Holder == nil {
		return nil, errors.New("ha: a Store and a Holder are required")
	}
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	opts.Prefix = strings.TrimSuffix(opts.Prefix, "/")
	if opts.LeaseTTL == 0 {
		opts.LeaseTTL = DefaultLeaseTTL
	}
	if opts.Timing == (Timing{}) {
		opts.Timing = DefaultTiming()
	}
	if err := opts.Timing.check(opts.LeaseTTL); err != nil {
		return nil, err
	}
	if opts.Clock == nil {
		opts.Clock = clock.Real{}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	laddr, err := net.ResolveUDPAddr("udp", opts.Listen)
	if err != nil {
		return nil, fmt.Errorf("ha: heartbeat address %q: %w", opts.Listen, err)
	}
	conn, err := net.ListenUDP("udp", laddr)
	if err != nil {
		return nil, fmt.Errorf("ha: listen for heartbeats on %q: %w", opts.Listen, err)
	}
	adv := opts.Advertise
	if adv == "" {
		adv = conn.LocalAddr().String()
	}
	ap, err := netip.ParseAddrPort(adv)
	if err != nil || ap.Addr().IsUnspecified() || ap.Port() == 0 {
		conn.Close()
		return nil, fmt.Errorf("ha: advertised heartbeat address %q must be an address and port peers can reach (set the listen address or the advertised one)", adv)
	}
	adv = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
	e := &Elector{opts: opts, clk: opts.Clock, log: opts.Logger, conn: conn, addr: adv,
		events: make(chan any, 256), wake: make(chan struct{}, 1), release: make(chan chan struct{}),
		done: make(chan struct{}), owners: map[string]Owner{}}
	cfg := config{node: opts.Node, prefix: opts.Prefix, addr: adv, ttl: opts.LeaseTTL, t: opts.Timing, inc: rand.Uint64()}
	e.m = newMachine(cfg, opts.Logger, e.clk.Now())
	if opts.Registerer != nil {
		e.metrics = newMetrics(opts.Registerer)
	}
	return e, nil
}

// Addr returns the heartbeat address peers are told to send to.
func (e *Elector) Addr() string { return e.addr }

// SetGroups sets the HA groups this agent's services name (ha_group); the
// groups that have settings in etcd count too. It never blocks.
func (e *Elector) SetGroups(groups []string) {
	e.mu.Lock()
	e.groups, e.setG = slices.Clone(groups), true
	e.mu.Unlock()
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// Owners returns the owner of each group as this agent last saw it.
func (e *Elector) Owners() map[string]Owner {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[string]Owner, len(e.owners))
	for k, v := range e.owners {
		out[k] = v
	}
	return out
}

// Held returns the groups whose addresses this agent holds, sorted.
func (e *Elector) Held() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.held)
}

// EtcdContact reports whether this agent's ownership reads reach etcd.
func (e *Elector) EtcdContact() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.contact
}

// Owns reports whether this agent holds group.
func (e *Elector) Owns(group string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Contains(e.held, group)
}

// Release hands every owned group over (planned stop, SIGTERM): each owner
// key is deleted first, the group's addresses are dropped right after and
// the peers told, so a standby claims at once; then the lease is revoked.
// It returns when that is done or ctx ends; the Elector claims nothing
// afterwards. Run must be running.
func (e *Elector) Release(ctx context.Context) error {
	ch := make(chan struct{})
	select {
	case e.release <- ch:
	case <-e.done:
		return errors.New("ha: release: the elector is not running")
	case <-ctx.Done():
		return fmt.Errorf("ha: release: %w", ctx.Err())
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("ha: release not finished: %w", ctx.Err())
	}
}

// Run decides ownership until ctx ends. On return it drops the addresses
// it still holds (without releasing the keys: a peer takes over when the
// lease runs out, or sooner through the heartbeats); call Release first
// for a hand-over.
func (e *Elector) Run(ctx context.Context) error {
	e.mu.Lock()
	if e.running {
		e.mu.Unlock()
		return errors.New("ha: Run called twice")
	}
	e.running = true
	e.mu.Unlock()
	defer close(e.done)
	opCtx, cancelOps := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() {
		cancelOps()
		e.conn.Close()
		wg.Wait()
	}()
	wg.Add(1)
	go func() { defer wg.Done(); e.receive(opCtx) }()

	var released chan struct{}
	timer := e.clk.NewTimer()
	defer timer.Stop()
	handle := func(ev any) {
		now := e.clk.Now()
		for _, eff := range e.m.handle(now, ev) {
			if _, ok := eff.(effReleased); ok && released != nil {
				close(released)
				released = nil
				continue
			}
			e.exec(opCtx, &wg, now, eff)
		}
		e.publish(now)
	}
	handle(evTick{})
	for {
		timer.ResetAt(e.clk.Now().Add(e.opts.Timing.Tick))
		select {
		case <-ctx.Done():
			for _, g := range e.m.groups {
				if g.held {
					g.held = false
					e.hold(g.name, false, nil)
				}
			}
			e.publish(e.clk.Now())
			return ctx.Err()
		case ev := <-e.events:
			handle(ev)
		case <-e.wake:
			e.mu.Lock()
			groups, set := e.groups, e.setG
			e.mu.Unlock()
			if set {
				handle(evGroups{groups: groups})
			}
		case ch := <-e.release:
			if released != nil || e.m.released {
				close(ch)
				continue
			}
			released = ch
			handle(evRelease{})
		case <-timer.C():
			handle(evTick{})
		}
	}
}

// post hands an operation's result to the loop, unless Run has ended.
func (e *Elector) post(ctx context.Context, ev any) {
	select {
	case e.events <- ev:
	case <-ctx.Done():
	}
}

func (e *Elector) receive(ctx context.Context) {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := e.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		ev := evPacket{from: netip.AddrPortFrom(from.Addr().Unmap(), from.Port()).String(), data: slices.Clone(buf[:n])}
		select {
		case e.events <- ev:
		case <-ctx.Done():
			return
		default: // the loop is behind; a heartbeat more or less does no harm
		}
	}
}

func (e *Elector) hold(group string, held bool, floating []spec.GroupAddress) {
	e.log.Info("ha: address hold", "group", group, "held", held)
	e.opts.Holder.Hold(group, held, floating)
	if e.metrics != nil {
		v := 0.0
		if held {
			v = 1
		}
		e.metrics.held.WithLabelValues(group).Set(v)
	}
}

func (e *Elector) exec(ctx context.Context, wg *sync.WaitGroup, now time.Time, eff any) {
	st, timeout := e.opts.Store, e.opts.Timing.Hold
	async := func(f func(ctx context.Context) any) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, timeout)
			ev := f(cctx)
			cancel()
			e.post(ctx, ev)
		}()
	}
	switch f := eff.(type) {
	case effHold:
		e.hold(f.group, f.held, f.floating)
	case effSend:
		for _, a := range f.addrs {
			if ap, err := netip.ParseAddrPort(a); err == nil {
				_, _ = e.conn.WriteToUDPAddrPort(f.data, ap)
			}
		}
	case effClaim:
		waited := now.Sub(f.ready)
		if e.metrics != nil {
			e.metrics.claimWait.WithLabelValues(f.kind, f.gate).Observe(waited.Seconds())
		}
		e.log.Info("ha: claiming a group", "group", f.group, "kind", f.kind, "waited", waited.Round(time.Millisecond), "gate", f.gate)
	case effOwner:
		if e.metrics != nil && f.owner.Node != "" {
			e.metrics.changes.WithLabelValues(f.group).Inc()
		}
		e.log.Info("ha: group owner", "group", f.group, "owner", f.owner.Node, "epoch", f.owner.Epoch)
	case effRead:
		async(func(ctx context.Context) any {
			ev := evRead{sent: f.sent, renew: f.renew}
			var rwg sync.WaitGroup
			if f.renew != 0 {
				rwg.Add(1)
				go func() { defer rwg.Done(); ev.renewErr = st.KeepAliveOnce(ctx, f.renew) }()
			}
			ev.rev, ev.kvs, ev.err = st.Read(ctx, f.prefixes...)
			if e.metrics != nil && ev.err == nil {
				e.metrics.read.Observe(e.clk.Now().Sub(f.sent).Seconds())
			}
			rwg.Wait()
			return ev
		})
	case effGrant:
		async(func(ctx context.Context) any {
			id, err := st.Grant(ctx, f.ttl)
			return evGrant{sent: f.sent, lease: id, err: err}
		})
	case effPut:
		async(func(ctx context.Context) any {
			return evPut{lease: f.lease, err: st.Put(ctx, f.key, f.value, f.lease)}
		})
	case effCond:
		async(func(ctx context.Context) any {
			ev := evCond{group: f.group, kind: f.kind, sent: f.sent, lease: f.lease}
			switch f.kind {
			case "create":
				ev.ok, ev.kv, ev.err = st.Create(ctx, f.key, f.value, f.lease)
			case "replace":
				ev.ok, ev.kv, ev.err = st.Replace(ctx, f.key, f.modRev, f.value, f.lease)
			default:
				ev.ok, ev.kv, ev.err = st.Touch(ctx, f.key, f.value, f.lease)
			}
			return ev
		})
	case effDelete:
		async(func(ctx context.Context) any {
			ev := evDelete{group: f.group, lease: f.lease, epoch: f.epoch}
			ev.ok, ev.rev, ev.err = st.Delete(ctx, f.key, f.lease)
			return ev
		})
	case effLease:
		async(func(ctx context.Context) any {
			alive, err := st.LeaseAlive(ctx, f.lease)
			return evLease{group: f.group, lease: f.lease, alive: alive, err: err}
		})
	case effRevoke:
		async(func(ctx context.Context) any {
			if err := st.Revoke(ctx, f.lease); err != nil {
				e.log.Warn("ha: revoke lease", "error", err)
			}
			return evRevoked{}
		})
	default:
		panic(fmt.Sprintf("ha: unknown effect %T", eff))
	}
}

func (e *Elector) publish(now time.Time) {
	owners, held, contact := e.m.owners(), e.m.heldGroups(), e.m.etcdOK(now)
	e.mu.Lock()
	e.owners, e.held, e.contact = owners, held, contact
	e.mu.Unlock()
	if e.metrics != nil {
		e.metrics.owned.Set(float64(len(held)))
		v := 0.0
		if contact {
			v = 1
		}
		e.metrics.contact.Set(v)
		if e.metrics.hadContact && !contact {
			e.metrics.lapses.Inc()
		}
		e.metrics.hadContact = contact
	}
}

type metrics struct {
	changes   *prometheus.CounterVec
	held      *prometheus.GaugeVec
	owned     prometheus.Gauge
	contact   prometheus.Gauge
	lapses    prometheus.Counter
	read      prometheus.Histogram
	claimWait *prometheus.HistogramVec
	// hadContact is the contact published last (Run's goroutine only).
	hadContact bool
}

func newMetrics(r prometheus.Registerer) *metrics {
	m := &metrics{
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "switchman_ha_owner_changes_total",
			Help: "Times this agent saw a new owner (node or epoch) of an HA group."}, []string{"group"}),
		held: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "switchman_ha_group_held",
			Help: "1 while this agent holds the group's addresses."}, []string{"group"}),
		owned: prometheus.NewGauge(prometheus.GaugeOpts{Name: "switchman_ha_owned_groups",
			Help: "HA groups whose addresses this agent holds."}),
		contact: prometheus.NewGauge(prometheus.GaugeOpts{Name: "switchman_ha_etcd_contact",
			Help: "1 while this agent's ownership reads reach etcd."}),
		lapses: prometheus.NewCounter(prometheus.CounterOpts{Name: "switchman_ha_etcd_contact_lapses_total",
			Help: "Times this agent's etcd contact lapsed: no read answered within two rounds of the last one sent that was."}),
		read: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "switchman_ha_etcd_read_seconds",
			Help:    "Time from sending an ownership read to etcd's answer.",
			Buckets: []float64{.002, .005, .01, .02, .05, .1, .2, .3, .5, 1, 2, 5}}),
		claimWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "switchman_ha_claim_wait_seconds",
			Help:    "Time from when a group became claimable by the safety rules (free, or its owner gone) to this agent's claim, by kind (create, replace) and by what held the claim back (none, start, regain, rank).",
			Buckets: []float64{.001, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10}}, []string{"kind", "gate"}),
	}
	r.MustRegister(m.changes, m.held, m.owned, m.contact, m.lapses, m.read, m.claimWait)
	return m
}
