// Package status is what agents report: the value of each service's status
// key (/switchman/status/<node>/<name>) and of the node key, the publisher
// that writes them under the agent's lease, and the reader behind
// `switchman status`.
package status

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
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

// Node is the value of /switchman/nodes/<node>.
type Node struct {
	Version string    `json:"version"`
	Drivers []string  `json:"drivers"`
	Started time.Time `json:"started"`
	// Groups are the HA groups whose addresses this agent holds.
	Groups []string `json:"groups,omitempty"`
}

// Publisher writes the node key and the status keys under one lease. It
// never blocks its caller on etcd: Publish records the wanted state and a
// goroutine (Run) writes the difference, re-granting the lease and writing
// everything again after the lease was lost.
type Publisher struct {
	cli    *clientv3.Client
	log    *slog.Logger
	prefix string
	node   string
	ttl    int64
	wake   chan struct{}

	mu    sync.Mutex
	want  map[string][]byte // service -> value
	info  Node
	nodeV []byte // info encoded
}

// NewPublisher returns a publisher for node under prefix with a lease of ttl.
func NewPublisher(cli *clientv3.Client, log *slog.Logger, prefix, node string, info Node, ttl time.Duration) (*Publisher, error) {
	nodeV, err := json.Marshal(info)
	if err != nil {
		return nil, fmt.Errorf("encode node info: %w", err)
	}
	return &Publisher{cli: cli, log: log, prefix: strings.TrimSuffix(prefix, "/"), node: node, info: info, nodeV: nodeV,
		ttl: max(int64(ttl/time.Second), 2), wake: make(chan struct{}, 1), want: map[string][]byte{}}, nil
}

// Publish sets the wanted status of every service; services left out have
// their status key removed.
func (p *Publisher) Publish(statuses map[string]Status) {
	want := make(map[string][]byte, len(statuses))
	for name, st := range statuses {
		v, err := json.Marshal(st)
		if err != nil {
			p.log.Error("encode status", "service", name, "error", err)
			continue
		}
		want[name] = v
	}
	p.mu.Lock()
	p.want = want
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// SetGroups sets the HA groups this agent holds, for the node key. It
// never blocks.
func (p *Publisher) SetGroups(groups []string) {
	p.mu.Lock()
	p.info.Groups = slices.Clone(groups)
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
	backoff := 500 * time.Millisecond
	for ctx.Err() == nil {
		err := p.session(ctx)
		if ctx.Err() != nil {
			break
		}
		p.log.Warn("status lease lost; retrying", "error", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 10*time.Second)
	}
	return ctx.Err()
}

// session grants a lease, writes everything, then follows Publish calls
// until the lease is lost.
func (p *Publisher) session(ctx context.Context) error {
	gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	lease, err := p.cli.Grant(gctx, p.ttl)
	cancel()
	if err != nil {
		return fmt.Errorf("grant lease: %w", err)
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
		return fmt.Errorf("keep lease alive: %w", err)
	}
	written := map[string][]byte{}
	var nodeWritten []byte
	if err := p.syncNode(ctx, lease.ID, &nodeWritten); err != nil {
		return err
	}
	// Remove what an earlier run left behind, then write everything.
	if err := p.sync(ctx, lease.ID, written, true); err != nil {
		return err
	}
	retry := time.NewTimer(time.Hour)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case _, ok := <-ka:
			if !ok {
				return fmt.Errorf("lease %x expired or keep-alive failed", lease.ID)
			}
		case <-p.wake:
			if err := p.syncNode(ctx, lease.ID, &nodeWritten); err != nil {
				p.log.Warn("write node key", "error", err)
				retry.Reset(time.Second)
			}
			if err := p.sync(ctx, lease.ID, written, false); err != nil {
				p.log.Warn("write status", "error", err)
				retry.Reset(time.Second)
			}
		case <-retry.C:
			if err := p.syncNode(ctx, lease.ID, &nodeWritten); err != nil {
				retry.Reset(time.Second)
			}
			if err := p.sync(ctx, lease.ID, written, false); err != nil {
				retry.Reset(time.Second)
			}
		}
	}
}

// sync writes the keys whose wanted value differs from what was written and
// deletes the ones no longer wanted. With full, it also lists the node's
// status keys in etcd and removes the stale ones.
func (p *Publisher) sync(ctx context.Context, lease clientv3.LeaseID, written map[string][]byte, full bool) error {
	p.mu.Lock()
	want := maps.Clone(p.want)
	p.mu.Unlock()
	if full {
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		resp, err := p.cli.Get(lctx, p.statusPrefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly())
		cancel()
		if err != nil {
			return fmt.Errorf("list status keys: %w", err)
		}
		for _, kv := range resp.Kvs {
			name := strings.TrimPrefix(string(kv.Key), p.statusPrefix())
			if _, ok := want[name]; !ok {
				written[name] = nil // mark for deletion below
			}
		}
	}
	for name, v := range want {
		if old, ok := written[name]; ok && string(old) == string(v) {
			continue
		}
		if err := p.put(ctx, p.statusPrefix()+name, v, lease); err != nil {
			return err
		}
		written[name] = v
	}
	for name := range written {
		if _, ok := want[name]; ok {
			continue
		}
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := p.cli.Delete(dctx, p.statusPrefix()+name)
		cancel()
		if err != nil {
			return fmt.Errorf("delete status of %s: %w", name, err)
		}
		delete(written, name)
	}
	return nil
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
