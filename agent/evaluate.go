package agent

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/watcher"
)

// Policy is the agent's own rules on top of the schema. `switchman
// validate`, `switchman plan` and the agent judge definitions with the
// same Policy and the same Evaluator.
type Policy struct {
	// Prefix is the etcd prefix (no trailing slash); certificate keys must
	// lie under it.
	Prefix string
	// VIPCIDRs restricts the VIPs a definition may claim; empty means any.
	VIPCIDRs []netip.Prefix
	// BackendCIDRs restricts the backend addresses; empty means any.
	BackendCIDRs []netip.Prefix
	// Spec holds the settings that change how a definition is read (the
	// L4 driver of definitions that name none).
	Spec spec.Options
}

// Input is what etcd holds for one service: its definition key and its
// pool members. Exists is false when the definition key is absent (a pool
// without a definition is not a service).
type Input struct {
	Def     watcher.KV
	Members map[string]watcher.KV
	Exists  bool
}

// Verdict is what the Evaluator decided about one service.
type Verdict struct {
	// InForce is the version to program: the latest when valid, else the
	// last good one; nil when there is none or the service lost its
	// vip:port to another.
	InForce *spec.Service
	// Revision is the etcd revision of the version in force (the highest
	// mod revision of its definition and pool members).
	Revision int64
	// Rejected says why the latest definition was refused, if it was; it
	// includes the loss of a contested vip:port.
	Rejected error
	// Exists is false for a service whose definition key is gone.
	Exists bool
}

// Evaluator judges service definitions one service at a time: it parses
// and merges them, applies the policy, keeps each service's last good
// version, and resolves vip:port/protocol conflicts between the versions
// in force (the service created first keeps the key; mode http services
// share one when their routes do not overlap). It is not safe for
// concurrent use; the loop owns it.
type Evaluator struct {
	policy Policy
	// secret returns an etcd key's value for tls.certificate_key; nil
	// means the keys cannot be looked up (offline files), and only their
	// place under the prefix is checked.
	secret func(key string) ([]byte, bool)
	svcs   map[string]*judged
	claims map[spec.Key]map[string]*judged
	// resolved caches, per key, why each of its claimants loses it (or one
	// of its routes); dropped whenever the key's claimants change.
	resolved map[spec.Key]map[string]error
}

// judged is one service as the evaluator knows it.
type judged struct {
	name      string
	createRev int64
	def       parsed[*spec.Service]
	members   map[string]parsed[spec.Member]
	rejected  error
	good      *spec.Service // last good version
	goodRev   int64
	claim     spec.Key // the key good claims; valid while good != nil
	exists    bool
	// secrets are the etcd keys the latest valid or last good version
	// refers to, for the loop's index.
	secrets []string
}

// parsed caches the result of parsing one etcd value by its mod revision,
// so an event re-parses only what changed.
type parsed[T any] struct {
	modRev int64
	val    T
	err    error
}

// NewEvaluator returns an evaluator with policy p. secret looks up the
// etcd keys certificate_key names; nil when they cannot be looked up.
func NewEvaluator(p Policy, secret func(key string) ([]byte, bool)) *Evaluator {
	p.Prefix = strings.TrimSuffix(p.Prefix, "/")
	return &Evaluator{policy: p, secret: secret, svcs: map[string]*judged{}, claims: map[spec.Key]map[string]*judged{}, resolved: map[spec.Key]map[string]error{}}
}

// Update judges one service's new input. It returns the names whose
// verdict may have changed: the service itself and every other claimant of
// the vip:port it held before or holds now.
func (e *Evaluator) Update(name string, in Input) []string {
	j := e.svcs[name]
	if j == nil {
		j = &judged{name: name, members: map[string]parsed[spec.Member]{}}
		e.svcs[name] = j
	}
	affected := e.claimants(j)
	if j.good != nil {
		delete(e.resolved, j.claim) // the create revision may change below
	}
	j.exists = in.Exists
	if !in.Exists {
		// Deleted: the last good version goes with it.
		e.unclaim(j)
		delete(e.svcs, name)
		return appendUnique(affected, name)
	}
	j.createRev = in.Def.CreateRevision
	svc, rev, err := e.build(j, in)
	j.rejected = err
	if err == nil {
		e.unclaim(j)
		j.good, j.goodRev = svc, rev
		e.claim(j)
		j.secrets = secretKeys(svc)
	}
	return appendUnique(append(affected, e.claimants(j)...), name)
}

// Restore seeds the last good version of a service (from the agent's
// durable record) as though in had been valid; the next Update decides
// whether the latest version replaces it. It reports an error when in is
// not valid under the current policy, and then restores nothing.
func (e *Evaluator) Restore(name string, in Input) error {
	j := &judged{name: name, members: map[string]parsed[spec.Member]{}, exists: true, createRev: in.Def.CreateRevision}
	svc, rev, err := e.build(j, in)
	if err != nil {
		return err
	}
	j.good, j.goodRev, j.secrets = svc, rev, secretKeys(svc)
	j.def, j.members = parsed[*spec.Service]{}, map[string]parsed[spec.Member]{} // parse etcd's copy afresh
	if old := e.svcs[name]; old != nil {
		e.unclaim(old)
	}
	e.svcs[name] = j
	e.claim(j)
	return nil
}

// Verdict returns what is decided about name now.
func (e *Evaluator) Verdict(name string) Verdict {
	j := e.svcs[name]
	if j == nil {
		return Verdict{}
	}
	v := Verdict{Exists: j.exists, Rejected: j.rejected}
	if j.good == nil {
		return v
	}
	if lost := e.lost(j); lost != nil {
		switch {
		case v.Rejected == nil:
			v.Rejected = lost
		default:
			v.Rejected = fmt.Errorf("%w; and its last good version: %w", v.Rejected, lost)
		}
		return v
	}
	v.InForce, v.Revision = j.good, j.goodRev
	return v
}

// LatestValid reports whether the latest version of name passed every
// check by itself (it may still have lost its vip:port to another).
func (e *Evaluator) LatestValid(name string) bool {
	j := e.svcs[name]
	return j != nil && j.exists && j.rejected == nil && j.good != nil
}

// Secrets names the etcd keys the service refers to (certificate keys).
func (e *Evaluator) Secrets(name string) []string {
	if j := e.svcs[name]; j != nil {
		return j.secrets
	}
	return nil
}

// Names lists every service the evaluator knows, sorted.
func (e *Evaluator) Names() []string {
	out := make([]string, 0, len(e.svcs))
	for n := range e.svcs {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// lost says why j's last good version does not keep the vip:port it
// claims (or one of its routes), or nil when it keeps it. The claimants of
// one key are resolved together (spec.ResolveConflicts: the service created
// first keeps a key; mode http services share one when their routes do not
// overlap), once per change of the key's claimants.
func (e *Evaluator) lost(j *judged) error {
	res, ok := e.resolved[j.claim]
	if !ok {
		claims := make([]spec.Claim, 0, len(e.claims[j.claim]))
		for _, c := range e.claims[j.claim] {
			claims = append(claims, spec.Claim{Service: c.good, CreateRevision: c.createRev})
		}
		res = spec.ResolveConflicts(claims)
		e.resolved[j.claim] = res
	}
	return res[j.name]
}

func (e *Evaluator) claim(j *judged) {
	if j.good == nil {
		return
	}
	j.claim = j.good.Key()
	delete(e.resolved, j.claim)
	if e.claims[j.claim] == nil {
		e.claims[j.claim] = map[string]*judged{}
	}
	e.claims[j.claim][j.name] = j
}

func (e *Evaluator) unclaim(j *judged) {
	if j.good == nil {
		return
	}
	delete(e.claims[j.claim], j.name)
	delete(e.resolved, j.claim)
	if len(e.claims[j.claim]) == 0 {
		delete(e.claims, j.claim)
	}
}

// claimants names the services that claim the same key as j.
func (e *Evaluator) claimants(j *judged) []string {
	if j.good == nil {
		return nil
	}
	out := make([]string, 0, len(e.claims[j.claim]))
	for n := range e.claims[j.claim] {
		out = append(out, n)
	}
	return out
}

// build parses, merges and checks one service against the policy,
// returning it with the revision of its inputs.
func (e *Evaluator) build(j *judged, in Input) (*spec.Service, int64, error) {
	if j.def.modRev != in.Def.ModRevision || j.def.val == nil && j.def.err == nil {
		j.def = parsed[*spec.Service]{modRev: in.Def.ModRevision}
		j.def.val, j.def.err = spec.ParseWith(j.name, in.Def.Value, e.policy.Spec)
	}
	if j.def.err != nil {
		return nil, 0, j.def.err
	}
	rev := in.Def.ModRevision
	names := make([]string, 0, len(in.Members))
	for m := range in.Members {
		names = append(names, m)
	}
	slices.Sort(names)
	var list []spec.Member
	var errs spec.Errors
	for _, m := range names {
		mkv := in.Members[m]
		rev = max(rev, mkv.ModRevision)
		pm, ok := j.members[m]
		if !ok || pm.modRev != mkv.ModRevision {
			pm = parsed[spec.Member]{modRev: mkv.ModRevision}
			pm.val, pm.err = spec.ParseMember(m, mkv.Value)
			j.members[m] = pm
		}
		if pm.err != nil {
			errs = append(errs, &spec.FieldError{Path: "backends/" + j.name + "/" + m, Msg: pm.err.Error()})
			continue
		}
		list = append(list, pm.val)
	}
	for m := range j.members {
		if _, ok := in.Members[m]; !ok {
			delete(j.members, m)
		}
	}
	if len(errs) > 0 {
		return nil, 0, errs
	}
	svc, err := spec.Merge(j.def.val, list)
	if err != nil {
		return nil, 0, err
	}
	if err := e.check(svc); err != nil {
		return nil, 0, err
	}
	return svc, rev, nil
}

// check applies the policy: VIP and backend ranges, certificate keys under
// the prefix (and present, when they can be looked up).
func (e *Evaluator) check(svc *spec.Service) error {
	var errs spec.Errors
	if len(e.policy.VIPCIDRs) > 0 && !contains(e.policy.VIPCIDRs, svc.VIP) {
		errs = append(errs, &spec.FieldError{Path: "vip", Msg: fmt.Sprintf("%s is outside the ranges this agent may serve (--vip-cidrs %s)", svc.VIP, prefixes(e.policy.VIPCIDRs))})
	}
	if len(e.policy.BackendCIDRs) > 0 {
		for _, b := range svc.Backends {
			if !contains(e.policy.BackendCIDRs, b.Address) {
				errs = append(errs, &spec.FieldError{Path: b.Source + ".address", Msg: fmt.Sprintf("%s is outside the ranges backends may use (--backend-cidrs %s)", b.Address, prefixes(e.policy.BackendCIDRs))})
			}
		}
	}
	if svc.TLS != nil && svc.TLS.CertificateKey != "" {
		k := svc.TLS.CertificateKey
		switch {
		case !strings.HasPrefix(k, e.policy.Prefix+"/"):
			errs = append(errs, &spec.FieldError{Path: "tls.certificate_key", Msg: fmt.Sprintf("%q is outside the agent's prefix %s/", k, e.policy.Prefix)})
		case e.secret != nil:
			if _, ok := e.secret(k); !ok {
				errs = append(errs, &spec.FieldError{Path: "tls.certificate_key", Msg: fmt.Sprintf("%q does not exist in etcd", k)})
			}
		}
	}
	return errs.Err()
}

func contains(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func prefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func secretKeys(svc *spec.Service) []string {
	if svc.TLS != nil && svc.TLS.CertificateKey != "" {
		return []string{svc.TLS.CertificateKey}
	}
	return nil
}

func appendUnique(list []string, names ...string) []string {
	for _, n := range names {
		if !slices.Contains(list, n) {
			list = append(list, n)
		}
	}
	return list
}

// Judgement is the verdict on a whole set of definitions.
type Judgement struct {
	// Services are the versions that would be programmed, sorted by name.
	Services []*spec.Service
	// Rejected says why each refused service was refused.
	Rejected map[string]error
}

// EvaluateAll judges every service in snap the way the agent does on its
// first pass (no last good versions), for `switchman plan` and `switchman
// validate`. With secret nil, certificate keys are checked only for their
// place under the prefix.
func EvaluateAll(p Policy, snap watcher.Snapshot, secret func(string) ([]byte, bool)) Judgement {
	e := NewEvaluator(p, secret)
	names := make([]string, 0, len(snap.Services))
	for n := range snap.Services {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		e.Update(n, Input{Def: snap.Services[n], Members: snap.Members[n], Exists: true})
	}
	out := Judgement{Rejected: map[string]error{}}
	for _, n := range names {
		v := e.Verdict(n)
		if v.Rejected != nil {
			out.Rejected[n] = v.Rejected
			continue
		}
		out.Services = append(out.Services, v.InForce)
	}
	slices.SortFunc(out.Services, func(a, b *spec.Service) int { return cmp.Compare(a.Name, b.Name) })
	return out
}
