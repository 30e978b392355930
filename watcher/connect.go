package watcher

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
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
// Check for that.
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
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, Explain(err, o.Endpoints)
	}
	return cli, nil
}

// Check reads the prefix once to tell whether etcd answers and lets this
// client read, and explains the usual failures.
func Check(ctx context.Context, cli *clientv3.Client, prefix string) error {
	_, err := cli.Get(ctx, prefix+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	return Explain(err, cli.Endpoints())
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
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("etcd at %v did not answer in time (is it running? does it need TLS: --etcd-ca, --etcd-cert, --etcd-key?): %w", endpoints, err)
	default:
		return fmt.Errorf("etcd at %v: %w", endpoints, err)
	}
}
