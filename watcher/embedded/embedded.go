// Package embedded runs a single-node etcd inside the agent's process, so
// one host works with nothing else installed and `etcdctl` works against it.
package embedded

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// Options configure the embedded etcd.
type Options struct {
	// Dir holds etcd's data.
	Dir string
	// ClientURL is where clients connect, e.g. http://127.0.0.1:2379.
	ClientURL string
	// PeerURL is the (unused by others) peer listener, e.g. http://127.0.0.1:2380.
	PeerURL string
	// Name is the member name.
	Name string
}

// Server is a running embedded etcd.
type Server struct {
	etcd *embed.Etcd
	// Endpoint is the client URL to connect to.
	Endpoint string
}

// Start starts etcd and waits until it serves clients or ctx is done.
func Start(ctx context.Context, log *slog.Logger, o Options) (*Server, error) {
	cfg := embed.NewConfig()
	cfg.Dir = o.Dir
	cfg.Name = o.Name
	if cfg.Name == "" {
		cfg.Name = "switchman"
	}
	cu, err := url.Parse(o.ClientURL)
	if err != nil {
		return nil, fmt.Errorf("client url %q: %w", o.ClientURL, err)
	}
	pu, err := url.Parse(o.PeerURL)
	if err != nil {
		return nil, fmt.Errorf("peer url %q: %w", o.PeerURL, err)
	}
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = cfg.Name + "=" + pu.String()
	cfg.LogLevel = "error"
	cfg.Logger = "zap"
	cfg.LogOutputs = []string{"stderr"}
	// Keep the single-node store from growing without bound.
	cfg.AutoCompactionMode = "periodic"
	cfg.AutoCompactionRetention = "1h"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd in %s: %w", o.Dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd: %w", err)
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("embedded etcd in %s did not become ready within 60s", o.Dir)
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	}
	log.Info("started embedded single-node etcd; etcdctl works against it", "endpoint", cu.String(), "data_dir", o.Dir)
	return &Server{etcd: e, Endpoint: cu.String()}, nil
}

// Err reports a fatal error of the running server.
func (s *Server) Err() <-chan error { return s.etcd.Err() }

// Close stops etcd.
func (s *Server) Close() { s.etcd.Close() }
