package status_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/switchman-lb/switchman/status"
	"github.com/switchman-lb/switchman/watcher"
	"github.com/switchman-lb/switchman/watcher/embedded"
)

func freeURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return "http://" + ln.Addr().String()
}

// etcd starts an etcd in the test process and returns a client.
func etcd(t *testing.T) *clientv3.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srv, err := embedded.Start(ctx, slog.New(slog.DiscardHandler), embedded.Options{Dir: t.TempDir(), ClientURL: freeURL(t), PeerURL: freeURL(t), Name: "status"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	cli, err := watcher.Connect(watcher.ConnOptions{Endpoints: []string{srv.Endpoint}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// TestGroupsAndNodeKey: the group table reads owners, settings and
// members; the node key follows the groups the agent holds.
func TestGroupsAndNodeKey(t *testing.T) {
	cli := etcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	since := time.Date(2026, 11, 30, 8, 0, 0, 0, time.UTC)
	for k, v := range map[string]string{
		"/switchman/owners/web":   `{"node":"lb1","since":"2026-11-30T08:00:00Z","epoch":7}`,
		"/switchman/owners/bad":   `not json`,
		"/switchman/groups/web":   `{"addresses":[{"address":"10.10.0.254/24","interface":"eth2"}]}`,
		"/switchman/groups/db":    "nodes: [lb3, lb2]\n",
		"/switchman/members/lb1":  `{"node":"lb1","addr":"10.20.0.11:7947"}`,
		"/switchman/members/lb2":  `{"node":"lb2","addr":"10.20.0.12:7947"}`,
		"/switchman/members/lb9":  `{"node":"lb9","addr":"10.20.0.19:7947"}`,
		"/other/owners/elsewhere": `{"node":"x"}`,
	} {
		if _, err := cli.Put(ctx, k, v); err != nil {
			t.Fatal(err)
		}
	}
	got, err := status.ReadGroups(ctx, cli, "/switchman/")
	if err != nil {
		t.Fatal(err)
	}
	want := []status.Group{
		{Name: "bad", Standbys: []string{"lb1", "lb2", "lb9"}},
		{Name: "db", Standbys: []string{"lb2"}},
		{Name: "web", Owner: "lb1", Since: since, Epoch: 7, Standbys: []string{"lb2", "lb9"}},
	}
	if len(got) != len(want) {
		t.Fatalf("groups %+v, want %+v", got, want)
	}
	for i := range want {
		g := got[i]
		if g.Name != want[i].Name || g.Owner != want[i].Owner || !g.Since.Equal(want[i].Since) || g.Epoch != want[i].Epoch || !slices.Equal(g.Standbys, want[i].Standbys) {
			t.Errorf("group %d: %+v, want %+v", i, g, want[i])
		}
	}
	if got[0].Error == "" {
		t.Error("an unreadable owner value is not reported")
	}

	pub, err := status.NewPublisher(cli, slog.New(slog.DiscardHandler), "/switchman", "lb1", status.Node{Version: "test"}, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- pub.Run(runCtx) }()
	defer func() { stop(); <-done }()
	node := func() status.Node {
		resp, err := cli.Get(ctx, "/switchman/nodes/lb1")
		if err != nil || len(resp.Kvs) == 0 {
			return status.Node{}
		}
		var n status.Node
		_ = json.Unmarshal(resp.Kvs[0].Value, &n)
		return n
	}
	waitNode := func(what string, cond func(status.Node) bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !cond(node()) {
			if time.Now().After(deadline) {
				t.Fatalf("node key: %s not seen in 30s: %+v", what, node())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitNode("written", func(n status.Node) bool { return n.Version == "test" && n.Groups == nil })
	pub.SetGroups([]string{"db", "web"})
	waitNode("groups db, web", func(n status.Node) bool { return slices.Equal(n.Groups, []string{"db", "web"}) })
	pub.SetGroups(nil)
	waitNode("no groups", func(n status.Node) bool { return n.Version == "test" && len(n.Groups) == 0 })
}
