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

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
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
	keys   map[string]KV
	synced bool
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
	return &Watcher{cli: cli, log: log, opts: opts, changed: make(chan struct{}, 1), keys: map[string]KV{}}
}

// Changed fires (coalesced) whenever the copy changes.
func (w *Watcher) Changed() <-chan struct{} { return w.changed }

// Synced reports whether the first full list has completed.
func (w *Watcher) Synced() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.synced
}

// Run lists and watches until ctx is done. It never gives up: errors are
// logged and retried with backoff, and the last copy stays in place.
func (w *Watcher) Run(ctx context.Context) error {
	backoff := w.opts.MinBackoff
	first := true
	for ctx.Err() == nil {
		rev, err := w.list(ctx)
		if err == nil {
			if !first && w.opts.OnRestart != nil {
				w.opts.OnRestart("relist")
			}
			first = false
			err = w.watch(ctx, rev)
			if err == nil || ctx.Err() != nil {
				backoff = w.opts.MinBackoff
				continue
			}
			backoff = w.opts.MinBackoff // the list worked; start small again
		}
		if ctx.Err() != nil {
			break
		}
		w.log.Warn("etcd watch interrupted; keeping the last state and retrying", "error", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, w.opts.MaxBackoff)
	}
	return ctx.Err()
}

// list reads the whole prefix at one revision and replaces the copy.
func (w *Watcher) list(ctx context.Context) (int64, error) {
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	keys := map[string]KV{}
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
			if w.wanted(string(kv.Key)) {
				keys[string(kv.Key)] = KV{Value: kv.Value, CreateRevision: kv.CreateRevision, ModRevision: kv.ModRevision}
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		start = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	w.mu.Lock()
	same := w.synced && maps.EqualFunc(w.keys, keys, func(a, b KV) bool { return a.ModRevision == b.ModRevision })
	w.keys, w.rev, w.synced = keys, rev, true
	w.mu.Unlock()
	w.log.Debug("listed etcd prefix", "prefix", w.opts.Prefix, "revision", rev, "keys", len(keys))
	if !same {
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
			if !w.wanted(k) {
				continue
			}
			changed = true
			if ev.Type == mvccpb.DELETE {
				delete(w.keys, k)
			} else {
				w.keys[k] = KV{Value: ev.Kv.Value, CreateRevision: ev.Kv.CreateRevision, ModRevision: ev.Kv.ModRevision}
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

// wanted filters out the keys agents write themselves.
func (w *Watcher) wanted(key string) bool {
	rest := strings.TrimPrefix(key, w.opts.Prefix+"/")
	return !strings.HasPrefix(rest, "status/") && !strings.HasPrefix(rest, "nodes/")
}

func (w *Watcher) notify() {
	select {
	case w.changed <- struct{}{}:
	default:
	}
}

// Snapshot returns a copy of the current state, split by kind.
func (w *Watcher) Snapshot() Snapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := Snapshot{Revision: w.rev, Services: map[string]KV{}, Members: map[string]map[string]KV{}, Other: map[string]KV{}}
	svcPrefix := w.opts.Prefix + "/services/"
	memPrefix := w.opts.Prefix + "/backends/"
	for k, v := range w.keys {
		switch {
		case strings.HasPrefix(k, svcPrefix) && !strings.Contains(k[len(svcPrefix):], "/"):
			s.Services[k[len(svcPrefix):]] = v
		case strings.HasPrefix(k, memPrefix):
			svc, member, ok := strings.Cut(k[len(memPrefix):], "/")
			if !ok || strings.Contains(member, "/") {
				s.Other[k] = v
				continue
			}
			if s.Members[svc] == nil {
				s.Members[svc] = map[string]KV{}
			}
			s.Members[svc][member] = v
		default:
			s.Other[k] = v
		}
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
