package health

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/spec"
)

// closedPort returns a loopback TCP or UDP port that nothing listens on.
func closedPort(t *testing.T, network string) netip.AddrPort {
	t.Helper()
	var addr net.Addr
	switch network {
	case "tcp":
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr = l.Addr()
		l.Close()
	case "udp":
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr = c.LocalAddr()
		c.Close()
	}
	return netip.MustParseAddrPort(addr.String())
}

func addrOf(t *testing.T, a net.Addr) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		t.Fatal(err)
	}
	return ap
}

// runCheck makes the checker of t and runs one check with timeout.
func runCheck(t *testing.T, tg Target, timeout time.Duration) error {
	t.Helper()
	c, err := NewChecker(tg)
	if err != nil {
		t.Fatalf("NewChecker: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	start := time.Now()
	err = c.Check(ctx)
	// Not a speed claim: a check that ignores its deadline would hang here.
	if took := time.Since(start); took > timeout+5*time.Second {
		t.Errorf("%s took %v with a %v timeout", c, took, timeout)
	}
	return err
}

func TestTCPCheck(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	serveTCP(l)
	open := addrOf(t, l.Addr())
	closed := closedPort(t, "tcp")
	tcp := func(port uint16) spec.Health { return spec.Health{Protocol: spec.HealthTCP, Port: port} }
	tests := []struct {
		name    string
		target  Target
		wantErr error // nil: success
	}{
		{"listener accepts", Target{Service: "s", Addr: open, Health: tcp(0)}, nil},
		{"closed port is refused", Target{Service: "s", Addr: closed, Health: tcp(0)}, syscall.ECONNREFUSED},
		{"health.port overrides a closed backend port", Target{Service: "s", Addr: closed, Health: tcp(open.Port())}, nil},
		{"health.port pointing at a closed port fails", Target{Service: "s", Addr: open, Health: tcp(closed.Port())}, syscall.ECONNREFUSED},
	}
	if silent, ok := unanswered(t); ok {
		tests = append(tests, struct {
			name    string
			target  Target
			wantErr error
		}{"no answer times out", Target{Service: "s", Addr: silent, Health: tcp(0)}, os.ErrDeadlineExceeded})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := runCheck(t, tt.target, 300*time.Millisecond)
			checkErr(t, err, tt.wantErr)
		})
	}

	// Canceling the context ends a check that waits for an answer.
	if silent, ok := unanswered(t); ok {
		c, err := NewChecker(Target{Service: "s", Addr: silent, Health: tcp(0)})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		go func() {
			time.Sleep(50 * time.Millisecond)
			cancel()
		}()
		if err := c.Check(ctx); !errors.Is(err, context.Canceled) {
			t.Errorf("canceled check: %v, want context.Canceled", err)
		}
	}
}

func checkErr(t *testing.T, err, want error) {
	t.Helper()
	switch {
	case want == nil && err != nil:
		t.Errorf("check failed: %v; want success", err)
	case want != nil && !errors.Is(err, want):
		t.Errorf("check error = %v; want one that is %v", err, want)
	}
}

func TestHTTPCheck(t *testing.T) {
	stop := make(chan struct{})
	var mu sync.Mutex
	var hosts []string
	var conns atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		hosts = append(hosts, r.Host)
		mu.Unlock()
		switch r.URL.Path {
		case "/ok":
			w.WriteHeader(http.StatusOK)
		case "/nocontent":
			w.WriteHeader(http.StatusNoContent)
		case "/fail":
			http.Error(w, "broken", http.StatusInternalServerError)
		case "/redirect":
			http.Redirect(w, r, "/ok", http.StatusFound)
		case "/big":
			// A body far larger than a check reads.
			chunk := []byte(strings.Repeat("x", 64<<10))
			for range 256 {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
		case "/stall":
			select {
			case <-r.Context().Done():
			case <-stop:
			}
		default:
			http.NotFound(w, r)
		}
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	defer srv.Close()
	defer close(stop)
	addr := addrOf(t, srv.Listener.Addr())
	web := func(path string) Target {
		return Target{Service: "web", Addr: addr, Health: spec.Health{Protocol: spec.HealthHTTP, Path: path}}
	}
	tests := []struct {
		name    string
		target  Target
		timeout time.Duration
		ok      bool
		wantErr error
	}{
		{"200 passes", web("/ok"), time.Second, true, nil},
		{"204 passes (any 2xx)", web("/nocontent"), time.Second, true, nil},
		{"500 fails", web("/fail"), time.Second, false, nil},
		{"404 fails", web("/missing"), time.Second, false, nil},
		{"302 fails (redirects are not followed)", web("/redirect"), time.Second, false, nil},
		{"a huge body passes (read is bounded)", web("/big"), 5 * time.Second, true, nil},
		{"a handler stalling past the timeout fails", web("/stall"), 200 * time.Millisecond, false, context.DeadlineExceeded},
		{"closed port fails", Target{Service: "web", Addr: closedPort(t, "tcp"), Health: spec.Health{Protocol: spec.HealthHTTP, Path: "/ok"}}, time.Second, false, syscall.ECONNREFUSED},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := runCheck(t, tt.target, tt.timeout)
			if tt.ok {
				checkErr(t, err, nil)
				return
			}
			if err == nil {
				t.Fatal("check passed; want failure")
			}
			if tt.wantErr != nil {
				checkErr(t, err, tt.wantErr)
			}
		})
	}

	// Three checks of the same target use three connections (no
	// keep-alive reuse), and send the address checked as Host.
	before := conns.Load()
	c, err := NewChecker(web("/ok"))
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := c.Check(context.Background()); err != nil {
			t.Fatalf("check: %v", err)
		}
	}
	if got := conns.Load() - before; got != 3 {
		t.Errorf("3 checks opened %d connections, want 3 (no keep-alive)", got)
	}
	mu.Lock()
	last := hosts[len(hosts)-1]
	mu.Unlock()
	if last != addr.String() {
		t.Errorf("Host header %q, want %q", last, addr)
	}
}

// selfSigned returns a self-signed certificate for name.
func selfSigned(t *testing.T, name string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func TestHTTPSCheckSNI(t *testing.T) {
	const name = "api.example.test"
	cert := selfSigned(t, name)
	var mu sync.Mutex
	var sawSNI []string
	var host string
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		host = r.Host
		mu.Unlock()
		if r.URL.Path != "/healthz" {
			http.NotFound(w, r)
		}
	}))
	srv.TLS = &tls.Config{
		Certificates: []tls.Certificate{cert},
		// The handshake fails unless the client names the expected host.
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			mu.Lock()
			sawSNI = append(sawSNI, hello.ServerName)
			mu.Unlock()
			if hello.ServerName != name {
				return nil, fmt.Errorf("unknown server name %q", hello.ServerName)
			}
			return nil, nil
		},
	}
	srv.Config.ErrorLog = nil
	srv.StartTLS()
	defer srv.Close()
	addr := addrOf(t, srv.Listener.Addr())
	https := func(sni string, verify bool) Target {
		return Target{Service: "api", Addr: addr, Health: spec.Health{Protocol: spec.HealthHTTPS, Path: "/healthz", SNI: sni, Verify: verify}}
	}
	tests := []struct {
		name    string
		target  Target
		ok      bool
		wantSNI string
	}{
		{"right sni passes (self-signed, not verified)", https(name, false), true, name},
		{"wrong sni fails the handshake", https("other.example.test", false), false, "other.example.test"},
		{"no sni fails the handshake", https("", false), false, ""},
		{"verify=true rejects the self-signed certificate", https(name, true), false, name},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mu.Lock()
			sawSNI = nil
			mu.Unlock()
			err := runCheck(t, tt.target, 2*time.Second)
			if tt.ok != (err == nil) {
				t.Fatalf("check error %v; want success=%v", err, tt.ok)
			}
			mu.Lock()
			defer mu.Unlock()
			if len(sawSNI) != 1 || sawSNI[0] != tt.wantSNI {
				t.Errorf("server saw SNI %q, want one handshake with %q", sawSNI, tt.wantSNI)
			}
			if tt.target.Health.Verify {
				var verr *tls.CertificateVerificationError
				if !errors.As(err, &verr) {
					t.Errorf("verify=true error %v, want a certificate verification error", err)
				}
			}
		})
	}
	mu.Lock()
	defer mu.Unlock()
	if want := fmt.Sprintf("%s:%d", name, addr.Port()); host != want {
		t.Errorf("Host header %q, want %q", host, want)
	}
}

func TestUDPCheck(t *testing.T) {
	echo, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	got := make(chan string, 16)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := echo.ReadFrom(buf)
			if err != nil {
				return
			}
			got <- string(buf[:n])
			_, _ = echo.WriteTo(buf[:n], from)
		}
	}()
	silent, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	udp := func(addr netip.AddrPort, payload string) Target {
		return Target{Service: "dns", Addr: addr, Health: spec.Health{Protocol: spec.HealthUDP, Payload: payload}}
	}
	tests := []struct {
		name        string
		target      Target
		ok          bool
		wantErr     error
		wantPayload string
	}{
		{"echo replies to the payload", udp(addrOf(t, echo.LocalAddr()), "ping"), true, nil, "ping"},
		{"empty payload sends a newline", udp(addrOf(t, echo.LocalAddr()), ""), true, nil, "\n"},
		{"closed port: ICMP port unreachable", udp(closedPort(t, "udp"), "ping"), false, syscall.ECONNREFUSED, ""},
		{"no reply within the timeout", udp(addrOf(t, silent.LocalAddr()), "ping"), false, os.ErrDeadlineExceeded, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := runCheck(t, tt.target, 300*time.Millisecond)
			if tt.ok {
				checkErr(t, err, nil)
				select {
				case p := <-got:
					if p != tt.wantPayload {
						t.Errorf("server got %q, want %q", p, tt.wantPayload)
					}
				case <-time.After(5 * time.Second):
					t.Error("server got nothing")
				}
				return
			}
			if err == nil {
				t.Fatal("check passed; want failure")
			}
			checkErr(t, err, tt.wantErr)
		})
	}
}

func TestNewCheckerKinds(t *testing.T) {
	addr := netip.MustParseAddrPort("10.1.1.2:8080")
	tests := []struct {
		h    spec.Health
		want string
	}{
		{spec.Health{Protocol: spec.HealthTCP}, "tcp 10.1.1.2:8080"},
		{spec.Health{Protocol: spec.HealthTCP, Port: 9000}, "tcp 10.1.1.2:9000"},
		{spec.Health{Protocol: spec.HealthHTTP, Path: "/healthz"}, "http 10.1.1.2:8080/healthz"},
		{spec.Health{Protocol: spec.HealthHTTP}, "http 10.1.1.2:8080/"},
		{spec.Health{Protocol: spec.HealthHTTPS, Path: "/h", SNI: "a.example"}, "https 10.1.1.2:8080/h"},
		{spec.Health{Protocol: spec.HealthUDP}, "udp 10.1.1.2:8080"},
		{spec.Health{Protocol: spec.HealthNone}, "none"},
	}
	for _, tt := range tests {
		c, err := NewChecker(Target{Service: "s", Addr: addr, Health: tt.h})
		if err != nil {
			t.Errorf("%+v: %v", tt.h, err)
			continue
		}
		if c.String() != tt.want {
			t.Errorf("%+v: String() = %q, want %q", tt.h, c, tt.want)
		}
	}
	if _, err := NewChecker(Target{Addr: addr, Health: spec.Health{Protocol: "icmp"}}); err == nil {
		t.Error("NewChecker accepted an unknown protocol")
	}
}
