package render

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"math/big"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/spec"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/haproxy")

// Paths used in the golden files; haproxyCheck rewrites them to a temporary
// directory before running haproxy -c.
const (
	goldenRunDir  = "/run/switchman/haproxy"
	goldenCertDir = "/etc/switchman/certs"
)

func goldenOpts() HAProxyOptions {
	return HAProxyOptions{
		AdminSocket:    goldenRunDir + "/admin.sock",
		PIDFile:        goldenRunDir + "/haproxy.pid",
		Certificates:   map[string]string{"etcd-tls": goldenRunDir + "/certs/etcd-tls.pem"},
		StateDir:       goldenRunDir,
		HTTPSpareSlots: 2,
	}
}

// web is a mode http service on bind with routes written host/path ("*"
// for any host).
func web(name, bind string, routes ...string) HAProxyService {
	s := HAProxyService{Name: name, Bind: netip.MustParseAddrPort(bind), Mode: spec.ModeHTTP, Scheduler: spec.RoundRobin,
		Servers: []HAProxyServer{srv("10.1.2.3", 8080, 1)}}
	for _, r := range routes {
		host, path, _ := strings.Cut(r, "/")
		if host == "*" {
			host = ""
		}
		s.Routes = append(s.Routes, spec.Route{Host: host, PathPrefix: "/" + path})
	}
	return s
}

// goldenHTTPFiles renders the files the http frontends of services read,
// as HAProxyConfig lays them out: "# path" then the content, per file.
func goldenHTTPFiles(t *testing.T, services []HAProxyService) []byte {
	t.Helper()
	l, err := LayoutHTTP(services, HTTPLayout{}, goldenOpts().HTTPSpareSlots, nil)
	if err != nil {
		t.Fatal(err)
	}
	files, err := HTTPFiles(l, services, goldenOpts())
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	for _, f := range files {
		b.WriteString("# " + f.Path + "\n")
		if f.CopyOf != "" {
			b.WriteString("#copy " + f.CopyOf + "\n")
		}
		b.Write(f.Content)
	}
	return b.Bytes()
}

func srv(addr string, port uint16, w int) HAProxyServer {
	a := netip.MustParseAddr(addr)
	return HAProxyServer{Name: ServerName(a, port), Address: a, Port: port, Weight: w}
}

func TestHAProxyConfigGolden(t *testing.T) {
	two := []HAProxyServer{srv("10.1.1.2", 8080, 1), srv("10.1.1.3", 8080, 3)}
	tests := []struct {
		name     string
		services []HAProxyService
	}{
		{"plain-tcp", []HAProxyService{{Name: "db", Bind: netip.MustParseAddrPort("192.0.2.10:5432"), Scheduler: spec.LeastConnection, Servers: two}}},
		{"tls-file", []HAProxyService{{Name: "api", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Certificate: goldenCertDir + "/api.pem", Scheduler: spec.RoundRobin, Servers: two}}},
		{"tls-etcd", []HAProxyService{{Name: "etcd-tls", Bind: netip.MustParseAddrPort("192.0.2.11:443"), CertificateKey: "/switchman/certs/api", CertificatePEM: []byte("ignored by the renderer"), Scheduler: spec.WeightedRoundRobin, Servers: two}}},
		{"hashing", []HAProxyService{
			{Name: "maglev", Bind: netip.MustParseAddrPort("192.0.2.12:443"), Scheduler: spec.MaglevHashing, Servers: two},
			{Name: "source", Bind: netip.MustParseAddrPort("192.0.2.13:443"), Scheduler: spec.SourceHashing, Servers: two},
		}},
		{"persistence", []HAProxyService{
			{Name: "sticky", Bind: netip.MustParseAddrPort("192.0.2.14:443"), Scheduler: spec.RoundRobin, Persistence: 5 * time.Minute, Servers: two},
			{Name: "sticky-ms", Bind: netip.MustParseAddrPort("[2001:db8::14]:443"), Scheduler: spec.RoundRobin, Persistence: 1500 * time.Millisecond, Servers: two},
		}},
		{"ipv6", []HAProxyService{{Name: "v6", Bind: netip.MustParseAddrPort("[2001:db8::10]:443"), Certificate: goldenCertDir + "/api.pem", Servers: []HAProxyServer{
			srv("2001:db8::1:2", 8443, 1), srv("2001:db8::1:3", 8443, 0), srv("2001:db8::1:4", 8443, 1000),
		}}}},
		{"empty-pool", []HAProxyService{{Name: "empty", Bind: netip.MustParseAddrPort("192.0.2.15:80")}}},
		{"no-services", nil},
		// Mode http: services sharing one vip:port by host and by path,
		// a wildcard, a catch-all; maps in the .files golden.
		{"http-shared", []HAProxyService{
			web("www", "192.0.2.50:80", "www.example.com/"),
			web("api", "192.0.2.50:80", "www.example.com/api", "api.example.com/", "www.example.com/api/v2/admin"),
			web("wild", "192.0.2.50:80", "*.example.com/"),
			func() HAProxyService {
				s := web("rest", "192.0.2.50:80", "*/")
				s.Scheduler = spec.LeastConnection
				return s
			}(),
		}},
		// TLS: two certificates chosen by SNI on one vip:port, a file and
		// an etcd key; the first by name is the default.
		{"http-tls", []HAProxyService{
			func() HAProxyService {
				s := web("etcd-tls", "192.0.2.52:443", "b.example.com/")
				s.CertificateKey = "/switchman/certs/b"
				return s
			}(),
			func() HAProxyService {
				s := web("api", "192.0.2.52:443", "a.example.com/")
				s.Certificate = goldenCertDir + "/api.pem"
				return s
			}(),
		}},
		// tcp and http side by side; persistence and hashing get pools of
		// their own; an IPv6 frontend.
		{"http-mixed", []HAProxyService{
			{Name: "db", Bind: netip.MustParseAddrPort("192.0.2.10:5432"), Scheduler: spec.LeastConnection, Servers: two},
			func() HAProxyService {
				s := web("sticky", "[2001:db8::50]:80", "*/")
				s.Scheduler, s.Persistence = spec.SourceHashing, 5*time.Minute
				s.Servers = []HAProxyServer{srv("2001:db8::1:2", 8080, 1), srv("2001:db8::1:3", 8080, 300)}
				return s
			}(),
			web("plain", "192.0.2.51:8080", "*/"),
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := HAProxyConfig(tt.services, goldenOpts())
			if err != nil {
				t.Fatal(err)
			}
			want := golden(t, tt.name+".cfg", got)
			var files []byte
			if slices.ContainsFunc(tt.services, HAProxyService.HTTP) {
				files = golden(t, tt.name+".files", goldenHTTPFiles(t, tt.services))
			}
			haproxyCheck(t, want, files)
		})
	}
}

// golden compares got with testdata/haproxy/name (rewriting it first with
// -update) and returns the golden content.
func golden(t *testing.T, name string, got []byte) []byte {
	t.Helper()
	path := filepath.Join("testdata", "haproxy", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./render -run Golden -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("rendered text differs from %s:\n--- got\n%s\n--- want\n%s", path, got, want)
	}
	return want
}

// haproxyCheck runs the real `haproxy -c` on cfg, with the golden paths
// moved into a temporary directory holding a freshly made certificate and
// the http files (as goldenHTTPFiles writes them).
func haproxyCheck(t *testing.T, cfg, files []byte) {
	t.Helper()
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Log("haproxy not installed (apt-get install haproxy): golden not checked with haproxy -c")
		return
	}
	dir := t.TempDir()
	for _, d := range []string{"run/certs", "run/maps", "certs"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	pemBytes := selfSigned(t)
	for _, p := range []string{"certs/api.pem", "run/certs/etcd-tls.pem"} {
		if err := os.WriteFile(filepath.Join(dir, p), pemBytes, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	move := func(s string) string {
		s = strings.ReplaceAll(s, goldenRunDir, filepath.Join(dir, "run"))
		return strings.ReplaceAll(s, goldenCertDir, filepath.Join(dir, "certs"))
	}
	for _, f := range strings.Split(string(files), "# ")[1:] {
		path, content, _ := strings.Cut(f, "\n")
		data := []byte(move(content))
		if src, ok := strings.CutPrefix(content, "#copy "); ok {
			if data, err = os.ReadFile(move(strings.TrimSpace(src))); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(move(path), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s := move(string(cfg))
	path := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "-c", "-f", path).CombinedOutput()
	if err != nil {
		t.Fatalf("haproxy -c rejected the config: %v\n%s\n%s", err, out, s)
	}
}

func selfSigned(t testing.TB) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "switchman-test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	out := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return append(out, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})...)
}

func TestHAProxyWeight(t *testing.T) {
	for _, tt := range []struct{ in, want int }{{-1, 0}, {0, 0}, {1, 1}, {100, 100}, {256, 256}, {257, 256}, {65535, 256}} {
		if got := HAProxyWeight(tt.in); got != tt.want {
			t.Errorf("HAProxyWeight(%d) = %d, want %d", tt.in, got, tt.want)
		}
	}
}

func TestHAProxyBalance(t *testing.T) {
	for _, tt := range []struct {
		s             spec.Scheduler
		balance, hash string
		wantErr       bool
	}{
		{spec.RoundRobin, "roundrobin", "", false},
		{spec.WeightedRoundRobin, "roundrobin", "", false},
		{spec.LeastConnection, "leastconn", "", false},
		{spec.WeightedLeastConnection, "leastconn", "", false},
		{spec.SourceHashing, "source", "consistent", false},
		{spec.MaglevHashing, "source", "consistent", false},
		{"fo", "", "", true},
	} {
		b, h, err := HAProxyBalance(tt.s)
		if b != tt.balance || h != tt.hash || (err != nil) != tt.wantErr {
			t.Errorf("HAProxyBalance(%q) = %q, %q, %v", tt.s, b, h, err)
		}
	}
}

// TestHAProxyConfigRefuses shows the renderer's own defence: values the
// spec would never let through are refused here too.
func TestHAProxyConfigRefuses(t *testing.T) {
	ok := HAProxyService{Name: "api", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Servers: []HAProxyServer{srv("10.0.0.1", 80, 1)}}
	tests := []struct {
		name string
		mod  func(*HAProxyService, *HAProxyOptions)
	}{
		{"newline in name", func(s *HAProxyService, _ *HAProxyOptions) { s.Name = "api\n    server evil 6.6.6.6:80" }},
		{"space in cert path", func(s *HAProxyService, _ *HAProxyOptions) { s.Certificate = "/etc/x.pem crt /etc/shadow" }},
		{"hash in cert path", func(s *HAProxyService, _ *HAProxyOptions) { s.Certificate = "/etc/x.pem#" }},
		{"semicolon in cert path", func(s *HAProxyService, _ *HAProxyOptions) { s.Certificate = "/etc/x.pem;del" }},
		{"quote in cert path", func(s *HAProxyService, _ *HAProxyOptions) { s.Certificate = `/etc/x".pem` }},
		{"relative cert path", func(s *HAProxyService, _ *HAProxyOptions) { s.Certificate = "x.pem" }},
		{"newline in etcd cert file", func(s *HAProxyService, o *HAProxyOptions) {
			s.CertificateKey = "/k"
			o.Certificates = map[string]string{"api": "/run/x.pem\nglobal"}
		}},
		{"etcd cert without file", func(s *HAProxyService, _ *HAProxyOptions) { s.CertificateKey = "/k" }},
		{"both cert kinds", func(s *HAProxyService, _ *HAProxyOptions) { s.Certificate, s.CertificateKey = "/a.pem", "/k" }},
		{"server name with space", func(s *HAProxyService, _ *HAProxyOptions) { s.Servers[0].Name = "s1 disabled" }},
		{"server name with semicolon", func(s *HAProxyService, _ *HAProxyOptions) { s.Servers[0].Name = "s1;shutdown" }},
		{"duplicate server", func(s *HAProxyService, _ *HAProxyOptions) { s.Servers = append(s.Servers, s.Servers[0]) }},
		{"zoned address", func(s *HAProxyService, _ *HAProxyOptions) {
			s.Servers[0].Address = netip.MustParseAddr("fe80::1%eth0 x")
		}},
		{"zero port", func(s *HAProxyService, _ *HAProxyOptions) { s.Servers[0].Port = 0 }},
		{"unknown scheduler", func(s *HAProxyService, _ *HAProxyOptions) { s.Scheduler = "random" }},
		{"negative persistence", func(s *HAProxyService, _ *HAProxyOptions) { s.Persistence = -time.Second }},
		{"socket path with space", func(_ *HAProxyService, o *HAProxyOptions) { o.AdminSocket = "/run/a.sock level admin" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := ok
			s.Servers = append([]HAProxyServer(nil), ok.Servers...)
			o := goldenOpts()
			tt.mod(&s, &o)
			if out, err := HAProxyConfig([]HAProxyService{s}, o); err == nil {
				t.Fatalf("rendered without error:\n%s", out)
			}
		})
	}
	if _, err := HAProxyConfig([]HAProxyService{ok, ok}, goldenOpts()); err == nil {
		t.Error("two services with one name rendered")
	}
	if _, err := HAProxyConfig([]HAProxyService{ok}, goldenOpts()); err != nil {
		t.Errorf("the unmodified service failed: %v", err)
	}
}

// cfgLine is one line of haproxy.cfg reduced to its shape.
type cfgLine struct {
	section string // "global", "defaults", "frontend fe_x", "backend be_x"
	keyword string // first token; "" for blank and comment lines
	tokens  int
}

// shape reads haproxy.cfg the way HAProxy's tokenizer would split it on
// whitespace, and returns every line's section, keyword and token count.
func shape(cfg string) []cfgLine {
	var out []cfgLine
	section := ""
	for _, l := range strings.Split(strings.TrimSuffix(cfg, "\n"), "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) == 0:
			out = append(out, cfgLine{section: section})
		case strings.HasPrefix(l, "#"):
			out = append(out, cfgLine{section: section, keyword: "#"})
		case !strings.HasPrefix(l, " "):
			section = strings.Join(f, " ")
			out = append(out, cfgLine{section: section, keyword: f[0], tokens: len(f)})
		default:
			out = append(out, cfgLine{section: section, keyword: f[0], tokens: len(f)})
		}
	}
	return out
}

// expectedShape is the shape the renderer must produce for services,
// derived from the inputs alone.
func expectedShape(services []HAProxyService) []cfgLine {
	out := []cfgLine{{keyword: "#"}}
	g := func(kw string, n int) { out = append(out, cfgLine{section: "global", keyword: kw, tokens: n}) }
	g("global", 1)
	g("master-worker", 1)
	g("stats", 9)
	g("pidfile", 2)
	out = append(out, cfgLine{section: "global"})
	d := func(kw string, n int) { out = append(out, cfgLine{section: "defaults", keyword: kw, tokens: n}) }
	d("defaults", 1)
	d("mode", 2)
	d("timeout", 3)
	d("timeout", 3)
	d("timeout", 3)
	d("retries", 2)
	d("option", 2)
	last := "defaults"
	for _, s := range services {
		out = append(out, cfgLine{section: last})
		fe := "frontend fe_" + s.Name
		bind := 2
		if s.Certificate != "" || s.CertificateKey != "" {
			bind = 5
		}
		out = append(out,
			cfgLine{section: fe, keyword: "frontend", tokens: 2},
			cfgLine{section: fe, keyword: "mode", tokens: 2},
			cfgLine{section: fe, keyword: "bind", tokens: bind},
			cfgLine{section: fe, keyword: "default_backend", tokens: 2},
			cfgLine{section: fe})
		be := "backend be_" + s.Name
		out = append(out,
			cfgLine{section: be, keyword: "backend", tokens: 2},
			cfgLine{section: be, keyword: "mode", tokens: 2},
			cfgLine{section: be, keyword: "balance", tokens: 2})
		if s.Scheduler == spec.SourceHashing || s.Scheduler == spec.MaglevHashing {
			out = append(out, cfgLine{section: be, keyword: "hash-type", tokens: 2})
		}
		if s.Persistence > 0 {
			out = append(out,
				cfgLine{section: be, keyword: "stick-table", tokens: 7},
				cfgLine{section: be, keyword: "stick", tokens: 3})
		}
		for range s.Servers {
			out = append(out, cfgLine{section: be, keyword: "server", tokens: 5})
		}
		last = be
	}
	return out
}

// FuzzHAProxyConfig feeds arbitrary names, paths, addresses and numbers to
// the renderer. Whatever it accepts must have exactly the lines, sections,
// directives and token counts the input asks for: no input can smuggle in
// a directive, a section, an extra argument or a comment.
func FuzzHAProxyConfig(f *testing.F) {
	f.Add("api", "192.0.2.10:443", "/etc/switchman/api.pem", "", "s10.0.0.1_80", "10.0.0.1", uint16(80), 1, int64(0), "rr", "/run/switchman/haproxy/admin.sock")
	f.Add("api", "[2001:db8::1]:443", "", "/switchman/certs/api", "s1", "::1", uint16(443), 70000, int64(1500), "mh", "/run/a.sock")
	f.Add("api\n    server evil 6.6.6.6:80", "192.0.2.10:443", "", "", "s1", "10.0.0.1", uint16(80), 1, int64(0), "sh", "/run/a.sock")
	f.Add("api", "192.0.2.10:443", "/etc/a.pem\n    bind 0.0.0.0:1", "", "s1", "10.0.0.1", uint16(80), 1, int64(0), "lc", "/run/a.sock")
	f.Add("api", "192.0.2.10:443", "/etc/a.pem#", "", "s1 weight 0;", "10.0.0.1", uint16(80), 1, int64(0), "wlc", "/run/a.sock level admin")
	f.Fuzz(func(t *testing.T, name, bind, cert, certKey, server, addr string, port uint16, weight int, persistMS int64, sched, socket string) {
		ap, err := netip.ParseAddrPort(bind)
		if err != nil {
			ap = netip.MustParseAddrPort("192.0.2.1:443")
		}
		a, err := netip.ParseAddr(addr)
		if err != nil {
			a = netip.MustParseAddr("10.0.0.1")
		}
		s := HAProxyService{
			Name: name, Bind: ap, Certificate: cert, CertificateKey: certKey,
			Scheduler: spec.Scheduler(sched), Persistence: time.Duration(persistMS) * time.Millisecond,
			Servers: []HAProxyServer{{Name: server, Address: a, Port: port, Weight: weight}},
		}
		o := HAProxyOptions{AdminSocket: socket, PIDFile: "/run/s/pid",
			Certificates: map[string]string{name: cert + ".from-etcd"}}
		out, err := HAProxyConfig([]HAProxyService{s}, o)
		if err != nil {
			return
		}
		got, want := shape(string(out)), expectedShape([]HAProxyService{s})
		if len(got) != len(want) {
			t.Fatalf("%d lines, want %d:\n%s", len(got), len(want), out)
		}
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("line %d is %+v, want %+v:\n%s", i+1, got[i], want[i], out)
			}
		}
	})
}
