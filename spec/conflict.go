package spec

import (
	"fmt"
	"sort"
)

// Claim is a valid service together with the etcd create revision of its
// definition key, which decides who keeps a contested vip:port/protocol.
type Claim struct {
	Service        *Service
	CreateRevision int64
}

// ResolveConflicts returns, for every service that loses a vip:port/protocol
// to another, an error naming the winner. Of two services claiming the same
// key, the one created first (lower create revision, then lower name) keeps it.
func ResolveConflicts(claims []Claim) map[string]error {
	sorted := append([]Claim(nil), claims...)
	sort.Slice(sorted, func(i, j int) bool {
		if sorted[i].CreateRevision != sorted[j].CreateRevision {
			return sorted[i].CreateRevision < sorted[j].CreateRevision
		}
		return sorted[i].Service.Name < sorted[j].Service.Name
	})
	owner := make(map[Key]Claim, len(sorted))
	losers := map[string]error{}
	for _, c := range sorted {
		k := c.Service.Key()
		if w, taken := owner[k]; taken {
			losers[c.Service.Name] = &FieldError{Path: "vip", Msg: fmt.Sprintf(
				"%s is already claimed by service %q (created at revision %d, before this one at %d)",
				k, w.Service.Name, w.CreateRevision, c.CreateRevision)}
			continue
		}
		owner[k] = c
	}
	return losers
}
