package nftables

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// Kernel is what the driver needs from nf_tables. Errors wrap the kernel's
// errno; an implementation whose kernel has no nf_tables wraps
// ErrUnavailable. Every call honours its context's deadline.
type Kernel interface {
	// Tables reads switchman's tables back; a family without one is
	// missing from the map. Dynamic sets are read without their elements.
	Tables(ctx context.Context) (map[render.NFTFamily]*Table, error)
	// Commit runs ops as one transaction: all take effect or none. It
	// returns, by op index, the handle of each rule it added or replaced.
	// A write the kernel refused is reported as an *OpError. Elements are
	// added and chains and sets created exclusively: what exists already
	// fails with EEXIST.
	Commit(ctx context.Context, ops []Op) ([]uint64, error)
	// Generation returns nf_tables' generation, which every committed
	// transaction (anyone's, in any table) advances by one.
	Generation(ctx context.Context) (uint32, error)
	// Connections counts the connections conntrack holds for a service,
	// by backend (the source of the reply direction): for TCP those not
	// yet closing (SYN_SENT, SYN_RECV, ESTABLISHED), for UDP all.
	Connections(ctx context.Context, k ConnKey) (map[netip.AddrPort]int, error)
}

// Defaults for Config.
const (
	DefaultCallTimeout = 10 * time.Second
	// DefaultReadTimeout bounds reading the tables back: tens of seconds
	// with 10,000 services on a busy host (the kernel looks each set up
	// by name, in a list).
	DefaultReadTimeout = 2 * time.Minute
	// DefaultMaxBatch bounds the writes of one transaction. The kernel
	// answers every write; a batch much larger fills the socket's receive
	// buffer (ENOBUFS). One service's writes are never split.
	DefaultMaxBatch = 1000
)

// Config configures a Driver.
type Config struct {
	Kernel Kernel
	Logger *slog.Logger
	// CallTimeout bounds each kernel call but the read of the tables; 0
	// means DefaultCallTimeout.
	CallTimeout time.Duration
	// ReadTimeout bounds the read of the tables; 0 means
	// DefaultReadTimeout.
	ReadTimeout time.Duration
	// MaxBatch bounds the writes of one transaction; 0 means
	// DefaultMaxBatch.
	MaxBatch int
}

// Driver serves nf_tables services. It implements the agent's Driver and
// ConnectionCounter.
type Driver struct {
	kernel      Kernel
	log         *slog.Logger
	timeout     time.Duration
	readTimeout time.Duration
	maxBatch    int
	turn        chan struct{} // one Apply or Sync at a time; waiting honours ctx

	// record is what the kernel holds as far as the driver knows: read by
	// the last Sync (or the first Apply) and kept up to date with every
	// transaction since. nil when unknown: the next pass reads it. Used
	// under turn only.
	record *record
	// gen is the nf_tables generation the record is exact for, when
	// genKnown: as long as the kernel's generation is still gen, nothing
	// changed, and a Sync need not read the tables again.
	gen      uint32
	genKnown bool
	// applied holds, by service, the Generation of the state last brought
	// into the tables without error.
	applied map[string]uint64
	// backends holds, by service, every backend of the state last handed
	// to the driver, whatever its weight: a draining backend is in no
	// slots map, but its connections are still counted. Used under turn.
	backends map[string][]netip.AddrPort

	writes, commits atomic.Uint64
}

// New returns a Driver.
func New(cfg Config) (*Driver, error) {
	if cfg.Kernel == nil {
		return nil, errors.New("nftables driver: no kernel")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = DefaultCallTimeout
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = DefaultMaxBatch
	}
	if cfg.ReadTimeout <= 0 {
		cfg.ReadTimeout = DefaultReadTimeout
	}
	return &Driver{kernel: cfg.Kernel, log: cfg.Logger, timeout: cfg.CallTimeout, readTimeout: cfg.ReadTimeout,
		maxBatch: cfg.MaxBatch, turn: make(chan struct{}, 1), applied: map[string]uint64{}, backends: map[string][]netip.AddrPort{}}, nil
}

// Name is "nftables".
func (d *Driver) Name() string { return string(spec.DriverNFTables) }

// Writes returns how many writes (netlink messages of transactions) the
// driver has sent, refused ones included.
func (d *Driver) Writes() uint64 { return d.writes.Load() }

// Commits returns how many transactions the driver has sent.
func (d *Driver) Commits() uint64 { return d.commits.Load() }

// Apply brings each given service to its desired state and touches nothing
// else: one transaction per service, built from what the driver recorded
// of earlier passes (no table is read, except once by a first Apply that
// comes before any Sync). A service whose part is nil or another driver's
// is removed from the tables.
func (d *Driver) Apply(ctx context.Context, changed []*render.ServiceState) map[string]error {
	return d.pass(ctx, changed, false)
}

// Sync makes switchman's tables match all: it repairs drift, removes
// what is not in all, and writes nothing when nothing differs. It reads
// the tables back unless nf_tables' generation shows that nobody but the
// driver has committed anything since it last knew them exactly (then
// they are what it recorded, and nothing can have drifted).
func (d *Driver) Sync(ctx context.Context, all []*render.ServiceState) map[string]error {
	return d.pass(ctx, all, true)
}

// pass renders states, diffs them against the record (read afresh for a
// Sync, unless nobody else has written since) and commits the difference.
// A service that cannot be rendered is left as the kernel has it.
//
// A Sync that finds the tables unchanged works like an Apply: it looks at
// the services whose state it has not applied yet (by Generation) and at
// those the tables hold that all no longer names; the others are already
// in the tables as the record says.
func (d *Driver) pass(ctx context.Context, states []*render.ServiceState, all bool) map[string]error {
	errs := map[string]error{}
	if !d.take(ctx) {
		for _, st := range states {
			if st.L4 != nil && st.L4.Driver == spec.DriverNFTables || !all {
				errs[st.Name] = fmt.Errorf("not applied: %w", ctx.Err())
			}
		}
		return errs
	}
	defer d.release()
	quick := all && d.record != nil && d.unchanged(ctx)
	want := Desired{Services: map[string]*render.NFTService{}, All: all && !quick, Keep: map[string]bool{}}
	gens := map[string]uint64{}
	ours := map[string]bool{} // the services all serves with nf_tables
	for _, st := range states {
		if st.L4 == nil || st.L4.Driver != spec.DriverNFTables {
			if !all {
				want.Services[st.Name] = nil
			}
			continue
		}
		ours[st.Name] = true
		if quick && st.Generation > 0 && d.applied[st.Name] == st.Generation {
			continue // in the tables as applied, and they did not change
		}
		n, err := render.NFTablesService(*st.L4)
		if err != nil {
			errs[st.Name] = fmt.Errorf("nftables: %w", err)
			want.Keep[st.Name] = true
			continue
		}
		want.Services[st.Name] = &n
		gens[st.Name] = st.Generation
		d.backends[st.Name] = n.Backends
	}
	if quick {
		for name := range d.record.services() {
			if !ours[name] {
				want.Services[name] = nil
			}
		}
	}
	if d.record == nil || (all && !quick) {
		if err := d.read(ctx); err != nil {
			failAll(errs, want.Services, err)
			return errs
		}
	}
	observed := d.record.tables
	if !want.All {
		// Only what the services in hand own (and the tables' own
		// objects): work in proportion to the change.
		observed = d.record.view(want.Services)
	}
	d.run(ctx, Diff(observed, want), errs)
	for name, svc := range want.Services {
		if svc == nil {
			delete(d.backends, name)
		}
		switch {
		case errs[name] != nil || svc == nil || gens[name] == 0:
			delete(d.applied, name)
		default:
			d.applied[name] = gens[name]
		}
	}
	if all {
		for name := range d.backends {
			if !ours[name] {
				delete(d.backends, name)
			}
		}
	}
	return errs
}

func (d *Driver) take(ctx context.Context) bool {
	select {
	case d.turn <- struct{}{}:
		return true
	case <-ctx.Done():
		return false
	}
}

func (d *Driver) release() { <-d.turn }

// unchanged reports whether the kernel's generation is still the one the
// record is exact for: nobody has committed anything since, so the record
// is what the kernel holds.
func (d *Driver) unchanged(ctx context.Context) bool {
	if !d.genKnown {
		return false
	}
	c, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	g, err := d.kernel.Generation(c)
	return err == nil && g == d.gen
}

// read replaces the record with the kernel's tables. A read that fails
// keeps the record the driver has (its best knowledge: it wrote nothing
// since), so Applies go on; the next Sync reads again.
func (d *Driver) read(ctx context.Context) error {
	c, cancel := context.WithTimeout(ctx, d.readTimeout)
	defer cancel()
	before, gerr := d.kernel.Generation(c)
	tables, err := d.kernel.Tables(c)
	if err != nil {
		d.genKnown = false
		return fmt.Errorf("read nf_tables: %w", err)
	}
	after, aerr := d.kernel.Generation(c)
	d.record = newRecord(tables)
	// Exact only if nobody committed while the tables were read.
	d.gen, d.genKnown = after, gerr == nil && aerr == nil && before == after
	return nil
}

// committed notes a transaction of the driver's own that the kernel
// took: the record stays exact if it was, and this transaction is the
// only one since (the generation moved by one).
func (d *Driver) committed(ctx context.Context) {
	if !d.genKnown {
		return
	}
	c, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	g, err := d.kernel.Generation(c)
	d.gen, d.genKnown = g, err == nil && g == d.gen+1
}

// run commits groups, several to a transaction up to maxBatch writes. A
// transaction the kernel refuses is aborted whole: the group of the refused
// write fails, and the others go again, from then on one group per
// transaction. A group whose services already failed is skipped. After a
// refusal the record is dropped, to be read again by the next pass.
func (d *Driver) run(ctx context.Context, groups []Group, errs map[string]error) {
	limit, stale := d.maxBatch, false
	defer func() {
		if stale {
			d.record, d.genKnown = nil, false
		}
	}()
	for len(groups) > 0 {
		var batch []Group
		n := 0
		for len(groups) > 0 {
			g := groups[0]
			if failed(errs, g) {
				groups = groups[1:]
				continue
			}
			if len(batch) > 0 && n+len(g.Ops) > limit {
				break
			}
			batch, n, groups = append(batch, g), n+len(g.Ops), groups[1:]
		}
		if len(batch) == 0 {
			return
		}
		ops := make([]Op, 0, n)
		for _, g := range batch {
			ops = append(ops, g.Ops...)
		}
		d.commits.Add(1)
		d.writes.Add(uint64(len(ops)))
		c, cancel := context.WithTimeout(ctx, d.timeout)
		handles, err := d.kernel.Commit(c, ops)
		cancel()
		var oe *OpError
		switch {
		case err == nil:
			if d.record != nil {
				d.record.apply(ops, handles)
				d.committed(ctx)
			}
		case errors.As(err, &oe) && oe.Index >= 0 && oe.Index < len(ops):
			i, at := 0, 0
			for ; i < len(batch)-1; i++ {
				if at += len(batch[i].Ops); oe.Index < at {
					break
				}
			}
			d.log.Warn("nf_tables refused a write", "op", oe.Op.String(), "services", batch[i].Services, "error", oe.Err)
			d.fail(errs, batch[i], fmt.Errorf("nftables: %w", err))
			groups = append(append(slices.Clone(batch[:i]), batch[i+1:]...), groups...)
			limit, stale = 0, true
		case errors.Is(err, syscall.ENOBUFS) && len(batch) > 1:
			limit = max(1, n/2)
			groups = append(batch, groups...)
		default:
			// The kernel is missing, not answering, or the context ended:
			// the outcome may be unknown.
			stale = stale || !errors.Is(err, ErrUnavailable)
			err = fmt.Errorf("nftables: %w", err)
			for _, g := range batch {
				d.fail(errs, g, err)
			}
			d.failRest(errs, groups, fmt.Errorf("not applied: an earlier nf_tables transaction failed (%w)", err))
			return
		}
	}
}

func failed(errs map[string]error, g Group) bool {
	for _, s := range g.Services {
		if _, bad := errs[s]; bad {
			return true
		}
	}
	return false
}

func (d *Driver) fail(errs map[string]error, g Group, err error) {
	if len(g.Services) == 0 {
		d.log.Warn("nf_tables cleanup failed", "error", err)
	}
	for _, s := range g.Services {
		if _, bad := errs[s]; !bad {
			errs[s] = err
		}
	}
}

func (d *Driver) failRest(errs map[string]error, groups []Group, err error) {
	for _, g := range groups {
		d.fail(errs, g, err)
	}
}

func failAll(errs map[string]error, want map[string]*render.NFTService, err error) {
	for name := range want {
		if _, bad := errs[name]; !bad {
			errs[name] = err
		}
	}
}

// Connections returns the connections conntrack holds for the named
// services, by backend: for TCP those not yet closing, for UDP all. Every
// backend of a service the tables hold is in the answer, 0 when it has no
// connection (the agent ends a drain early only on a counted 0). One
// conntrack dump, filtered by the kernel to the service's vip:port, per
// service.
func (d *Driver) Connections(ctx context.Context, services map[string]bool) (map[render.BackendRef]int, error) {
	if !d.take(ctx) {
		return nil, fmt.Errorf("nftables: count connections: %w", ctx.Err())
	}
	keys := d.record.connKeys(services)
	backends := map[string][]netip.AddrPort{}
	for name := range keys {
		backends[name] = d.backends[name]
	}
	d.release()
	out := map[render.BackendRef]int{}
	for _, name := range sortedKeys(keys) {
		for _, b := range backends[name] {
			out[render.BackendRef{Service: name, Addr: b}] = 0
		}
		c, cancel := context.WithTimeout(ctx, d.timeout)
		counts, err := d.kernel.Connections(c, keys[name])
		cancel()
		if err != nil {
			return nil, fmt.Errorf("nftables: count connections of %s: %w", name, err)
		}
		for b, n := range counts {
			out[render.BackendRef{Service: name, Addr: b}] += n
		}
	}
	return out, nil
}

// editRules applies one rule write to a chain's rules.
func editRules(rules []Rule, op Op, handle uint64) []Rule {
	at := slices.IndexFunc(rules, func(r Rule) bool { return r.Handle == op.Handle })
	r := Rule{Handle: handle, Spec: op.Rule, Known: true}
	switch {
	case op.Kind == DelRule && at >= 0:
		return slices.Delete(rules, at, at+1)
	case op.Kind == ReplaceRule && at >= 0:
		rules[at] = r
	case op.Kind == AddRule && op.Handle != 0 && at >= 0:
		return slices.Insert(rules, at, r)
	case op.Kind == AddRule && op.Handle == 0:
		return append(rules, r)
	}
	return rules
}
