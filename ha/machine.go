package ha

import (
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/switchman-lb/switchman/spec"
)

// Timing is how fast ha confirms, detects and decides. DefaultTiming gives
// the values the package documentation reasons with.
type Timing struct {
	// Round is how often an agent reads its ownership back from etcd.
	Round time.Duration
	// Hold (D) is how long an owner keeps its addresses after sending the
	// last read that etcd answered with "the key is yours".
	Hold time.Duration
	// Margin (m) covers the time an owner needs to drop its addresses once
	// its deadline passes, late timers and clock-rate differences.
	Margin time.Duration
	// Heartbeat is how often agents send each other a UDP heartbeat.
	Heartbeat time.Duration
	// Silence (S) is how long without a heartbeat makes a peer silent.
	Silence time.Duration
	// Stagger delays the claims of less preferred agents, per rank.
	Stagger time.Duration
	// PreemptDelay is how long a more preferred agent must have been
	// alive and in contact with etcd before an owner hands it a group.
	PreemptDelay time.Duration
	// StartGrace is how long a starting agent claims nothing, so it
	// hears its peers first.
	StartGrace time.Duration
	// Regain (G) is how long an agent that regains etcd claims nothing.
	// An owner without etcd keeps its addresses for Regain - Margin after
	// the last "no etcd" heartbeat of each peer, which gives its own
	// client time to reconnect when etcd comes back for everyone.
	Regain time.Duration
	// Tick is how often the state is evaluated when nothing happens.
	Tick time.Duration
}

// DefaultTiming returns the default timing: reads every 100 ms, a hold
// deadline of 400 ms, heartbeats every 100 ms and silence after 300 ms.
func DefaultTiming() Timing {
	return Timing{
		Round:        100 * time.Millisecond,
		Hold:         400 * time.Millisecond,
		Margin:       100 * time.Millisecond,
		Heartbeat:    100 * time.Millisecond,
		Silence:      300 * time.Millisecond,
		Stagger:      100 * time.Millisecond,
		PreemptDelay: time.Second,
		StartGrace:   600 * time.Millisecond,
		Regain:       2 * time.Second,
		Tick:         10 * time.Millisecond,
	}
}

// contact is how recent the last successful read must be for an agent to
// say it is in contact with etcd.
func (t Timing) contact() time.Duration { return 2 * t.Round }

// maxReads is how many reads may be in flight at once: two, so that one
// slow answer does not hold the next read back, while an etcd that is
// slow for everyone gets at most twice the reads.
const maxReads = 2

// keepFor is how long an owner without etcd keeps its addresses on the
// strength of a peer's "no etcd" heartbeat: the Margin less than what that
// peer waits after regaining etcd before it claims.
func (t Timing) keepFor() time.Duration { return t.Regain - t.Margin }

// check reports timing that cannot be safe with a lease of ttl.
func (t Timing) check(ttl time.Duration) error {
	for name, d := range map[string]time.Duration{"round": t.Round, "hold": t.Hold, "margin": t.Margin, "heartbeat": t.Heartbeat,
		"silence": t.Silence, "stagger": t.Stagger, "preempt delay": t.PreemptDelay, "start grace": t.StartGrace, "regain": t.Regain, "tick": t.Tick} {
		if d <= 0 {
			return fmt.Errorf("ha timing: %s %v must be positive", name, d)
		}
	}
	switch {
	case ttl < 2*time.Second:
		return fmt.Errorf("ha lease TTL %v is below etcd's minimum of 2s", ttl)
	case t.Hold < 2*t.Round:
		return fmt.Errorf("ha timing: hold %v must be at least two rounds (%v)", t.Hold, 2*t.Round)
	case t.Silence < 2*t.Heartbeat:
		return fmt.Errorf("ha timing: silence %v must be at least two heartbeats (%v)", t.Silence, 2*t.Heartbeat)
	case t.Hold+t.Margin+t.Round > ttl/2:
		return fmt.Errorf("ha timing: hold %v + margin %v + round %v must stay under half the lease TTL %v", t.Hold, t.Margin, t.Round, ttl)
	case t.Tick*4 > t.Margin:
		return fmt.Errorf("ha timing: tick %v must be at most a quarter of the margin %v", t.Tick, t.Margin)
	case t.Regain < t.Silence+t.Margin:
		return fmt.Errorf("ha timing: regain %v must be at least silence + margin (%v)", t.Regain, t.Silence+t.Margin)
	case t.StartGrace < t.Hold+t.Margin:
		return fmt.Errorf("ha timing: start grace %v must be at least hold + margin (%v)", t.StartGrace, t.Hold+t.Margin)
	}
	return nil
}

// config is what the machine needs to know about itself.
type config struct {
	node   string
	prefix string // e.g. /switchman, no trailing slash
	addr   string // heartbeat address advertised in the member key
	ttl    time.Duration
	t      Timing
	inc    uint64 // incarnation
}

func (c config) ownersPrefix() string         { return c.prefix + "/owners/" }
func (c config) groupsPrefix() string         { return c.prefix + "/groups/" }
func (c config) membersPrefix() string        { return c.prefix + "/members/" }
func (c config) ownerKey(group string) string { return c.ownersPrefix() + group }

// owner is an owner key as last seen.
type owner struct {
	node      string
	epoch     int64
	since     time.Time
	lease     LeaseID
	createRev int64
	modRev    int64
}

// group is what the machine knows and does about one HA group.
type group struct {
	name string
	// owner is the owner key as of viewRev; nil when absent.
	owner   *owner
	viewRev int64
	// seen is when the owner key last changed in this agent's view.
	seen time.Time
	// absent is when the key was first seen absent; prev is the owner
	// seen before that, and prevLease whether its lease still lives.
	absent    time.Time
	prev      *owner
	prevLease leaseState
	checking  bool
	// confirmed is the send time of the latest read or transaction that
	// etcd answered with "the key is this agent's".
	confirmed time.Time
	// holdAt is the earliest time this agent may hold the group (after a
	// takeover: past the previous owner's hold deadline).
	holdAt time.Time
	held   bool
	// floating are the floating addresses the holder was last given.
	floating []spec.GroupAddress
	// op is the etcd operation in flight for the group, if any.
	op        string
	lastTouch time.Time
	// gaveUp: a release on shutdown failed and the addresses were dropped
	// anyway; never held again.
	gaveUp bool
}

type leaseState int

const (
	leaseUnknown leaseState = iota
	leaseAlive
	leaseGone
)

// peer is another agent as heard through its heartbeats.
type peer struct {
	node, addr string
	leaving    bool
	known      time.Time // first seen as a member
	heard      time.Time // last heartbeat; zero: never
	inc, seq   uint64
	etcd       bool
	hear       map[string]bool
	groups     map[string]string
	lostSince  map[string]time.Time
	// usable is since when the peer has been heard in contact with etcd;
	// noEtcd when it was last heard saying it had none.
	usable, noEtcd time.Time
	// suspect: this peer took a group from this agent while this agent
	// was alive and could not hear it (a partition between peers); no
	// fast takeover from it until it is heard again.
	suspect bool
	// cleared: the peer said none of this agent's heartbeats (of this
	// incarnation) up to this sequence number counts for its keep mode.
	cleared uint64
}

type noteSeen struct {
	node string
	releaseNote
}

// machine is the ownership state machine of one agent. It does no I/O:
// handle takes an event and the current time and returns effects, which
// the runner (or a test's simulation) carries out and answers with events.
type machine struct {
	cfg config
	log *slog.Logger

	start time.Time
	seq   uint64

	lease     LeaseID
	myLeases  map[LeaseID]bool
	granting  bool
	grantAt   time.Time
	member    bool // member key written under the current lease
	putting   bool
	renewedAt time.Time // send time of the latest successful renewal or grant

	// reads are the send times of the reads in flight, oldest first: a
	// read goes out every Round even while earlier ones are slow, so one
	// slow answer does not hold the next confirmation back.
	reads    []time.Time
	renewing bool // a renewal rides on a read in flight
	nextRead time.Time
	lastOK   time.Time // send time of the latest successful read
	// contact is etcdOK as of the last step, lostAt when it last went
	// false: for the logs of lapses.
	contact bool
	lostAt  time.Time
	since   time.Time // when the current run of successful reads began (response time)
	joined  time.Time // when the first run began
	// noEtcdSeq is the sequence number of the last heartbeat this agent
	// sent saying it had no etcd (0: none in this incarnation).
	noEtcdSeq uint64
	rev       int64

	members  map[string]string // node -> heartbeat address, this agent included
	settings map[string]spec.Group
	bad      map[string]string // group -> settings error, logged once
	wanted   map[string]bool
	groups   map[string]*group
	peers    map[string]*peer
	notes    map[string]noteSeen // group -> latest release note heard
	mine     map[string]releaseNote
	mineAt   map[string]time.Time

	lastSent   time.Time
	lastReport string

	releasing bool
	revoking  bool
	released  bool
}

func newMachine(cfg config, log *slog.Logger, now time.Time) *machine {
	return &machine{cfg: cfg, log: log, start: now, myLeases: map[LeaseID]bool{}, members: map[string]string{},
		settings: map[string]spec.Group{}, bad: map[string]string{}, wanted: map[string]bool{}, groups: map[string]*group{},
		peers: map[string]*peer{}, notes: map[string]noteSeen{}, mine: map[string]releaseNote{}, mineAt: map[string]time.Time{}}
}

// Events the machine handles.
type (
	evTick    struct{}
	evGroups  struct{ groups []string }
	evRelease struct{}
	evRead    struct {
		sent time.Time
		// renew is the lease renewed with the read (0: none); renewErr
		// the renewal's error.
		renew    LeaseID
		renewErr error
		rev      int64
		kvs      [][]KV
		err      error
	}
	evGrant struct {
		sent  time.Time
		lease LeaseID
		err   error
	}
	evPut struct {
		lease LeaseID
		err   error
	}
	evCond struct {
		group, kind string
		sent        time.Time
		lease       LeaseID
		ok          bool
		kv          KV
		err         error
	}
	evDelete struct {
		group string
		lease LeaseID
		epoch int64
		ok    bool
		rev   int64
		err   error
	}
	evLease struct {
		group string
		lease LeaseID
		alive bool
		err   error
	}
	evRevoked struct{}
	evPacket  struct {
		from string
		data []byte
	}
)

// Effects the machine asks for.
type (
	effRead struct {
		sent     time.Time
		prefixes []string
		renew    LeaseID // 0: no renewal with this read
	}
	effGrant struct {
		sent time.Time
		ttl  time.Duration
	}
	effPut struct {
		key   string
		value []byte
		lease LeaseID
	}
	// effCond is a conditional write: kind create, replace or touch.
	effCond struct {
		group, kind, key string
		sent             time.Time
		value            []byte
		lease            LeaseID
		modRev           int64
	}
	effDelete struct {
		group, key string
		lease      LeaseID
		epoch      int64
	}
	effLease struct {
		group string
		lease LeaseID
	}
	effRevoke struct{ lease LeaseID }
	effHold   struct {
		group    string
		held     bool
		floating []spec.GroupAddress
	}
	effSend struct {
		addrs []string
		data  []byte
	}
	// effClaim reports a claim sent: ready is when the group became
	// claimable by the safety rules (free, or its owner gone), gate what
	// held the claim back after that (none, start, regain, rank).
	effClaim struct {
		group, kind, gate string
		ready             time.Time
	}
	// effOwner reports a new owner of a group (node "" when none).
	effOwner struct {
		group string
		owner Owner
	}
	effReleased struct{}
)

// Owner is the owner of a group as an agent last saw it.
type Owner struct {
	Node  string
	Epoch int64
	Since time.Time
}

func (m *machine) handle(now time.Time, ev any) []any {
	var out []any
	switch e := ev.(type) {
	case evTick:
	case evGroups:
		m.wanted = map[string]bool{}
		for _, g := range e.groups {
			m.wanted[g] = true
		}
	case evRelease:
		m.releasing = true
	case evRead:
		out = m.onRead(now, e, out)
	case evGrant:
		m.granting = false
		if e.err != nil {
			m.grantAt = now.Add(m.cfg.t.Hold)
			m.log.Warn("ha: cannot grant a lease", "error", e.err)
			break
		}
		m.lease, m.member, m.renewedAt = e.lease, false, e.sent
		m.myLeases[e.lease] = true
	case evPut:
		m.putting = false
		if e.err == nil && e.lease == m.lease {
			m.member = true
		}
	case evCond:
		out = m.onCond(now, e, out)
	case evDelete:
		out = m.onDelete(now, e, out)
	case evLease:
		if g := m.groups[e.group]; g != nil {
			g.checking = false
			if e.err == nil && g.prev != nil && g.prev.lease == e.lease {
				g.prevLease = leaseGone
				if e.alive {
					g.prevLease = leaseAlive
				}
			}
		}
	case evRevoked:
		m.released, m.revoking, m.lease, m.member = true, false, 0, false
		out = append(out, effReleased{})
	case evPacket:
		m.onPacket(now, e)
	default:
		panic(fmt.Sprintf("ha: unknown event %T", ev))
	}
	return m.step(now, out)
}

// etcdOK reports whether this agent is in contact with etcd.
func (m *machine) etcdOK(now time.Time) bool {
	return !m.lastOK.IsZero() && now.Sub(m.lastOK) < m.cfg.t.contact()
}

func (m *machine) onRead(now time.Time, e evRead, out []any) []any {
	if i := slices.IndexFunc(m.reads, e.sent.Equal); i >= 0 {
		m.reads = slices.Delete(m.reads, i, i+1)
	}
	if e.renew != 0 {
		m.renewing = false
	}
	if e.err != nil {
		if m.etcdOK(now) {
			m.log.Debug("ha: etcd read failed", "error", e.err)
		}
		return out
	}
	if e.renew != 0 && e.renew == m.lease {
		switch {
		case errors.Is(e.renewErr, ErrLeaseNotFound):
			m.log.Warn("ha: lease lost; granting a new one", "lease", fmt.Sprintf("%x", m.lease))
			m.lease, m.member = 0, false
		case e.renewErr == nil && e.sent.After(m.renewedAt):
			m.renewedAt = e.sent
		}
	}
	if !m.etcdOK(now) {
		m.since = now
		if m.joined.IsZero() {
			m.joined = now
		}
		if !m.lastOK.IsZero() {
			m.log.Info("ha: etcd contact regained", "lapse", now.Sub(m.lostAt).Round(time.Millisecond), "read_took", now.Sub(e.sent).Round(time.Millisecond))
		}
		m.contact = true
	}
	if e.sent.After(m.lastOK) {
		m.lastOK = e.sent
	}
	if e.rev < m.rev {
		return out // an older answer than one already seen
	}
	m.rev = e.rev
	owners, groups, members := e.kvs[0], e.kvs[1], e.kvs[2]

	m.members = map[string]string{}
	for _, kv := range members {
		var v memberValue
		node := strings.TrimPrefix(kv.Key, m.cfg.membersPrefix())
		if err := json.Unmarshal(kv.Value, &v); err != nil || v.Node != node {
			continue
		}
		ap, err := netip.ParseAddrPort(v.Addr)
		if err != nil {
			continue
		}
		m.members[node] = ap.String()
	}
	if _, ok := m.members[m.cfg.node]; !ok && m.lease != 0 {
		m.member = false
	}
	for node, addr := range m.members {
		if node == m.cfg.node {
			continue
		}
		p := m.peers[node]
		if p == nil || p.addr != addr {
			p = &peer{node: node, addr: addr, known: now, hear: map[string]bool{}, groups: map[string]string{}, lostSince: map[string]time.Time{}}
			m.peers[node] = p
		}
	}
	for node := range m.peers {
		if _, ok := m.members[node]; !ok {
			delete(m.peers, node)
		}
	}

	settings := map[string]spec.Group{}
	for _, kv := range groups {
		name := strings.TrimPrefix(kv.Key, m.cfg.groupsPrefix())
		g, err := spec.ParseGroup(name, kv.Value)
		if err != nil {
			if m.bad[name] != err.Error() {
				m.log.Error("ha: group settings rejected; the group keeps its last good settings", "group", name, "error", err)
				m.bad[name] = err.Error()
			}
			if old, ok := m.settings[name]; ok {
				settings[name] = old
			}
			continue
		}
		delete(m.bad, name)
		settings[name] = g
	}
	m.settings = settings

	seen := map[string]bool{}
	for _, kv := range owners {
		name := strings.TrimPrefix(kv.Key, m.cfg.ownersPrefix())
		seen[name] = true
		out = m.observe(now, m.group(name), &kv, e.rev, e.sent, false, out)
	}
	for name, g := range m.groups {
		if !seen[name] {
			out = m.observe(now, g, nil, e.rev, e.sent, false, out)
		}
	}
	return out
}

func (m *machine) group(name string) *group {
	g := m.groups[name]
	if g == nil {
		g = &group{name: name}
		m.groups[name] = g
	}
	return g
}

func parseOwner(kv *KV) *owner {
	var v ownerValue
	o := &owner{lease: kv.Lease, createRev: kv.CreateRevision, modRev: kv.ModRevision}
	if err := json.Unmarshal(kv.Value, &v); err == nil {
		o.node, o.epoch, o.since = v.Node, v.Epoch, v.Since
	}
	return o
}

func (m *machine) isMine(o *owner) bool {
	return o != nil && o.node == m.cfg.node && m.lease != 0 && o.lease == m.lease
}

// observe records the owner key of g as of revision rev (kv nil: absent),
// read by a request sent at sent; byWrite when it is the answer of this
// agent's own write.
func (m *machine) observe(now time.Time, g *group, kv *KV, rev int64, sent time.Time, byWrite bool, out []any) []any {
	if rev < g.viewRev {
		return out
	}
	g.viewRev = rev
	if kv == nil {
		if g.owner != nil {
			g.prev, g.prevLease, g.absent, g.seen = g.owner, leaseUnknown, now, now
			g.owner = nil
			out = append(out, effOwner{group: g.name})
		} else if g.absent.IsZero() {
			g.absent = now
		}
		return out
	}
	o := parseOwner(kv)
	if g.owner == nil || g.owner.modRev != o.modRev {
		g.seen = now
	}
	wasMine := m.isMine(g.owner)
	if g.owner == nil || g.owner.node != o.node || g.owner.epoch != o.epoch {
		out = append(out, effOwner{group: g.name, owner: Owner{Node: o.node, Epoch: o.epoch, Since: o.since}})
		if wasMine && g.held {
			if p := m.peers[o.node]; p != nil && now.Sub(m.heard(p)) > m.cfg.t.Silence {
				p.suspect = true
			}
		}
	}
	g.owner, g.absent = o, time.Time{}
	if m.isMine(o) {
		if !wasMine && !byWrite && g.op != "create" {
			// Ours, but not through a claim of an absent key that we saw
			// answered (a takeover, or a write whose answer was lost): the
			// earlier owner may still hold until its deadline.
			g.holdAt = now.Add(m.cfg.t.Hold + m.cfg.t.Margin)
		}
		if sent.After(g.confirmed) {
			g.confirmed = sent
		}
	}
	return out
}

func (m *machine) onCond(now time.Time, e evCond, out []any) []any {
	g := m.group(e.group)
	g.op = ""
	if e.err != nil {
		m.log.Debug("ha: write failed", "group", e.group, "kind", e.kind, "error", e.err)
		return out
	}
	if !e.ok || e.lease != m.lease {
		return out // someone else was first; the next read shows who
	}
	wasMine := m.isMine(g.owner)
	out = m.observe(now, g, &e.kv, e.kv.ModRevision, e.sent, true, out)
	switch {
	case e.kind == "replace" && !wasMine:
		g.holdAt = now.Add(m.cfg.t.Hold + m.cfg.t.Margin)
		m.log.Info("ha: took over a group from a gone owner; holding after its deadline", "group", e.group, "hold_in", m.cfg.t.Hold+m.cfg.t.Margin)
	case e.kind == "create":
		m.log.Info("ha: claimed a group", "group", e.group)
	}
	return out
}

func (m *machine) onDelete(now time.Time, e evDelete, out []any) []any {
	g := m.group(e.group)
	g.op = ""
	if e.err != nil || !e.ok {
		if m.releasing {
			// Shutting down: drop the addresses even though the key may
			// stay until the lease runs out or a peer takes over.
			m.log.Error("ha: could not release a group; dropping its addresses anyway", "group", e.group, "error", e.err)
			out = m.setHold(g, false, out)
			g.owner, g.gaveUp = nil, true
		}
		return out
	}
	// Key first, then the addresses, then tell the peers.
	if g.owner != nil {
		g.prev = g.owner
	}
	g.owner, g.absent, g.viewRev, g.prevLease = nil, now, max(g.viewRev, e.rev), leaseUnknown
	out = m.setHold(g, false, out)
	out = append(out, effOwner{group: g.name})
	m.mine[g.name] = releaseNote{Epoch: e.epoch, Rev: e.rev}
	m.mineAt[g.name] = now
	m.lastReport = "" // send a heartbeat at once
	m.log.Info("ha: released a group", "group", g.name, "epoch", e.epoch)
	return out
}

func (m *machine) onPacket(now time.Time, e evPacket) {
	h, err := decodeHeartbeat(e.data)
	if err != nil {
		return
	}
	p := m.peers[h.Node]
	if p == nil || p.addr != e.from {
		return // only members, from their registered address
	}
	if h.Inc != p.inc {
		p.inc, p.seq, p.cleared = h.Inc, 0, 0
	} else if h.Seq <= p.seq {
		return
	}
	if c, ok := h.Cleared[m.cfg.node]; ok && c.Inc == m.cfg.inc && c.Seq > p.cleared {
		p.cleared = c.Seq
	}
	p.seq, p.heard, p.etcd, p.suspect, p.leaving = h.Seq, now, h.Etcd, false, h.Leaving
	p.hear = map[string]bool{}
	for _, n := range h.Hear {
		p.hear[n] = true
	}
	p.groups = h.Groups
	for g, st := range h.Groups {
		if st != stateLost {
			delete(p.lostSince, g)
		} else if p.lostSince[g].IsZero() {
			p.lostSince[g] = now
		}
	}
	for g := range p.lostSince {
		if _, ok := h.Groups[g]; !ok {
			delete(p.lostSince, g)
		}
	}
	if !h.Etcd {
		p.usable, p.noEtcd = time.Time{}, now
	} else if p.usable.IsZero() {
		p.usable = now
	}
	for name, note := range h.Released {
		m.notes[name] = noteSeen{node: h.Node, releaseNote: note}
		g := m.groups[name]
		if g != nil && g.owner != nil && g.owner.node == h.Node && g.owner.epoch == note.Epoch && note.Rev > g.viewRev {
			g.prev, g.prevLease, g.owner, g.absent, g.seen, g.viewRev = g.owner, leaseUnknown, nil, now, now, note.Rev
		}
	}
}

// heard is when p was last heard, or when it became known if never.
func (m *machine) heard(p *peer) time.Time {
	if p.heard.IsZero() {
		return p.known
	}
	return p.heard
}

func (m *machine) fresh(p *peer, now time.Time) bool {
	return !p.heard.IsZero() && now.Sub(p.heard) <= m.cfg.t.Silence
}

// usable reports whether node could own a group now: alive and in contact
// with etcd as far as this agent knows.
func (m *machine) usable(node string, now time.Time) bool {
	if node == m.cfg.node {
		return m.etcdOK(now) && !m.releasing && m.lease != 0
	}
	p := m.peers[node]
	return p != nil && m.fresh(p, now) && p.etcd && !p.leaving && !p.usable.IsZero()
}

func (m *machine) eligible(group, node string) bool {
	nodes := m.settings[group].Nodes
	return len(nodes) == 0 || slices.Contains(nodes, node)
}

// candidates lists the agents that could own group now, most preferred
// first: the order of the group's nodes when given, otherwise by
// rendezvous hashing of group and node, which spreads groups over agents.
func (m *machine) candidates(group string, now time.Time, exclude string) []string {
	var out []string
	if nodes := m.settings[group].Nodes; len(nodes) > 0 {
		for _, n := range nodes {
			if n != exclude && m.usable(n, now) {
				out = append(out, n)
			}
		}
		return out
	}
	for n := range m.members {
		if n != exclude && m.usable(n, now) {
			out = append(out, n)
		}
	}
	if !slices.Contains(out, m.cfg.node) && m.cfg.node != exclude && m.usable(m.cfg.node, now) {
		out = append(out, m.cfg.node)
	}
	sort.Slice(out, func(i, j int) bool {
		si, sj := rendezvous(group, out[i]), rendezvous(group, out[j])
		if si != sj {
			return si > sj
		}
		return out[i] < out[j]
	})
	return out
}

func rendezvous(group, node string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(group))
	h.Write([]byte{0})
	h.Write([]byte(node))
	// fnv mixes the last bytes poorly; finish with a multiply-xorshift.
	x := h.Sum64()
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	return x
}

// keepMode reports whether every other member was heard, within keepFor,
// saying it has no etcd either, in a report that still counts (counts):
// then nobody can claim (an agent that regains etcd claims nothing
// for Regain, unless this agent cleared its reports), and an owner keeps
// its addresses past its hold deadline. With no other member heard, an
// owner must assume it is the one cut off.
func (m *machine) keepMode(now time.Time) bool {
	n := 0
	for node := range m.members {
		if node == m.cfg.node {
			continue
		}
		if p := m.peers[node]; p == nil || !m.counts(p, now) {
			return false
		}
		n++
	}
	return n > 0
}

// counts reports whether p's latest "no etcd" heartbeat counts for keep
// mode: heard within keepFor, and after this agent sent its last read
// that etcd answered or its last renewal that etcd confirmed, whichever
// is earlier (an owner needs both to hold without keep mode). A report
// heard before both says only that p's reads were slow or failed while
// this agent's worked: not that etcd is gone for everyone. Once a report
// no longer counts it never will again (time, lastOK and renewedAt only
// grow), which lets cleared promise it.
func (m *machine) counts(p *peer, now time.Time) bool {
	ref := m.lastOK
	if m.renewedAt.Before(ref) {
		ref = m.renewedAt
	}
	return !p.noEtcd.IsZero() && now.Sub(p.noEtcd) <= m.cfg.t.keepFor() && p.noEtcd.After(ref)
}

// anyCounts reports whether a peer's "no etcd" report counts (counts).
func (m *machine) anyCounts(now time.Time) bool {
	for _, p := range m.peers {
		if m.counts(p, now) {
			return true
		}
	}
	return false
}

// cleared lists, for each peer that ever said it had no etcd and whose
// reports no longer count (counts), the last heartbeat heard from it: the
// peer need not wait Regain before claiming this agent's groups.
func (m *machine) cleared(now time.Time) map[string]seqNote {
	var out map[string]seqNote
	for _, p := range m.peers {
		if p.noEtcd.IsZero() || p.inc == 0 || m.counts(p, now) {
			continue
		}
		if out == nil {
			out = map[string]seqNote{}
		}
		out[p.node] = seqNote{Inc: p.inc, Seq: p.seq}
	}
	return out
}

// mayKeep reports whether node could be keeping addresses in keep mode
// on the strength of this agent's "no etcd" heartbeats: it is another
// agent and has not cleared the last of them.
func (m *machine) mayKeep(node string) bool {
	if node == m.cfg.node || m.noEtcdSeq == 0 {
		return false
	}
	p := m.peers[node]
	return p == nil || p.cleared < m.noEtcdSeq
}

// peerReport describes the peers for logs: when each was last heard and
// when it last said it had no etcd.
func (m *machine) peerReport(now time.Time) string {
	var b strings.Builder
	for _, node := range slices.Sorted(maps.Keys(m.peers)) {
		p := m.peers[node]
		fmt.Fprintf(&b, "%s(heard %v ago, etcd %v", node, now.Sub(m.heard(p)).Round(time.Millisecond), p.etcd)
		if !p.noEtcd.IsZero() {
			fmt.Fprintf(&b, ", no etcd %v ago", now.Sub(p.noEtcd).Round(time.Millisecond))
		}
		b.WriteString(") ")
	}
	return strings.TrimSpace(b.String())
}

// peerHolds reports whether a peer heard recently says it holds group.
func (m *machine) peerHolds(group string, now time.Time) bool {
	for _, p := range m.peers {
		if m.fresh(p, now) && p.groups[group] == stateHold {
			return true
		}
	}
	return false
}

// started is when this process may first claim: after its start grace,
// and Regain after its first contact with etcd (an earlier run of this
// agent may have said it had no etcd).
func (m *machine) started() time.Time {
	return maxTime(m.start.Add(m.cfg.t.StartGrace), m.joined.Add(m.cfg.t.Regain))
}

// claimFrom is when this agent may claim a group from owner (its current
// owner, or the last one when the key is gone): once started, and Regain
// after it last regained etcd, unless owner cannot be keeping the group
// on the strength of this agent's "no etcd" heartbeats: it released the
// group and said so, or it cleared them (mayKeep).
func (m *machine) claimFrom(owner string, released bool) time.Time {
	if released || !m.mayKeep(owner) {
		return m.started()
	}
	return maxTime(m.started(), m.since.Add(m.cfg.t.Regain))
}

// gate names what held a claim from owner back after the group became
// claimable at ready: the start, the regain wait, the rank's stagger, or
// none.
func (m *machine) gate(ready time.Time, rank int, owner string, released bool) string {
	switch {
	case m.started().After(ready):
		return "start"
	case m.claimFrom(owner, released).After(ready):
		return "regain"
	case rank > 0:
		return "rank"
	}
	return "none"
}

func (m *machine) mayClaim(now time.Time) bool {
	return !m.releasing && m.lease != 0 && m.member && m.etcdOK(now) && now.Sub(m.start) >= m.cfg.t.StartGrace
}

// names returns every group the machine deals with, sorted.
func (m *machine) names() []string {
	set := map[string]bool{}
	for g := range m.wanted {
		set[g] = true
	}
	for g := range m.settings {
		set[g] = true
	}
	for g, st := range m.groups {
		if m.isMine(st.owner) || st.held {
			set[g] = true
		}
	}
	return slices.Sorted(maps.Keys(set))
}

func (m *machine) wants(group string) bool {
	_, configured := m.settings[group]
	return m.wanted[group] || configured
}

func (m *machine) step(now time.Time, out []any) []any {
	t := m.cfg.t
	if m.lease == 0 && !m.granting && !m.releasing && !now.Before(m.grantAt) {
		m.granting = true
		out = append(out, effGrant{sent: now, ttl: m.cfg.ttl})
	}
	if m.lease != 0 && !m.member && !m.putting && !m.releasing && m.cfg.addr != "" {
		m.putting = true
		v, _ := json.Marshal(memberValue{Node: m.cfg.node, Addr: m.cfg.addr})
		out = append(out, effPut{key: m.cfg.membersPrefix() + m.cfg.node, value: v, lease: m.lease})
	}
	if ok := m.etcdOK(now); ok != m.contact {
		if !ok {
			m.lostAt = now
			in := time.Duration(0)
			if len(m.reads) > 0 {
				in = now.Sub(m.reads[0])
			}
			m.log.Info("ha: etcd contact lost", "since_last_ok", now.Sub(m.lastOK).Round(time.Millisecond), "read_in_flight", in.Round(time.Millisecond))
		}
		m.contact = ok
	}
	if len(m.reads) < maxReads && !now.Before(m.nextRead) && !m.released {
		m.reads, m.nextRead = append(m.reads, now), now.Add(t.Round)
		r := effRead{sent: now, prefixes: []string{m.cfg.ownersPrefix(), m.cfg.groupsPrefix(), m.cfg.membersPrefix()}}
		// Renew when due, and at once while a peer's "no etcd" report
		// counts: the renewal is what clears it (counts).
		if m.lease != 0 && !m.renewing && (now.Sub(m.renewedAt) >= m.cfg.ttl/6 || m.etcdOK(now) && m.anyCounts(now)) {
			r.renew, m.renewing = m.lease, true
		}
		out = append(out, r)
	}
	for _, p := range m.peers {
		if !m.fresh(p, now) {
			p.usable = time.Time{}
		}
	}
	for _, name := range m.names() {
		out = m.stepGroup(now, m.group(name), out)
	}
	if m.releasing && !m.released {
		out = m.stepRelease(out)
	}
	for g, at := range m.mineAt {
		if now.Sub(at) > 2*time.Second {
			delete(m.mine, g)
			delete(m.mineAt, g)
		}
	}
	return m.heartbeat(now, out)
}

// stepRelease hands everything over on a planned stop: each owned key is
// deleted first and the group's addresses dropped right after (onDelete),
// then the lease is revoked.
func (m *machine) stepRelease(out []any) []any {
	busy := m.revoking
	for _, name := range slices.Sorted(maps.Keys(m.groups)) {
		g := m.groups[name]
		if g.op == "" && m.isMine(g.owner) {
			g.op = "release"
			out = append(out, effDelete{group: g.name, key: m.cfg.ownerKey(g.name), lease: m.lease, epoch: g.owner.epoch})
		}
		busy = busy || g.op != ""
	}
	if busy {
		return out
	}
	for _, g := range m.groups {
		out = m.setHold(g, false, out)
	}
	if m.lease == 0 {
		m.released = true
		return append(out, effReleased{})
	}
	m.revoking = true
	return append(out, effRevoke{lease: m.lease})
}

func (m *machine) stepGroup(now time.Time, g *group, out []any) []any {
	t := m.cfg.t
	if m.isMine(g.owner) {
		if g.op == "" && m.etcdOK(now) && !m.releasing {
			switch {
			case !m.wants(g.name):
				g.op = "release"
				out = append(out, effDelete{group: g.name, key: m.cfg.ownerKey(g.name), lease: m.lease, epoch: g.owner.epoch})
			case m.handOver(g.name, now):
				m.log.Info("ha: handing a group over to a preferred node", "group", g.name)
				g.op = "release"
				out = append(out, effDelete{group: g.name, key: m.cfg.ownerKey(g.name), lease: m.lease, epoch: g.owner.epoch})
			case m.needTouch(now) && now.Sub(g.lastTouch) >= t.Silence/3:
				g.op, g.lastTouch = "touch", now
				v, _ := json.Marshal(ownerValue{Node: m.cfg.node, Since: g.owner.since, Epoch: g.owner.epoch})
				out = append(out, effCond{group: g.name, kind: "touch", key: m.cfg.ownerKey(g.name), sent: now, value: v, lease: m.lease})
			}
		}
		hold := m.mayHold(g, now)
		if g.held && !hold {
			m.log.Warn("ha: dropping an owned group: no confirmation from etcd in time", "group", g.name,
				"since_confirmed", now.Sub(g.confirmed), "since_renewed", now.Sub(m.renewedAt), "peers", m.peerReport(now))
		}
		return m.setHold(g, hold, out)
	}
	out = m.setHold(g, false, out)
	if g.op != "" || !m.wants(g.name) || !m.eligible(g.name, m.cfg.node) || !m.mayClaim(now) {
		return out
	}
	if g.owner == nil {
		return m.claim(now, g, out)
	}
	return m.takeover(now, g, out)
}

// mayHold is the hold rule: an owner holds only until Hold after the send
// time of its latest confirmation, and never past the point where its
// lease could have run out on the etcd side; past that only in keep mode.
func (m *machine) mayHold(g *group, now time.Time) bool {
	if now.Before(g.holdAt) || g.confirmed.IsZero() || g.gaveUp {
		return false
	}
	t := m.cfg.t
	confirmed := now.Before(g.confirmed.Add(t.Hold)) && now.Before(m.renewedAt.Add(m.cfg.ttl-t.Margin))
	if confirmed {
		return true
	}
	// Keep mode: confirmed at our last contact with etcd, and every peer
	// says etcd is gone for it too.
	return !g.confirmed.Before(m.lastOK) && g.held && m.keepMode(now)
}

// setHold tells the holder when held changes, and when the floating
// addresses of a held group change.
func (m *machine) setHold(g *group, held bool, out []any) []any {
	floating := m.settings[g.name].Addresses
	if g.held == held && (!held || slices.Equal(g.floating, floating)) {
		return out
	}
	g.held, g.floating = held, floating
	m.lastReport = ""
	return append(out, effHold{group: g.name, held: held, floating: floating})
}

// needTouch reports whether a peer may not hear this agent, so that it
// could take this agent for dead: then owned keys are rewritten often, a
// sign of life etcd carries to every agent.
func (m *machine) needTouch(now time.Time) bool {
	for _, p := range m.peers {
		if now.Sub(m.heard(p)) > m.cfg.t.Silence/2 || (m.fresh(p, now) && !p.hear[m.cfg.node]) {
			return true
		}
	}
	return false
}

// handOver reports whether an owned group should go to another agent:
// this agent is not among the group's nodes, or preempt is on and a more
// preferred agent has been alive long enough.
func (m *machine) handOver(group string, now time.Time) bool {
	var best string
	if !m.eligible(group, m.cfg.node) {
		if c := m.candidates(group, now, m.cfg.node); len(c) > 0 {
			best = c[0]
		}
	} else if m.settings[group].Preempt {
		if c := m.candidates(group, now, ""); len(c) > 0 && c[0] != m.cfg.node {
			best = c[0]
		}
	}
	if best == "" {
		return false
	}
	p := m.peers[best]
	return p != nil && !p.usable.IsZero() && now.Sub(p.usable) >= m.cfg.t.PreemptDelay
}

// claim creates the absent owner key of g once no earlier owner can still
// hold the group and this agent's turn has come.
func (m *machine) claim(now time.Time, g *group, out []any) []any {
	t := m.cfg.t
	if m.peerHolds(g.name, now) {
		return out
	}
	var safe time.Time
	p := g.prev
	prev, released := "", false
	if p != nil {
		prev, released = p.node, m.noted(g.name, p)
	}
	switch {
	case p == nil:
		// Never seen an owner: one may have been deleted by someone else
		// just before; wait out its hold deadline.
		safe = g.absent.Add(t.Hold + t.Margin)
	case p.node == m.cfg.node && m.myLeases[p.lease]:
		safe = g.absent // ours: dropped as soon as it was gone
	case released:
		safe = g.absent // the owner released it and dropped its addresses
	case g.prevLease == leaseGone:
		safe = g.absent // expired: the owner dropped before that
	case g.prevLease == leaseAlive:
		safe = g.absent.Add(t.Hold + t.Margin) // deleted by someone else
	default:
		if !g.checking {
			g.checking = true
			out = append(out, effLease{group: g.name, lease: p.lease})
		}
		return out
	}
	rank := slices.Index(m.candidates(g.name, now, ""), m.cfg.node)
	if rank < 0 {
		return out
	}
	// Less preferred agents wait a little longer, counted from when the
	// group became free to claim, so the preferred one wins the race.
	ready := maxTime(g.absent, safe)
	base := maxTime(ready, m.claimFrom(prev, released))
	if now.Before(base.Add(time.Duration(rank) * t.Stagger)) {
		return out
	}
	out = append(out, effClaim{group: g.name, kind: "create", ready: ready, gate: m.gate(ready, rank, prev, released)})
	epoch := g.viewRev + 1
	if p != nil && p.epoch >= epoch {
		epoch = p.epoch + 1
	}
	v, _ := json.Marshal(ownerValue{Node: m.cfg.node, Since: now.UTC(), Epoch: epoch})
	g.op = "create"
	return append(out, effCond{group: g.name, kind: "create", key: m.cfg.ownerKey(g.name), sent: now, value: v, lease: m.lease})
}

func (m *machine) noted(group string, p *owner) bool {
	n, ok := m.notes[group]
	return ok && n.node == p.node && n.Epoch == p.epoch
}

// takeover replaces the owner key of an owner that is gone: silent to this
// agent and its key untouched for Silence, or heard saying it lost the
// group for Hold. The new owner holds only after Hold + Margin.
func (m *machine) takeover(now time.Time, g *group, out []any) []any {
	t := m.cfg.t
	o := g.owner
	var trigger time.Time
	switch p := m.peers[o.node]; {
	case o.node == m.cfg.node:
		trigger = g.seen // a key of an earlier run of this agent
	case p == nil:
		// Not a member (its member key is gone) or unknown writer.
		if now.Sub(g.seen) > t.Silence && now.Sub(m.start) > t.Silence {
			trigger = maxTime(g.seen, m.start).Add(t.Silence)
		}
	case !m.fresh(p, now) && !p.suspect && now.Sub(g.seen) > t.Silence:
		trigger = maxTime(m.heard(p), g.seen).Add(t.Silence)
	case m.fresh(p, now) && !p.lostSince[g.name].IsZero() && now.Sub(p.lostSince[g.name]) >= t.Hold:
		trigger = p.lostSince[g.name].Add(t.Hold)
	}
	if trigger.IsZero() {
		return out
	}
	rank := slices.Index(m.candidates(g.name, now, o.node), m.cfg.node)
	if rank < 0 || now.Before(maxTime(trigger, m.claimFrom(o.node, false)).Add(time.Duration(rank)*t.Stagger)) {
		return out
	}
	out = append(out, effClaim{group: g.name, kind: "replace", ready: trigger, gate: m.gate(trigger, rank, o.node, false)})
	epoch := max(g.viewRev, o.epoch) + 1
	v, _ := json.Marshal(ownerValue{Node: m.cfg.node, Since: now.UTC(), Epoch: epoch})
	g.op = "replace"
	return append(out, effCond{group: g.name, kind: "replace", key: m.cfg.ownerKey(g.name), sent: now, value: v, lease: m.lease, modRev: o.modRev})
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// heartbeat sends this agent's state to every other member every
// Heartbeat, and at once when it changed.
func (m *machine) heartbeat(now time.Time, out []any) []any {
	h := heartbeat{V: heartbeatVersion, Node: m.cfg.node, Inc: m.cfg.inc, Etcd: m.etcdOK(now), Leaving: m.releasing}
	for _, p := range m.peers {
		if !p.heard.IsZero() && now.Sub(p.heard) <= m.cfg.t.Silence/2 {
			h.Hear = append(h.Hear, p.node)
		}
	}
	sort.Strings(h.Hear)
	for name, g := range m.groups {
		if !m.isMine(g.owner) {
			continue
		}
		if h.Groups == nil {
			h.Groups = map[string]string{}
		}
		switch {
		case g.held:
			h.Groups[name] = stateHold
		case now.Before(g.holdAt):
			h.Groups[name] = stateWait
		default:
			h.Groups[name] = stateLost
		}
	}
	if len(m.mine) > 0 {
		h.Released = maps.Clone(m.mine)
	}
	report, _ := json.Marshal(h)
	if string(report) == m.lastReport && now.Sub(m.lastSent) < m.cfg.t.Heartbeat {
		return out
	}
	var addrs []string
	for _, p := range m.peers {
		addrs = append(addrs, p.addr)
	}
	m.lastReport, m.lastSent = string(report), now
	if len(addrs) == 0 {
		return out
	}
	sort.Strings(addrs)
	m.seq++
	h.Seq = m.seq
	if !h.Etcd {
		m.noEtcdSeq = m.seq
	}
	// Not part of the report: it changes with every heartbeat heard and
	// goes out with the next one.
	h.Cleared = m.cleared(now)
	data, _ := json.Marshal(h)
	return append(out, effSend{addrs: addrs, data: data})
}

// owners returns every group's owner as last seen.
func (m *machine) owners() map[string]Owner {
	out := map[string]Owner{}
	for name, g := range m.groups {
		if g.owner != nil {
			out[name] = Owner{Node: g.owner.node, Epoch: g.owner.epoch, Since: g.owner.since}
		}
	}
	return out
}

// held returns the groups whose addresses this agent holds.
func (m *machine) heldGroups() []string {
	var out []string
	for name, g := range m.groups {
		if g.held {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}
