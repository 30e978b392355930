package watcher_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/internal/etcdtest"
	"github.com/switchman-lb/switchman/watcher"
)

// TestConnectionMistakesReportedAtOnce: a wrong CA, a missing client
// certificate, a certificate of another CA and a port nobody listens on
// are reported with their cause (x509, the handshake, the refusal), not
// after the deadline as "did not answer in time" (15 s for switchman
// status and plan).
func TestConnectionMistakesReportedAtOnce(t *testing.T) {
	p := newPKI(t, t.TempDir())
	other := newPKI(t, t.TempDir()) // another CA, and certificates it signed
	ep := startSecureEtcd(t, p)
	refused := "http://" + etcdtest.FreeAddr(t)
	tests := []struct {
		name string
		opts watcher.ConnOptions
		want []string // all in the error
	}{
		{"wrong CA", watcher.ConnOptions{Endpoints: []string{ep}, CA: other.ca, Cert: p.clientCert, Key: p.clientKey}, []string{"TLS handshake", "x509", "unknown authority"}},
		{"wrong CA with a password", watcher.ConnOptions{Endpoints: []string{ep}, CA: other.ca, Cert: p.clientCert, Key: p.clientKey, User: "lb1", Password: "pw"}, []string{"TLS handshake", "x509"}},
		{"no client certificate", watcher.ConnOptions{Endpoints: []string{ep}, CA: p.ca}, []string{"TLS handshake", "certificate required"}},
		{"no client certificate with a password", watcher.ConnOptions{Endpoints: []string{ep}, CA: p.ca, User: "lb1", Password: "pw"}, []string{"TLS handshake", "certificate required"}},
		{"client certificate of another CA", watcher.ConnOptions{Endpoints: []string{ep}, CA: p.ca, Cert: other.clientCert, Key: other.clientKey}, []string{"TLS handshake", "unknown certificate authority"}},
		{"connection refused", watcher.ConnOptions{Endpoints: []string{refused}}, []string{"cannot be reached", "connection refused", refused}},
		{"connection refused with TLS settings", watcher.ConnOptions{Endpoints: []string{"https://" + etcdtest.FreeAddr(t)}, CA: p.ca}, []string{"cannot be reached", "connection refused"}},
		{"connection refused with a password", watcher.ConnOptions{Endpoints: []string{refused}, User: "lb1", Password: "pw"}, []string{"cannot be reached", "connection refused"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.DialTimeout = 15 * time.Second
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			cli, err := watcher.Connect(tc.opts, nil)
			if err == nil {
				defer cli.Close()
				err = watcher.Check(ctx, cli, "/switchman")
			}
			if err == nil {
				t.Fatal("no error")
			}
			if errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("waited out the deadline: %v", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q: %v", w, err)
				}
			}
		})
	}
}
