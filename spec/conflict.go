package spec

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
)

// Claim is a valid service together with the etcd create revision of its
// definition key, which decides who keeps a contested vip:port/protocol.
type Claim struct {
	Service        *Service
	CreateRevision int64
}

// ResolveConflicts returns, for every service that loses a vip:port/protocol
// (or one of its routes) to another, an error naming the winner. The claims
// of one key are taken in creation order (lower create revision, then lower
// name), and the first keeps the key:
//   - when it is a mode tcp service, every later claimant loses the key;
//   - when it is a mode http service, a later http service shares the key
//     when it agrees with it on TLS (all of them terminate TLS, or none)
//     and on allow_cidrs (one listener, one filter), and when none of its
//     routes is claimed already by an earlier sharer; otherwise it loses,
//     naming the service it lost to. A tcp service loses the key.
func ResolveConflicts(claims []Claim) map[string]error {
	sorted := slices.Clone(claims)
	sort.Slice(sorted, func(i, j int) bool {
		if sorted[i].CreateRevision != sorted[j].CreateRevision {
			return sorted[i].CreateRevision < sorted[j].CreateRevision
		}
		return sorted[i].Service.Name < sorted[j].Service.Name
	})
	type holder struct {
		first  Claim
		routes map[Route]Claim
	}
	owner := make(map[Key]*holder, len(sorted))
	losers := map[string]error{}
	for _, c := range sorted {
		k := c.Service.Key()
		h := owner[k]
		if h == nil {
			h = &holder{first: c, routes: map[Route]Claim{}}
			for _, r := range c.Service.Routes {
				h.routes[r] = c
			}
			owner[k] = h
			continue
		}
		if err := shareable(h.first, c, k, h.routes); err != nil {
			losers[c.Service.Name] = err
			continue
		}
		for _, r := range c.Service.Routes {
			h.routes[r] = c
		}
	}
	return losers
}

// shareable says why c cannot share key k with first, the service that
// holds it, and the routes claimed so far; nil when it can.
func shareable(first, c Claim, k Key, routes map[Route]Claim) *FieldError {
	f, s := first.Service, c.Service
	since := func(w Claim) string {
		return fmt.Sprintf("service %q (created at revision %d, before this one at %d)", w.Service.Name, w.CreateRevision, c.CreateRevision)
	}
	switch {
	case f.Mode != ModeHTTP:
		return &FieldError{Path: "vip", Msg: fmt.Sprintf("%s is already claimed by %s", k, since(first))}
	case s.Mode != ModeHTTP:
		return &FieldError{Path: "vip", Msg: fmt.Sprintf("%s is already claimed by %s, which serves it in mode http; only mode http services share a vip:port", k, since(first))}
	case (f.TLS == nil) != (s.TLS == nil):
		with := "with TLS; an http service sharing it needs a tls block too"
		if f.TLS == nil {
			with = "without TLS; an http service sharing it cannot terminate TLS on it"
		}
		return &FieldError{Path: "tls", Msg: fmt.Sprintf("%s is served by %s %s", k, since(first), with)}
	case !sameCIDRs(f.AllowCIDRs, s.AllowCIDRs):
		return &FieldError{Path: "allow_cidrs", Msg: fmt.Sprintf("%v differs from %v of %s, which holds %s; http services sharing a vip:port share its filter, so they must allow the same ranges",
			s.AllowCIDRs, f.AllowCIDRs, since(first), k)}
	}
	for i, r := range s.Routes {
		if w, taken := routes[r]; taken {
			return &FieldError{Path: fmt.Sprintf("routes[%d]", i), Msg: fmt.Sprintf("%s on %s is already claimed by %s", r, k, since(w))}
		}
	}
	return nil
}

func sameCIDRs(a, b []netip.Prefix) bool {
	sorted := func(ps []netip.Prefix) []netip.Prefix {
		out := slices.Clone(ps)
		slices.SortFunc(out, func(x, y netip.Prefix) int {
			if c := x.Addr().Compare(y.Addr()); c != 0 {
				return c
			}
			return x.Bits() - y.Bits()
		})
		return slices.Compact(out)
	}
	return slices.Equal(sorted(a), sorted(b))
}
