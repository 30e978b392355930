package agent

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"

	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/watcher"
)

// verdict is what the loop decided about one service definition.
type verdict struct {
	// inForce is the version to program: the new one when valid, the last
	// good one when the new one was rejected, nil when there is none.
	inForce *spec.Service
	// revision is the etcd revision of the version in force (the highest
	// mod revision of its definition and pool members).
	revision int64
	// rejected is why the latest definition was refused, if it was.
	rejected error
}

// good is a service's last good version.
type good struct {
	svc      *spec.Service
	revision int64
}

// parsed caches the result of parsing one etcd value by its mod revision,
// so a burst of unrelated changes does not parse every definition again.
type parsed[T any] struct {
	modRev int64
	val    T
	err    error
}

// evaluator turns watcher snapshots into verdicts, keeping the last good
// version of every service. It is used by one goroutine (the loop).
type evaluator struct {
	prefix   string
	vipCIDRs []netip.Prefix // empty: any VIP

	lastGood map[string]good
	defs     map[string]parsed[*spec.Service]
	members  map[string]parsed[spec.Member] // key: service + "/" + member
}

func newEvaluator(prefix string, vipCIDRs []netip.Prefix) *evaluator {
	return &evaluator{
		prefix:   strings.TrimSuffix(prefix, "/"),
		vipCIDRs: vipCIDRs,
		lastGood: map[string]good{},
		defs:     map[string]parsed[*spec.Service]{},
		members:  map[string]parsed[spec.Member]{},
	}
}

// evaluate decides every service in snap. Services whose key is gone are
// dropped together with their last good version.
func (e *evaluator) evaluate(snap watcher.Snapshot) map[string]verdict {
	out := make(map[string]verdict, len(snap.Services))
	var claims []spec.Claim
	created := map[string]int64{}
	for name, kv := range snap.Services {
		svc, rev, err := e.build(name, kv, snap.Members[name], snap.Other)
		v := verdict{}
		if err != nil {
			v.rejected = err
			if g, ok := e.lastGood[name]; ok {
				v.inForce, v.revision = g.svc, g.revision
			}
		} else {
			e.lastGood[name] = good{svc: svc, revision: rev}
			v.inForce, v.revision = svc, rev
		}
		out[name] = v
		if v.inForce != nil {
			claims = append(claims, spec.Claim{Service: v.inForce, CreateRevision: kv.CreateRevision})
			created[name] = kv.CreateRevision
		}
	}
	for name := range e.lastGood {
		if _, ok := snap.Services[name]; !ok {
			delete(e.lastGood, name)
		}
	}
	e.prune(snap)
	for loser, err := range spec.ResolveConflicts(claims) {
		v := out[loser]
		v.inForce = nil
		if v.rejected == nil {
			v.rejected = err
		} else {
			v.rejected = fmt.Errorf("%w; and its last good version: %w", v.rejected, err)
		}
		out[loser] = v
	}
	return out
}

// build parses, merges and checks one service against the agent's policy,
// returning it with the revision of its inputs.
func (e *evaluator) build(name string, kv watcher.KV, members map[string]watcher.KV, other map[string]watcher.KV) (*spec.Service, int64, error) {
	p, ok := e.defs[name]
	if !ok || p.modRev != kv.ModRevision {
		p.modRev = kv.ModRevision
		p.val, p.err = spec.Parse(name, kv.Value)
		e.defs[name] = p
	}
	if p.err != nil {
		return nil, 0, p.err
	}
	rev := kv.ModRevision
	names := make([]string, 0, len(members))
	for m := range members {
		names = append(names, m)
	}
	sort.Strings(names)
	var list []spec.Member
	var errs spec.Errors
	for _, m := range names {
		mkv := members[m]
		rev = max(rev, mkv.ModRevision)
		key := name + "/" + m
		pm, ok := e.members[key]
		if !ok || pm.modRev != mkv.ModRevision {
			pm.modRev = mkv.ModRevision
			pm.val, pm.err = spec.ParseMember(m, mkv.Value)
			e.members[key] = pm
		}
		if pm.err != nil {
			errs = append(errs, &spec.FieldError{Path: "backends/" + key, Msg: pm.err.Error()})
			continue
		}
		list = append(list, pm.val)
	}
	if len(errs) > 0 {
		return nil, 0, errs
	}
	svc, err := spec.Merge(p.val, list)
	if err != nil {
		return nil, 0, err
	}
	if err := e.policy(svc, other); err != nil {
		return nil, 0, err
	}
	return svc, rev, nil
}

// policy applies the agent's own rules: the VIP allowlist, and etcd-held
// certificates inside the agent's prefix.
func (e *evaluator) policy(svc *spec.Service, other map[string]watcher.KV) error {
	if len(e.vipCIDRs) > 0 {
		allowed := false
		for _, p := range e.vipCIDRs {
			if p.Contains(svc.VIP) {
				allowed = true
				break
			}
		}
		if !allowed {
			return &spec.FieldError{Path: "vip", Msg: fmt.Sprintf("%s is outside the ranges this agent may serve (--vip-cidrs %s)", svc.VIP, prefixes(e.vipCIDRs))}
		}
	}
	if svc.TLS != nil && svc.TLS.CertificateKey != "" {
		k := svc.TLS.CertificateKey
		if !strings.HasPrefix(k, e.prefix+"/") {
			return &spec.FieldError{Path: "tls.certificate_key", Msg: fmt.Sprintf("%q is outside the agent's prefix %s/", k, e.prefix)}
		}
		if _, ok := other[k]; !ok {
			return &spec.FieldError{Path: "tls.certificate_key", Msg: fmt.Sprintf("%q does not exist in etcd", k)}
		}
	}
	return nil
}

// prune forgets cached parses of keys that are gone.
func (e *evaluator) prune(snap watcher.Snapshot) {
	for name := range e.defs {
		if _, ok := snap.Services[name]; !ok {
			delete(e.defs, name)
		}
	}
	for key := range e.members {
		svc, m, _ := strings.Cut(key, "/")
		if _, ok := snap.Members[svc][m]; !ok {
			delete(e.members, key)
		}
	}
}

func prefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

// Evaluate decides every service in snap the way the agent does, but with
// no history: it returns the services that would be programmed, sorted by
// name, and why each of the others was refused. `switchman plan` uses it.
func Evaluate(prefix string, vipCIDRs []netip.Prefix, snap watcher.Snapshot) ([]*spec.Service, map[string]error) {
	verdicts := newEvaluator(prefix, vipCIDRs).evaluate(snap)
	rejected := map[string]error{}
	for name, v := range verdicts {
		if v.rejected != nil {
			rejected[name] = v.rejected
			delete(verdicts, name)
		}
	}
	return inForce(verdicts), rejected
}

// inForce lists the services to program, sorted by name.
func inForce(verdicts map[string]verdict) []*spec.Service {
	out := make([]*spec.Service, 0, len(verdicts))
	for _, v := range verdicts {
		if v.inForce != nil {
			out = append(out, v.inForce)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
