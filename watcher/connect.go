package watcher

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ConnOptions say how to reach etcd.
type ConnOptions struct {
	Endpoints []string
	// CA, Cert and Key are PEM files for TLS; CA alone verifies the server,
	// Cert and Key add a client certificate.
	CA, Cert, Key string
	// User and Password authenticate with etcd's auth.
	User, Password string
	DialTimeout    time.Duration
}

// Connect returns an etcd client. It does not wait for etcd to answer; use
// Check for that. With a user name it must log in, so it first makes sure
// the endpoints can be reached: a refused connection or a failed TLS
// handshake is returned at once, with its cause, rather than after the
// dial timeout as "did not answer in time".
func Connect(o ConnOptions, log *slog.Logger) (*clientv3.Client, error) {
	if len(o.Endpoints) == 0 {
		return nil, errors.New("no etcd endpoints given")
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 5 * time.Second
	}
	cfg := clientv3.Config{
		Endpoints:   o.Endpoints,
		DialTimeout: o.DialTimeout,
		Username:    o.User,
		Password:    o.Password,
		Logger:      zap.NewNop(),
		// Reconnect quickly after etcd comes back.
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		RejectOldCluster:     false,
		// gRPC's default reconnect backoff grows to 2 minutes: after an
		// outage an agent would learn that etcd is back seconds after its
		// peers, and an HA owner that cannot renew in time must drop.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: o.DialTimeout,
		})},
	}
	if (o.Cert == "") != (o.Key == "") {
		return nil, fmt.Errorf("--etcd-cert %q and --etcd-key %q go together: give both or neither", o.Cert, o.Key)
	}
	if o.CA != "" || o.Cert != "" {
		info := transport.TLSInfo{CertFile: o.Cert, KeyFile: o.Key, TrustedCAFile: o.CA}
		tc, err := info.ClientConfig()
		if err != nil {
			return nil, fmt.Errorf("etcd TLS (--etcd-ca %q, --etcd-cert %q, --etcd-key %q): %w", o.CA, o.Cert, o.Key, err)
		}
		tc.MinVersion = tls.VersionTLS12
		cfg.TLS = tc
		// Check finds the settings here to explain a failed handshake.
		cfg.Context = context.WithValue(context.Background(), tlsKey{}, tc)
	}
	if cfg.Username != "" {
		if err := reach(cfg); err != nil {
			return nil, err
		}
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, Explain(err, o.Endpoints)
	}
	return cli, nil
}

// reach connects without logging in and reports an endpoint that cannot
// be reached at all (refused, TLS handshake failed), within the dial
// timeout. Answers about authentication mean etcd was reached.
func reach(cfg clientv3.Config) error {
	cfg.Username, cfg.Password = "", ""
	probe, err := clientv3.New(cfg)
	if err != nil {
		return Explain(err, cfg.Endpoints)
	}
	defer probe.Close()
	ctx, cancel := context.WithTimeout(context.Background(), cfg.DialTimeout)
	defer cancel()
	err = countKeys(ctx, probe, "/")
	switch {
	case status.Code(err) == codes.Unavailable:
		return explainUnreachable(ctx, err, cfg.Endpoints, cfg.TLS)
	case errors.Is(err, context.DeadlineExceeded):
		return Explain(err, cfg.Endpoints)
	}
	return nil
}

// tlsKey keys the client's TLS settings in the context of a client made
// by Connect.
type tlsKey struct{}

// Check reads the prefix once to tell whether etcd answers and lets this
// client read, and explains the usual failures. It does not wait for an
// endpoint that cannot be reached: a refused connection or a failed TLS
// handshake (wrong CA, no or a foreign client certificate) is returned at
// once, with its cause.
func Check(ctx context.Context, cli *clientv3.Client, prefix string) error {
	err := countKeys(ctx, cli, prefix+"/")
	if status.Code(err) == codes.Unavailable {
		tc, _ := cli.Ctx().Value(tlsKey{}).(*tls.Config)
		return explainUnreachable(ctx, err, cli.Endpoints(), tc)
	}
	return Explain(err, cli.Endpoints())
}

// explainUnreachable explains err, a connection failure, with why the TLS
// handshake with an endpoint fails, if it does. gRPC's own error often
// says only "broken pipe": with TLS 1.3 a server refuses a client
// certificate after the client's side of the handshake is done, and
// gRPC's first write races the server's alert. A handshake of our own that
// then only reads (and writes nothing) receives the alert itself.
func explainUnreachable(ctx context.Context, err error, endpoints []string, tc *tls.Config) error {
	for _, ep := range endpoints {
		host := ep
		if u, perr := url.Parse(ep); perr == nil && u.Host != "" {
			if u.Scheme != "https" {
				continue
			}
			host = u.Host
		}
		if tc == nil {
			break // no settings of ours to try
		}
		if cause := handshake(ctx, host, tc); cause != nil {
			return fmt.Errorf("etcd at %v: the TLS handshake with %s fails (are --etcd-ca, --etcd-cert and --etcd-key right?): %w", endpoints, host, cause)
		}
	}
	return Explain(err, endpoints)
}

// handshake makes a TLS connection to host and waits briefly for the
// server to refuse it. nil means the server kept it open, or that host
// could not be reached at all (not a TLS matter; gRPC's error says why).
func handshake(ctx context.Context, host string, tc *tls.Config) error {
	tc = tc.Clone()
	if tc.ServerName == "" {
		tc.ServerName, _, _ = net.SplitHostPort(host)
	}
	hctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(hctx, "tcp", host)
	if err != nil {
		return nil
	}
	conn := tls.Client(raw, tc)
	defer conn.Close()
	if err := conn.HandshakeContext(hctx); err != nil {
		return err // e.g. x509: certificate signed by unknown authority
	}
	deadline, _ := hctx.Deadline()
	_ = conn.SetReadDeadline(deadline)
	if _, err := conn.Read(make([]byte, 1)); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		return err // the server's alert, e.g. "remote error: tls: certificate required"
	}
	return nil
}

// countKeys counts the keys under prefix without waiting for a connection
// to become ready: the client's own calls wait for one until their
// deadline and then say only that it passed, while a fail-fast call
// returns the connection's error as soon as it has failed.
func countKeys(ctx context.Context, cli *clientv3.Client, prefix string) error {
	kv := pb.NewKVClient(cli.ActiveConnection())
	_, err := kv.Range(ctx, &pb.RangeRequest{Key: []byte(prefix), RangeEnd: []byte(clientv3.GetPrefixRangeEnd(prefix)), CountOnly: true},
		grpc.WaitForReady(false))
	if err != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return rpctypes.Error(err) // etcd's own errors as rpctypes values, for errors.Is
}

// Explain turns an etcd error into one that says what to do.
func Explain(err error, endpoints []string) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, rpctypes.ErrUserEmpty), errors.Is(err, rpctypes.ErrInvalidAuthToken):
		return fmt.Errorf("etcd at %v requires authentication: pass --etcd-user and --etcd-password (or a client certificate with --etcd-cert/--etcd-key): %w", endpoints, err)
	case errors.Is(err, rpctypes.ErrAuthFailed):
		return fmt.Errorf("etcd at %v refused the user name or password given with --etcd-user/--etcd-password: %w", endpoints, err)
	case errors.Is(err, rpctypes.ErrPermissionDenied):
		return fmt.Errorf("etcd at %v denied access: the etcd role of this user needs read on the prefix and write on its status keys: %w", endpoints, err)
	case status.Code(err) == codes.Unavailable:
		return fmt.Errorf("etcd at %v cannot be reached (is it running there? are --etcd-ca, --etcd-cert and --etcd-key right?): %w", endpoints, err)
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("etcd at %v did not answer in time (is it running? does it need TLS: --etcd-ca, --etcd-cert, --etcd-key?): %w", endpoints, err)
	default:
		return fmt.Errorf("etcd at %v: %w", endpoints, err)
	}
}
