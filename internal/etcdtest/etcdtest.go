// Package etcdtest runs a single-node etcd inside a test, on free loopback
// ports, for the packages whose tests need a real etcd.
package etcdtest

import (
	"net"
	"net/url"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// FreeAddr returns a 127.0.0.1 address whose port is free right now.
func FreeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// Start runs etcd until the test ends and returns its client URL. With
// tls, clients connect over TLS with those settings (ClientCertAuth asks
// for a client certificate).
func Start(t testing.TB, tls *transport.TLSInfo) string {
	t.Helper()
	cfg := embed.NewConfig()
	cfg.Dir = t.TempDir()
	cfg.Name = "etcdtest"
	scheme := "http://"
	if tls != nil {
		scheme = "https://"
		cfg.ClientTLSInfo = *tls
	}
	cu, _ := url.Parse(scheme + FreeAddr(t))
	pu, _ := url.Parse("http://" + FreeAddr(t))
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = cfg.Name + "=" + pu.String()
	// Quiet: etcd logs its own shutdown at error level.
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		t.Fatalf("etcd: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("etcd not ready within 60s")
	}
	return cu.String()
}
