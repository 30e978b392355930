package nftables

import (
	"maps"
	"slices"
	"strings"

	"github.com/switchman-lb/switchman/render"
)

// Group is writes applied in one transaction, and the services whose state
// depends on it.
type Group struct {
	Services []string
	Ops      []Op
}

// Desired is what Diff brings the tables to.
type Desired struct {
	// Services maps the services to bring into shape to their objects; a
	// nil value removes the service.
	Services map[string]*render.NFTService
	// All says Services is every service the tables should hold: the
	// tables' own objects are repaired, and services the tables hold that
	// are neither in Services nor in Keep, and objects nobody owns, are
	// removed. Without All, only the services in Services are touched, and
	// only their own objects: their chains and sets, and their elements in
	// the shared maps.
	All bool
	// Keep lists services to leave as they are (with All).
	Keep map[string]bool
}

// Diff returns the transactions that bring switchman's tables from observed
// to want.
//
// Each service gets one group, so that its changes are one transaction: a
// changed weight is only the changed elements of its slots map. Within a
// group, the element that exposes the service is removed first and added
// last, and objects are deleted only once nothing refers to them. A table
// left without services is deleted (one group listing the services it
// held); a table that gains its first service is created by a group that
// comes first. Groups come in the order: tables, orphans, removed services,
// other services, table deletions.
func Diff(observed map[render.NFTFamily]*Table, want Desired) []Group {
	all := want.All
	families := []render.NFTFamily{render.NFTIPv4, render.NFTIPv6}
	obsBase := map[render.NFTFamily]*objects{}
	orphans := map[render.NFTFamily]*objects{}
	obsSvc := map[string]map[render.NFTFamily]*objects{}
	for _, f := range families {
		t := observed[f]
		if t == nil {
			continue
		}
		b, o, svcs := split(t)
		obsBase[f], orphans[f] = b, o
		for name, objs := range svcs {
			if obsSvc[name] == nil {
				obsSvc[name] = map[render.NFTFamily]*objects{}
			}
			obsSvc[name][f] = objs
		}
	}
	scope := map[string]bool{}
	for name := range want.Services {
		scope[name] = true
	}
	if all {
		for name := range obsSvc {
			if !want.Keep[name] {
				scope[name] = true
			}
		}
	}
	// Which families hold services once this is done.
	live := map[render.NFTFamily]int{}
	for name, byFamily := range obsSvc {
		if scope[name] {
			continue
		}
		for f := range byFamily {
			live[f]++
		}
	}
	for _, s := range want.Services {
		if s != nil {
			live[s.Family]++
		}
	}

	var groups, tableDeletes []Group
	deleting := map[render.NFTFamily]bool{}
	for _, f := range families {
		var dependents []string
		for _, name := range sortedKeys(scope) {
			if s := want.Services[name]; s != nil && s.Family == f {
				dependents = append(dependents, name)
			}
		}
		switch {
		case observed[f] != nil && live[f] == 0:
			deleting[f] = true
			var gone []string
			for _, name := range sortedKeys(scope) {
				if obsSvc[name][f] != nil {
					gone = append(gone, name)
				}
			}
			tableDeletes = append(tableDeletes, Group{Services: gone, Ops: []Op{{Kind: DelTable, Family: f}}})
		case observed[f] == nil && live[f] > 0:
			var ph phases
			ph[0] = append(ph[0], Op{Kind: AddTable, Family: f})
			diffObjects(f, newObjects(), baseObjects(), &ph)
			groups = append(groups, Group{Services: dependents, Ops: ph.ops()})
		case observed[f] != nil:
			var ph phases
			recreated := diffObjects(f, obsBase[f], baseObjects(), &ph)
			// A shared set made anew has lost its elements: every
			// service has to add its own again.
			for set := range recreated {
				for _, byFamily := range obsSvc {
					if o := byFamily[f]; o != nil {
						o.shared = slices.DeleteFunc(o.shared, func(sh render.NFTShared) bool { return sh.Set == set })
					}
				}
				orphans[f].shared = slices.DeleteFunc(orphans[f].shared, func(sh render.NFTShared) bool { return sh.Set == set })
			}
			if ops := ph.ops(); len(ops) > 0 {
				groups = append(groups, Group{Services: dependents, Ops: ops})
			}
		}
	}
	if all {
		for _, f := range families {
			if o := orphans[f]; o != nil && !deleting[f] {
				var ph phases
				diffObjects(f, o, newObjects(), &ph)
				if ops := ph.ops(); len(ops) > 0 {
					groups = append(groups, Group{Ops: ops})
				}
			}
		}
	}
	// One group per service, except that services trading shared
	// elements (one takes the vip:port the other leaves) share one, so
	// that all of them hide before any of them exposes.
	perService := map[string]*phases{}
	holder := map[render.NFTShared]string{} // shared element key -> service leaving it
	for _, name := range sortedKeys(scope) {
		var ph phases
		for _, f := range families {
			if deleting[f] {
				continue
			}
			o := obsSvc[name][f]
			d := newObjects()
			if s := want.Services[name]; s != nil && s.Family == f {
				d = serviceObjects(s)
			}
			if o == nil {
				o = newObjects()
			}
			diffObjects(f, o, d, &ph)
		}
		if len(ph.ops()) == 0 {
			continue
		}
		perService[name] = &ph
		for _, op := range ph[1] {
			for _, e := range op.Elements {
				holder[sharedKey(op.Set.Name, e)] = name
			}
		}
	}
	join := map[string]string{} // union-find over services
	var find func(string) string
	find = func(n string) string {
		if p, ok := join[n]; ok && p != n {
			r := find(p)
			join[n] = r
			return r
		}
		return n
	}
	for _, name := range sortedKeys(perService) {
		for _, op := range perService[name][8] {
			for _, e := range op.Elements {
				if other, ok := holder[sharedKey(op.Set.Name, e)]; ok && other != name {
					if a, b := find(name), find(other); a != b {
						join[max(a, b)] = min(a, b)
					}
				}
			}
		}
	}
	members := map[string][]string{}
	for _, name := range sortedKeys(perService) {
		r := find(name)
		members[r] = append(members[r], name)
	}
	var removals, changes []Group
	for _, root := range sortedKeys(members) {
		var merged phases
		removal := true
		for _, name := range members[root] {
			for i, ops := range perService[name] {
				merged[i] = append(merged[i], ops...)
			}
			removal = removal && want.Services[name] == nil
		}
		g := Group{Services: members[root], Ops: merged.ops()}
		if removal {
			removals = append(removals, g)
		} else {
			changes = append(changes, g)
		}
	}
	groups = append(groups, removals...)
	groups = append(groups, changes...)
	return append(groups, tableDeletes...)
}

// objects is a collection of chains, sets and shared elements, with the
// order in which they are created.
type objects struct {
	chains     map[string]*Chain
	sets       map[string]*render.NFTSet
	chainOrder []string
	setOrder   []string
	shared     []render.NFTShared
}

func newObjects() *objects {
	return &objects{chains: map[string]*Chain{}, sets: map[string]*render.NFTSet{}}
}

func (o *objects) addChain(c *Chain) {
	o.chains[c.Name] = c
	o.chainOrder = append(o.chainOrder, c.Name)
}

func (o *objects) addSet(s *render.NFTSet) {
	o.sets[s.Name] = s
	o.setOrder = append(o.setOrder, s.Name)
}

func desiredChain(c render.NFTChain) *Chain {
	out := &Chain{Name: c.Name, Hook: c.Hook}
	for _, r := range c.Rules {
		out.Rules = append(out.Rules, Rule{Spec: r, Known: true})
	}
	return out
}

// baseObjects is NFTBase as objects; the shared sets' elements belong to
// the services and are compared there.
func baseObjects() *objects {
	o := newObjects()
	b := render.NFTBase()
	for _, c := range b.Chains {
		o.addChain(desiredChain(c))
	}
	for _, s := range b.Sets {
		o.addSet(&s)
	}
	return o
}

func serviceObjects(s *render.NFTService) *objects {
	o := newObjects()
	for _, c := range s.Chains {
		o.addChain(desiredChain(c))
	}
	for _, set := range s.Sets {
		o.addSet(&set)
	}
	o.shared = append(o.shared, s.Shared...)
	return o
}

// split sorts a table's objects into the table's own (the shared sets
// without their elements), each service's, and those nobody owns.
func split(t *Table) (base, orphans *objects, services map[string]*objects) {
	base, orphans, services = newObjects(), newObjects(), map[string]*objects{}
	of := func(name string) *objects {
		if services[name] == nil {
			services[name] = newObjects()
		}
		return services[name]
	}
	b := render.NFTBase()
	baseChain := map[string]bool{}
	for _, c := range b.Chains {
		baseChain[c.Name] = true
	}
	baseSet := map[string]bool{}
	for _, s := range b.Sets {
		baseSet[s.Name] = true
	}
	for _, name := range sortedKeys(t.Chains) {
		c := t.Chains[name]
		switch owner, ok := render.NFTOwner(name); {
		case baseChain[name]:
			base.addChain(c)
		case ok:
			of(owner).addChain(c)
		default:
			orphans.addChain(c)
		}
	}
	// The shared maps' elements belong to the service whose chain they go
	// to; a masquerade element to the service with its vip and port.
	byKey := map[render.NFTElement]string{}
	for _, set := range sharedVerdictMaps {
		if s := t.Sets[set]; s != nil {
			for _, e := range s.Elements {
				if owner, ok := render.NFTOwner(e.Goto); ok {
					byKey[e.Key()] = owner
				}
			}
		}
	}
	for _, name := range sortedKeys(t.Sets) {
		s := t.Sets[name]
		owner, ok := render.NFTOwner(name)
		switch {
		case baseSet[name]:
			attrs := *s
			attrs.Elements = nil
			base.addSet(&attrs)
			for _, e := range s.Elements {
				var who string
				var found bool
				if proto, masq := masqSets[name]; masq {
					who, found = byKey[render.NFTElement{Addr: e.Addr, Proto: proto, Port: e.Port}]
				} else {
					who, found = render.NFTOwner(e.Goto)
				}
				sh := render.NFTShared{Set: name, Element: e}
				if found {
					of(who).shared = append(of(who).shared, sh)
				} else {
					orphans.shared = append(orphans.shared, sh)
				}
			}
		case ok:
			of(owner).addSet(s)
		default:
			orphans.addSet(s)
		}
	}
	return base, orphans, services
}

// phases orders the writes of a group so that each is valid when it runs:
// 0 table, 1 hide (shared elements), 2 rule deletions, 3 element
// deletions, 4 chain and set deletions, 5 chain and set additions, 6
// element additions, 7 rule additions and replacements, 8 expose (shared
// elements).
type phases [9][]Op

func (p *phases) ops() []Op {
	n := 0
	for _, ops := range p {
		n += len(ops)
	}
	out := make([]Op, 0, n)
	for _, ops := range p {
		out = append(out, ops...)
	}
	return out
}

func sameHook(a, b *render.NFTHook) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

func sameSetAttrs(a, b *render.NFTSet) bool {
	return a.Name == b.Name && a.Key == b.Key && a.Verdicts == b.Verdicts && a.Backends == b.Backends && a.Interval == b.Interval && a.Timeout == b.Timeout && a.Size == b.Size
}

// diffObjects adds to ph the writes that turn o into d in family f, and
// returns the sets it makes anew (they existed with other attributes).
func diffObjects(f render.NFTFamily, o, d *objects, ph *phases) (recreated map[string]bool) {
	doomedChains, doomedSets, recreated := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for name, c := range o.chains {
		if dc, ok := d.chains[name]; !ok || !sameHook(c.Hook, dc.Hook) {
			doomedChains[name] = true
		}
	}
	for name, s := range o.sets {
		if ds, ok := d.sets[name]; !ok || !sameSetAttrs(s, ds) {
			doomedSets[name] = true
			if ok {
				recreated[name] = true
			}
		}
	}
	setOp := func(kind OpKind, s *render.NFTSet, elems []render.NFTElement) Op {
		attrs := *s
		attrs.Elements = nil
		return Op{Kind: kind, Family: f, Set: attrs, Elements: elems}
	}
	// An element stays only if it is wanted and does not go to a chain
	// that is about to be deleted.
	keep := func(e render.NFTElement, wanted []render.NFTElement) bool {
		return !doomedChains[e.Goto] && slices.Contains(wanted, e)
	}

	// Shared elements: hide first, expose last.
	sharedOf := func(shared []render.NFTShared, set string) []render.NFTElement {
		var out []render.NFTElement
		for _, sh := range shared {
			if sh.Set == set {
				out = append(out, sh.Element)
			}
		}
		return out
	}
	base := render.NFTBase()
	for _, bs := range base.Sets {
		have, wanted := sharedOf(o.shared, bs.Name), sharedOf(d.shared, bs.Name)
		var del []render.NFTElement
		for _, e := range have {
			if !keep(e, wanted) {
				del = append(del, e)
			}
		}
		if len(del) > 0 {
			ph[1] = append(ph[1], setOp(DelElements, &bs, del))
		}
	}
	// Expose in the order the service lists them: the services map last.
	for _, sh := range d.shared {
		have := sharedOf(o.shared, sh.Set)
		if keep(sh.Element, have) {
			continue
		}
		for _, bs := range base.Sets {
			if bs.Name == sh.Set {
				ph[8] = append(ph[8], setOp(AddElements, &bs, []render.NFTElement{sh.Element}))
			}
		}
	}

	// Chains that stay: edit their rules in place.
	for _, name := range sortedKeys(o.chains) {
		if !doomedChains[name] {
			planRules(f, o.chains[name], d.chains[name], doomedChains, doomedSets, ph)
		}
	}
	// Sets that stay: edit their elements.
	for _, name := range sortedKeys(o.sets) {
		if doomedSets[name] {
			continue
		}
		os, ds := o.sets[name], d.sets[name]
		var del, add []render.NFTElement
		for _, e := range os.Elements {
			if !keep(e, ds.Elements) {
				del = append(del, e)
			}
		}
		for _, e := range ds.Elements {
			if !keep(e, os.Elements) {
				add = append(add, e)
			}
		}
		if len(del) > 0 {
			ph[3] = append(ph[3], setOp(DelElements, ds, del))
		}
		if len(add) > 0 {
			ph[6] = append(ph[6], setOp(AddElements, ds, add))
		}
	}
	deleteInOrder(f, o, doomedChains, doomedSets, ph)
	// New chains and sets, in the order the desired state lists them.
	for _, name := range d.chainOrder {
		if _, had := o.chains[name]; had && !doomedChains[name] {
			continue
		}
		c := d.chains[name]
		ph[5] = append(ph[5], Op{Kind: AddChain, Family: f, Chain: name, Hook: c.Hook})
		for _, r := range c.Rules {
			ph[7] = append(ph[7], Op{Kind: AddRule, Family: f, Chain: name, Rule: r.Spec})
		}
	}
	for _, name := range d.setOrder {
		if _, had := o.sets[name]; had && !doomedSets[name] {
			continue
		}
		s := d.sets[name]
		ph[5] = append(ph[5], setOp(AddSet, s, nil))
		if len(s.Elements) > 0 {
			ph[6] = append(ph[6], setOp(AddElements, s, s.Elements))
		}
	}
	return recreated
}

// planRules edits the rules of a chain that stays, keeping the rules that
// are already right (the longest common subsequence) and their handles:
// other rules are replaced in place where possible, deleted, or inserted
// before the next rule that stays. A rule that refers to a chain or set
// about to be deleted is deleted first and added again after.
func planRules(f render.NFTFamily, oc, dc *Chain, doomedChains, doomedSets map[string]bool, ph *phases) {
	o, d := oc.Rules, dc.Rules
	usable := func(r Rule) bool {
		return r.Known && !doomedChains[r.Spec.Chain] && !doomedSets[r.Spec.Set]
	}
	// lcs[i][j]: the longest common subsequence of o[i:] and d[j:].
	lcs := make([][]int, len(o)+1)
	for i := range lcs {
		lcs[i] = make([]int, len(d)+1)
	}
	for i := len(o) - 1; i >= 0; i-- {
		for j := len(d) - 1; j >= 0; j-- {
			if usable(o[i]) && o[i].Spec == d[j].Spec {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var gapO []Rule
	var gapD []Rule
	flush := func(anchor uint64) {
		k := 0
		for _, r := range gapO {
			if usable(r) && k < len(gapD) {
				ph[7] = append(ph[7], Op{Kind: ReplaceRule, Family: f, Chain: oc.Name, Handle: r.Handle, Rule: gapD[k].Spec})
				k++
				continue
			}
			ph[2] = append(ph[2], Op{Kind: DelRule, Family: f, Chain: oc.Name, Handle: r.Handle, Rule: r.Spec})
		}
		for ; k < len(gapD); k++ {
			ph[7] = append(ph[7], Op{Kind: AddRule, Family: f, Chain: oc.Name, Handle: anchor, Rule: gapD[k].Spec})
		}
		gapO, gapD = nil, nil
	}
	i, j := 0, 0
	for i < len(o) && j < len(d) {
		switch {
		case usable(o[i]) && o[i].Spec == d[j].Spec:
			flush(o[i].Handle)
			i++
			j++
		case lcs[i+1][j] >= lcs[i][j+1]:
			gapO = append(gapO, o[i])
			i++
		default:
			gapD = append(gapD, d[j])
			j++
		}
	}
	gapO = append(gapO, o[i:]...)
	gapD = append(gapD, d[j:]...)
	flush(0)
}

// deleteInOrder deletes the doomed chains and sets of o, each once nothing
// left refers to it (a chain's rules, a map's elements).
func deleteInOrder(f render.NFTFamily, o *objects, doomedChains, doomedSets map[string]bool, ph *phases) {
	type node struct {
		chain bool
		name  string
	}
	pending := map[node]bool{}
	for n := range doomedChains {
		pending[node{true, n}] = true
	}
	for n := range doomedSets {
		pending[node{false, n}] = true
	}
	refs := func(n node) []node {
		var out []node
		if n.chain {
			for _, r := range o.chains[n.name].Rules {
				if r.Spec.Chain != "" {
					out = append(out, node{true, r.Spec.Chain})
				}
				if r.Spec.Set != "" {
					out = append(out, node{false, r.Spec.Set})
				}
			}
			return out
		}
		for _, e := range o.sets[n.name].Elements {
			if e.Goto != "" {
				out = append(out, node{true, e.Goto})
			}
		}
		return out
	}
	order := func(a, b node) int {
		if a.chain != b.chain {
			if a.chain {
				return -1
			}
			return 1
		}
		return strings.Compare(a.name, b.name)
	}
	for len(pending) > 0 {
		referenced := map[node]bool{}
		for n := range pending {
			for _, r := range refs(n) {
				if r != n && pending[r] {
					referenced[r] = true
				}
			}
		}
		var ready []node
		for n := range pending {
			if !referenced[n] {
				ready = append(ready, n)
			}
		}
		if len(ready) == 0 { // a cycle, which nf_tables does not allow
			ready = slices.Collect(maps.Keys(pending))
		}
		slices.SortFunc(ready, order)
		for _, n := range ready {
			delete(pending, n)
			if n.chain {
				ph[4] = append(ph[4], Op{Kind: DelChain, Family: f, Chain: n.name})
				continue
			}
			attrs := *o.sets[n.name]
			attrs.Elements = nil
			ph[4] = append(ph[4], Op{Kind: DelSet, Family: f, Set: attrs})
		}
	}
}

// sharedKey identifies an element of a shared map by its key alone.
func sharedKey(set string, e render.NFTElement) render.NFTShared {
	return render.NFTShared{Set: set, Element: e.Key()}
}

func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
