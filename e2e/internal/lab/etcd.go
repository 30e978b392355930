package lab

import (
	"context"
	"log/slog"
	"net"
	"net/url"
	"path/filepath"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/switchman-lb/switchman/watcher"
)

// EtcdTimeout bounds one etcd call from a test.
const EtcdTimeout = 30 * time.Second

// Etcd is an etcd running inside the test process, so a test can stop and
// restart it under running agents, with a client for puts and reads. Its
// URLs stay the same across restarts.
type Etcd struct {
	t                  testing.TB
	dir                string
	clientURL, peerURL string

	mu  sync.Mutex
	srv *embed.Etcd
	cli *clientv3.Client
}

// StartEtcd starts an etcd serving clients on clientHost (an address of
// this namespace, e.g. 127.0.0.1) at a free port, and registers a cleanup
// that stops it.
func StartEtcd(t testing.TB, clientHost string) *Etcd {
	t.Helper()
	e := &Etcd{t: t, dir: filepath.Join(t.TempDir(), "etcd"),
		clientURL: "http://" + FreeAddr(t, clientHost), peerURL: "http://" + FreeAddr(t, "127.0.0.1")}
	e.Start()
	cli, err := watcher.Connect(watcher.ConnOptions{Endpoints: []string{e.clientURL}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	e.cli = cli
	t.Cleanup(func() {
		_ = cli.Close()
		e.Stop()
	})
	return e
}

// FreeAddr returns host:port with a TCP port free right now on host.
func FreeAddr(t testing.TB, host string) string {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// URL is the client URL agents connect to.
func (e *Etcd) URL() string { return e.clientURL }

// Client is the test's etcd client.
func (e *Etcd) Client() *clientv3.Client { return e.cli }

// Start starts etcd again on the same data and URLs after Stop. It logs
// nothing: the test's output goes to a serial port, which is slow under
// emulation, and etcd's errors while clients time out would flood it.
func (e *Etcd) Start() {
	e.t.Helper()
	cfg := embed.NewConfig()
	cfg.Dir, cfg.Name = e.dir, "e2e"
	cu, err := url.Parse(e.clientURL)
	if err != nil {
		e.t.Fatal(err)
	}
	pu, err := url.Parse(e.peerURL)
	if err != nil {
		e.t.Fatal(err)
	}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = cfg.Name + "=" + pu.String()
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	srv, err := embed.StartEtcd(cfg)
	if err != nil {
		e.t.Fatalf("start etcd: %v", err)
	}
	select {
	case <-srv.Server.ReadyNotify():
	case err := <-srv.Err():
		srv.Close()
		e.t.Fatalf("start etcd: %v", err)
	case <-time.After(2 * time.Minute):
		srv.Close()
		e.t.Fatal("etcd not ready after 2 minutes")
	}
	e.mu.Lock()
	e.srv = srv
	e.mu.Unlock()
}

// Stop stops etcd (a no-op when it is stopped).
func (e *Etcd) Stop() {
	e.mu.Lock()
	srv := e.srv
	e.srv = nil
	e.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// EtcdCtx is a context bounded by EtcdTimeout.
func EtcdCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), EtcdTimeout)
}

// Put writes key = value.
func (e *Etcd) Put(t testing.TB, key, value string) {
	t.Helper()
	ctx, cancel := EtcdCtx()
	defer cancel()
	if _, err := e.cli.Put(ctx, key, value); err != nil {
		t.Fatalf("etcd put %s: %v", key, err)
	}
}

// Del deletes key, or every key under it when prefix is true.
func (e *Etcd) Del(t testing.TB, key string, prefix bool) {
	t.Helper()
	ctx, cancel := EtcdCtx()
	defer cancel()
	var opts []clientv3.OpOption
	if prefix {
		opts = append(opts, clientv3.WithPrefix())
	}
	if _, err := e.cli.Delete(ctx, key, opts...); err != nil {
		t.Fatalf("etcd delete %s: %v", key, err)
	}
}

// Get returns key's value, and false when it is absent.
func (e *Etcd) Get(key string) ([]byte, bool, error) {
	ctx, cancel := EtcdCtx()
	defer cancel()
	resp, err := e.cli.Get(ctx, key)
	if err != nil || len(resp.Kvs) == 0 {
		return nil, false, err
	}
	return resp.Kvs[0].Value, true, nil
}
