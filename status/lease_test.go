package status

import (
	"log/slog"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/switchman-lb/switchman/internal/logtest"
)

// TestLeaseHeldFollowsTheSession: switchman_status_lease_held is 0 while
// no session can write the node key, 1 once one holds its lease with the
// keys written, and 0 again once the lease is lost and cannot be had back.
func TestLeaseHeldFollowsTheSession(t *testing.T) {
	root, lb1 := authEtcd(t)
	ctx := testCtx(t)
	rec := &logtest.Recorder{}
	p := runPublisher(t, lb1, slog.New(rec))
	gauge := p.Collector()
	held := func() bool { return testutil.ToFloat64(gauge) == 1 }

	// No write permission: every session fails at the node key.
	waitFor(t, "two failed sessions", func() bool { return len(retries(rec)) >= 2 })
	if held() {
		t.Fatal("lease reported held while no session could write the node key")
	}
	keys := [][2]string{{"/switchman/nodes/lb1", ""}, {"/switchman/status/lb1/", clientv3.GetPrefixRangeEnd("/switchman/status/lb1/")}}
	for _, k := range keys {
		if err := grant(ctx, root, k[0], k[1], int32(clientv3.PermReadWrite)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "lease held", held)

	// Take the permission away again and revoke the lease: the session
	// ends and no new one can write the node key.
	resp, err := root.Get(ctx, "/switchman/nodes/lb1")
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("node key: %v", err)
	}
	if _, err := root.RoleRevokePermission(ctx, "switchman-lb1", keys[0][0], ""); err != nil {
		t.Fatal(err)
	}
	if _, err := root.Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "lease reported lost", func() bool { return !held() })
}
