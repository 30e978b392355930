package ha

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"
)

// errUnreachable is what a cut-off client gets from the fake etcd.
var errUnreachable = errors.New("fake etcd: unreachable")

// fakeEtcd is a stateful etcd: keys with create and mod revisions, leases
// that expire on the test's clock and take their keys with them, and
// faults: one client cut off, or etcd down for everyone (no leader: no
// lease expires, and all leases are renewed when it comes back, as a new
// etcd leader does).
type fakeEtcd struct {
	mu        sync.Mutex
	now       func() time.Time
	rev       int64
	kvs       map[string]KV
	leases    map[LeaseID]*fakeLease
	nextLease LeaseID
	down      bool
	cut       map[string]bool
	noRenew   map[string]bool
	// expired records when each lease ran out, revoked when it was revoked.
	expired, revoked map[LeaseID]time.Time
	// writes logs every successful write: time, client, op, key.
	writes []fakeWrite
}

type fakeLease struct {
	ttl    time.Duration
	expiry time.Time
}

type fakeWrite struct {
	at              time.Time
	client, op, key string
	lease           LeaseID
}

func newFakeEtcd(now func() time.Time) *fakeEtcd {
	return &fakeEtcd{now: now, kvs: map[string]KV{}, leases: map[LeaseID]*fakeLease{}, nextLease: 0x100,
		cut: map[string]bool{}, expired: map[LeaseID]time.Time{}, revoked: map[LeaseID]time.Time{}}
}

// client returns the Store one agent uses.
func (f *fakeEtcd) client(name string) *fakeClient { return &fakeClient{f: f, name: name} }

// expire runs out the leases that are due. f.mu is held.
func (f *fakeEtcd) expireLocked() {
	if f.down {
		return
	}
	now := f.now()
	ids := make([]LeaseID, 0, len(f.leases))
	for id := range f.leases {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	for _, id := range ids {
		if l := f.leases[id]; !now.Before(l.expiry) {
			f.expired[id] = now
			f.dropLeaseLocked(id)
		}
	}
}

func (f *fakeEtcd) expire() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.expireLocked()
}

func (f *fakeEtcd) dropLeaseLocked(id LeaseID) {
	delete(f.leases, id)
	deleted := false
	for k, kv := range f.kvs {
		if kv.Lease == id {
			if !deleted {
				f.rev++
				deleted = true
			}
			delete(f.kvs, k)
		}
	}
}

// setDown takes etcd down for everyone, or brings it back.
func (f *fakeEtcd) setDown(down bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down && !down {
		for _, l := range f.leases {
			l.expiry = f.now().Add(l.ttl)
		}
	}
	f.down = down
}

func (f *fakeEtcd) setCut(client string, cut bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cut[client] = cut
}

// adminDelete deletes a key as an operator would (etcdctl del).
func (f *fakeEtcd) adminDelete(key string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.kvs[key]; !ok {
		return false
	}
	f.rev++
	delete(f.kvs, key)
	f.writes = append(f.writes, fakeWrite{at: f.now(), client: "admin", op: "delete", key: key})
	return true
}

// adminPut writes a key as an operator would.
func (f *fakeEtcd) adminPut(key, value string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.putLocked("admin", "put", key, []byte(value), 0)
}

func (f *fakeEtcd) get(key string) (KV, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	kv, ok := f.kvs[key]
	return kv, ok
}

func (f *fakeEtcd) leaseExpiry(id LeaseID) (time.Time, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	l, ok := f.leases[id]
	if !ok {
		return time.Time{}, false
	}
	return l.expiry, true
}

func (f *fakeEtcd) putLocked(client, op, key string, value []byte, lease LeaseID) KV {
	f.rev++
	kv, ok := f.kvs[key]
	if !ok {
		kv = KV{Key: key, CreateRevision: f.rev}
	}
	kv.Value, kv.ModRevision, kv.Lease = append([]byte(nil), value...), f.rev, lease
	f.kvs[key] = kv
	f.writes = append(f.writes, fakeWrite{at: f.now(), client: client, op: op, key: key, lease: lease})
	return kv
}

// fakeClient is one agent's connection to the fake etcd.
type fakeClient struct {
	f    *fakeEtcd
	name string
}

// enter locks the store and fails for a cut-off client or a down etcd.
func (c *fakeClient) enter(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.f.mu.Lock()
	if c.f.cut[c.name] || c.f.down {
		c.f.mu.Unlock()
		return errUnreachable
	}
	c.f.expireLocked()
	return nil
}

func (c *fakeClient) Grant(ctx context.Context, ttl time.Duration) (LeaseID, error) {
	if err := c.enter(ctx); err != nil {
		return 0, err
	}
	defer c.f.mu.Unlock()
	c.f.nextLease++
	id := c.f.nextLease
	c.f.leases[id] = &fakeLease{ttl: ttl, expiry: c.f.now().Add(ttl)}
	return id, nil
}

func (c *fakeClient) KeepAliveOnce(ctx context.Context, id LeaseID) error {
	if err := c.enter(ctx); err != nil {
		return err
	}
	defer c.f.mu.Unlock()
	if c.f.noRenew[c.name] {
		return errors.New("fake etcd: renewal dropped")
	}
	l, ok := c.f.leases[id]
	if !ok {
		return fmt.Errorf("renew %x: %w", id, ErrLeaseNotFound)
	}
	l.expiry = c.f.now().Add(l.ttl)
	return nil
}

func (c *fakeClient) Revoke(ctx context.Context, id LeaseID) error {
	if err := c.enter(ctx); err != nil {
		return err
	}
	defer c.f.mu.Unlock()
	if _, ok := c.f.leases[id]; ok {
		c.f.revoked[id] = c.f.now()
		c.f.dropLeaseLocked(id)
	}
	return nil
}

func (c *fakeClient) LeaseAlive(ctx context.Context, id LeaseID) (bool, error) {
	if err := c.enter(ctx); err != nil {
		return false, err
	}
	defer c.f.mu.Unlock()
	_, ok := c.f.leases[id]
	return ok, nil
}

func (c *fakeClient) Read(ctx context.Context, prefixes ...string) (int64, [][]KV, error) {
	if err := c.enter(ctx); err != nil {
		return 0, nil, err
	}
	defer c.f.mu.Unlock()
	out := make([][]KV, len(prefixes))
	for i, p := range prefixes {
		for k, kv := range c.f.kvs {
			if strings.HasPrefix(k, p) {
				out[i] = append(out[i], kv)
			}
		}
		sort.Slice(out[i], func(a, b int) bool { return out[i][a].Key < out[i][b].Key })
	}
	return c.f.rev, out, nil
}

func (c *fakeClient) Put(ctx context.Context, key string, value []byte, lease LeaseID) error {
	if err := c.enter(ctx); err != nil {
		return err
	}
	defer c.f.mu.Unlock()
	if _, ok := c.f.leases[lease]; lease != 0 && !ok {
		return fmt.Errorf("put %s: %w", key, ErrLeaseNotFound)
	}
	c.f.putLocked(c.name, "put", key, value, lease)
	return nil
}

func (c *fakeClient) cond(ctx context.Context, op, key string, ok func(KV, bool) bool, value []byte, lease LeaseID) (bool, KV, error) {
	if err := c.enter(ctx); err != nil {
		return false, KV{}, err
	}
	defer c.f.mu.Unlock()
	if _, alive := c.f.leases[lease]; !alive {
		return false, KV{}, fmt.Errorf("%s %s: %w", op, key, ErrLeaseNotFound)
	}
	kv, present := c.f.kvs[key]
	if !ok(kv, present) {
		return false, KV{}, nil
	}
	return true, c.f.putLocked(c.name, op, key, value, lease), nil
}

func (c *fakeClient) Create(ctx context.Context, key string, value []byte, lease LeaseID) (bool, KV, error) {
	return c.cond(ctx, "create", key, func(_ KV, present bool) bool { return !present }, value, lease)
}

func (c *fakeClient) Replace(ctx context.Context, key string, modRev int64, value []byte, lease LeaseID) (bool, KV, error) {
	return c.cond(ctx, "replace", key, func(kv KV, present bool) bool { return present && kv.ModRevision == modRev }, value, lease)
}

func (c *fakeClient) Touch(ctx context.Context, key string, value []byte, lease LeaseID) (bool, KV, error) {
	return c.cond(ctx, "touch", key, func(kv KV, present bool) bool { return present && kv.Lease == lease }, value, lease)
}

func (c *fakeClient) Delete(ctx context.Context, key string, lease LeaseID) (bool, int64, error) {
	if err := c.enter(ctx); err != nil {
		return false, 0, err
	}
	defer c.f.mu.Unlock()
	kv, ok := c.f.kvs[key]
	if !ok || kv.Lease != lease {
		return false, c.f.rev, nil
	}
	c.f.rev++
	delete(c.f.kvs, key)
	c.f.writes = append(c.f.writes, fakeWrite{at: c.f.now(), client: c.name, op: "delete", key: key, lease: lease})
	return true, c.f.rev, nil
}

// failRenew makes one client's lease renewals fail (the lease then runs
// out) while its other calls work.
func (f *fakeEtcd) failRenew(client string, fail bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.noRenew == nil {
		f.noRenew = map[string]bool{}
	}
	f.noRenew[client] = fail
}
