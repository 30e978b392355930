// Package nftfake is a stateful, in-memory stand-in for the kernel's
// nf_tables, for tests of code that uses nftables.Kernel. It keeps
// switchman's tables, runs each Commit as a transaction (all writes or
// none), rejects misuse with the errno nf_tables gives (EEXIST, ENOENT,
// EBUSY, EINVAL), hands out rule handles, counts calls and writes, and can
// be told to fail, to refuse large batches (ENOBUFS) or to behave as a
// kernel without nf_tables.
package nftfake

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"syscall"

	"github.com/switchman-lb/switchman/drivers/nftables"
	"github.com/switchman-lb/switchman/render"
)

// Kernel is the fake. The zero value is not usable; call New.
type Kernel struct {
	mu          sync.Mutex
	tables      map[render.NFTFamily]*nftables.Table
	handle      uint64
	reads       int
	commits     int
	writes      map[nftables.OpKind]int
	log         [][]nftables.Op
	fail        map[nftables.OpKind]error
	maxBatch    int
	unavailable bool
	conns       map[nftables.ConnKey]map[netip.AddrPort]int
	gen         uint32 // bumped by every commit and edit, as nf_tables' generation
	readErr     error
}

var _ nftables.Kernel = (*Kernel)(nil)

// New returns a fake with no tables.
func New() *Kernel {
	return &Kernel{tables: map[render.NFTFamily]*nftables.Table{}, writes: map[nftables.OpKind]int{},
		fail: map[nftables.OpKind]error{}, conns: map[nftables.ConnKey]map[netip.AddrPort]int{}}
}

// Fail makes every later write of kind k fail with err (nil clears it).
func (k *Kernel) Fail(kind nftables.OpKind, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err == nil {
		delete(k.fail, kind)
		return
	}
	k.fail[kind] = err
}

// SetMaxBatch makes a Commit of more than n writes fail with ENOBUFS, as
// the real socket does when the kernel's answers overflow it (0: no limit).
func (k *Kernel) SetMaxBatch(n int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.maxBatch = n
}

// FailReads makes every later Tables fail with err (nil clears it).
func (k *Kernel) FailReads(err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.readErr = err
}

// SetUnavailable makes every call fail as on a kernel without nf_tables.
func (k *Kernel) SetUnavailable(on bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.unavailable = on
}

// SetConnections sets what Connections answers for a service.
func (k *Kernel) SetConnections(key nftables.ConnKey, counts map[netip.AddrPort]int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.conns[key] = maps.Clone(counts)
}

// Counts of calls and writes.
type Counts struct {
	Reads, Commits, Writes int
	ByKind                 map[nftables.OpKind]int
}

// Counts returns the calls and writes so far (committed or not).
func (k *Kernel) Counts() Counts {
	k.mu.Lock()
	defer k.mu.Unlock()
	c := Counts{Reads: k.reads, Commits: k.commits, ByKind: maps.Clone(k.writes)}
	for _, n := range k.writes {
		c.Writes += n
	}
	return c
}

// ResetCounts zeroes the counters and forgets the logged transactions.
func (k *Kernel) ResetCounts() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.reads, k.commits, k.writes, k.log = 0, 0, map[nftables.OpKind]int{}, nil
}

// Log returns the transactions committed since the last ResetCounts.
func (k *Kernel) Log() [][]nftables.Op {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.log)
}

// State returns a copy of the tables.
func (k *Kernel) State() map[render.NFTFamily]*nftables.Table {
	k.mu.Lock()
	defer k.mu.Unlock()
	return cloneTables(k.tables)
}

// Edit changes the tables behind the driver's back, as an operator with
// nft would; fn gets the live tables.
func (k *Kernel) Edit(fn func(map[render.NFTFamily]*nftables.Table)) {
	k.mu.Lock()
	defer k.mu.Unlock()
	fn(k.tables)
	k.gen++
}

// Generation implements nftables.Kernel.
func (k *Kernel) Generation(ctx context.Context) (uint32, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.check(ctx); err != nil {
		return 0, err
	}
	return k.gen, nil
}

// Tables implements nftables.Kernel.
func (k *Kernel) Tables(ctx context.Context) (map[render.NFTFamily]*nftables.Table, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.reads++
	if err := k.check(ctx); err != nil {
		return nil, err
	}
	if k.readErr != nil {
		return nil, k.readErr
	}
	out := cloneTables(k.tables)
	for _, t := range out {
		for _, s := range t.Sets {
			if s.Timeout > 0 {
				s.Elements = nil
			}
		}
	}
	return out, nil
}

// Connections implements nftables.Kernel.
func (k *Kernel) Connections(ctx context.Context, key nftables.ConnKey) (map[netip.AddrPort]int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.check(ctx); err != nil {
		return nil, err
	}
	return maps.Clone(k.conns[key]), nil
}

func (k *Kernel) check(ctx context.Context) error {
	if k.unavailable {
		return fmt.Errorf("%w: %w", nftables.ErrUnavailable, syscall.EPROTONOSUPPORT)
	}
	return ctx.Err()
}

// Commit implements nftables.Kernel: the writes apply to a copy of the
// tables, which replaces them only if every write succeeded.
func (k *Kernel) Commit(ctx context.Context, ops []nftables.Op) ([]uint64, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.check(ctx); err != nil {
		return nil, err
	}
	k.commits++
	for _, op := range ops {
		k.writes[op.Kind]++
	}
	if k.maxBatch > 0 && len(ops) > k.maxBatch {
		return nil, fmt.Errorf("receive: %w", syscall.ENOBUFS)
	}
	next := cloneTables(k.tables)
	handles := make([]uint64, len(ops))
	handle := k.handle
	for i, op := range ops {
		if err := k.fail[op.Kind]; err != nil {
			return nil, &nftables.OpError{Index: i, Op: op, Err: err}
		}
		if op.Kind == nftables.AddRule || op.Kind == nftables.ReplaceRule {
			handle++
			handles[i] = handle
		}
		if err := apply(next, op, handles[i]); err != nil {
			return nil, &nftables.OpError{Index: i, Op: op, Err: err}
		}
	}
	k.tables, k.handle = next, handle
	k.gen++
	k.log = append(k.log, slices.Clone(ops))
	return handles, nil
}

// apply makes one write as nf_tables does, or fails as it does.
func apply(tables map[render.NFTFamily]*nftables.Table, op nftables.Op, handle uint64) error {
	if op.Kind == nftables.AddTable {
		if tables[op.Family] != nil {
			return syscall.EEXIST
		}
		tables[op.Family] = nftables.NewTable(op.Family)
		return nil
	}
	t := tables[op.Family]
	if t == nil {
		return syscall.ENOENT
	}
	switch op.Kind {
	case nftables.DelTable:
		delete(tables, op.Family)
	case nftables.AddChain:
		if op.Chain == "" {
			return syscall.EINVAL
		}
		if t.Chains[op.Chain] != nil {
			return syscall.EEXIST
		}
		t.Chains[op.Chain] = &nftables.Chain{Name: op.Chain, Hook: op.Hook}
	case nftables.DelChain:
		if t.Chains[op.Chain] == nil {
			return syscall.ENOENT
		}
		if chainUsed(t, op.Chain) {
			return syscall.EBUSY
		}
		delete(t.Chains, op.Chain)
	case nftables.AddSet:
		if t.Sets[op.Set.Name] != nil {
			return syscall.EEXIST
		}
		if op.Set.Key == 0 || op.Set.Timeout < 0 || (op.Set.Timeout > 0 && op.Set.Size == 0) || (op.Set.Verdicts && op.Set.Backends) {
			return syscall.EINVAL
		}
		s := op.Set
		s.Elements = nil
		t.Sets[s.Name] = &s
	case nftables.DelSet:
		if t.Sets[op.Set.Name] == nil {
			return syscall.ENOENT
		}
		if setUsed(t, op.Set.Name) {
			return syscall.EBUSY
		}
		delete(t.Sets, op.Set.Name)
	case nftables.AddElements:
		return addElements(t, op)
	case nftables.DelElements:
		s := t.Sets[op.Set.Name]
		if s == nil {
			return syscall.ENOENT
		}
		for _, e := range op.Elements {
			i := slices.IndexFunc(s.Elements, e.SameKey)
			if i < 0 {
				return syscall.ENOENT
			}
			s.Elements = slices.Delete(s.Elements, i, i+1)
		}
	case nftables.AddRule, nftables.ReplaceRule, nftables.DelRule:
		return editRule(t, op, handle)
	default:
		return syscall.EOPNOTSUPP
	}
	return nil
}

func addElements(t *nftables.Table, op nftables.Op) error {
	s := t.Sets[op.Set.Name]
	if s == nil {
		return syscall.ENOENT
	}
	if s.Timeout > 0 {
		return syscall.EOPNOTSUPP // the packet path fills dynamic sets
	}
	for _, e := range op.Elements {
		if slices.ContainsFunc(s.Elements, e.SameKey) {
			return syscall.EEXIST
		}
		switch {
		case s.Verdicts && t.Chains[e.Goto] == nil:
			return syscall.ENOENT
		case s.Verdicts && t.Chains[e.Goto].Hook != nil:
			return syscall.EOPNOTSUPP // no goto to a base chain
		case !s.Verdicts && e.Goto != "":
			return syscall.EINVAL
		case s.Backends != e.Backend.IsValid():
			return syscall.EINVAL // a data map's element carries its data, others none
		case s.Backends && render.NFTFamilyOf(e.Backend.Addr()) != t.Family:
			return syscall.EINVAL
		case (e.End || e.Open) && !s.Interval:
			return syscall.EINVAL
		case s.Key == render.NFTKeySlot && e.Addr.IsValid():
			return syscall.EINVAL
		case s.Key != render.NFTKeySlot && !e.Addr.IsValid():
			return syscall.EINVAL
		}
		s.Elements = append(s.Elements, e)
	}
	slices.SortFunc(s.Elements, render.NFTElement.Compare)
	return nil
}

func editRule(t *nftables.Table, op nftables.Op, handle uint64) error {
	c := t.Chains[op.Chain]
	if c == nil {
		return syscall.ENOENT
	}
	at := -1
	if op.Handle != 0 {
		at = slices.IndexFunc(c.Rules, func(r nftables.Rule) bool { return r.Handle == op.Handle })
		if at < 0 {
			return syscall.ENOENT
		}
	}
	if op.Kind == nftables.DelRule {
		if at < 0 {
			return syscall.EINVAL
		}
		c.Rules = slices.Delete(c.Rules, at, at+1)
		return nil
	}
	if err := checkRefs(t, op.Rule); err != nil {
		return err
	}
	r := nftables.Rule{Handle: handle, Spec: op.Rule, Known: true}
	switch {
	case op.Kind == nftables.ReplaceRule && at < 0:
		return syscall.EINVAL
	case op.Kind == nftables.ReplaceRule:
		c.Rules[at] = r
	case at >= 0:
		c.Rules = slices.Insert(c.Rules, at, r)
	default:
		c.Rules = append(c.Rules, r)
	}
	return nil
}

// checkRefs fails as nf_tables does when a rule names a missing chain or
// set, or uses a set the wrong way.
func checkRefs(t *nftables.Table, r render.NFTRule) error {
	if r.Chain != "" {
		c := t.Chains[r.Chain]
		if c == nil {
			return syscall.ENOENT
		}
		if c.Hook != nil {
			return syscall.EOPNOTSUPP
		}
	}
	if r.Set == "" {
		return nil
	}
	s := t.Sets[r.Set]
	if s == nil {
		return syscall.ENOENT
	}
	switch r.Kind {
	case render.NFTDispatch, render.NFTRoundRobin, render.NFTSourceHash:
		if !s.Verdicts {
			return syscall.EINVAL
		}
	case render.NFTDNATRoundRobin, render.NFTDNATSourceHash:
		if !s.Backends {
			return syscall.EINVAL
		}
	case render.NFTRemember:
		if s.Timeout == 0 {
			return syscall.EOPNOTSUPP // dynset needs a set the packet path may update
		}
	default:
		if s.Verdicts {
			return syscall.EINVAL
		}
	}
	return nil
}

// chainUsed and setUsed report what nf_tables counts as a use: a rule
// naming the chain or set, a map element going to the chain.
func chainUsed(t *nftables.Table, name string) bool {
	return used(t, func(r render.NFTRule) bool { return r.Chain == name }, func(e render.NFTElement) bool { return e.Goto == name })
}

func setUsed(t *nftables.Table, name string) bool {
	return used(t, func(r render.NFTRule) bool { return r.Set == name }, func(render.NFTElement) bool { return false })
}

func used(t *nftables.Table, rule func(render.NFTRule) bool, elem func(render.NFTElement) bool) bool {
	for _, c := range t.Chains {
		if slices.ContainsFunc(c.Rules, func(r nftables.Rule) bool { return rule(r.Spec) }) {
			return true
		}
	}
	for _, s := range t.Sets {
		if slices.ContainsFunc(s.Elements, elem) {
			return true
		}
	}
	return false
}

func cloneTables(in map[render.NFTFamily]*nftables.Table) map[render.NFTFamily]*nftables.Table {
	out := make(map[render.NFTFamily]*nftables.Table, len(in))
	for f, t := range in {
		out[f] = t.Clone()
	}
	return out
}
