package watcher_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/switchman-lb/switchman/internal/etcdtest"
	"github.com/switchman-lb/switchman/status"
	"github.com/switchman-lb/switchman/watcher"
)

// pki writes a CA, a server certificate for 127.0.0.1 and a client
// certificate into dir.
type pki struct {
	ca, serverCert, serverKey, clientCert, clientKey, strangerCert, strangerKey string
}

func newPKI(t *testing.T, dir string) pki {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "switchman test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	issue := func(name string, serial int64, usage x509.ExtKeyUsage) (string, string) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kb, _ := x509.MarshalECPrivateKey(key)
		c, k := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
		write(t, c, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
		write(t, k, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}))
		return c, k
	}
	p := pki{ca: filepath.Join(dir, "ca.pem")}
	write(t, p.ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}))
	p.serverCert, p.serverKey = issue("server", 2, x509.ExtKeyUsageServerAuth)
	p.clientCert, p.clientKey = issue("lb1", 3, x509.ExtKeyUsageClientAuth)
	p.strangerCert, p.strangerKey = issue("stranger", 4, x509.ExtKeyUsageClientAuth)
	return p
}

func write(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// startSecureEtcd runs etcd that requires a client certificate signed by
// the test CA, with auth to be enabled by the test.
func startSecureEtcd(t *testing.T, p pki) string {
	t.Helper()
	return etcdtest.Start(t, &transport.TLSInfo{CertFile: p.serverCert, KeyFile: p.serverKey, TrustedCAFile: p.ca, ClientCertAuth: true})
}

// TestTLSAndAuth shows the agent's connection working with a client
// certificate and user/password, being refused with a clear message without
// them, and the least-privilege role from the README being enough.
func TestTLSAndAuth(t *testing.T) {
	p := newPKI(t, t.TempDir())
	ep := startSecureEtcd(t, p)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	full := watcher.ConnOptions{Endpoints: []string{ep}, CA: p.ca, Cert: p.clientCert, Key: p.clientKey, DialTimeout: 3 * time.Second}

	// Set up auth the way the README says: root, and a role for the agent
	// that reads the prefix and writes only its own status and node keys.
	admin, err := watcher.Connect(full, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	steps := []func() error{
		func() error { _, err := admin.UserAdd(ctx, "root", "rootpw"); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := admin.RoleAdd(ctx, "switchman-lb1"); return err },
		func() error {
			_, err := admin.RoleGrantPermission(ctx, "switchman-lb1", "/switchman/", clientv3.GetPrefixRangeEnd("/switchman/"), clientv3.PermissionType(clientv3.PermRead))
			return err
		},
		func() error {
			_, err := admin.RoleGrantPermission(ctx, "switchman-lb1", "/switchman/status/lb1/", clientv3.GetPrefixRangeEnd("/switchman/status/lb1/"), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error {
			_, err := admin.RoleGrantPermission(ctx, "switchman-lb1", "/switchman/nodes/lb1", "", clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error { _, err := admin.UserAdd(ctx, "lb1", "lb1pw"); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "lb1", "switchman-lb1"); return err },
		func() error { _, err := admin.AuthEnable(ctx); return err },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("auth setup step %d: %v", i, err)
		}
	}

	cases := []struct {
		name    string
		opts    watcher.ConnOptions
		wantErr string // part of the explained error; "" = works
		is      error
	}{
		{"certificate and password", withUser(full, "lb1", "lb1pw"), "", nil},
		// etcd takes the user from the client certificate's CN when no
		// password is given.
		{"certificate of user lb1", full, "", nil},
		{"certificate of no user", watcher.ConnOptions{Endpoints: []string{ep}, CA: p.ca, Cert: p.strangerCert, Key: p.strangerKey, DialTimeout: 3 * time.Second}, "denied access", rpctypes.ErrPermissionDenied},
		{"wrong password", withUser(full, "lb1", "nope"), "refused the user name or password", rpctypes.ErrAuthFailed},
		{"no client certificate", withUser(watcher.ConnOptions{Endpoints: []string{ep}, CA: p.ca, DialTimeout: 2 * time.Second}, "lb1", "lb1pw"), "certificate required", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cli, err := watcher.Connect(tc.opts, nil)
			if err == nil {
				defer cli.Close()
				cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
				err = watcher.Check(cctx, cli, "/switchman")
				ccancel()
			}
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("want success, got %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("want an error containing %q, got %v", tc.wantErr, err)
			case tc.is != nil && !errors.Is(err, tc.is):
				t.Fatalf("want errors.Is %v, got %v", tc.is, err)
			}
		})
	}

	// With the role, the agent reads definitions and writes its status,
	// and nothing else.
	root, err := watcher.Connect(withUser(full, "root", "rootpw"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	if _, err := root.Put(ctx, "/switchman/services/web", `{"vip":"192.0.2.10","port":80,"backends":[{"address":"10.0.0.1"}]}`); err != nil {
		t.Fatal(err)
	}
	cli, err := watcher.Connect(withUser(full, "lb1", "lb1pw"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	snap, err := watcher.ReadOnce(ctx, cli, "/switchman")
	if err != nil || len(snap.Services) != 1 {
		t.Fatalf("the agent role cannot read definitions: %v %v", snap.Services, err)
	}
	pub, err := status.NewPublisher(cli, slog.New(slog.DiscardHandler), "/switchman", "lb1", status.Node{Version: "test"}, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	pctx, pcancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { _ = pub.Run(pctx); close(done) }()
	pub.Set("web", status.Status{State: status.StateApplied, Revision: 2, Driver: "ipvs"})
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := root.Get(ctx, "/switchman/status/lb1/web")
		if err == nil && len(resp.Kvs) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status not written with the agent role: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := cli.Put(ctx, "/switchman/services/evil", "{}"); !errors.Is(err, rpctypes.ErrPermissionDenied) {
		t.Fatalf("the agent role may write definitions: %v", err)
	}
	pcancel()
	<-done
}

func withUser(o watcher.ConnOptions, user, pw string) watcher.ConnOptions {
	o.User, o.Password = user, pw
	return o
}
