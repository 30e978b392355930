// Package nftables serves switchman's layer-4 services with the kernel's
// nf_tables, for kernels without IPVS. It owns one table per family (`ip
// switchman`, `ip6 switchman`) and never touches another table. The layout
// is render's pure model (render.NFTablesService): a verdict map from vip .
// protocol . port to a chain per service, backend selection inside it
// (numgen, jhash, a Maglev table), DNAT to the backend, and the service's
// allow_cidrs filter and masquerade in the same transaction as the element
// that exposes it.
//
// The driver computes the difference with a pure function (Diff) and
// applies it in atomic transactions, one per service: a changed weight
// changes only the elements of that service's selection map, and an Apply
// looks only at the services it is given. A full pass (Sync) reads the
// tables back only when nf_tables' generation moved past the driver's own
// transactions. The kernel is
// reached through the small Kernel interface; NewNetlink is the real one
// (netlink.go and conntrack.go), package nftfake a stateful fake.
package nftables

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// Table is switchman's table in one family as the kernel has it.
type Table struct {
	Family render.NFTFamily
	Chains map[string]*Chain
	// Sets hold their elements, except dynamic sets (the packet path's
	// state), whose Elements are never read.
	Sets map[string]*render.NFTSet
}

// NewTable returns an empty table of family f.
func NewTable(f render.NFTFamily) *Table {
	return &Table{Family: f, Chains: map[string]*Chain{}, Sets: map[string]*render.NFTSet{}}
}

// Clone returns a deep copy of t.
func (t *Table) Clone() *Table {
	c := NewTable(t.Family)
	for n, ch := range t.Chains {
		cc := *ch
		cc.Rules = append([]Rule(nil), ch.Rules...)
		c.Chains[n] = &cc
	}
	for n, s := range t.Sets {
		cs := *s
		cs.Elements = append([]render.NFTElement(nil), s.Elements...)
		c.Sets[n] = &cs
	}
	return c
}

// Chain is one chain and its rules, in order.
type Chain struct {
	Name  string
	Hook  *render.NFTHook
	Rules []Rule
}

// Rule is one rule of a chain as the kernel has it.
type Rule struct {
	Handle uint64
	Spec   render.NFTRule
	// Known is false for a rule switchman does not make (someone else's
	// edit): it never equals a desired rule.
	Known bool
}

// OpKind is the kind of one nf_tables write.
type OpKind int

// Writes. Each is one netlink message of a transaction.
const (
	AddTable OpKind = iota + 1
	DelTable
	AddChain
	DelChain // deletes the chain with its rules
	AddSet
	DelSet // deletes the set with its elements
	AddElements
	DelElements
	AddRule     // append, or insert before the rule Handle names
	ReplaceRule // in place of the rule Handle names
	DelRule
)

var opNames = map[OpKind]string{
	AddTable: "add-table", DelTable: "delete-table", AddChain: "add-chain", DelChain: "delete-chain",
	AddSet: "add-set", DelSet: "delete-set", AddElements: "add-elements", DelElements: "delete-elements",
	AddRule: "add-rule", ReplaceRule: "replace-rule", DelRule: "delete-rule",
}

// String names the write.
func (k OpKind) String() string {
	if s, ok := opNames[k]; ok {
		return s
	}
	return fmt.Sprintf("op%d", int(k))
}

// Op is one nf_tables write in switchman's table of Family.
type Op struct {
	Kind   OpKind
	Family render.NFTFamily
	Chain  string          // chain and rule writes
	Hook   *render.NFTHook // AddChain of a base chain
	// Set names the set of set and element writes; AddSet creates it with
	// these attributes (its Elements are not used), element writes encode
	// their elements by its key type.
	Set      render.NFTSet
	Elements []render.NFTElement
	Rule     render.NFTRule
	// Handle names the rule a ReplaceRule or DelRule is about, and the rule
	// an AddRule inserts before (0: append).
	Handle uint64
}

// String describes the write for logs and test failures.
func (o Op) String() string {
	switch o.Kind {
	case AddTable, DelTable:
		return fmt.Sprintf("%s %s", o.Kind, o.Family)
	case AddChain, DelChain:
		return fmt.Sprintf("%s %s %s", o.Kind, o.Family, o.Chain)
	case AddSet, DelSet:
		return fmt.Sprintf("%s %s %s", o.Kind, o.Family, o.Set.Name)
	case AddElements, DelElements:
		var es []string
		for _, e := range o.Elements {
			es = append(es, fmt.Sprintf("%+v", e))
		}
		return fmt.Sprintf("%s %s %s {%s}", o.Kind, o.Family, o.Set.Name, strings.Join(es, ", "))
	}
	return fmt.Sprintf("%s %s %s handle %d: %s", o.Kind, o.Family, o.Chain, o.Handle, o.Rule.Text(o.Family))
}

// OpError reports the write of a transaction that the kernel refused; the
// transaction was aborted, so none of its writes took effect. Err wraps the
// kernel's errno.
type OpError struct {
	Index int
	Op    Op
	Err   error
}

// Error describes the refused write.
func (e *OpError) Error() string { return fmt.Sprintf("nf_tables refused %s: %v", e.Op, e.Err) }

// Unwrap returns the kernel's error.
func (e *OpError) Unwrap() error { return e.Err }

// ConnKey names the connections of one service: its protocol, VIP and
// port.
type ConnKey struct {
	Protocol spec.Protocol
	VIP      netip.Addr
	Port     uint16
}

// ErrUnavailable says the kernel has no nf_tables (or not the parts the
// driver needs). Kernel implementations wrap it.
var ErrUnavailable = errors.New("nf_tables is not available in this kernel: load it with `modprobe nf_tables nft_nat nft_ct nft_numgen nft_hash nft_reject_inet nft_masq` (the kernel needs CONFIG_NF_TABLES with NFT_NAT, NFT_CT, NFT_NUMGEN, NFT_HASH, NFT_REJECT and NFT_MASQ), or use driver ipvs")
