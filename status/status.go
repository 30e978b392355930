// Package status is what agents report: the value of each service's status
// key (/switchman/status/<node>/<name>) and of the node key, the publisher
// that writes them under the agent's lease, and the reader behind
// `switchman status`.
package status

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/switchman-lb/switchman/internal/backoff"
)

// Service states written to the status key.
const (
	StateApplied  = "applied"
	StateRejected = "rejected"
	StateFailed   = "failed"
)

// Status is the value of /switchman/status/<node>/<name>.
type Status struct {
	State    string `json:"state"`
	Revision int64  `json:"revision"`
	Driver   string `json:"driver"`
	Error    string `json:"error"`
	// VIP is vip:port/proto of the service in force, for `switchman status`.
	VIP         string          `json:"vip,omitempty"`
	FailingOpen bool            `json:"failing_open,omitempty"`
	Backends    []BackendStatus `json:"backends"`
	// Summary is set when Backends lists only some of the backends (see
	// Encode); it counts all of them.
	Summary *Summary `json:"backends_summary,omitempty"`
}

// Summary counts every backend of a service whose status lists only the
// first Listed of them.
type Summary struct {
	Total    int `json:"total"`
	Healthy  int `json:"healthy"`
	Draining int `json:"draining"`
	Listed   int `json:"listed"`
}

// Counts returns how many backends are healthy and how many there are,
// listed or not.
func (s Status) Counts() (healthy, total int) {
	if s.Summary != nil {
		return s.Summary.Healthy, s.Summary.Total
	}
	for _, b := range s.Backends {
		if b.Healthy {
			healthy++
		}
	}
	return healthy, len(s.Backends)
}

// BackendStatus is one backend's health and programmed weight.
type BackendStatus struct {
	Address        string     `json:"address"`
	Port           uint16     `json:"port"`
	Healthy        bool       `json:"healthy"`
	Weight         int        `json:"weight"`
	Draining       bool       `json:"draining,omitempty"`
	LastError      string     `json:"last_error,omitempty"`
	LastTransition *time.Time `json:"last_transition,omitempty"`
}

// Limits of an encoded status value. A value must fit in one etcd request
// (1.5 MiB by default) with room to spare, since `switchman status` reads
// every node's values at once; a service with 20,000 backends or an error
// text amplified by quoting must still get its status written.
const (
	// MaxValueSize bounds the encoded value.
	MaxValueSize = 64 << 10
	// MaxListedBackends is how many backends a value lists at most; the
	// others are only counted in Summary.
	MaxListedBackends = 256
	// MaxErrorText bounds the error text (in bytes, before JSON quoting);
	// what is cut is replaced by a marker that says how much.
	MaxErrorText = 4 << 10
	// maxBackendText bounds a backend's last error; maxShortText the
	// other strings (state, driver, vip, address), which the agent keeps
	// short anyway.
	maxBackendText = 256
	maxShortText   = 128
)

// Encode returns the JSON value of a status, at most MaxValueSize bytes:
// texts are cut with a marker, and past MaxListedBackends (or fewer, when
// more would not fit) the backends are summarised: the first ones are
// listed and Summary counts them all.
func Encode(st Status) []byte {
	st.State = cutText(st.State, maxShortText)
	st.Driver = cutText(st.Driver, maxShortText)
	st.VIP = cutText(st.VIP, maxShortText)
	st.Error = cutText(st.Error, MaxErrorText)
	all := st.Backends
	if all == nil {
		all = []BackendStatus{}
	}
	st.Backends = make([]BackendStatus, min(len(all), MaxListedBackends))
	for i := range st.Backends {
		b := all[i]
		b.Address = cutText(b.Address, maxShortText)
		b.LastError = cutText(b.LastError, maxBackendText)
		if t := b.LastTransition; t != nil && (t.Year() < 0 || t.Year() > 9999) {
			b.LastTransition = nil // JSON cannot hold it
		}
		st.Backends[i] = b
	}
	// Each listed backend is encoded once to find how many fit beside the
	// rest of the value (measured with the largest summary it can have).
	sum := &Summary{Total: len(all), Listed: len(st.Backends)}
	for _, b := range all {
		if b.Healthy {
			sum.Healthy++
		}
		if b.Draining {
			sum.Draining++
		}
	}
	rest := st
	rest.Backends, rest.Summary = []BackendStatus{}, sum
	base, _ := json.Marshal(rest)
	budget := MaxValueSize - len(base)
	fit := 0
	for _, b := range st.Backends {
		v, err := json.Marshal(b)
		if err != nil || budget < len(v)+1 {
			break
		}
		budget -= len(v) + 1 // and a comma
		fit++
	}
	if fit < len(all) {
		st.Backends = st.Backends[:fit]
		sum.Listed = fit
		st.Summary = sum
	}
	if v, err := json.Marshal(st); err == nil && len(v) <= MaxValueSize {
		return v
	}
	// Not reached: the texts are cut so that a status listing no backend
	// fits. Keep the promise anyway.
	v, _ := json.Marshal(Status{State: st.State, Revision: st.Revision, Driver: st.Driver, VIP: st.VIP,
		Error: "status too large to write", Backends: []BackendStatus{}, Summary: sum})
	return v
}

// cutText returns s as valid UTF-8 of at most limit bytes plus a marker
// saying how many bytes were cut.
func cutText(s string, limit int) string {
	if len(s) <= limit && utf8.ValidString(s) {
		return s
	}
	s = strings.ToValidUTF8(s, "\uFFFD")
	if len(s) <= limit {
		return s
	}
	end := limit
	for end > 0 && !utf8.RuneStart(s[end]) {
		end--
	}
	return fmt.Sprintf("%s... [%d more bytes cut]", s[:end], len(s)-end)
}

// Node is the value of /switchman/nodes/<node>.
type Node struct {
	Version string    `json:"version"`
	Drivers []string  `json:"drivers"`
	Started time.Time `json:"started"`
	// Groups are the HA groups whose addresses this agent holds.
	Groups []string `json:"groups,omitempty"`
	// IPVSSync is the state of the IPVS connection-sync daemons, when
	// --ipvs-sync-interface asks for them (or stopping them failed).
	IPVSSync *IPVSSync `json:"ipvs_sync,omitempty"`
}

// IPVSSync is an agent's IPVS connection sync in its node key.
type IPVSSync struct {
	// Interface and SyncID are the configured settings; empty when sync
	// is not configured (only Error is set then).
	Interface string `json:"interface,omitempty"`
	SyncID    int    `json:"sync_id"`
	// Running lists the roles ("master", "backup") whose daemon runs as
	// configured.
	Running []string `json:"running"`
	// Error says why a daemon does not run as configured.
	Error string `json:"error,omitempty"`
}

// Publisher writes the node key and the status keys under one lease. It
// never blocks its caller on etcd: Publish records the wanted state and a
// goroutine (Run) writes the difference, re-granting the lease and writing
// everything again after the lease was lost. A key whose write fails does
// not hold up the others; it is written again with a backoff.
type Publisher struct {
	cli    *clientv3.Client
	log    *slog.Logger
	prefix string
	node   string
	ttl    int64
	wake   chan struct{}
	// lease paces new sessions after a lost lease, retry the rewrites of
	// keys whose write failed; each starts again from its minimum after a
	// success.
	lease, retry *backoff.Backoff

	mu   sync.Mutex
	want map[string][]byte // service -> value
	// changed are the services whose wanted value was set or deleted
	// since the last write of the keys (with the keys that failed).
	changed map[string]bool
	info    Node
	nodeV   []byte // info encoded

	// held is set while a session holds its lease with the node key and
	// the status keys written.
	held atomic.Bool
}

// LeaseHeld reports whether the publisher holds its lease: granted, kept
// alive, and the node and status keys written under it. While it is
// false, this node's keys are missing or about to expire in etcd.
func (p *Publisher) LeaseHeld() bool { return p.held.Load() }

// Collector is the gauge switchman_status_lease_held: 1 while LeaseHeld.
func (p *Publisher) Collector() prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "switchman_status_lease_held",
		Help: "1 while the agent holds the lease of its status and node keys in etcd, 0 while it is lost (switchman status shows this node's services missing or stale).",
	}, func() float64 {
		if p.LeaseHeld() {
			return 1
		}
		return 0
	})
}

// NewPublisher returns a publisher for node under prefix with a lease of ttl.
func NewPublisher(cli *clientv3.Client, log *slog.Logger, prefix, node string, info Node, ttl time.Duration) (*Publisher, error) {
	nodeV, err := json.Marshal(info)
	if err != nil {
		return nil, fmt.Errorf("encode node info: %w", err)
	}
	return &Publisher{cli: cli, log: log, prefix: strings.TrimSuffix(prefix, "/"), node: node, info: info, nodeV: nodeV,
		ttl: max(int64(ttl/time.Second), 2), wake: make(chan struct{}, 1), want: map[string][]byte{}, changed: map[string]bool{},
		lease: backoff.New(500*time.Millisecond, 10*time.Second, 0.2),
		retry: backoff.New(time.Second, 30*time.Second, 0.2)}, nil
}

// SetGroups sets the HA groups this agent holds, for the node key. It
// never blocks.
func (p *Publisher) SetGroups(groups []string) {
	p.setNode(func(n *Node) { n.Groups = slices.Clone(groups) })
}

// SetIPVSSync sets the state of the IPVS connection sync, for the node
// key (nil: none to report). It never blocks.
func (p *Publisher) SetIPVSSync(s *IPVSSync) {
	if s != nil {
		c := *s
		c.Running = slices.Clone(s.Running)
		c.Error = cutText(c.Error, MaxErrorText)
		s = &c
	}
	p.setNode(func(n *Node) { n.IPVSSync = s })
}

// setNode changes the node key's value and wakes the writer.
func (p *Publisher) setNode(change func(*Node)) {
	p.mu.Lock()
	change(&p.info)
	v, err := json.Marshal(p.info)
	if err == nil {
		p.nodeV = v
	}
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// syncKeys writes the node key and the status keys that differ from
// what was written; a failed node key write is reported as the error.
func (p *Publisher) syncKeys(ctx context.Context, lease clientv3.LeaseID, written map[string][]byte, nodeWritten *[]byte) (map[string]error, error) {
	nodeErr := p.syncNode(ctx, lease, nodeWritten)
	failed, err := p.sync(ctx, lease, written, false)
	if err == nil {
		err = nodeErr
	}
	return failed, err
}

// syncNode writes the node key when its value differs from what was
// written.
func (p *Publisher) syncNode(ctx context.Context, lease clientv3.LeaseID, written *[]byte) error {
	p.mu.Lock()
	v := p.nodeV
	p.mu.Unlock()
	if string(v) == string(*written) {
		return nil
	}
	if err := p.put(ctx, p.prefix+"/nodes/"+p.node, v, lease); err != nil {
		return err
	}
	*written = v
	return nil
}

func (p *Publisher) statusPrefix() string { return p.prefix + "/status/" + p.node + "/" }

// Run keeps the lease and the keys until ctx is done. On return it revokes
// the lease, so this node's keys disappear at once on a clean shutdown.
func (p *Publisher) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		worked, err := p.session(ctx)
		if ctx.Err() != nil {
			break
		}
		if worked {
			p.lease.Reset() // an outage before this session is over
		}
		delay := p.lease.Next()
		p.log.Warn("status lease lost; retrying", "error", err, "retry_in", delay)
		select {
		case <-ctx.Done():
		case <-time.After(delay):
		}
	}
	return ctx.Err()
}

// session grants a lease, writes everything, then follows Set and Delete calls
// until the lease is lost. worked says the lease was granted and the keys
// written (some may have failed on their own and wait for a retry).
func (p *Publisher) session(ctx context.Context) (worked bool, err error) {
	gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	lease, err := p.cli.Grant(gctx, p.ttl)
	cancel()
	if err != nil {
		return false, fmt.Errorf("grant lease: %w", err)
	}
	sctx, stop := context.WithCancel(ctx)
	defer func() {
		stop()
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if ctx.Err() != nil {
			_, _ = p.cli.Revoke(rctx, lease.ID)
		}
	}()
	ka, err := p.cli.KeepAlive(sctx, lease.ID)
	if err != nil {
		return false, fmt.Errorf("keep lease alive: %w", err)
	}
	written := map[string][]byte{}
	var nodeWritten []byte
	if err := p.syncNode(ctx, lease.ID, &nodeWritten); err != nil {
		return false, err
	}
	// Remove what an earlier run left behind, then write everything.
	failed, err := p.sync(ctx, lease.ID, written, true)
	if err != nil {
		return false, err
	}
	p.held.Store(true)
	defer p.held.Store(false)
	retry := time.NewTimer(time.Hour)
	retry.Stop() // armed only while some key waits for a retry
	defer retry.Stop()
	after := func(failed map[string]error, err error) {
		if err == nil && len(failed) == 0 {
			p.retry.Reset()
			return
		}
		delay := p.retry.Next()
		if err == nil {
			names := slices.Sorted(maps.Keys(failed))
			err = failed[names[0]]
			p.log.Warn("status keys not written; retrying", "keys", len(names), "first", names[0], "error", err, "retry_in", delay)
		} else {
			p.log.Warn("write status; retrying", "error", err, "retry_in", delay)
		}
		retry.Reset(delay)
	}
	after(failed, nil)
	for {
		select {
		case <-ctx.Done():
			return true, nil
		case _, ok := <-ka:
			if !ok {
				return true, fmt.Errorf("lease %x expired or keep-alive failed", lease.ID)
			}
		case <-p.wake:
			after(p.syncKeys(ctx, lease.ID, written, &nodeWritten))
		case <-retry.C:
			after(p.syncKeys(ctx, lease.ID, written, &nodeWritten))
		}
	}
}

// sync deletes the keys no longer wanted, then writes the keys whose wanted
// value differs from what was written: those of the services set or
// deleted since the last sync, or with full every one, after listing the
// node's status keys in etcd to find stale ones. A key whose write or
// deletion fails is returned in failed, with its reason, and the others go
// on; err is set when it had to stop (etcd did not answer in time, the
// lease is gone), since every other write would fail the same way. The
// keys not written are looked at again by the next sync.
func (p *Publisher) sync(ctx context.Context, lease clientv3.LeaseID, written map[string][]byte, full bool) (failed map[string]error, err error) {
	p.mu.Lock()
	names := p.changed
	p.changed = map[string]bool{}
	var want map[string][]byte
	if full {
		want = maps.Clone(p.want)
	} else {
		want = make(map[string][]byte, len(names))
		for name := range names {
			if v, ok := p.want[name]; ok {
				want[name] = v
			}
		}
	}
	p.mu.Unlock()
	failed = map[string]error{}
	defer func() {
		// What was not written is looked at again next time.
		p.mu.Lock()
		for name := range names {
			p.changed[name] = true
		}
		p.mu.Unlock()
	}()
	if full {
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		resp, err := p.cli.Get(lctx, p.statusPrefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly())
		cancel()
		if err != nil {
			return nil, fmt.Errorf("list status keys: %w", err)
		}
		for _, kv := range resp.Kvs {
			name := strings.TrimPrefix(string(kv.Key), p.statusPrefix())
			if _, ok := want[name]; !ok {
				written[name] = nil // mark for deletion below
				names[name] = true
			}
		}
		for name := range want {
			names[name] = true
		}
	}
	// Deletions first: a status of a removed service goes even when some
	// write fails.
	for _, name := range slices.Sorted(maps.Keys(names)) {
		if _, ok := want[name]; ok {
			continue
		}
		if _, ok := written[name]; !ok {
			delete(names, name) // never written (a full sync marks the stale keys it found as written)
			continue
		}
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := p.cli.Delete(dctx, p.statusPrefix()+name)
		cancel()
		if err != nil {
			err = fmt.Errorf("delete status of %s: %w", name, err)
			if stopsAll(err) {
				return failed, err
			}
			failed[name] = err
			continue
		}
		delete(written, name)
		delete(names, name)
	}
	for _, name := range slices.Sorted(maps.Keys(want)) {
		v := want[name]
		if old, ok := written[name]; ok && string(old) == string(v) {
			delete(names, name)
			continue
		}
		if err := p.put(ctx, p.statusPrefix()+name, v, lease); err != nil {
			if stopsAll(err) {
				return failed, err
			}
			failed[name] = err
			continue
		}
		written[name] = v
		delete(names, name)
	}
	return failed, nil
}

// stopsAll tells an error that every other request would meet too (etcd
// did not answer in time, the lease is gone) from one about a key alone
// (a value too large, a key this user may not write).
func stopsAll(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) ||
		errors.Is(err, rpctypes.ErrLeaseNotFound)
}

func (p *Publisher) put(ctx context.Context, key string, v []byte, lease clientv3.LeaseID) error {
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := p.cli.Put(pctx, key, string(v), clientv3.WithLease(lease)); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
}

// ReadStatuses lists every node's status keys under prefix, by node then
// service, for `switchman status`.
func ReadStatuses(ctx context.Context, cli *clientv3.Client, prefix string) (map[string]map[string]Status, error) {
	prefix = strings.TrimSuffix(prefix, "/") + "/status/"
	resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", prefix, err)
	}
	out := map[string]map[string]Status{}
	for _, kv := range resp.Kvs {
		node, name, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), prefix), "/")
		if !ok {
			continue
		}
		var st Status
		if err := json.Unmarshal(kv.Value, &st); err != nil {
			st = Status{State: "unreadable", Error: fmt.Sprintf("status value is not JSON: %v", err)}
		}
		if out[node] == nil {
			out[node] = map[string]Status{}
		}
		out[node][name] = st
	}
	return out, nil
}
