// Package embedded runs a single-node etcd inside the agent's process, so
// one host works with nothing else installed and `etcdctl` works against it.
package embedded

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
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
	// AllowRemote lets ClientURL and PeerURL be other than loopback
	// addresses. The embedded etcd has neither TLS nor authentication:
	// whoever reaches it can write definitions, that is, make this host
	// answer for VIPs and send their traffic anywhere.
	AllowRemote bool
}

// Server is a running embedded etcd.
type Server struct {
	etcd  *embed.Etcd
	level zap.AtomicLevel
	// Endpoint is the client URL to connect to.
	Endpoint string
}

// Start starts etcd and waits until it serves clients or ctx is done.
// etcd's own messages (errors only) go to log.
func Start(ctx context.Context, log *slog.Logger, o Options) (*Server, error) {
	cfg := embed.NewConfig()
	cfg.Dir = o.Dir
	cfg.Name = o.Name
	if cfg.Name == "" {
		cfg.Name = "switchman"
	}
	cu, err := listenURL("--embedded-etcd-client-url", o.ClientURL, o.AllowRemote)
	if err != nil {
		return nil, err
	}
	pu, err := listenURL("--embedded-etcd-peer-url", o.PeerURL, o.AllowRemote)
	if err != nil {
		return nil, err
	}
	if o.AllowRemote && (!loopback(cu) || !loopback(pu)) {
		log.Warn("THE EMBEDDED ETCD LISTENS BEYOND THIS HOST WITHOUT TLS OR AUTHENTICATION: anyone who reaches it controls this load balancer (--embedded-etcd-allow-remote); run etcd with TLS and auth and give --etcd-endpoints instead",
			"client_url", cu.String(), "peer_url", pu.String())
	}
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = cfg.Name + "=" + pu.String()
	level := zap.NewAtomicLevelAt(zapcore.ErrorLevel)
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.New(&slogCore{log: log.With("component", "etcd"), level: level}))
	// Keep the single-node store from growing without bound.
	cfg.AutoCompactionMode = "periodic"
	cfg.AutoCompactionRetention = "1h"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd in %s: %w", o.Dir, err)
	}
	s := &Server{etcd: e, level: level, Endpoint: cu.String()}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		s.Close()
		return nil, fmt.Errorf("embedded etcd: %w", err)
	case <-time.After(60 * time.Second):
		s.Close()
		return nil, fmt.Errorf("embedded etcd in %s did not become ready within 60s", o.Dir)
	case <-ctx.Done():
		s.Close()
		return nil, ctx.Err()
	}
	log.Info("started embedded single-node etcd; etcdctl works against it", "endpoint", cu.String(), "data_dir", o.Dir)
	return s, nil
}

// listenURL parses a listen URL and, unless remote is allowed, refuses a
// host that is not a loopback address.
func listenURL(flag, raw string, allowRemote bool) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("%s %q: %w", flag, raw, err)
	}
	if !allowRemote && !loopback(u) {
		return nil, fmt.Errorf("%s %s is not a loopback address: the embedded etcd has no TLS and no authentication, so anyone who reaches it controls this load balancer; keep it on 127.0.0.1, run etcd with TLS and auth and give --etcd-endpoints, or pass --embedded-etcd-allow-remote on a network you trust", flag, raw)
	}
	return u, nil
}

// loopback tells whether a URL's host is a loopback address (or localhost).
func loopback(u *url.URL) bool {
	host := u.Hostname()
	if strings.EqualFold(host, "localhost") {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.Unmap().IsLoopback()
}

// Err reports a fatal error of the running server.
func (s *Server) Err() <-chan error { return s.etcd.Err() }

// Close stops etcd. What etcd logs while it stops (its listeners closing,
// reported as errors with stack traces) is dropped.
func (s *Server) Close() {
	s.level.SetLevel(zapcore.InvalidLevel)
	s.etcd.Close()
}

// slogCore hands etcd's zap entries at or above level to a slog logger,
// so they share the agent's format and destination.
type slogCore struct {
	log    *slog.Logger
	level  zap.AtomicLevel
	fields []zapcore.Field
}

func (c *slogCore) Enabled(l zapcore.Level) bool { return c.level.Enabled(l) }

func (c *slogCore) With(fields []zapcore.Field) zapcore.Core {
	return &slogCore{log: c.log, level: c.level, fields: append(slices.Clip(c.fields), fields...)}
}

func (c *slogCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *slogCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range append(slices.Clip(c.fields), fields...) {
		f.AddTo(enc)
	}
	keys := slices.Sorted(maps.Keys(enc.Fields))
	attrs := make([]any, 0, 2*len(keys))
	for _, k := range keys {
		attrs = append(attrs, k, enc.Fields[k])
	}
	lvl := slog.LevelError
	switch {
	case e.Level < zapcore.InfoLevel:
		lvl = slog.LevelDebug
	case e.Level < zapcore.WarnLevel:
		lvl = slog.LevelInfo
	case e.Level < zapcore.ErrorLevel:
		lvl = slog.LevelWarn
	}
	c.log.Log(context.Background(), lvl, e.Message, attrs...)
	return nil
}

func (c *slogCore) Sync() error { return nil }
