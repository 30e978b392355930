package nftables

import (
	"slices"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// record is what the kernel holds as far as the driver knows, indexed by
// the service that owns each chain, set and shared element, so that an
// Apply looks at the services it changes and not at the whole table.
type record struct {
	tables map[render.NFTFamily]*Table
	// owners lists, per family and service, what the service owns.
	owners map[render.NFTFamily]map[string]*owned
	// shared holds, per family and shared set (NFTBase's), its elements
	// by key (NFTElement.Key).
	shared map[render.NFTFamily]map[string]map[render.NFTElement]render.NFTElement
}

// owned names what one service owns in one family: chains, sets, and the
// keys (NFTElement.Key) of its elements in the shared verdict maps, by map.
type owned struct {
	chains, sets map[string]bool
	elements     map[string]map[render.NFTElement]bool
}

func (o *owned) empty() bool { return len(o.chains) == 0 && len(o.sets) == 0 && len(o.elements) == 0 }

// sharedVerdictMaps are the shared maps whose elements belong to the
// service that owns their chain; masqSets the shared sets whose elements
// belong to the service with their vip and port, by protocol.
var (
	sharedVerdictMaps = []string{render.NFTServicesMap, render.NFTFiltersMap}
	masqSets          = map[string]spec.Protocol{render.NFTMasqTCPSet: spec.TCP, render.NFTMasqUDPSet: spec.UDP}
)

func isShared(set string) bool {
	_, masq := masqSets[set]
	return masq || slices.Contains(sharedVerdictMaps, set)
}

func newRecord(tables map[render.NFTFamily]*Table) *record {
	r := &record{tables: tables, owners: map[render.NFTFamily]map[string]*owned{},
		shared: map[render.NFTFamily]map[string]map[render.NFTElement]render.NFTElement{}}
	for f, t := range tables {
		for name := range t.Chains {
			r.own(f, name, true)
		}
		for name, s := range t.Sets {
			r.own(f, name, false)
			if isShared(name) {
				r.addShared(f, name, s.Elements)
			}
		}
	}
	return r
}

// owner returns the index entry of service in family f, made when create.
func (r *record) owner(f render.NFTFamily, service string, create bool) *owned {
	o := r.owners[f][service]
	if o != nil || !create {
		return o
	}
	if r.owners[f] == nil {
		r.owners[f] = map[string]*owned{}
	}
	o = &owned{chains: map[string]bool{}, sets: map[string]bool{}, elements: map[string]map[render.NFTElement]bool{}}
	r.owners[f][service] = o
	return o
}

// forget drops service's index entry in family f when it owns nothing.
func (r *record) forget(f render.NFTFamily, service string, o *owned) {
	if o.empty() {
		delete(r.owners[f], service)
	}
}

// own notes a chain or set in the index, when a service owns it.
func (r *record) own(f render.NFTFamily, name string, chain bool) {
	service, ok := render.NFTOwner(name)
	if !ok {
		return
	}
	o := r.owner(f, service, true)
	if chain {
		o.chains[name] = true
	} else {
		o.sets[name] = true
	}
}

// disown takes a deleted chain or set out of the index.
func (r *record) disown(f render.NFTFamily, name string, chain bool) {
	service, ok := render.NFTOwner(name)
	if !ok {
		return
	}
	o := r.owner(f, service, false)
	if o == nil {
		return
	}
	if chain {
		delete(o.chains, name)
	} else {
		delete(o.sets, name)
	}
	r.forget(f, service, o)
}

// addShared notes elements added to shared set name.
func (r *record) addShared(f render.NFTFamily, name string, elems []render.NFTElement) {
	if len(elems) == 0 {
		return
	}
	if r.shared[f] == nil {
		r.shared[f] = map[string]map[render.NFTElement]render.NFTElement{}
	}
	m := r.shared[f][name]
	if m == nil {
		m = map[render.NFTElement]render.NFTElement{}
		r.shared[f][name] = m
	}
	for _, e := range elems {
		k := e.Key()
		m[k] = e
		if service, ok := render.NFTOwner(e.Goto); ok {
			o := r.owner(f, service, true)
			if o.elements[name] == nil {
				o.elements[name] = map[render.NFTElement]bool{}
			}
			o.elements[name][k] = true
		}
	}
}

// delShared notes elements deleted from shared set name.
func (r *record) delShared(f render.NFTFamily, name string, elems []render.NFTElement) {
	m := r.shared[f][name]
	for _, e := range elems {
		k := e.Key()
		had, ok := m[k]
		if !ok {
			continue
		}
		delete(m, k)
		service, ok := render.NFTOwner(had.Goto)
		if !ok {
			continue
		}
		if o := r.owner(f, service, false); o != nil {
			delete(o.elements[name], k)
			if len(o.elements[name]) == 0 {
				delete(o.elements, name)
			}
			r.forget(f, service, o)
		}
	}
	if len(m) == 0 {
		delete(r.shared[f], name)
	}
	if len(r.shared[f]) == 0 {
		delete(r.shared, f)
	}
}

// dropShared forgets shared set name (deleted with its elements).
func (r *record) dropShared(f render.NFTFamily, name string) {
	m := r.shared[f][name]
	elems := make([]render.NFTElement, 0, len(m))
	for _, e := range m {
		elems = append(elems, e)
	}
	r.delShared(f, name, elems)
}

// dropFamily forgets everything of family f.
func (r *record) dropFamily(f render.NFTFamily) {
	delete(r.owners, f)
	delete(r.shared, f)
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
// for empty. It shares the record's chains and the sets the named
// services own; Diff does not change them. Its work is in proportion to
// the named services, not to the table.
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
		r.scopeShared(f, v, services)
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

// scopeShared replaces the shared maps and sets of view v (family f) by
// copies that hold only the named services' elements: in the services
// and filters maps those whose chain a named service owns, in the
// masquerade sets those with the vip and port of such an element.
func (r *record) scopeShared(f render.NFTFamily, v *Table, services map[string]*render.NFTService) {
	var keys []render.NFTElement
	for _, name := range sharedVerdictMaps {
		x := v.Sets[name]
		if x == nil {
			continue
		}
		c := *x
		c.Elements = nil
		for service := range services {
			o := r.owners[f][service]
			if o == nil {
				continue
			}
			for k := range o.elements[name] {
				c.Elements = append(c.Elements, r.shared[f][name][k])
				keys = append(keys, k)
			}
		}
		slices.SortFunc(c.Elements, render.NFTElement.Compare)
		v.Sets[name] = &c
	}
	for name, proto := range masqSets {
		x := v.Sets[name]
		if x == nil {
			continue
		}
		c := *x
		c.Elements = nil
		for _, k := range keys {
			if k.Proto != proto {
				continue
			}
			if e, ok := r.shared[f][name][render.NFTElement{Addr: k.Addr, Port: k.Port}]; ok {
				c.Elements = append(c.Elements, e)
			}
		}
		slices.SortFunc(c.Elements, render.NFTElement.Compare)
		c.Elements = slices.Compact(c.Elements)
		v.Sets[name] = &c
	}
}

// insertLimit is the most elements apply inserts one by one into a set's
// sorted elements; more are appended and the set sorted again.
const insertLimit = 16

// apply applies committed writes to the record, with the handles the
// kernel gave the rules. Sets keep their elements sorted: a few added
// elements are inserted in place and deleted ones found by binary search,
// so that one service's elements in a shared set of 10,000 cost no scan
// or sort of the set.
func (r *record) apply(ops []Op, handles []uint64) {
	added := map[*render.NFTSet][]render.NFTElement{}
	for i, op := range ops {
		if op.Kind == AddTable {
			r.tables[op.Family] = NewTable(op.Family)
			r.dropFamily(op.Family)
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
			r.dropFamily(op.Family)
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
			if isShared(op.Set.Name) {
				r.dropShared(op.Family, op.Set.Name)
			}
		case AddElements:
			if s := t.Sets[op.Set.Name]; s != nil {
				added[s] = append(added[s], op.Elements...)
				if isShared(s.Name) {
					r.addShared(op.Family, s.Name, op.Elements)
				}
			}
		case DelElements:
			if s := t.Sets[op.Set.Name]; s != nil {
				for _, x := range op.Elements {
					if i, ok := slices.BinarySearchFunc(s.Elements, x, render.NFTElement.Compare); ok {
						s.Elements = slices.Delete(s.Elements, i, i+1)
					}
					added[s] = slices.DeleteFunc(added[s], x.SameKey)
				}
				if isShared(s.Name) {
					r.delShared(op.Family, s.Name, op.Elements)
				}
			}
		case AddRule, ReplaceRule, DelRule:
			if c := t.Chains[op.Chain]; c != nil {
				c.Rules = editRules(c.Rules, op, handle)
			}
		}
	}
	for s, elems := range added {
		if len(elems) > insertLimit {
			s.Elements = append(s.Elements, elems...)
			slices.SortFunc(s.Elements, render.NFTElement.Compare)
			continue
		}
		for _, e := range elems {
			if i, ok := slices.BinarySearchFunc(s.Elements, e, render.NFTElement.Compare); ok {
				s.Elements[i] = e
			} else {
				s.Elements = slices.Insert(s.Elements, i, e)
			}
		}
	}
}

// connKeys returns, for the named services the record holds, the
// vip:port/proto that names their connections. A nil record knows none.
func (r *record) connKeys(services map[string]bool) map[string]ConnKey {
	keys := map[string]ConnKey{}
	if r == nil {
		return keys
	}
	for f := range r.tables {
		for name := range services {
			if o := r.owners[f][name]; o != nil {
				for k := range o.elements[render.NFTServicesMap] {
					keys[name] = ConnKey{Protocol: k.Proto, VIP: k.Addr, Port: k.Port}
				}
			}
		}
	}
	return keys
}
