package ha

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Etcd is the Store over an etcd v3 client.
type Etcd struct{ cli *clientv3.Client }

// NewEtcd returns the Store of cli.
func NewEtcd(cli *clientv3.Client) *Etcd { return &Etcd{cli: cli} }

// Grant implements Store. etcd rounds a TTL up to whole seconds (and to
// its own minimum).
func (e *Etcd) Grant(ctx context.Context, ttl time.Duration) (LeaseID, error) {
	secs := int64((ttl + time.Second - 1) / time.Second)
	r, err := e.cli.Grant(ctx, secs)
	if err != nil {
		return 0, fmt.Errorf("grant lease of %ds: %w", secs, err)
	}
	return LeaseID(r.ID), nil
}

// KeepAliveOnce implements Store.
func (e *Etcd) KeepAliveOnce(ctx context.Context, id LeaseID) error {
	_, err := e.cli.KeepAliveOnce(ctx, clientv3.LeaseID(id))
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("renew lease %x: %w", id, ErrLeaseNotFound)
	}
	if err != nil {
		return fmt.Errorf("renew lease %x: %w", id, err)
	}
	return nil
}

// Revoke implements Store.
func (e *Etcd) Revoke(ctx context.Context, id LeaseID) error {
	if _, err := e.cli.Revoke(ctx, clientv3.LeaseID(id)); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("revoke lease %x: %w", id, err)
	}
	return nil
}

// LeaseAlive implements Store.
func (e *Etcd) LeaseAlive(ctx context.Context, id LeaseID) (bool, error) {
	r, err := e.cli.TimeToLive(ctx, clientv3.LeaseID(id))
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("look up lease %x: %w", id, err)
	}
	return r.TTL > 0, nil
}

// Read implements Store with one read-only transaction, which etcd serves
// linearizably.
func (e *Etcd) Read(ctx context.Context, prefixes ...string) (int64, [][]KV, error) {
	ops := make([]clientv3.Op, len(prefixes))
	for i, p := range prefixes {
		ops[i] = clientv3.OpGet(p, clientv3.WithPrefix())
	}
	r, err := e.cli.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return 0, nil, fmt.Errorf("read %v: %w", prefixes, err)
	}
	out := make([][]KV, len(prefixes))
	for i, resp := range r.Responses {
		for _, kv := range resp.GetResponseRange().Kvs {
			out[i] = append(out[i], KV{Key: string(kv.Key), Value: kv.Value, CreateRevision: kv.CreateRevision,
				ModRevision: kv.ModRevision, Lease: LeaseID(kv.Lease)})
		}
	}
	return r.Header.Revision, out, nil
}

// Put implements Store.
func (e *Etcd) Put(ctx context.Context, key string, value []byte, lease LeaseID) error {
	if _, err := e.cli.Put(ctx, key, string(value), clientv3.WithLease(clientv3.LeaseID(lease))); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
}

// Create implements Store.
func (e *Etcd) Create(ctx context.Context, key string, value []byte, lease LeaseID) (bool, KV, error) {
	return e.cond(ctx, "create", key, clientv3.Compare(clientv3.CreateRevision(key), "=", 0), value, lease)
}

// Replace implements Store.
func (e *Etcd) Replace(ctx context.Context, key string, modRev int64, value []byte, lease LeaseID) (bool, KV, error) {
	return e.cond(ctx, "replace", key, clientv3.Compare(clientv3.ModRevision(key), "=", modRev), value, lease)
}

// Touch implements Store.
func (e *Etcd) Touch(ctx context.Context, key string, value []byte, lease LeaseID) (bool, KV, error) {
	return e.cond(ctx, "touch", key, clientv3.Compare(clientv3.LeaseValue(key), "=", clientv3.LeaseID(lease)), value, lease)
}

// cond puts key under lease if cmp holds, in one transaction, and reads the
// key back in the same transaction.
func (e *Etcd) cond(ctx context.Context, what, key string, cmp clientv3.Cmp, value []byte, lease LeaseID) (bool, KV, error) {
	r, err := e.cli.Txn(ctx).If(cmp).
		Then(clientv3.OpPut(key, string(value), clientv3.WithLease(clientv3.LeaseID(lease))), clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return false, KV{}, fmt.Errorf("%s %s: %w", what, key, err)
	}
	if !r.Succeeded {
		return false, KV{}, nil
	}
	kvs := r.Responses[1].GetResponseRange().Kvs
	if len(kvs) != 1 {
		return false, KV{}, fmt.Errorf("%s %s: the key is missing right after the write", what, key)
	}
	kv := kvs[0]
	return true, KV{Key: key, Value: kv.Value, CreateRevision: kv.CreateRevision, ModRevision: kv.ModRevision, Lease: LeaseID(kv.Lease)}, nil
}

// Delete implements Store.
func (e *Etcd) Delete(ctx context.Context, key string, lease LeaseID) (bool, int64, error) {
	r, err := e.cli.Txn(ctx).If(clientv3.Compare(clientv3.LeaseValue(key), "=", clientv3.LeaseID(lease))).
		Then(clientv3.OpDelete(key)).Commit()
	if err != nil {
		return false, 0, fmt.Errorf("delete %s: %w", key, err)
	}
	return r.Succeeded, r.Header.Revision, nil
}
