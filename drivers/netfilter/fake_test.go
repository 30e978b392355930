package netfilter

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// fakeTables keeps the chains of one address family in memory and rejects
// what iptables would reject: creating a chain that exists, deleting a rule
// that is not there, jumping to a chain that does not exist, deleting a
// chain that is built in, not empty or still jumped to.
type fakeTables struct {
	chains map[string]map[string][]rule // table -> chain -> rules
	order  map[string][]string          // table -> chain names, creation order
	// writes counts calls that change something (or try to); reads
	// counts listings.
	writes, reads int
	// failOn, when set, makes a write fail before it happens.
	failOn func(call, table, chain string, r rule) error
}

var fakeBuiltins = map[string][]string{
	"filter": {"INPUT", "FORWARD", "OUTPUT"},
	"nat":    {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
}

var fakeTargets = []string{"ACCEPT", "DROP", "RETURN", "REJECT", "MASQUERADE", "SNAT", "DNAT", "LOG"}

func newFakeTables() *fakeTables {
	f := &fakeTables{chains: map[string]map[string][]rule{}, order: map[string][]string{}}
	for table, chains := range fakeBuiltins {
		f.chains[table] = map[string][]rule{}
		for _, c := range chains {
			f.chains[table][c] = nil
			f.order[table] = append(f.order[table], c)
		}
	}
	return f
}

func isBuiltin(table, chain string) bool { return slices.Contains(fakeBuiltins[table], chain) }

func (f *fakeTables) chain(table, chain string) ([]rule, error) {
	t, ok := f.chains[table]
	if !ok {
		return nil, fmt.Errorf("fake: no table %q", table)
	}
	rules, ok := t[chain]
	if !ok {
		return nil, fmt.Errorf("fake: no chain %s/%s", table, chain)
	}
	return rules, nil
}

func (f *fakeTables) write(call, table, chain string, r rule) error {
	f.writes++
	if f.failOn != nil {
		return f.failOn(call, table, chain, r)
	}
	return nil
}

// checkTarget rejects a jump to a chain that does not exist.
func (f *fakeTables) checkTarget(table string, r rule) error {
	for i := 0; i+1 < len(r); i++ {
		if r[i] == "-j" {
			t := r[i+1]
			if slices.Contains(fakeTargets, t) {
				return nil
			}
			if _, ok := f.chains[table][t]; !ok {
				return fmt.Errorf("fake: jump to missing chain %s/%s", table, t)
			}
		}
	}
	return nil
}

func (f *fakeTables) NewChain(table, chain string) error {
	if err := f.write("NewChain", table, chain, nil); err != nil {
		return err
	}
	if _, err := f.chain(table, chain); err == nil {
		return fmt.Errorf("fake: chain %s/%s exists", table, chain)
	}
	if len(chain) > 28 {
		return fmt.Errorf("fake: chain name %q longer than 28", chain)
	}
	f.chains[table][chain] = nil
	f.order[table] = append(f.order[table], chain)
	return nil
}

func (f *fakeTables) DeleteChain(table, chain string) error {
	if err := f.write("DeleteChain", table, chain, nil); err != nil {
		return err
	}
	rules, err := f.chain(table, chain)
	switch {
	case err != nil:
		return err
	case isBuiltin(table, chain):
		return fmt.Errorf("fake: delete built-in chain %s/%s", table, chain)
	case len(rules) > 0:
		return fmt.Errorf("fake: delete non-empty chain %s/%s", table, chain)
	}
	for c, rs := range f.chains[table] {
		for _, r := range rs {
			if slices.Contains(r, chain) {
				return fmt.Errorf("fake: delete chain %s/%s still jumped to from %s", table, chain, c)
			}
		}
	}
	delete(f.chains[table], chain)
	f.order[table] = slices.DeleteFunc(f.order[table], func(c string) bool { return c == chain })
	return nil
}

// ListTable prints like iptables -S: the -P and -N lines, then every
// chain's rules, comments quoted.
func (f *fakeTables) ListTable(table string) ([]string, error) {
	f.reads++
	if _, ok := f.chains[table]; !ok {
		return nil, fmt.Errorf("fake: no table %q", table)
	}
	var out []string
	for _, c := range f.order[table] {
		if isBuiltin(table, c) {
			out = append(out, "-P "+c+" ACCEPT")
		} else {
			out = append(out, "-N "+c)
		}
	}
	for _, c := range f.order[table] {
		for _, r := range f.chains[table][c] {
			words := slices.Clone(r)
			for i := 1; i < len(words); i++ {
				if words[i-1] == "--comment" {
					words[i] = strconv.Quote(words[i])
				}
			}
			out = append(out, "-A "+c+" "+strings.Join(words, " "))
		}
	}
	return out, nil
}

// hasChain says whether the chain exists.
func (f *fakeTables) hasChain(table, chain string) bool {
	_, err := f.chain(table, chain)
	return err == nil
}

func (f *fakeTables) apply(table, chain string, o op) error {
	rules, err := f.chain(table, chain)
	if err != nil {
		return err
	}
	if o.kind != opDelete {
		if err := f.checkTarget(table, o.rule); err != nil {
			return err
		}
	}
	got, err := applyOps(rules, []op{o})
	if err != nil {
		return fmt.Errorf("fake: %s/%s: %w", table, chain, err)
	}
	f.chains[table][chain] = got
	return nil
}

func (f *fakeTables) Append(table, chain string, r ...string) error {
	if err := f.write("Append", table, chain, r); err != nil {
		return err
	}
	return f.apply(table, chain, op{kind: opAppend, rule: r})
}

func (f *fakeTables) Insert(table, chain string, pos int, r ...string) error {
	if err := f.write("Insert", table, chain, r); err != nil {
		return err
	}
	return f.apply(table, chain, op{kind: opInsert, pos: pos, rule: r})
}

func (f *fakeTables) Delete(table, chain string, r ...string) error {
	if err := f.write("Delete", table, chain, r); err != nil {
		return err
	}
	return f.apply(table, chain, op{kind: opDelete, rule: r})
}

// dump renders a chain's rules one per line, for assertions.
func (f *fakeTables) dump(table, chain string) []string {
	var out []string
	for _, r := range f.chains[table][chain] {
		out = append(out, r.String())
	}
	return out
}
