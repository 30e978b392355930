// Package netfilter programs switchman's access control (allow_cidrs) and
// source NAT (preserve_client_ip: false) with iptables and ip6tables.
//
// Layout, per address family (iptables for IPv4 VIPs, ip6tables for IPv6):
//
//	filter INPUT (rule 1)    -m comment --comment switchman -j SWITCHMAN-FILTER
//	SWITCHMAN-FILTER         one jump per service with allow_cidrs:
//	                         -d VIP -p PROTO --dport PORT ... -j SWITCHMAN-S-<hash>
//	SWITCHMAN-S-<hash>       per service, in order: -s RANGE -j RETURN for each
//	                         allowed range, then -j DROP
//	nat POSTROUTING (rule 1) -m comment --comment switchman -j SWITCHMAN-POSTROUTING
//	SWITCHMAN-POSTROUTING    per backend of a masqueraded service:
//	                         -d BACKEND -p PROTO --dport BPORT -m conntrack
//	                         --ctorigdst VIP --ctorigdstport PORT -j MASQUERADE
//
// Every rule carries `-m comment --comment switchman:<service>`. The base
// chains and their jumps are created the first time a service needs them
// and never flushed; everything inside chains named SWITCHMAN-* belongs to
// switchman and is reconciled rule by rule against the desired state. No
// other chain is written to except for the two jumps.
package netfilter

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"

	"github.com/switchman-lb/switchman/render"
)

// Tables is the part of iptables the driver uses, for one address family.
// Rules are given and listed as iptables -S writes them. The driver reads
// each table once per Apply (ListTable) rather than chain by chain: every
// call runs the iptables binary, which takes milliseconds.
type Tables interface {
	// ListTable returns the table as iptables -t TABLE -S prints it: -P
	// and -N lines naming every chain, then -A lines, one per rule.
	ListTable(table string) ([]string, error)
	// NewChain creates a chain; it fails if the chain exists.
	NewChain(table, chain string) error
	// DeleteChain deletes an empty, unreferenced chain.
	DeleteChain(table, chain string) error
	// Append adds a rule at the end of a chain.
	Append(table, chain string, rule ...string) error
	// Insert adds a rule at a 1-based position.
	Insert(table, chain string, pos int, rule ...string) error
	// Delete removes the first rule with this spec; it fails if none.
	Delete(table, chain string, rule ...string) error
}

// Driver reconciles the netfilter rules of every service. Apply and Sync
// must not be called concurrently (the agent runs them in one goroutine).
type Driver struct {
	log    *slog.Logger
	open   func(v6 bool) (Tables, error)
	tables [2]Tables // [0] iptables, [1] ip6tables; opened on first need

	// known is what is in force for each service, as the last Sync or
	// Apply left it; after a Sync, a service missing here has nothing. A
	// service in lost (an error left it uncertain), or any service before
	// the first Sync, is read back before an Apply changes it.
	known  map[string]installed
	lost   map[string]bool
	synced bool
	// based marks the tables (by family) whose base chain and jump are
	// known to be in place.
	based [2]map[string]bool
}

// New returns a driver that runs the iptables and ip6tables binaries. It
// finds them on first use, so one installed later is picked up.
func New(log *slog.Logger) *Driver {
	return newDriver(log, openIPTables)
}

func newDriver(log *slog.Logger, open func(v6 bool) (Tables, error)) *Driver {
	return &Driver{log: log, open: open, known: map[string]installed{}, lost: map[string]bool{}, based: [2]map[string]bool{{}, {}}}
}

// Name is "netfilter".
func (d *Driver) Name() string { return "netfilter" }

// Sync makes the SWITCHMAN-* chains match the filters of all (every
// service this driver serves), reading each table once, and returns the
// services whose rules could not be programmed. Errors on rules of a
// service no longer desired are returned under that service's name (from
// the rule's comment) so that the agent retries.
func (d *Driver) Sync(ctx context.Context, all []*render.ServiceState) map[string]error {
	var filters []render.Filter
	for _, s := range all {
		if s.Filter != nil {
			filters = append(filters, *s.Filter)
		}
	}
	errs := d.syncFilters(ctx, filters)
	clear(d.known)
	clear(d.lost)
	for _, f := range filters {
		if errs[f.Service] != nil {
			continue
		}
		if in, err := installedOf(f); err == nil {
			d.known[f.Service] = in
		}
	}
	for name := range errs {
		d.lost[name] = true
	}
	d.synced = true
	return errs
}

func (d *Driver) syncFilters(ctx context.Context, all []render.Filter) map[string]error {
	errs := map[string]error{}
	var byFamily [2][]render.Filter
	for _, f := range all {
		byFamily[family(f.VIP)] = append(byFamily[family(f.VIP)], f)
	}
	for fam, filters := range byFamily {
		name := "ipv4"
		if fam == 1 {
			name = "ipv6"
		}
		t, err := d.table(fam)
		if err != nil {
			if len(filters) > 0 {
				d.log.Error("netfilter unavailable", "family", name, "error", err)
				for _, f := range filters {
					errs[f.Service] = err
				}
			}
			continue
		}
		r := &reconciler{ctx: ctx, log: d.log.With("family", name), t: t, errs: errs}
		d.based[fam][tableFilter] = r.filter(filters)
		d.based[fam][tableNAT] = r.nat(filters)
	}
	return errs
}

// table opens the iptables of a family (0 IPv4, 1 IPv6) on first need.
func (d *Driver) table(fam int) (Tables, error) {
	if d.tables[fam] == nil {
		t, err := d.open(fam == 1)
		if err != nil {
			return nil, err
		}
		d.tables[fam] = t
	}
	return d.tables[fam], nil
}

// family is 0 for an IPv4 VIP, 1 for IPv6.
func family(a netip.Addr) int {
	if a.Unmap().Is4() {
		return 0
	}
	return 1
}

// reconciler reconciles one family in one Apply.
type reconciler struct {
	ctx  context.Context
	log  *slog.Logger
	t    Tables
	errs map[string]error
}

// fail records err against service, or logs it when no service owns it.
func (r *reconciler) fail(service string, err error) {
	if service == "" {
		r.log.Error("netfilter change failed", "error", err)
		return
	}
	r.errs[service] = errors.Join(r.errs[service], err)
}

func (r *reconciler) failAll(services []string, err error) {
	for _, s := range services {
		r.fail(s, err)
	}
}

// do runs one write, unless the context is done, and logs it.
func (r *reconciler) do(table, chain string, o op) error {
	if err := r.ctx.Err(); err != nil {
		return err
	}
	var err error
	switch o.kind {
	case opAppend:
		err = r.t.Append(table, chain, o.rule...)
	case opInsert:
		err = r.t.Insert(table, chain, o.pos, o.rule...)
	case opDelete:
		err = r.t.Delete(table, chain, o.rule...)
	}
	if err != nil {
		return fmt.Errorf("%s rule in %s/%s (%s): %w", o.kind, table, chain, o.rule, err)
	}
	r.log.Info("netfilter rule changed", "op", o.kind.String(), "table", table, "chain", chain, "rule", o.rule.String())
	return nil
}

func (r *reconciler) newChain(table, chain string) error {
	if err := r.ctx.Err(); err != nil {
		return err
	}
	if err := r.t.NewChain(table, chain); err != nil {
		return fmt.Errorf("create chain %s/%s: %w", table, chain, err)
	}
	r.log.Info("netfilter chain created", "table", table, "chain", chain)
	return nil
}

func (r *reconciler) read(table string) (snapshot, error) {
	lines, err := r.t.ListTable(table)
	if err != nil {
		return snapshot{}, fmt.Errorf("list table %s: %w", table, err)
	}
	snap, err := parseTable(lines)
	if err != nil {
		return snapshot{}, fmt.Errorf("list table %s: %w", table, err)
	}
	return snap, nil
}

// base makes sure chain exists in table and that builtin jumps to it (a
// new jump goes first). It reports whether there is anything to reconcile:
// a chain that never existed and is not needed is left uncreated.
func (r *reconciler) base(snap snapshot, table, builtin, chain string, needed bool) (bool, error) {
	if !snap.has(chain) && !needed {
		return false, nil
	}
	if !snap.has(chain) {
		if err := r.newChain(table, chain); err != nil {
			return false, err
		}
	}
	jump := jumpRule(chain)
	if !slices.ContainsFunc(snap.rules[builtin], func(x rule) bool { return x.key() == jump.key() }) {
		if err := r.do(table, builtin, op{kind: opInsert, pos: 1, rule: jump}); err != nil {
			return false, err
		}
	}
	return true, nil
}

// filter reconciles the filter table: SWITCHMAN-FILTER and the
// per-service chains. It reports whether the base chain and its jump are
// in place.
func (r *reconciler) filter(filters []render.Filter) bool {
	type service struct {
		name  string
		jump  rule
		chain string
		rules []rule
	}
	var want []service
	var names []string
	ours := map[string]bool{}   // per-service chains of desired services
	failed := map[string]bool{} // services whose jump must be left as it is
	for _, f := range filters {
		if f.AllowCIDRs == nil {
			continue
		}
		names = append(names, f.Service)
		ours[serviceChain(f.Service)] = true
		jump, rules, err := filterRules(f)
		if err != nil {
			r.fail(f.Service, err)
			failed[f.Service] = true
			continue
		}
		want = append(want, service{name: f.Service, jump: jump, chain: serviceChain(f.Service), rules: rules})
	}
	snap, err := r.read(tableFilter)
	if err != nil {
		r.failAll(names, err)
		return false
	}
	ok, err := r.base(snap, tableFilter, "INPUT", chainFilter, len(names) > 0)
	if err != nil {
		r.failAll(names, err)
		return false
	}
	if !ok {
		return false
	}
	// First the per-service chains, complete before anything jumps to
	// them.
	var jumps []rule
	for _, s := range want {
		if !snap.has(s.chain) {
			if err := r.newChain(tableFilter, s.chain); err != nil {
				r.fail(s.name, err)
				failed[s.name] = true
				continue
			}
		}
		for _, o := range diffOrdered(snap.rules[s.chain], s.rules) {
			if err := r.do(tableFilter, s.chain, o); err != nil {
				r.fail(s.name, err)
				failed[s.name] = true
				break // later positions assumed this op happened
			}
		}
		if !failed[s.name] {
			jumps = append(jumps, s.jump)
		}
	}
	// Then the jumps: order does not matter, each matches its own
	// VIP:port/protocol.
	for _, o := range diffSet(snap.rules[chainFilter], jumps, func(x rule) bool { return failed[x.service()] }) {
		if err := r.do(tableFilter, chainFilter, o); err != nil {
			r.fail(o.rule.service(), err)
		}
	}
	// Last, the per-service chains of services gone: empty, then delete.
	for _, c := range snap.chains {
		if !strings.HasPrefix(c, serviceChainPrefix) || ours[c] {
			continue
		}
		r.dropChain(tableFilter, c, snap.rules[c])
	}
	return true
}

// dropChain empties and deletes a per-service chain nothing wants.
func (r *reconciler) dropChain(table, chain string, rules []rule) {
	owner := ""
	for _, x := range rules {
		if owner == "" {
			owner = x.service()
		}
		if err := r.do(table, chain, op{kind: opDelete, rule: x}); err != nil {
			r.fail(x.service(), err)
			return
		}
	}
	if err := r.ctx.Err(); err != nil {
		r.fail(owner, err)
		return
	}
	if err := r.t.DeleteChain(table, chain); err != nil {
		r.fail(owner, fmt.Errorf("delete chain %s/%s: %w", table, chain, err))
		return
	}
	r.log.Info("netfilter chain deleted", "table", table, "chain", chain)
}

// nat reconciles SWITCHMAN-POSTROUTING and reports whether the chain and
// its jump are in place.
func (r *reconciler) nat(filters []render.Filter) bool {
	var want []rule
	var names []string
	failed := map[string]bool{}
	for _, f := range filters {
		if !f.Masquerade {
			continue
		}
		names = append(names, f.Service)
		rules, err := masqueradeRules(f)
		if err != nil {
			r.fail(f.Service, err)
			failed[f.Service] = true
			continue
		}
		want = append(want, rules...)
	}
	snap, err := r.read(tableNAT)
	if err != nil {
		r.failAll(names, err)
		return false
	}
	ok, err := r.base(snap, tableNAT, "POSTROUTING", chainNAT, len(names) > 0)
	if err != nil {
		r.failAll(names, err)
		return false
	}
	if !ok {
		return false
	}
	for _, o := range diffSet(snap.rules[chainNAT], want, func(x rule) bool { return failed[x.service()] }) {
		if err := r.do(tableNAT, chainNAT, o); err != nil {
			r.fail(o.rule.service(), err)
		}
	}
	return true
}
