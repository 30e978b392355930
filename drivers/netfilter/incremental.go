package netfilter

import (
	"context"
	"slices"

	"github.com/switchman-lb/switchman/render"
)

// installed is what is in force for one service in one family: the jump
// into its chain (nil without allow_cidrs), the chain's rules, and its
// masquerade rules.
type installed struct {
	fam   int
	jump  rule
	chain []rule
	masq  []rule
}

// installedOf is what f needs.
func installedOf(f render.Filter) (installed, error) {
	in := installed{fam: family(f.VIP)}
	if f.AllowCIDRs != nil {
		jump, chain, err := filterRules(f)
		if err != nil {
			return installed{}, err
		}
		in.jump, in.chain = jump, chain
	}
	if f.Masquerade {
		m, err := masqueradeRules(f)
		if err != nil {
			return installed{}, err
		}
		in.masq = m
	}
	return in, nil
}

func (in installed) empty() bool { return in.jump == nil && len(in.chain) == 0 && len(in.masq) == 0 }

// Apply brings the given services' rules to their desired filters (a nil
// Filter removes them), touching only their own rules: the jump in
// SWITCHMAN-FILTER, their per-service chain and their masquerade rules. A
// service whose rules the driver has not seen since it started is read
// back first, from those chains only.
func (d *Driver) Apply(ctx context.Context, changed []*render.ServiceState) map[string]error {
	errs := map[string]error{}
	for _, s := range changed {
		if err := d.apply1(ctx, s); err != nil {
			errs[s.Name] = err
			delete(d.known, s.Name) // read it back next time
			d.lost[s.Name] = true
		} else {
			delete(d.lost, s.Name)
		}
	}
	return errs
}

func (d *Driver) apply1(ctx context.Context, s *render.ServiceState) error {
	var want installed
	if s.Filter != nil {
		var err error
		if want, err = installedOf(*s.Filter); err != nil {
			return err
		}
	}
	old, ok := d.known[s.Name]
	if !ok && d.synced && !d.lost[s.Name] {
		old, ok = installed{fam: want.fam}, true // known to have nothing
	}
	if !ok {
		// Unknown: what may be left of it in a family in use (a family
		// this process never used is cleaned by the next Sync).
		for fam := range 2 {
			if d.tables[fam] != nil && (s.Filter == nil || fam != want.fam) {
				if err := d.change(ctx, fam, s.Name, nil, installed{fam: fam}); err != nil {
					return err
				}
			}
		}
		if s.Filter == nil {
			delete(d.known, s.Name)
			return nil
		}
		if err := d.change(ctx, want.fam, s.Name, nil, want); err != nil {
			return err
		}
		d.known[s.Name] = want
		return nil
	}
	if s.Filter == nil || old.fam != want.fam {
		if err := d.change(ctx, old.fam, s.Name, &old, installed{fam: old.fam}); err != nil {
			return err
		}
		delete(d.known, s.Name)
		if s.Filter == nil {
			return nil
		}
		old = installed{fam: want.fam}
	}
	if err := d.change(ctx, want.fam, s.Name, &old, want); err != nil {
		return err
	}
	d.known[s.Name] = want
	return nil
}

// change turns one service's rules in family fam from old (nil: unknown,
// read them back) into want: the chain complete before the jump goes in,
// the jump out before the chain is emptied.
func (d *Driver) change(ctx context.Context, fam int, service string, old *installed, want installed) error {
	t, err := d.table(fam)
	if err != nil {
		if old == nil && want.empty() {
			return nil // nothing can be there
		}
		return err
	}
	r := &reconciler{ctx: ctx, log: d.log, t: t, errs: map[string]error{}}
	if old == nil {
		got, err := d.learn(r, fam, service)
		if err != nil {
			return err
		}
		old = &got
	}
	chain := serviceChain(service)
	if want.jump != nil {
		if err := d.ensureBase(r, fam, tableFilter); err != nil {
			return err
		}
		if old.jump == nil && old.chain == nil {
			if err := r.newChain(tableFilter, chain); err != nil {
				return err
			}
		}
		for _, o := range diffOrdered(old.chain, want.chain) {
			if err := r.do(tableFilter, chain, o); err != nil {
				return err
			}
		}
		if old.jump == nil || old.jump.key() != want.jump.key() {
			if err := r.do(tableFilter, chainFilter, op{kind: opAppend, rule: want.jump}); err != nil {
				return err
			}
		}
	}
	if old.jump != nil && (want.jump == nil || old.jump.key() != want.jump.key()) {
		if err := r.do(tableFilter, chainFilter, op{kind: opDelete, rule: old.jump}); err != nil {
			return err
		}
	}
	if want.jump == nil && old.chain != nil {
		r.dropChain(tableFilter, chain, old.chain)
		if err := r.errs[service]; err != nil {
			return err
		}
		for _, e := range r.errs {
			return e // a rule of another owner's name in our chain
		}
	}
	if len(want.masq) > 0 {
		if err := d.ensureBase(r, fam, tableNAT); err != nil {
			return err
		}
	}
	for _, o := range diffSet(old.masq, want.masq, nil) {
		if err := r.do(tableNAT, chainNAT, o); err != nil {
			return err
		}
	}
	return nil
}

// learn reads back what one service has: its jump and masquerade rules
// (by their comment) and its own chain. It reads the two tables whole,
// which only a service the driver lost track of (after an error) needs.
func (d *Driver) learn(r *reconciler, fam int, service string) (installed, error) {
	var in installed
	filter, err := r.read(tableFilter)
	if err != nil {
		return in, err
	}
	// The base chains seen on the way need no read of their own.
	if ok, err := r.base(filter, tableFilter, "INPUT", chainFilter, false); err == nil && ok {
		d.based[fam][tableFilter] = true
	}
	for _, x := range filter.rules[chainFilter] {
		if x.service() == service {
			in.jump = x
		}
	}
	if c := serviceChain(service); filter.has(c) {
		in.chain = slices.Clip(append([]rule{}, filter.rules[c]...))
	}
	nat, err := r.read(tableNAT)
	if err != nil {
		return in, err
	}
	if ok, err := r.base(nat, tableNAT, "POSTROUTING", chainNAT, false); err == nil && ok {
		d.based[fam][tableNAT] = true
	}
	for _, x := range nat.rules[chainNAT] {
		if x.service() == service {
			in.masq = append(in.masq, x)
		}
	}
	return in, nil
}

// ensureBase puts the table's switchman chain and its jump in place the
// first time they are needed (one read of the table, once).
func (d *Driver) ensureBase(r *reconciler, fam int, table string) error {
	if d.based[fam][table] {
		return nil
	}
	snap, err := r.read(table)
	if err != nil {
		return err
	}
	builtin, chain := "INPUT", chainFilter
	if table == tableNAT {
		builtin, chain = "POSTROUTING", chainNAT
	}
	if _, err := r.base(snap, table, builtin, chain, true); err != nil {
		return err
	}
	d.based[fam][table] = true
	return nil
}
