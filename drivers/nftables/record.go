package nftables

import (
	"net/netip"
	"slices"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// record is what the kernel holds as far as the driver knows, indexed by
// the service that owns each chain and set, so that an Apply looks at the
// services it changes and not at the whole table.
type record struct {
	tables map[render.NFTFamily]*Table
	// owners lists, per family and service, the chains and sets the
	// service owns.
	owners map[render.NFTFamily]map[string]*owned
}

// owned names one service's chains and sets in one family.
type owned struct {
	chains, sets map[string]bool
}

func newRecord(tables map[render.NFTFamily]*Table) *record {
	r := &record{tables: tables, owners: map[render.NFTFamily]map[string]*owned{}}
	for f, t := range tables {
		for name := range t.Chains {
			r.own(f, name, true)
		}
		for name := range t.Sets {
			r.own(f, name, false)
		}
	}
	return r
}

// own notes a chain or set in the index, when a service owns it.
func (r *record) own(f render.NFTFamily, name string, chain bool) {
	owner, ok := render.NFTOwner(name)
	if !ok {
		return
	}
	if r.owners[f] == nil {
		r.owners[f] = map[string]*owned{}
	}
	o := r.owners[f][owner]
	if o == nil {
		o = &owned{chains: map[string]bool{}, sets: map[string]bool{}}
		r.owners[f][owner] = o
	}
	if chain {
		o.chains[name] = true
	} else {
		o.sets[name] = true
	}
}

// disown takes a deleted chain or set out of the index.
func (r *record) disown(f render.NFTFamily, name string, chain bool) {
	owner, ok := render.NFTOwner(name)
	if !ok {
		return
	}
	o := r.owners[f][owner]
	if o == nil {
		return
	}
	if chain {
		delete(o.chains, name)
	} else {
		delete(o.sets, name)
	}
	if len(o.chains) == 0 && len(o.sets) == 0 {
		delete(r.owners[f], owner)
	}
}

// services returns the services that own something in the tables.
func (r *record) services() map[string]bool {
	out := map[string]bool{}
	for _, owners := range r.owners {
		for name := range owners {
			out[name] = true
		}
	}
	return out
}

// view returns the part of the tables that Diff needs to bring the named
// services into shape without All: the tables' own chains and sets (the
// shared ones with the named services' elements only), the named
// services' chains and sets, and the objects of one other service where
// there is one, so that a table that still serves others is never taken
// for empty. It shares the record's objects; Diff does not change them.
func (r *record) view(services map[string]*render.NFTService) map[render.NFTFamily]*Table {
	out := map[render.NFTFamily]*Table{}
	base := render.NFTBase()
	for f, t := range r.tables {
		v := NewTable(f)
		for _, c := range base.Chains {
			if x := t.Chains[c.Name]; x != nil {
				v.Chains[c.Name] = x
			}
		}
		for _, s := range base.Sets {
			if x := t.Sets[s.Name]; x != nil {
				v.Sets[s.Name] = x
			}
		}
		scopeShared(v, services)
		add := func(o *owned) {
			for c := range o.chains {
				v.Chains[c] = t.Chains[c]
			}
			for s := range o.sets {
				v.Sets[s] = t.Sets[s]
			}
		}
		for name := range services {
			if o := r.owners[f][name]; o != nil {
				add(o)
			}
		}
		for name, o := range r.owners[f] {
			if _, in := services[name]; !in {
				add(o)
				break
			}
		}
		out[f] = v
	}
	return out
}

// scopeShared replaces the shared maps and sets of view v by copies that
// hold only the named services' elements: in the services and filters
// maps those whose chain a named service owns, in the masquerade sets
// those with the vip and port of such an element.
func scopeShared(v *Table, services map[string]*render.NFTService) {
	keys := map[render.NFTElement]bool{}
	for _, name := range []string{render.NFTServicesMap, render.NFTFiltersMap} {
		x := v.Sets[name]
		if x == nil {
			continue
		}
		c := *x
		c.Elements = nil
		for _, e := range x.Elements {
			if owner, ok := render.NFTOwner(e.Goto); ok {
				if _, in := services[owner]; in {
					c.Elements = append(c.Elements, e)
					k := e
					k.Goto = ""
					keys[k] = true
				}
			}
		}
		v.Sets[name] = &c
	}
	for name, proto := range map[string]spec.Protocol{render.NFTMasqTCPSet: spec.TCP, render.NFTMasqUDPSet: spec.UDP} {
		x := v.Sets[name]
		if x == nil {
			continue
		}
		c := *x
		c.Elements = nil
		for _, e := range x.Elements {
			if keys[render.NFTElement{Addr: e.Addr, Proto: proto, Port: e.Port}] {
				c.Elements = append(c.Elements, e)
			}
		}
		v.Sets[name] = &c
	}
}

// apply applies committed writes to the record, with the handles the
// kernel gave the rules. A set that gains elements is sorted once, at
// the end.
func (r *record) apply(ops []Op, handles []uint64) {
	type setRef struct {
		f    render.NFTFamily
		name string
	}
	grown := map[setRef]bool{}
	for i, op := range ops {
		if op.Kind == AddTable {
			r.tables[op.Family] = NewTable(op.Family)
			delete(r.owners, op.Family)
			continue
		}
		t := r.tables[op.Family]
		if t == nil {
			continue
		}
		var handle uint64
		if i < len(handles) {
			handle = handles[i]
		}
		switch op.Kind {
		case DelTable:
			delete(r.tables, op.Family)
			delete(r.owners, op.Family)
		case AddChain:
			t.Chains[op.Chain] = &Chain{Name: op.Chain, Hook: op.Hook}
			r.own(op.Family, op.Chain, true)
		case DelChain:
			delete(t.Chains, op.Chain)
			r.disown(op.Family, op.Chain, true)
		case AddSet:
			s := op.Set
			s.Elements = nil
			t.Sets[s.Name] = &s
			r.own(op.Family, s.Name, false)
		case DelSet:
			delete(t.Sets, op.Set.Name)
			r.disown(op.Family, op.Set.Name, false)
		case AddElements:
			if s := t.Sets[op.Set.Name]; s != nil {
				s.Elements = append(s.Elements, op.Elements...)
				grown[setRef{op.Family, s.Name}] = true
			}
		case DelElements:
			if s := t.Sets[op.Set.Name]; s != nil {
				s.Elements = slices.DeleteFunc(s.Elements, func(e render.NFTElement) bool {
					return slices.ContainsFunc(op.Elements, func(x render.NFTElement) bool { return x.SameKey(e) })
				})
			}
		case AddRule, ReplaceRule, DelRule:
			if c := t.Chains[op.Chain]; c != nil {
				c.Rules = editRules(c.Rules, op, handle)
			}
		}
	}
	for ref := range grown {
		if t := r.tables[ref.f]; t != nil {
			if s := t.Sets[ref.name]; s != nil {
				slices.SortFunc(s.Elements, render.NFTElement.Compare)
			}
		}
	}
}

// connKeys returns, for the named services the record holds, the
// vip:port/proto that names their connections and their backends (the
// targets of their DNAT rules). A nil record knows none.
func (r *record) connKeys(services map[string]bool) (map[string]ConnKey, map[string][]netip.AddrPort) {
	keys, backends := map[string]ConnKey{}, map[string][]netip.AddrPort{}
	if r == nil {
		return keys, backends
	}
	for f, t := range r.tables {
		if s := t.Sets[render.NFTServicesMap]; s != nil {
			for _, e := range s.Elements {
				if name, ok := render.NFTOwner(e.Goto); ok && services[name] {
					keys[name] = ConnKey{Protocol: e.Proto, VIP: e.Addr, Port: e.Port}
				}
			}
		}
		for name := range services {
			o := r.owners[f][name]
			if o == nil {
				continue
			}
			for c := range o.chains {
				for _, rule := range t.Chains[c].Rules {
					if rule.Known && rule.Spec.Kind == render.NFTDNAT {
						backends[name] = append(backends[name], netip.AddrPortFrom(rule.Spec.Addr, rule.Spec.Port))
					}
				}
			}
		}
	}
	return keys, backends
}
