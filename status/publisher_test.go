package status

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/switchman-lb/switchman/internal/etcdtest"
	"github.com/switchman-lb/switchman/internal/logtest"
)

// authEtcd starts an etcd with auth on: root (password root) and user lb1
// (password lb1) whose role, switchman-lb1, reads /switchman/ and nothing
// else until the test grants more. It returns clients for both.
func authEtcd(t *testing.T) (root, lb1 *clientv3.Client) {
	t.Helper()
	ep := etcdtest.Start(t, nil)
	connect := func(user, pw string) *clientv3.Client {
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, Username: user, Password: pw, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cli.Close() })
		return cli
	}
	admin := connect("", "")
	ctx := testCtx(t)
	steps := []func() error{
		func() error { _, err := admin.UserAdd(ctx, "root", "root"); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := admin.RoleAdd(ctx, "switchman-lb1"); return err },
		func() error {
			return grant(ctx, admin, "/switchman/", clientv3.GetPrefixRangeEnd("/switchman/"), int32(clientv3.PermRead))
		},
		func() error { _, err := admin.UserAdd(ctx, "lb1", "lb1"); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "lb1", "switchman-lb1"); return err },
		func() error { _, err := admin.AuthEnable(ctx); return err },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("auth setup step %d: %v", i, err)
		}
	}
	return connect("root", "root"), connect("lb1", "lb1")
}

func grant(ctx context.Context, cli *clientv3.Client, key, end string, perm int32) error {
	_, err := cli.RoleGrantPermission(ctx, "switchman-lb1", key, end, clientv3.PermissionType(perm))
	return err
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// retries returns the retry_in of every "status lease lost" record.
func retries(rec *logtest.Recorder) []time.Duration {
	var out []time.Duration
	for _, r := range rec.Records() {
		if r.Message != "status lease lost; retrying" {
			continue
		}
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "retry_in" {
				out = append(out, a.Value.Duration())
			}
			return true
		})
	}
	return out
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 60s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func runPublisher(t *testing.T, cli *clientv3.Client, log *slog.Logger) *Publisher {
	t.Helper()
	p, err := NewPublisher(cli, log, "/switchman", "lb1", Node{Version: "test"}, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = p.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return p
}

func value(ctx context.Context, cli *clientv3.Client, key string) ([]byte, bool) {
	resp, err := cli.Get(ctx, key)
	if err != nil || len(resp.Kvs) == 0 {
		return nil, false
	}
	return resp.Kvs[0].Value, true
}

// TestPublisherOneFailedWriteBlocksNothing: a status over etcd's request
// limit (19,999 backends) is written summarised; a key this agent may not
// write fails alone: the other keys are written and the stale status of a
// removed service is deleted all the same, and the failed key is written
// once it can be (it used to stop the publisher before its deletions).
func TestPublisherOneFailedWriteBlocksNothing(t *testing.T) {
	root, lb1 := authEtcd(t)
	ctx := testCtx(t)
	if _, err := root.Put(ctx, "/switchman/status/lb1/old", `{"state":"applied"}`); err != nil {
		t.Fatal(err)
	}
	// lb1 may write its node key and its status keys, except .../bad.
	pfx := "/switchman/status/lb1/"
	for _, r := range [][2]string{{"/switchman/nodes/lb1", ""}, {pfx, pfx + "bad"}, {pfx + "bad\x00", clientv3.GetPrefixRangeEnd(pfx)}} {
		if err := grant(ctx, root, r[0], r[1], int32(clientv3.PermReadWrite)); err != nil {
			t.Fatal(err)
		}
	}
	p := runPublisher(t, lb1, slog.New(slog.DiscardHandler))
	small := Status{State: StateApplied, Driver: "ipvs", Backends: manyBackends(2)}
	for name, st := range map[string]Status{"a": small, "bad": small, "big": {State: StateApplied, Driver: "ipvs", Backends: manyBackends(19_999)}, "z": small} {
		p.Set(name, st)
	}

	waitFor(t, "statuses a, big and z written, old deleted", func() bool {
		_, a := value(ctx, root, pfx+"a")
		_, z := value(ctx, root, pfx+"z")
		_, big := value(ctx, root, pfx+"big")
		_, old := value(ctx, root, pfx+"old")
		return a && z && big && !old
	})
	v, _ := value(ctx, root, pfx+"big")
	if st := decode(t, v); len(v) > MaxValueSize || st.Summary == nil || st.Summary.Total != 19_999 {
		t.Errorf("status of big: %d bytes, summary %+v", len(v), st.Summary)
	}
	if _, bad := value(ctx, root, pfx+"bad"); bad {
		t.Fatal("bad written without permission")
	}
	if err := grant(ctx, root, pfx+"bad", "", int32(clientv3.PermReadWrite)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "status of bad written on a retry", func() bool { _, ok := value(ctx, root, pfx+"bad"); return ok })
}

// TestPublisherLeaseBackoffResets: the delay before a new lease grows
// while sessions fail, and starts again from its minimum after a session
// that worked (it used to stay at its maximum after an outage).
func TestPublisherLeaseBackoffResets(t *testing.T) {
	root, lb1 := authEtcd(t)
	ctx := testCtx(t)
	// No write permission yet: each session fails at the node key.
	rec := &logtest.Recorder{}
	runPublisher(t, lb1, slog.New(rec))
	waitFor(t, "three failed sessions", func() bool { return len(retries(rec)) >= 3 })
	grown := retries(rec)
	if last := grown[len(grown)-1]; last < time.Second {
		t.Fatalf("retry delays %v do not grow", grown)
	}
	for _, k := range [][2]string{{"/switchman/nodes/lb1", ""}, {"/switchman/status/lb1/", clientv3.GetPrefixRangeEnd("/switchman/status/lb1/")}} {
		if err := grant(ctx, root, k[0], k[1], int32(clientv3.PermReadWrite)); err != nil {
			t.Fatal(err)
		}
	}
	var lease clientv3.LeaseID
	waitFor(t, "a session that works", func() bool {
		resp, err := root.Get(ctx, "/switchman/nodes/lb1")
		if err != nil || len(resp.Kvs) == 0 {
			return false
		}
		lease = clientv3.LeaseID(resp.Kvs[0].Lease)
		return true
	})
	before := len(retries(rec))
	if _, err := root.Revoke(ctx, lease); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		t.Fatal(err)
	}
	waitFor(t, "the lost lease noticed", func() bool { return len(retries(rec)) > before })
	all := retries(rec)
	if d := all[before]; d > 500*time.Millisecond {
		t.Errorf("after a session that worked, the next lease is %v away; want at most the minimum 500ms (delays: %v)", d, all)
	}
}

// TestPublisherWritesOnlyWhatChanged: with 500 statuses written, setting
// one and deleting another writes those two keys and no other, and setting
// a value already written writes nothing.
func TestPublisherWritesOnlyWhatChanged(t *testing.T) {
	ep := etcdtest.Start(t, nil)
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	ctx := testCtx(t)
	p := runPublisher(t, cli, slog.New(slog.DiscardHandler))
	pfx := "/switchman/status/lb1/"
	st := Status{State: StateApplied, Driver: "ipvs", Backends: manyBackends(2)}
	for i := range 500 {
		p.Set(fmt.Sprintf("s%03d", i), st)
	}
	waitFor(t, "500 statuses written", func() bool {
		resp, err := cli.Get(ctx, pfx, clientv3.WithPrefix(), clientv3.WithCountOnly())
		return err == nil && resp.Count == 500
	})
	resp, err := cli.Get(ctx, pfx, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	wch := cli.Watch(ctx, pfx, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	changed := st
	changed.State = StateFailed
	p.Set("s042", changed)
	p.Delete("s100")
	p.Set("s200", st) // the same value: nothing to write
	seen := map[string]int{}
	for len(seen) < 2 {
		select {
		case wr := <-wch:
			for _, ev := range wr.Events {
				seen[strings.TrimPrefix(string(ev.Kv.Key), pfx)]++
			}
		case <-ctx.Done():
			t.Fatalf("events seen: %v", seen)
		}
	}
	// Anything else written would show up after the two events: a put
	// that settles the publisher's state is the last word.
	p.Set("s499", changed)
	for seen["s499"] == 0 {
		wr := <-wch
		for _, ev := range wr.Events {
			seen[strings.TrimPrefix(string(ev.Kv.Key), pfx)]++
		}
	}
	if want := map[string]int{"s042": 1, "s100": 1, "s499": 1}; !maps.Equal(seen, want) {
		t.Errorf("keys written: %v, want %v", seen, want)
	}
}
