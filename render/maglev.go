package render

import (
	"hash/fnv"
	"net/netip"
	"slices"
)

// MaglevSize is the size of the lookup table of scheduler mh on nf_tables:
// a prime, and IPVS's default for its own mh scheduler.
const MaglevSize = 251

// SlotBackend is one candidate of a selection table: a backend and its
// weight. Backends with weight 0 are never chosen.
type SlotBackend struct {
	Addr   netip.AddrPort
	Weight int
}

// Maglev computes a Maglev lookup table (Eisenbud et al., "Maglev: A Fast
// and Reliable Software Network Load Balancer", NSDI 2016) of m entries for
// the backends with a positive weight. Entry i names the backend that
// clients hashing to i are sent to. m must be a prime larger than the
// number of backends for every backend to get a fair share.
//
// The table depends only on the set of backends and their weights, not on
// their order (the function sorts them), so every host computes the same
// table. Each backend walks its own permutation of the entries, derived
// from a hash of its address and port; the backends take turns claiming
// their next free preferred entry, a backend taking turns in proportion to
// its weight (smooth weighted round robin decides whose turn it is).
// Removing one of N equally weighted backends therefore moves about 1/N of
// the entries, and mostly only those it held. It returns nil when no
// backend has a positive weight.
func Maglev(backends []SlotBackend, m int) []netip.AddrPort {
	active := activeSorted(backends)
	if len(active) == 0 || m <= 0 {
		return nil
	}
	type walker struct {
		offset, skip, next int
		weight, current    int
	}
	ws := make([]walker, len(active))
	total := 0
	for i, b := range active {
		key := b.Addr.String()
		ws[i] = walker{offset: int(hash64(key, 'o') % uint64(m)), skip: 1, weight: b.Weight}
		if m > 1 {
			ws[i].skip = int(hash64(key, 's')%uint64(m-1)) + 1
		}
		total += b.Weight
	}
	owner := make([]int, m)
	for i := range owner {
		owner[i] = -1
	}
	for filled := 0; filled < m; filled++ {
		// Whose turn: smooth weighted round robin, ties to the lowest index.
		pick := 0
		for i := range ws {
			ws[i].current += ws[i].weight
			if ws[i].current > ws[pick].current {
				pick = i
			}
		}
		ws[pick].current -= total
		w := &ws[pick]
		for {
			c := (w.offset + w.next*w.skip) % m
			w.next++
			if owner[c] < 0 {
				owner[c] = pick
				break
			}
		}
	}
	table := make([]netip.AddrPort, m)
	for i, o := range owner {
		table[i] = active[o].Addr
	}
	return table
}

// activeSorted returns the backends with a positive weight, sorted by
// address and port.
func activeSorted(backends []SlotBackend) []SlotBackend {
	var out []SlotBackend
	for _, b := range backends {
		if b.Weight > 0 {
			out = append(out, b)
		}
	}
	slices.SortFunc(out, func(a, b SlotBackend) int { return a.Addr.Compare(b.Addr) })
	return out
}

// hash64 is FNV-1a over a one-byte domain tag and s: stable across hosts,
// releases and architectures, unlike Go's seeded map hash.
func hash64(s string, tag byte) uint64 {
	h := fnv.New64a()
	h.Write([]byte{tag})
	h.Write([]byte(s))
	return h.Sum64()
}
