package render

import (
	"cmp"
	"errors"
	"fmt"
	"math/big"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/switchman-lb/switchman/spec"
)

// This file is the pure model of what the nf_tables driver programs:
// switchman's own table in each family, a verdict map from vip . protocol .
// port to a chain per service, backend selection inside that chain, and
// the text `nft list table` shows for it (NFTablesRuleset, for `switchman
// plan`). The driver programs exactly these objects.
//
//	table ip switchman
//	  map services      vip . proto . port : goto svc-<name>      (exposes a service)
//	  map filters       vip . proto . port : goto allow-<name>    (allow_cidrs)
//	  set masq-tcp/udp  vip . port                                (masquerade)
//	  chain filter-prerouting, filter-output  (filter, priority -110): vmap @filters
//	  chain nat-prerouting, nat-output        (nat, priority -100):    vmap @services
//	  chain nat-postrouting                   (nat, priority 100):     masquerade @masq-*
//	  per service:
//	    chain svc-<name>   dnat to <selector> mod N map @slots-<name>  reject
//	    map slots-<name>   slot : addr . port
//	    chain allow-<name> + set allowed-<name>: ip saddr != @allowed-<name> drop
//	  per service with persistence, instead:
//	    chain svc-<name>   ip saddr @aff-... goto be-...  <selector> mod N vmap @slots-<name>  reject
//	    map slots-<name>   slot : goto be-<name>/<addr>/<port>
//	    chain be-<name>/<addr>/<port>   update @aff-...  dnat to addr:port
//	    set aff-<name>/<addr>/<port>    client addresses, timeout = persistence
//
// The slots map of a service without persistence holds data, not
// verdicts: a weight change rewrites elements that name no chain, so the
// kernel's commit does not validate the whole table again (adding a goto
// element does, which cost 36 ms per change with 10,000 services; see
// docs/BENCHMARKS.md, nf_tables). Persistence needs a chain per backend to
// remember the client in, so those services keep the verdict map.

// NFTFamily is an nf_tables address family switchman uses.
type NFTFamily string

// The families of switchman's tables.
const (
	NFTIPv4 NFTFamily = "ip"
	NFTIPv6 NFTFamily = "ip6"
)

// NFTFamilyOf returns the family of a's table.
func NFTFamilyOf(a netip.Addr) NFTFamily {
	if a.Unmap().Is4() {
		return NFTIPv4
	}
	return NFTIPv6
}

// NFTTable is the name of switchman's table in each family. Nothing else
// in the kernel is ever touched.
const NFTTable = "switchman"

// Names of the objects every table has.
const (
	NFTServicesMap       = "services"
	NFTFiltersMap        = "filters"
	NFTMasqTCPSet        = "masq-tcp"
	NFTMasqUDPSet        = "masq-udp"
	NFTFilterPrerouting  = "filter-prerouting"
	NFTFilterOutput      = "filter-output"
	NFTNATPrerouting     = "nat-prerouting"
	NFTNATOutput         = "nat-output"
	NFTNATPostrouting    = "nat-postrouting"
	nftPrefixService     = "svc-"
	nftPrefixBackend     = "be-"
	nftPrefixAllow       = "allow-"
	nftPrefixSlots       = "slots-"
	nftPrefixAffinity    = "aff-"
	nftPrefixAllowed     = "allowed-"
	nftAffinitySetSize   = 65535
	nftFilterPriority    = -110 // before DNAT (-100), while the destination is still the VIP
	nftNATPriority       = -100 // NF_IP_PRI_NAT_DST
	nftSNATPriority      = 100  // NF_IP_PRI_NAT_SRC
	nftSlotKeyTypeofSize = 1024
)

// Sizes of the selection tables.
const (
	// SHSize is the number of buckets of scheduler sh, as in IPVS.
	SHSize = 256
	// MaxSlots bounds the cycle of scheduler wrr; weights whose cycle
	// (the sum of the weights over their greatest common divisor) is
	// longer are scaled down in proportion.
	MaxSlots = nftSlotKeyTypeofSize
	// NFTHashSeed is the seed of the source-address hash of sh and mh. It
	// is fixed (nf_tables picks a random one when none is given) so that
	// every host sends a client to the same backend.
	NFTHashSeed uint32 = 0x5357_4d4e
)

// NFTKey is the key type of a set or map.
type NFTKey int

// Key types.
const (
	NFTKeyAddr          NFTKey = iota + 1 // ipv4_addr or ipv6_addr
	NFTKeyAddrPort                        // addr . inet_service
	NFTKeyAddrProtoPort                   // addr . inet_proto . inet_service
	NFTKeySlot                            // a slot number (typeof numgen inc mod 1024)
)

// NFTSet is one named set or verdict map.
type NFTSet struct {
	Name     string
	Key      NFTKey
	Verdicts bool // a verdict map: every element has a Goto
	Backends bool // a data map to backends: every element has a Backend
	Interval bool
	// Timeout, when positive, makes the set dynamic: the packet path adds
	// elements, which expire after Timeout. Elements of dynamic sets are
	// never listed here: they are state, not configuration.
	Timeout  time.Duration
	Size     uint32
	Elements []NFTElement // sorted (NFTElement.Compare)
}

// NFTElement is one element of a set or map. Which fields count depends on
// the set's key type.
type NFTElement struct {
	Addr  netip.Addr
	Proto spec.Protocol
	Port  uint16
	Slot  uint32
	// End marks the element that ends an interval (interval sets hold
	// interval boundaries, as the kernel does). Open marks an interval
	// start whose interval runs to the last address.
	End     bool
	Open    bool
	Goto    string         // verdict maps: the chain to go to
	Backend netip.AddrPort // data maps to backends: the backend
}

// Compare orders elements by key, an interval end before a start.
func (e NFTElement) Compare(o NFTElement) int {
	if c := e.Addr.Compare(o.Addr); c != 0 {
		return c
	}
	if c := cmp.Compare(e.Proto, o.Proto); c != 0 {
		return c
	}
	if c := cmp.Compare(e.Port, o.Port); c != 0 {
		return c
	}
	if c := cmp.Compare(e.Slot, o.Slot); c != 0 {
		return c
	}
	if e.End != o.End {
		if e.End {
			return -1
		}
		return 1
	}
	return 0
}

// Key returns e as a key of its set: without the value a map holds under
// it (Goto, Backend) or the flag of an open interval.
func (e NFTElement) Key() NFTElement {
	e.Goto, e.Open, e.Backend = "", false, netip.AddrPort{}
	return e
}

// SameKey reports whether e and o are the same element of a set (maps may
// hold another value under that key).
func (e NFTElement) SameKey(o NFTElement) bool { return e.Key() == o.Key() }

// NFTHook makes a chain a base chain attached to a netfilter hook.
type NFTHook struct {
	Type     string // filter or nat
	Hook     string // prerouting, output or postrouting
	Priority int
}

// NFTChain is one chain and its rules, in order.
type NFTChain struct {
	Name  string
	Hook  *NFTHook
	Rules []NFTRule
}

// NFTRuleKind is one of the few rule shapes switchman programs.
type NFTRuleKind int

// Rule shapes, with the text `nft list` shows for them.
const (
	// NFTDispatch: ip daddr . meta l4proto . th dport vmap @Set
	NFTDispatch NFTRuleKind = iota + 1
	// NFTMasquerade: meta l4proto Proto ct status dnat ct original ip daddr . ct original proto-dst @Set masquerade
	NFTMasquerade
	// NFTAllow: ip saddr != @Set drop
	NFTAllow
	// NFTAffinity: ip saddr @Set goto Chain
	NFTAffinity
	// NFTRoundRobin: numgen inc mod Modulus vmap @Set
	NFTRoundRobin
	// NFTSourceHash: jhash ip saddr mod Modulus seed NFTHashSeed vmap @Set
	NFTSourceHash
	// NFTReject: reject (ICMP port unreachable, as IPVS answers when no
	// destination is available)
	NFTReject
	// NFTRemember: update @Set { ip saddr }
	NFTRemember
	// NFTDNAT: meta l4proto Proto dnat to Addr:Port
	NFTDNAT
	// NFTDNATRoundRobin: meta l4proto Proto dnat ip to numgen inc mod
	// Modulus map @Set (a data map to backends)
	NFTDNATRoundRobin
	// NFTDNATSourceHash: meta l4proto Proto dnat ip to jhash ip saddr mod
	// Modulus seed NFTHashSeed map @Set
	NFTDNATSourceHash
)

// NFTRule is one rule. Which fields count depends on Kind.
type NFTRule struct {
	Kind    NFTRuleKind
	Set     string
	Chain   string
	Proto   spec.Protocol
	Addr    netip.Addr
	Port    uint16
	Modulus uint32
}

// NFTObjects is a collection of chains and sets.
type NFTObjects struct {
	Chains []NFTChain
	Sets   []NFTSet
}

// NFTShared is an element a service owns in one of the shared maps or sets
// (services, filters, masq-tcp, masq-udp).
type NFTShared struct {
	Set     string
	Element NFTElement
}

// NFTService is everything one service owns in its family's table: its
// own chains and sets, and its elements in the shared ones. The element in
// the services map is what exposes it, so the driver adds it last and
// removes it first, in the same transaction as the rest.
type NFTService struct {
	Name   string
	Family NFTFamily
	NFTObjects
	Shared []NFTShared
	// Backends is every backend of the service, whatever its weight (a
	// draining backend is in no slot): the backends whose connections
	// the driver counts. Nothing in the tables is made of it.
	Backends []netip.AddrPort
}

// NFTBase returns the objects every switchman table has, whatever its
// services: the shared maps and sets, empty, and the base chains.
func NFTBase() NFTObjects {
	dispatch := func(set string) []NFTRule { return []NFTRule{{Kind: NFTDispatch, Set: set}} }
	return NFTObjects{
		Sets: []NFTSet{
			{Name: NFTServicesMap, Key: NFTKeyAddrProtoPort, Verdicts: true},
			{Name: NFTFiltersMap, Key: NFTKeyAddrProtoPort, Verdicts: true},
			{Name: NFTMasqTCPSet, Key: NFTKeyAddrPort},
			{Name: NFTMasqUDPSet, Key: NFTKeyAddrPort},
		},
		Chains: []NFTChain{
			{Name: NFTFilterPrerouting, Hook: &NFTHook{Type: "filter", Hook: "prerouting", Priority: nftFilterPriority}, Rules: dispatch(NFTFiltersMap)},
			{Name: NFTFilterOutput, Hook: &NFTHook{Type: "filter", Hook: "output", Priority: nftFilterPriority}, Rules: dispatch(NFTFiltersMap)},
			{Name: NFTNATPrerouting, Hook: &NFTHook{Type: "nat", Hook: "prerouting", Priority: nftNATPriority}, Rules: dispatch(NFTServicesMap)},
			{Name: NFTNATOutput, Hook: &NFTHook{Type: "nat", Hook: "output", Priority: nftNATPriority}, Rules: dispatch(NFTServicesMap)},
			{Name: NFTNATPostrouting, Hook: &NFTHook{Type: "nat", Hook: "postrouting", Priority: nftSNATPriority}, Rules: []NFTRule{
				{Kind: NFTMasquerade, Proto: spec.TCP, Set: NFTMasqTCPSet},
				{Kind: NFTMasquerade, Proto: spec.UDP, Set: NFTMasqUDPSet},
			}},
		},
	}
}

// NFTOwner returns the service that owns the chain or set with this name,
// and false for the objects of NFTBase and for names switchman never makes.
func NFTOwner(object string) (string, bool) {
	for _, p := range []string{nftPrefixService, nftPrefixAllowed, nftPrefixAllow, nftPrefixSlots} {
		if name, ok := strings.CutPrefix(object, p); ok {
			return name, validName(name)
		}
	}
	for _, p := range []string{nftPrefixBackend, nftPrefixAffinity} {
		if rest, ok := strings.CutPrefix(object, p); ok {
			name, _, found := strings.Cut(rest, "/")
			return name, found && validName(name)
		}
	}
	return "", false
}

func validName(s string) bool {
	if s == "" || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for _, c := range []byte(s) {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// NFTServiceChain names a service's chain: the target of its element in
// the services map.
func NFTServiceChain(service string) string { return nftPrefixService + service }

// NFTAllowChain names the chain that drops sources outside allow_cidrs.
func NFTAllowChain(service string) string { return nftPrefixAllow + service }

func nftSlotsMap(service string) string   { return nftPrefixSlots + service }
func nftAllowedSet(service string) string { return nftPrefixAllowed + service }

func nftBackendName(prefix, service string, b netip.AddrPort) string {
	addr := strings.ReplaceAll(b.Addr().String(), ":", "-")
	return prefix + service + "/" + addr + "/" + strconv.Itoa(int(b.Port()))
}

// NFTBackendChain names the chain that sends a connection to backend b.
func NFTBackendChain(service string, b netip.AddrPort) string {
	return nftBackendName(nftPrefixBackend, service, b)
}

func nftAffinitySet(service string, b netip.AddrPort) string {
	return nftBackendName(nftPrefixAffinity, service, b)
}

// NFTServiceKey is the element of a service in the services and filters
// maps (without the chain to go to).
func NFTServiceKey(s L4Service) NFTElement {
	return NFTElement{Addr: s.Address.Unmap(), Proto: s.Protocol, Port: s.Port}
}

// NFTablesService returns what service s owns in switchman's table, or an
// error naming the field and value nf_tables cannot serve faithfully.
func NFTablesService(s L4Service) (NFTService, error) {
	if err := nftCheck(s); err != nil {
		return NFTService{}, err
	}
	vip := s.Address.Unmap()
	out := NFTService{Name: s.Service, Family: NFTFamilyOf(vip)}
	for _, d := range s.Destinations {
		out.Backends = append(out.Backends, netip.AddrPortFrom(d.Address.Unmap(), d.Port))
	}
	modulus, table := NFTSlots(s)
	hash := s.Scheduler == spec.SourceHashing || s.Scheduler == spec.MaglevHashing
	svc := NFTChain{Name: NFTServiceChain(s.Service)}
	slots := NFTSet{Name: nftSlotsMap(s.Service), Key: NFTKeySlot}
	selector := NFTRule{Set: slots.Name, Modulus: modulus}
	if s.Persistence > 0 {
		slots.Verdicts = true
		svc.Rules = nftBackendChains(s, &out)
		selector.Kind = NFTRoundRobin
		if hash {
			selector.Kind = NFTSourceHash
		}
	} else {
		slots.Backends = true
		selector.Kind, selector.Proto = NFTDNATRoundRobin, s.Protocol
		if hash {
			selector.Kind = NFTDNATSourceHash
		}
	}
	for i, b := range table {
		e := NFTElement{Slot: uint32(i), Backend: b}
		if slots.Verdicts {
			e = NFTElement{Slot: uint32(i), Goto: NFTBackendChain(s.Service, b)}
		}
		slots.Elements = append(slots.Elements, e)
	}
	out.Sets = append([]NFTSet{slots}, out.Sets...)
	svc.Rules = append(svc.Rules, selector, NFTRule{Kind: NFTReject})
	out.Chains = append([]NFTChain{svc}, out.Chains...)

	key := NFTServiceKey(s)
	if s.AllowCIDRs != nil {
		allowed := NFTSet{Name: nftAllowedSet(s.Service), Key: NFTKeyAddr, Interval: true, Elements: nftIntervals(vip.Is4(), s.AllowCIDRs)}
		out.Sets = append(out.Sets, allowed)
		out.Chains = append(out.Chains, NFTChain{Name: NFTAllowChain(s.Service), Rules: []NFTRule{{Kind: NFTAllow, Set: allowed.Name}}})
		filter := key
		filter.Goto = NFTAllowChain(s.Service)
		out.Shared = append(out.Shared, NFTShared{Set: NFTFiltersMap, Element: filter})
	}
	if s.Masquerade {
		set := NFTMasqTCPSet
		if s.Protocol == spec.UDP {
			set = NFTMasqUDPSet
		}
		out.Shared = append(out.Shared, NFTShared{Set: set, Element: NFTElement{Addr: vip, Port: s.Port}})
	}
	expose := key
	expose.Goto = svc.Name
	out.Shared = append(out.Shared, NFTShared{Set: NFTServicesMap, Element: expose})
	return out, nil
}

// nftBackendChains adds to out the chain per backend and the affinity set
// per backend of a service with persistence, and returns the rules that
// send a client seen recently back to its backend, as long as that backend
// takes new connections.
func nftBackendChains(s L4Service, out *NFTService) []NFTRule {
	var affinity []NFTRule
	for _, d := range s.Destinations {
		b := netip.AddrPortFrom(d.Address.Unmap(), d.Port)
		be := NFTChain{Name: NFTBackendChain(s.Service, b)}
		aff := nftAffinitySet(s.Service, b)
		out.Sets = append(out.Sets, NFTSet{Name: aff, Key: NFTKeyAddr, Timeout: s.Persistence, Size: nftAffinitySetSize})
		be.Rules = append(be.Rules, NFTRule{Kind: NFTRemember, Set: aff},
			NFTRule{Kind: NFTDNAT, Proto: s.Protocol, Addr: b.Addr(), Port: b.Port()})
		if d.Weight > 0 {
			affinity = append(affinity, NFTRule{Kind: NFTAffinity, Set: aff, Chain: be.Name})
		}
		out.Chains = append(out.Chains, be)
	}
	return affinity
}

// nftCheck refuses what the nf_tables driver cannot serve faithfully (spec
// refuses it already; this guards the driver against anything else).
func nftCheck(s L4Service) error {
	if !validName(s.Service) {
		return fmt.Errorf("name: %q is not a DNS label", s.Service)
	}
	switch s.Scheduler {
	case spec.RoundRobin, spec.WeightedRoundRobin, spec.SourceHashing, spec.MaglevHashing:
	default:
		return fmt.Errorf("scheduler: %q is not supported by driver nftables; use rr, wrr, sh or mh", s.Scheduler)
	}
	if len(s.Flags) > 0 {
		return fmt.Errorf("scheduler_flags: %q is IPVS only", s.Flags[0])
	}
	if s.Protocol != spec.TCP && s.Protocol != spec.UDP {
		return fmt.Errorf("protocol: %q is not tcp or udp", s.Protocol)
	}
	if !s.Address.IsValid() {
		return errors.New("vip: missing")
	}
	for _, d := range s.Destinations {
		if d.Forwarding != spec.NAT && d.Forwarding != "" {
			return fmt.Errorf("forwarding: %q is not supported by driver nftables; use nat, or driver ipvs", d.Forwarding)
		}
		if NFTFamilyOf(d.Address) != NFTFamilyOf(s.Address) {
			return fmt.Errorf("backends: %s is not in the family of vip %s", d.Address, s.Address)
		}
	}
	if s.Persistence < 0 || s.Persistence%time.Second != 0 {
		return fmt.Errorf("persistence: %s is not a whole number of seconds", s.Persistence)
	}
	return nil
}

// NFTSlots returns the selection table of service s and the modulus its
// selector uses: entry i is the backend of slot i. Only backends with a
// positive weight appear. rr: each backend once, in order; wrr: one cycle
// of IPVS's weighted round robin; sh: IPVS's 256 source-hash buckets
// filled in proportion to the weights; mh: a Maglev table (Maglev). With no
// usable backend the table is empty and nothing matches, so the service
// chain rejects new connections.
func NFTSlots(s L4Service) (modulus uint32, table []netip.AddrPort) {
	var backends []SlotBackend
	for _, d := range s.Destinations {
		backends = append(backends, SlotBackend{Addr: netip.AddrPortFrom(d.Address.Unmap(), d.Port), Weight: d.Weight})
	}
	active := activeSorted(backends)
	switch s.Scheduler {
	case spec.SourceHashing:
		return SHSize, sourceHashTable(active, SHSize)
	case spec.MaglevHashing:
		return MaglevSize, Maglev(active, MaglevSize)
	case spec.WeightedRoundRobin:
		table = wrrCycle(active, MaxSlots)
	default:
		for _, b := range active {
			table = append(table, b.Addr)
		}
	}
	return uint32(max(len(table), 1)), table
}

// wrrCycle returns one cycle of IPVS's weighted round robin over active
// (sorted, positive weights): the weights are reduced by their greatest
// common divisor, and scaled down in proportion when the cycle would be
// longer than limit.
func wrrCycle(active []SlotBackend, limit int) []netip.AddrPort {
	w := scaledWeights(active, limit)
	if len(w) == 0 {
		return nil
	}
	g, mw, sum := 0, 0, 0
	for _, x := range w {
		g, mw, sum = gcd(g, x), max(mw, x), sum+x
	}
	out := make([]netip.AddrPort, 0, sum/g)
	// ip_vs_wrr_schedule: walk the backends; each time round, lower the
	// current weight by the gcd; pick those at least that heavy.
	i, cw := -1, 0
	for len(out) < sum/g {
		i = (i + 1) % len(w)
		if i == 0 {
			if cw -= g; cw <= 0 {
				cw = mw
			}
		}
		if w[i] >= cw {
			out = append(out, active[i].Addr)
		}
	}
	return out
}

// sourceHashTable fills n buckets as IPVS's sh does: walking the backends
// in order, each takes as many consecutive buckets as its weight, round
// and round until all are filled. Weights are reduced by their gcd and
// scaled to fit n, so that every backend has a bucket.
func sourceHashTable(active []SlotBackend, n int) []netip.AddrPort {
	w := scaledWeights(active, n)
	if len(w) == 0 {
		return nil
	}
	var cycle []netip.AddrPort
	for i, x := range w {
		for range x {
			cycle = append(cycle, active[i].Addr)
		}
	}
	out := make([]netip.AddrPort, n)
	for i := range out {
		out[i] = cycle[i%len(cycle)]
	}
	return out
}

// scaledWeights returns the weights of active divided by their gcd, scaled
// down in proportion (each at least 1) when they sum to more than limit.
func scaledWeights(active []SlotBackend, limit int) []int {
	if len(active) == 0 {
		return nil
	}
	g, sum := 0, 0
	for _, b := range active {
		g, sum = gcd(g, b.Weight), sum+b.Weight
	}
	w := make([]int, len(active))
	for i, b := range active {
		w[i] = b.Weight / g
	}
	if sum/g <= limit {
		return w
	}
	for i, b := range active {
		w[i] = max(1, int(int64(b.Weight)*int64(limit)/int64(sum)))
	}
	g = 0
	for _, x := range w {
		g = gcd(g, x)
	}
	for i := range w {
		w[i] /= g
	}
	return w
}

func gcd(a, b int) int {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// nftIntervals turns allowed prefixes into the elements of an interval set
// as nft writes them: the prefixes merged into disjoint ranges, each a start
// element and an end element one past its last address (none when it ends
// at the last address: the start is then marked Open), after an end element
// at the first address when no range starts there.
func nftIntervals(v4 bool, prefixes []netip.Prefix) []NFTElement {
	type span struct{ lo, hi *big.Int }
	bits := 128
	if v4 {
		bits = 32
	}
	var spans []span
	for _, p := range prefixes {
		p = p.Masked()
		if p.Addr().Unmap().Is4() != v4 {
			continue
		}
		lo := addrInt(p.Addr().Unmap())
		size := new(big.Int).Lsh(big.NewInt(1), uint(bits-p.Bits()))
		spans = append(spans, span{lo, new(big.Int).Sub(new(big.Int).Add(lo, size), big.NewInt(1))})
	}
	slices.SortFunc(spans, func(a, b span) int { return a.lo.Cmp(b.lo) })
	var merged []span
	for _, s := range spans {
		if n := len(merged); n > 0 && s.lo.Cmp(new(big.Int).Add(merged[n-1].hi, big.NewInt(1))) <= 0 {
			if s.hi.Cmp(merged[n-1].hi) > 0 {
				merged[n-1].hi = s.hi
			}
			continue
		}
		merged = append(merged, s)
	}
	last := new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), uint(bits)), big.NewInt(1))
	var out []NFTElement
	if len(merged) > 0 && merged[0].lo.Sign() != 0 {
		out = append(out, NFTElement{Addr: intAddr(big.NewInt(0), v4), End: true})
	}
	for _, s := range merged {
		open := s.hi.Cmp(last) == 0
		out = append(out, NFTElement{Addr: intAddr(s.lo, v4), Open: open})
		if !open {
			out = append(out, NFTElement{Addr: intAddr(new(big.Int).Add(s.hi, big.NewInt(1)), v4), End: true})
		}
	}
	return out
}

func addrInt(a netip.Addr) *big.Int { return new(big.Int).SetBytes(a.AsSlice()) }

func intAddr(i *big.Int, v4 bool) netip.Addr {
	if v4 {
		var b [4]byte
		i.FillBytes(b[:])
		return netip.AddrFrom4(b)
	}
	var b [16]byte
	i.FillBytes(b[:])
	return netip.AddrFrom16(b)
}

// NFTTableContent is switchman's whole table in one family.
type NFTTableContent struct {
	Family NFTFamily
	NFTObjects
}

// NFTAssemble puts services into their families' tables: NFTBase with
// every service's own chains and sets after it, and the services' shared
// elements in the shared maps. Tables come ip first, then ip6; a family
// without services has no table.
func NFTAssemble(services []NFTService) []NFTTableContent {
	var out []NFTTableContent
	for _, f := range []NFTFamily{NFTIPv4, NFTIPv6} {
		t := NFTTableContent{Family: f, NFTObjects: NFTBase()}
		var chains []NFTChain
		n := 0
		for _, s := range services {
			if s.Family != f {
				continue
			}
			n++
			t.Sets = append(t.Sets, s.Sets...)
			chains = append(chains, s.Chains...)
			for _, sh := range s.Shared {
				for i := range t.Sets {
					if t.Sets[i].Name == sh.Set {
						t.Sets[i].Elements = append(t.Sets[i].Elements, sh.Element)
					}
				}
			}
		}
		if n == 0 {
			continue
		}
		t.Chains = append(t.Chains, chains...)
		for i := range t.Sets {
			slices.SortFunc(t.Sets[i].Elements, NFTElement.Compare)
		}
		out = append(out, t)
	}
	return out
}

// NFTablesRuleset returns the ruleset the nf_tables driver programs for
// services, in `nft -f` syntax and the layout `nft list table ip
// switchman` shows (elements sorted; nft lists hash sets in hash order),
// so that an operator can compare a plan with the kernel.
func NFTablesRuleset(services []L4Service) (string, error) {
	var svcs []NFTService
	var errs []error
	for _, s := range services {
		n, err := NFTablesService(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.Service, err))
			continue
		}
		svcs = append(svcs, n)
	}
	var b strings.Builder
	for _, t := range NFTAssemble(svcs) {
		b.WriteString(t.String())
	}
	return b.String(), errors.Join(errs...)
}

// String formats the table as `nft list table` does.
func (t NFTTableContent) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table %s %s {\n", t.Family, NFTTable)
	sep := ""
	for _, s := range t.Sets {
		b.WriteString(sep)
		sep = "\n"
		writeNFTSet(&b, t.Family, s)
	}
	for _, c := range t.Chains {
		b.WriteString(sep)
		sep = "\n"
		fmt.Fprintf(&b, "\tchain %s {\n", c.Name)
		if h := c.Hook; h != nil {
			fmt.Fprintf(&b, "\t\ttype %s hook %s priority %s; policy accept;\n", h.Type, h.Hook, nftPriorityText(h.Hook, h.Priority))
		}
		for _, r := range c.Rules {
			fmt.Fprintf(&b, "\t\t%s\n", r.Text(t.Family))
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

// nftPriorityText names a priority as nft does: by the standard priority
// of the hook it is closest to, or as a number where nft knows no name.
func nftPriorityText(hook string, p int) string {
	named := map[string]struct {
		name string
		prio int
	}{"prerouting": {"dstnat", nftNATPriority}, "postrouting": {"srcnat", nftSNATPriority}}
	n, ok := named[hook]
	switch {
	case !ok:
		return strconv.Itoa(p)
	case p == n.prio:
		return n.name
	case p < n.prio:
		return fmt.Sprintf("%s - %d", n.name, n.prio-p)
	}
	return fmt.Sprintf("%s + %d", n.name, p-n.prio)
}

func writeNFTSet(b *strings.Builder, f NFTFamily, s NFTSet) {
	kind := "set"
	if s.Verdicts || s.Backends {
		kind = "map"
	}
	fmt.Fprintf(b, "\t%s %s {\n", kind, s.Name)
	addr := "ipv4_addr"
	if f == NFTIPv6 {
		addr = "ipv6_addr"
	}
	key := map[NFTKey]string{
		NFTKeyAddr:          "type " + addr,
		NFTKeyAddrPort:      "type " + addr + " . inet_service",
		NFTKeyAddrProtoPort: "type " + addr + " . inet_proto . inet_service",
		NFTKeySlot:          fmt.Sprintf("typeof numgen inc mod %d", nftSlotKeyTypeofSize),
	}[s.Key]
	switch {
	case s.Verdicts:
		key += " : verdict"
	case s.Backends:
		key += fmt.Sprintf(" : %s daddr . th dport", f)
	}
	fmt.Fprintf(b, "\t\t%s\n", key)
	if s.Size > 0 {
		fmt.Fprintf(b, "\t\tsize %d\n", s.Size)
	}
	switch {
	case s.Interval:
		b.WriteString("\t\tflags interval\n")
	case s.Timeout > 0:
		b.WriteString("\t\tflags dynamic,timeout\n")
	}
	if s.Timeout > 0 {
		fmt.Fprintf(b, "\t\ttimeout %s\n", nftDuration(s.Timeout))
	}
	var items []string
	if s.Interval {
		items = nftRanges(s.Elements)
	} else {
		for _, e := range s.Elements {
			items = append(items, e.text(s.Key))
		}
	}
	if len(items) > 0 {
		// nft puts five integers, two IPv4 addresses or one of anything
		// else on a line.
		perLine := 1
		switch {
		case s.Key == NFTKeySlot:
			perLine = 5
		case s.Key == NFTKeyAddr && f == NFTIPv4:
			perLine = 2
		}
		b.WriteString("\t\telements = { ")
		for i, it := range items {
			if i > 0 {
				if i%perLine == 0 {
					b.WriteString(",\n\t\t\t     ")
				} else {
					b.WriteString(", ")
				}
			}
			b.WriteString(it)
		}
		b.WriteString(" }\n")
	}
	b.WriteString("\t}\n")
}

func (e NFTElement) text(k NFTKey) string {
	var s string
	switch k {
	case NFTKeyAddr:
		s = e.Addr.String()
	case NFTKeyAddrPort:
		s = fmt.Sprintf("%s . %d", e.Addr, e.Port)
	case NFTKeyAddrProtoPort:
		s = fmt.Sprintf("%s . %s . %d", e.Addr, e.Proto, e.Port)
	case NFTKeySlot:
		s = strconv.FormatUint(uint64(e.Slot), 10)
	}
	switch {
	case e.Goto != "":
		s += " : goto " + e.Goto
	case e.Backend.IsValid():
		s += fmt.Sprintf(" : %s . %d", e.Backend.Addr(), e.Backend.Port())
	}
	return s
}

// nftRanges turns interval boundaries back into what nft shows: a prefix,
// a single address, or first-last.
func nftRanges(elems []NFTElement) []string {
	var out []string
	for i, e := range elems {
		if e.End {
			continue
		}
		lo := e.Addr
		var hi netip.Addr
		switch {
		case e.Open:
			hi = intAddr(new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), uint(lo.BitLen())), big.NewInt(1)), lo.Is4())
		case i+1 < len(elems) && elems[i+1].End:
			hi = elems[i+1].Addr.Prev()
		default:
			continue // a start without its end: not something nft writes
		}
		out = append(out, rangeText(lo, hi))
	}
	return out
}

func rangeText(lo, hi netip.Addr) string {
	if lo == hi {
		return lo.String()
	}
	for bits := lo.BitLen() - 1; bits >= 0; bits-- {
		p := netip.PrefixFrom(lo, bits)
		if p.Masked().Addr() != lo {
			break
		}
		last := intAddr(new(big.Int).Add(addrInt(lo), new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), uint(lo.BitLen()-bits)), big.NewInt(1))), lo.Is4())
		if last == hi {
			return p.String()
		}
		if addrInt(last).Cmp(addrInt(hi)) > 0 {
			break
		}
	}
	return lo.String() + "-" + hi.String()
}

// nftDuration formats d as nft does: 1d2h3m4s.
func nftDuration(d time.Duration) string {
	var b strings.Builder
	for _, u := range []struct {
		d time.Duration
		s string
	}{{24 * time.Hour, "d"}, {time.Hour, "h"}, {time.Minute, "m"}, {time.Second, "s"}, {time.Millisecond, "ms"}} {
		if n := d / u.d; n > 0 {
			fmt.Fprintf(&b, "%d%s", n, u.s)
			d -= n * u.d
		}
	}
	return b.String()
}

// Text returns the rule as `nft list` shows it in a table of family f.
func (r NFTRule) Text(f NFTFamily) string {
	switch r.Kind {
	case NFTDispatch:
		return fmt.Sprintf("%s daddr . meta l4proto . th dport vmap @%s", f, r.Set)
	case NFTMasquerade:
		return fmt.Sprintf("meta l4proto %s ct status dnat ct original %s daddr . ct original proto-dst @%s masquerade", r.Proto, f, r.Set)
	case NFTAllow:
		return fmt.Sprintf("%s saddr != @%s drop", f, r.Set)
	case NFTAffinity:
		return fmt.Sprintf("%s saddr @%s goto %s", f, r.Set, r.Chain)
	case NFTRoundRobin:
		return fmt.Sprintf("numgen inc mod %d vmap @%s", r.Modulus, r.Set)
	case NFTSourceHash:
		return fmt.Sprintf("jhash %s saddr mod %d seed %#x vmap @%s", f, r.Modulus, NFTHashSeed, r.Set)
	case NFTReject:
		return "reject"
	case NFTRemember:
		return fmt.Sprintf("update @%s { %s saddr }", r.Set, f)
	case NFTDNAT:
		return fmt.Sprintf("meta l4proto %s dnat to %s", r.Proto, netip.AddrPortFrom(r.Addr, r.Port))
	case NFTDNATRoundRobin:
		return fmt.Sprintf("meta l4proto %s dnat %s to numgen inc mod %d map @%s", r.Proto, f, r.Modulus, r.Set)
	case NFTDNATSourceHash:
		return fmt.Sprintf("meta l4proto %s dnat %s to jhash %s saddr mod %d seed %#x map @%s", r.Proto, f, f, r.Modulus, NFTHashSeed, r.Set)
	}
	return fmt.Sprintf("# unknown rule kind %d", r.Kind)
}
