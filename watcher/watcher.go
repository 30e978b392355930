// Package watcher keeps a local copy of switchman's keys in etcd: an initial
// Get of the prefix at revision R, then a Watch from R+1. When the watch
// breaks or its revision is compacted away, it lists again and resumes;
// while etcd is unreachable the last copy stands and nothing is torn down.
package watcher

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/connectivity"

	"github.com/switchman-lb/switchman/internal/backoff"
)

// KV is one key's value with its etcd revisions.
type KV struct {
	Value          []byte
	CreateRevision int64
	ModRevision    int64
}

// Snapshot is a consistent copy of the definitions under the prefix at
// Revision. Keys are relative to the prefix's sub-folders.
type Snapshot struct {
	Revision int64
	// Services maps a service name to its definition.
	Services map[string]KV
	// Members maps a service name to its pool members by member name.
	Members map[string]map[string]KV
	// Other holds every other key under the prefix that is not written by
	// agents (status/, nodes/), by its full key, e.g. certificates.
	Other map[string]KV
}

// Options configure a Watcher.
type Options struct {
	// Prefix is the key prefix, e.g. /switchman (no trailing slash).
	Prefix string
	// MinBackoff and MaxBackoff bound the retry delay after an error.
	MinBackoff, MaxBackoff time.Duration
	// OnRestart is called each time the watch is re-established after the
	// first list (for a metric).
	OnRestart func(reason string)
}

// Watcher mirrors the prefix. Run it, then read Snapshot after each signal
// on Changed.
type Watcher struct {
	cli     *clientv3.Client
	log     *slog.Logger
	opts    Options
	changed chan struct{}

	mu     sync.Mutex
	rev    int64
	store  store
	dirty  Changes
	synced bool
	// watching is set while a watch runs on a fresh list.
	watching bool
}

// Changes names what changed since the last TakeChanges: services whose
// definition or pool changed, and other keys (certificates, groups) by
// their full key.
type Changes struct {
	Services map[string]bool
	Other    map[string]bool
}

// Empty reports whether nothing changed.
func (c Changes) Empty() bool { return len(c.Services) == 0 && len(c.Other) == 0 }

// store is the local copy, indexed the way the loop reads it.
type store struct {
	services map[string]KV
	members  map[string]map[string]KV
	other    map[string]KV
}

func newStore() store {
	return store{services: map[string]KV{}, members: map[string]map[string]KV{}, other: map[string]KV{}}
}

// New returns a watcher over cli.
func New(cli *clientv3.Client, log *slog.Logger, opts Options) *Watcher {
	opts.Prefix = strings.TrimSuffix(opts.Prefix, "/")
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = 200 * time.Millisecond
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 10 * time.Second
	}
	return &Watcher{cli: cli, log: log, opts: opts, changed: make(chan struct{}, 1), store: newStore(), dirty: newChanges()}
}

// Changed fires (coalesced) whenever the copy changes.
func (w *Watcher) Changed() <-chan struct{} { return w.changed }

// Synced reports whether the first full list has completed.
func (w *Watcher) Synced() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.synced
}

// Connected reports whether the watcher is in touch with etcd: its watch
// runs on a fresh list and the client's connection is up. A watch whose
// connection broke is resumed by the client without telling the watcher,
// so the connection's state is asked too.
func (w *Watcher) Connected() bool {
	w.mu.Lock()
	watching := w.watching
	w.mu.Unlock()
	return watching && w.cli.ActiveConnection().GetState() == connectivity.Ready
}

// Collector is the gauge switchman_etcd_connected: 1 while Connected.
func (w *Watcher) Collector() prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "switchman_etcd_connected",
		Help: "1 while the agent's etcd watch runs on an established connection, 0 while etcd is unreachable (the data plane keeps its last state).",
	}, func() float64 {
		if w.Connected() {
			return 1
		}
		return 0
	})
}

func (w *Watcher) setWatching(v bool) {
	w.mu.Lock()
	w.watching = v
	w.mu.Unlock()
}

// Run lists and watches until ctx is done. It never gives up: errors are
// logged and retried with backoff, and the last copy stays in place.
func (w *Watcher) Run(ctx context.Context) error {
	retry := backoff.New(w.opts.MinBackoff, w.opts.MaxBackoff, 0.2)
	first := true
	for ctx.Err() == nil {
		rev, err := w.list(ctx)
		if err == nil {
			if !first && w.opts.OnRestart != nil {
				w.opts.OnRestart("relist")
			}
			first = false
			retry.Reset() // the list worked; start small again
			w.setWatching(true)
			err = w.watch(ctx, rev)
			w.setWatching(false)
			if err == nil || ctx.Err() != nil {
				continue
			}
		}
		if ctx.Err() != nil {
			break
		}
		delay := retry.Next()
		w.log.Warn("etcd watch interrupted; keeping the last state and retrying", "error", err, "retry_in", delay)
		select {
		case <-ctx.Done():
		case <-time.After(delay):
		}
	}
	return ctx.Err()
}

// list reads the whole prefix at one revision and replaces the copy.
func (w *Watcher) list(ctx context.Context) (int64, error) {
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	next := newStore()
	var rev int64
	start := w.opts.Prefix + "/"
	end := clientv3.GetPrefixRangeEnd(start)
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(1000), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := w.cli.Get(lctx, start, opts...)
		if err != nil {
			return 0, fmt.Errorf("list %s: %w", w.opts.Prefix, err)
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			next.put(w.opts.Prefix, string(kv.Key), KV{Value: kv.Value, CreateRevision: kv.CreateRevision, ModRevision: kv.ModRevision})
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		start = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	w.mu.Lock()
	changed := w.store.diff(next, w.dirty)
	if !w.synced {
		// The first list: everything is new to the loop.
		changed = true
	}
	w.store, w.rev, w.synced = next, rev, true
	w.mu.Unlock()
	w.log.Debug("listed etcd prefix", "prefix", w.opts.Prefix, "revision", rev, "services", len(next.services))
	if changed {
		w.notify()
	}
	return rev, nil
}

// watch follows changes from rev+1 until the watch breaks.
func (w *Watcher) watch(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	ch := w.cli.Watch(wctx, w.opts.Prefix+"/", clientv3.WithPrefix(), clientv3.WithRev(rev+1), clientv3.WithProgressNotify())
	for resp := range ch {
		if err := resp.Err(); err != nil {
			if errors.Is(err, rpctypes.ErrCompacted) {
				return fmt.Errorf("watch from revision %d: compacted at %d: %w", rev+1, resp.CompactRevision, err)
			}
			return fmt.Errorf("watch: %w", err)
		}
		if resp.Canceled {
			return errors.New("watch canceled by the server")
		}
		changed := false
		w.mu.Lock()
		for _, ev := range resp.Events {
			k := string(ev.Kv.Key)
			if ev.Type == mvccpb.DELETE {
				changed = w.store.remove(w.opts.Prefix, k, w.dirty) || changed
			} else {
				kv := KV{Value: ev.Kv.Value, CreateRevision: ev.Kv.CreateRevision, ModRevision: ev.Kv.ModRevision}
				changed = w.store.put(w.opts.Prefix, k, kv, w.dirty) || changed
			}
		}
		if resp.Header.Revision > w.rev {
			w.rev = resp.Header.Revision
		}
		rev = w.rev
		w.mu.Unlock()
		if changed {
			w.notify()
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	return errors.New("watch channel closed")
}

// Kinds of keys under the prefix.
const (
	kindIgnored = iota // written by agents: status/, nodes/, owners/
	kindService
	kindMember
	kindOther
)

// classify splits a full key into its kind and names. A service key's
// name is everything after services/ (a name with a slash is kept, and the
// loop rejects it as not a DNS label); a member key is backends/<svc>/<rest>.
func classify(prefix, key string) (kind int, svc, member string) {
	rest, ok := strings.CutPrefix(key, prefix+"/")
	if !ok {
		return kindIgnored, "", ""
	}
	switch {
	case strings.HasPrefix(rest, "status/"), strings.HasPrefix(rest, "nodes/"), strings.HasPrefix(rest, "owners/"):
		return kindIgnored, "", ""
	case strings.HasPrefix(rest, "services/"):
		if name := rest[len("services/"):]; name != "" {
			return kindService, name, ""
		}
	case strings.HasPrefix(rest, "backends/"):
		if svc, member, ok := strings.Cut(rest[len("backends/"):], "/"); ok && svc != "" && member != "" {
			return kindMember, svc, member
		}
	}
	return kindOther, "", ""
}

// put stores one key and records the change in dirty (nil: record
// nothing). It reports whether the key is one the loop reads.
func (s *store) put(prefix, key string, kv KV, dirty ...Changes) bool {
	kind, svc, member := classify(prefix, key)
	switch kind {
	case kindService:
		s.services[svc] = kv
		mark(dirty, svc, "")
	case kindMember:
		if s.members[svc] == nil {
			s.members[svc] = map[string]KV{}
		}
		s.members[svc][member] = kv
		mark(dirty, svc, "")
	case kindOther:
		s.other[key] = kv
		mark(dirty, "", key)
	default:
		return false
	}
	return true
}

// remove deletes one key, like put.
func (s *store) remove(prefix, key string, dirty ...Changes) bool {
	kind, svc, member := classify(prefix, key)
	switch kind {
	case kindService:
		delete(s.services, svc)
		mark(dirty, svc, "")
	case kindMember:
		delete(s.members[svc], member)
		if len(s.members[svc]) == 0 {
			delete(s.members, svc)
		}
		mark(dirty, svc, "")
	case kindOther:
		delete(s.other, key)
		mark(dirty, "", key)
	default:
		return false
	}
	return true
}

func mark(dirty []Changes, svc, other string) {
	for _, d := range dirty {
		if svc != "" {
			d.Services[svc] = true
		}
		if other != "" {
			d.Other[other] = true
		}
	}
}

// diff records in dirty every difference between s and next (by mod
// revision) and reports whether there was any.
func (s *store) diff(next store, dirty Changes) bool {
	n := len(dirty.Services) + len(dirty.Other)
	same := func(a, b KV) bool { return a.ModRevision == b.ModRevision }
	for name, kv := range next.services {
		if old, ok := s.services[name]; !ok || !same(old, kv) {
			dirty.Services[name] = true
		}
	}
	for name := range s.services {
		if _, ok := next.services[name]; !ok {
			dirty.Services[name] = true
		}
	}
	for name, m := range next.members {
		if !maps.EqualFunc(m, s.members[name], same) {
			dirty.Services[name] = true
		}
	}
	for name := range s.members {
		if _, ok := next.members[name]; !ok {
			dirty.Services[name] = true
		}
	}
	for key, kv := range next.other {
		if old, ok := s.other[key]; !ok || !same(old, kv) {
			dirty.Other[key] = true
		}
	}
	for key := range s.other {
		if _, ok := next.other[key]; !ok {
			dirty.Other[key] = true
		}
	}
	return len(dirty.Services)+len(dirty.Other) > n
}

func newChanges() Changes { return Changes{Services: map[string]bool{}, Other: map[string]bool{}} }

func (w *Watcher) notify() {
	select {
	case w.changed <- struct{}{}:
	default:
	}
}

// TakeChanges returns what changed since the last call and forgets it.
// Before the first full list completes it returns nothing.
func (w *Watcher) TakeChanges() Changes {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.synced {
		return newChanges()
	}
	c := w.dirty
	w.dirty = newChanges()
	return c
}

// ServiceNames lists every service name in the copy.
func (w *Watcher) ServiceNames() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	names := make([]string, 0, len(w.store.services)+len(w.store.members))
	for n := range w.store.services {
		names = append(names, n)
	}
	for n := range w.store.members {
		if _, ok := w.store.services[n]; !ok {
			names = append(names, n)
		}
	}
	return names
}

// Service returns one service's definition and pool members (a copy of
// the map; the values are shared and must not be modified). ok is false
// when the definition key does not exist.
func (w *Watcher) Service(name string) (def KV, members map[string]KV, ok bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	def, ok = w.store.services[name]
	return def, maps.Clone(w.store.members[name]), ok
}

// Value returns any other key under the prefix (a certificate, a group's
// settings) by its full key.
func (w *Watcher) Value(key string) (KV, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	kv, ok := w.store.other[key]
	return kv, ok
}

// Revision is the etcd revision the copy is at.
func (w *Watcher) Revision() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.rev
}

// Snapshot returns a copy of the whole current state, split by kind.
func (w *Watcher) Snapshot() Snapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := Snapshot{Revision: w.rev, Services: maps.Clone(w.store.services), Members: make(map[string]map[string]KV, len(w.store.members)), Other: maps.Clone(w.store.other)}
	for n, m := range w.store.members {
		s.Members[n] = maps.Clone(m)
	}
	return s
}

// ReadOnce lists the prefix once and returns it as a snapshot.
func ReadOnce(ctx context.Context, cli *clientv3.Client, prefix string) (Snapshot, error) {
	w := New(cli, slog.New(slog.DiscardHandler), Options{Prefix: prefix})
	if _, err := w.list(ctx); err != nil {
		return Snapshot{}, err
	}
	return w.Snapshot(), nil
}
