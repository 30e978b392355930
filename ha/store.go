package ha

import (
	"context"
	"errors"
	"time"
)

// LeaseID names an etcd lease.
type LeaseID int64

// KV is one key as etcd holds it.
type KV struct {
	Key            string
	Value          []byte
	CreateRevision int64
	ModRevision    int64
	Lease          LeaseID
}

// ErrLeaseNotFound is returned by KeepAliveOnce for a lease that expired or
// was revoked.
var ErrLeaseNotFound = errors.New("lease not found")

// Store is what ha needs from etcd. Every call honours its context's
// deadline. Reads are linearizable: a read sent at time s reflects every
// write that completed before s. The conditional writes are single etcd
// transactions, so etcd alone decides between two agents.
type Store interface {
	// Grant creates a lease of ttl.
	Grant(ctx context.Context, ttl time.Duration) (LeaseID, error)
	// KeepAliveOnce renews the lease once; ErrLeaseNotFound when it is gone.
	KeepAliveOnce(ctx context.Context, id LeaseID) error
	// Revoke ends the lease and deletes its keys.
	Revoke(ctx context.Context, id LeaseID) error
	// LeaseAlive reports whether the lease still exists.
	LeaseAlive(ctx context.Context, id LeaseID) (bool, error)
	// Read returns every key under each prefix, all at one revision, in one
	// linearizable request.
	Read(ctx context.Context, prefixes ...string) (rev int64, kvs [][]KV, err error)
	// Put writes key under the lease unconditionally.
	Put(ctx context.Context, key string, value []byte, lease LeaseID) error
	// Create writes key under the lease only if the key is absent; ok
	// false means it was present. kv is the key as written.
	Create(ctx context.Context, key string, value []byte, lease LeaseID) (ok bool, kv KV, err error)
	// Replace writes key under the lease only if its ModRevision is
	// modRev (a takeover from an owner that stopped answering).
	Replace(ctx context.Context, key string, modRev int64, value []byte, lease LeaseID) (ok bool, kv KV, err error)
	// Touch rewrites key only if it is held by the lease (a sign of life
	// that etcd can see).
	Touch(ctx context.Context, key string, value []byte, lease LeaseID) (ok bool, kv KV, err error)
	// Delete deletes key only if it is held by the lease; rev is the
	// revision of the deletion.
	Delete(ctx context.Context, key string, lease LeaseID) (ok bool, rev int64, err error)
}
