package netfilter

import (
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/switchman-lb/switchman/render"
)

// Chain and table names. iptables limits chain names to 28 characters.
const (
	tableFilter = "filter"
	tableNAT    = "nat"

	// chainFilter holds one jump per service with allow_cidrs; it is
	// jumped to from INPUT, where IPVS (LOCAL_IN, after the filter table)
	// and HAProxy (a local socket) both see traffic to the VIP.
	chainFilter = "SWITCHMAN-FILTER"
	// chainNAT holds the masquerade rules; it is jumped to from POSTROUTING.
	chainNAT = "SWITCHMAN-POSTROUTING"
	// serviceChainPrefix starts the name of each per-service chain.
	serviceChainPrefix = "SWITCHMAN-S-"

	commentPrefix = "switchman:"
)

// rule is one rule spec as iptables -S prints it, without "-A CHAIN".
type rule []string

func (r rule) key() string { return strings.Join(r, "\x00") }

// service names the service a rule belongs to, from its comment, or "".
func (r rule) service() string {
	for i := 0; i+1 < len(r); i++ {
		if r[i] == "--comment" {
			if name, ok := strings.CutPrefix(r[i+1], commentPrefix); ok {
				return name
			}
		}
	}
	return ""
}

// String renders the rule for logs and errors.
func (r rule) String() string { return strings.Join(r, " ") }

// jumpRule is the INPUT-to-SWITCHMAN-FILTER jump; it is inserted once at the
// top of the built-in chain.
func jumpRule(target string) rule {
	return rule{"-m", "comment", "--comment", "switchman", "-j", target}
}

// serviceChain names the per-service chain of a service: a hash, because a
// service name may have 63 characters.
func serviceChain(service string) string {
	sum := sha256.Sum256([]byte(service))
	return serviceChainPrefix + base32.StdEncoding.EncodeToString(sum[:])[:16]
}

func tag(service string) string { return commentPrefix + service }

// hostCIDR writes an address the way iptables -S prints a host match.
func hostCIDR(a netip.Addr) string {
	return netip.PrefixFrom(a, a.BitLen()).String()
}

// filterRules returns the jump into the service's chain (for SWITCHMAN-FILTER)
// and the rules of that chain, in order: RETURN for each allowed range
// (sorted, deduplicated), then DROP. RETURN rather than ACCEPT hands allowed
// packets back to INPUT, so the host's own rules still apply to them, as
// they do to services without allow_cidrs.
func filterRules(f render.Filter) (jump rule, chain []rule, err error) {
	vip := f.VIP.Unmap()
	proto := string(f.Protocol)
	if proto != "tcp" && proto != "udp" {
		return nil, nil, fmt.Errorf("protocol %q is not tcp or udp", f.Protocol)
	}
	jump = rule{"-d", hostCIDR(vip), "-p", proto, "-m", proto, "--dport", strconv.Itoa(int(f.Port)),
		"-m", "comment", "--comment", tag(f.Service), "-j", serviceChain(f.Service)}
	var ranges []netip.Prefix
	for _, p := range f.AllowCIDRs {
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits())
		if p.Addr().Is4() != vip.Is4() || !p.IsValid() {
			return nil, nil, fmt.Errorf("allow_cidrs %s is not of the vip %s's address family", p, vip)
		}
		ranges = append(ranges, p.Masked())
	}
	slices.SortFunc(ranges, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	ranges = slices.Compact(ranges)
	for _, p := range ranges {
		chain = append(chain, rule{"-s", p.String(), "-m", "comment", "--comment", tag(f.Service), "-j", "RETURN"})
	}
	chain = append(chain, rule{"-m", "comment", "--comment", tag(f.Service), "-j", "DROP"})
	return jump, chain, nil
}

// masqueradeRules returns one MASQUERADE rule per backend: a connection
// first addressed to VIP:port (its conntrack original destination) that
// now leaves for the backend gets the host's source address. This is what
// `-m ipvs --vaddr VIP --vport PORT` would select, but it needs only
// xt_conntrack; IPVS keeps conntrack entries for its connections when
// net.ipv4.vs.conntrack is 1, which the vip driver sets.
func masqueradeRules(f render.Filter) ([]rule, error) {
	vip := f.VIP.Unmap()
	proto := string(f.Protocol)
	if proto != "tcp" && proto != "udp" {
		return nil, fmt.Errorf("protocol %q is not tcp or udp", f.Protocol)
	}
	var out []rule
	seen := map[string]bool{}
	for _, b := range f.Backends {
		a := b.Addr().Unmap()
		if a.Is4() != vip.Is4() {
			return nil, fmt.Errorf("backend %s is not of the vip %s's address family", b, vip)
		}
		r := rule{"-d", hostCIDR(a), "-p", proto, "-m", proto, "--dport", strconv.Itoa(int(b.Port())),
			"-m", "conntrack", "--ctorigdst", vip.String(), "--ctorigdstport", strconv.Itoa(int(f.Port)),
			"-m", "comment", "--comment", tag(f.Service), "-j", "MASQUERADE"}
		if !seen[r.key()] {
			seen[r.key()] = true
			out = append(out, r)
		}
	}
	return out, nil
}

// snapshot is one table as iptables -t TABLE -S prints it.
type snapshot struct {
	chains []string          // every chain, built-in ones included, in listed order
	rules  map[string][]rule // chain -> rules, in order
}

func (s snapshot) has(chain string) bool { return slices.Contains(s.chains, chain) }

// parseTable reads iptables -S output: -P and -N lines name chains, -A
// lines are rules.
func parseTable(lines []string) (snapshot, error) {
	s := snapshot{rules: map[string][]rule{}}
	for _, line := range lines {
		if strings.TrimSpace(line) == "" {
			continue
		}
		words, err := splitWords(line)
		if err != nil {
			return snapshot{}, err
		}
		if len(words) < 2 {
			return snapshot{}, fmt.Errorf("unexpected line %q", line)
		}
		switch words[0] {
		case "-P", "-N":
			if !s.has(words[1]) {
				s.chains = append(s.chains, words[1])
			}
		case "-A":
			if !s.has(words[1]) {
				return snapshot{}, fmt.Errorf("rule of an unlisted chain: %q", line)
			}
			s.rules[words[1]] = append(s.rules[words[1]], rule(words[2:]))
		default:
			return snapshot{}, fmt.Errorf("unexpected line %q", line)
		}
	}
	return s, nil
}

// splitWords splits an iptables -S line into words the way a shell would:
// double quotes group, a backslash escapes the next character.
func splitWords(line string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord, quoted := false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case c == '\\' && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
			inWord = true
		case c == '"':
			quoted = !quoted
			inWord = true
		case c == ' ' && !quoted:
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if quoted {
		return nil, fmt.Errorf("unbalanced quote in %q", line)
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, nil
}

// opKind says what an op does to a chain.
type opKind int

const (
	opAppend opKind = iota
	opInsert
	opDelete
)

func (k opKind) String() string {
	switch k {
	case opAppend:
		return "append"
	case opInsert:
		return "insert"
	default:
		return "delete"
	}
}

// op is one change to a chain. Pos (1-based) is used by opInsert only.
type op struct {
	kind opKind
	pos  int
	rule rule
}

// diffSet returns the ops that turn current into desired when the order of
// rules does not matter (every rule matches traffic no other rule does):
// appends of the missing rules, then deletions of the extra ones and of
// duplicates. Rules for which skip returns true are left alone on both
// sides (a service whose chain could not be programmed keeps its jump).
func diffSet(current, desired []rule, skip func(rule) bool) []op {
	have := map[string]bool{}
	var ops []op
	for _, r := range current {
		if skip != nil && skip(r) {
			continue
		}
		have[r.key()] = true
	}
	want := map[string]bool{}
	for _, r := range desired {
		if skip != nil && skip(r) {
			continue
		}
		if !have[r.key()] && !want[r.key()] {
			ops = append(ops, op{kind: opAppend, rule: r})
		}
		want[r.key()] = true
	}
	kept := map[string]bool{}
	for _, r := range current {
		if skip != nil && skip(r) {
			continue
		}
		if want[r.key()] && !kept[r.key()] {
			kept[r.key()] = true
			continue
		}
		ops = append(ops, op{kind: opDelete, rule: r})
	}
	return ops
}

// diffOrdered returns the ops that turn current into exactly desired, in
// order, for a chain where order matters (RETURN rules before the final
// DROP). It keeps the longest run of current rules that already appear in
// desired order (greedily), inserts the missing rules in place first, then
// deletes the rest, so a range that stays allowed is never dropped while
// the chain changes. Deletion is by rule spec, which removes the first
// copy of a rule; when that would give the wrong order (duplicates or
// reordered rules, only after someone edited our chain), it falls back to
// appending every desired rule and then deleting every current one, which
// is always exact and keeps the old policy in force until the new one is
// complete. Desired must not repeat a rule.
func diffOrdered(current, desired []rule) []op {
	index := make(map[string]int, len(desired))
	for i, r := range desired {
		index[r.key()] = i
	}
	keep := make([]bool, len(current))
	kept := map[int]bool{} // desired indexes already present in order
	last := -1
	for i, r := range current {
		j, ok := index[r.key()]
		if !ok || j <= last {
			continue
		}
		keep[i] = true
		kept[j] = true
		last = j
	}
	// Simulate the list while inserting so that positions are exact.
	list := slices.Clone(current)
	var ops []op
	for j, r := range desired {
		if kept[j] {
			continue
		}
		next := -1 // the next kept rule in desired order: insert before it
		for k := j + 1; k < len(desired); k++ {
			if kept[k] {
				next = k
				break
			}
		}
		if next < 0 {
			ops = append(ops, op{kind: opAppend, rule: r})
			list = append(list, r)
			continue
		}
		p := slices.IndexFunc(list, func(x rule) bool { return x.key() == desired[next].key() })
		ops = append(ops, op{kind: opInsert, pos: p + 1, rule: r})
		list = slices.Insert(list, p, r)
	}
	for i, r := range current {
		if !keep[i] {
			ops = append(ops, op{kind: opDelete, rule: r})
		}
	}
	if got, err := applyOps(current, ops); err == nil && equalRules(got, desired) {
		return ops
	}
	ops = ops[:0]
	for _, r := range desired {
		ops = append(ops, op{kind: opAppend, rule: r})
	}
	for _, r := range current {
		ops = append(ops, op{kind: opDelete, rule: r})
	}
	return ops
}

// applyOps returns list after ops, with iptables' semantics: a deletion
// removes the first rule with the same spec, an insertion at pos puts the
// rule at that 1-based position. It fails on a deletion of a rule that is
// not there or an insertion out of range.
func applyOps(list []rule, ops []op) ([]rule, error) {
	list = slices.Clone(list)
	for _, o := range ops {
		switch o.kind {
		case opAppend:
			list = append(list, o.rule)
		case opInsert:
			if o.pos < 1 || o.pos > len(list)+1 {
				return nil, fmt.Errorf("insert at %d into a chain of %d rules", o.pos, len(list))
			}
			list = slices.Insert(list, o.pos-1, o.rule)
		case opDelete:
			i := slices.IndexFunc(list, func(x rule) bool { return x.key() == o.rule.key() })
			if i < 0 {
				return nil, fmt.Errorf("delete of a rule that is not there: %s", o.rule)
			}
			list = slices.Delete(list, i, i+1)
		}
	}
	return list, nil
}

func equalRules(a, b []rule) bool {
	return slices.EqualFunc(a, b, func(x, y rule) bool { return x.key() == y.key() })
}
