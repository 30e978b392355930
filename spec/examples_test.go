package spec

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// exampleName is the service name of an example file: its base name
// without the extension, as `switchman validate` uses.
func exampleName(path string) string {
	return strings.TrimSuffix(filepath.Base(path), filepath.Ext(path))
}

func exampleFiles(t *testing.T, patterns ...string) []string {
	t.Helper()
	var files []string
	for _, p := range patterns {
		m, err := filepath.Glob(filepath.Join("..", "examples", p))
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, m...)
	}
	if len(files) == 0 {
		t.Fatalf("no files match %v under ../examples", patterns)
	}
	return files
}

// TestExamplesValid parses and merges every example definition, and checks
// that no two of them claim the same vip:port/protocol (the CLI validates
// and plans them all together).
func TestExamplesValid(t *testing.T) {
	files := exampleFiles(t, "*.yaml", "*.json")
	var claims []Claim
	seen := map[string]bool{}
	for i, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		s, err := Parse(exampleName(f), data)
		if err == nil {
			s, err = Merge(s, nil)
		}
		if err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		checkInvariants(t, s)
		if check, ok := exampleFeatures[s.Name]; !ok {
			t.Errorf("%s: no feature check for this example; add one to exampleFeatures", f)
		} else if problem := check(s); problem != "" {
			t.Errorf("%s does not show its feature: %s", f, problem)
		}
		seen[s.Name] = true
		claims = append(claims, Claim{Service: s, CreateRevision: int64(i + 1)})
	}
	for name := range exampleFeatures {
		if !seen[name] {
			t.Errorf("example %s is missing", name)
		}
	}
	for name, err := range ResolveConflicts(claims) {
		t.Errorf("example %s: %v", name, err)
	}
	if !hasJSON(files) {
		t.Error("no JSON example")
	}
}

// exampleFeatures says, per example, what it is there to show; each check
// returns "" when the parsed service shows it.
var exampleFeatures = map[string]func(s *Service) string{
	"web-rr": func(s *Service) string {
		return want(s.Protocol == TCP && s.Scheduler == RoundRobin && s.Forwarding == NAT && s.Driver == DriverIPVS && s.Health.Protocol == HealthHTTP, "tcp rr nat ipvs with an http check")
	},
	"dns-udp": func(s *Service) string {
		return want(s.Protocol == UDP && s.Scheduler == WeightedLeastConnection && s.Health.Protocol == HealthUDP &&
			s.Health.Payload == "\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x01", "udp wlc with the DNS query payload")
	},
	"api-tls": func(s *Service) string {
		return want(s.TLS != nil && s.TLS.Certificate == "/etc/switchman/certs/api.pem" && s.Driver == DriverHAProxy, "tls from /etc/switchman/certs/api.pem on haproxy")
	},
	"api-tls-etcd": func(s *Service) string {
		return want(s.TLS != nil && s.TLS.CertificateKey == "/switchman/certs/api" && s.Driver == DriverHAProxy && s.Health.Protocol == HealthHTTPS && s.Health.SNI != "", "tls from the etcd key /switchman/certs/api, https check with sni")
	},
	"tcp-proxy-haproxy": func(s *Service) string {
		return want(s.TLS == nil && s.Driver == DriverHAProxy, "driver haproxy without tls")
	},
	"cache-mh": func(s *Service) string {
		return want(s.Scheduler == MaglevHashing && strings.Join(s.SchedulerFlags, ",") == "mh-fallback,mh-port" && s.Persistence > 0, "mh with mh-fallback,mh-port and persistence")
	},
	"sticky-sh": func(s *Service) string { return want(s.Scheduler == SourceHashing, "scheduler sh") },
	"dr": func(s *Service) string {
		ok := s.Forwarding == Direct
		for _, b := range s.Backends {
			ok = ok && b.Port == s.Port
		}
		return want(ok, "forwarding dr with backend ports equal to the service port")
	},
	"tun":  func(s *Service) string { return want(s.Forwarding == Tunnel, "forwarding tun") },
	"ipv6": func(s *Service) string { return want(s.VIP.Is6() && s.AllowCIDRs[0].String() == "::/0", "an IPv6 vip") },
	"restricted": func(s *Service) string {
		return want(s.AllowCIDRs[0].Bits() > 0 && !s.PreserveClientIP && s.Driver == DriverIPVS && s.Forwarding == NAT, "allow_cidrs and masquerade")
	},
	"pool-only": func(s *Service) string { return want(len(s.Backends) == 1, "exactly one static backend") },
	"drain": func(s *Service) string {
		return want(s.Drain != DefaultDrain && !s.FailOpen, "a drain time of its own and fail_open false")
	},
	"http-www": func(s *Service) string {
		return want(s.Mode == ModeHTTP && s.Driver == DriverHAProxy && len(s.Routes) == 2 && s.Routes[1].Host == "*.example.com", "mode http with an exact and a wildcard host")
	},
	"http-api": func(s *Service) string {
		return want(s.Mode == ModeHTTP && s.Routes[0].PathPrefix == "/api" && s.VIP.String() == "192.0.2.60", "mode http routing a path, sharing http-www's vip:port")
	},
	"app-wrr": func(s *Service) string {
		return want(s.Scheduler == WeightedRoundRobin && s.Health.Protocol == HealthHTTPS && s.Health.Verify, "wrr with a verified https check")
	},
}

func want(ok bool, what string) string {
	if ok {
		return ""
	}
	return "want " + what
}

func hasJSON(files []string) bool {
	for _, f := range files {
		if strings.HasSuffix(f, ".json") {
			return true
		}
	}
	return false
}

// TestExamplesBroken checks that every file under examples/broken fails
// with the error its first line names: "# want-error: <path>: <text>".
func TestExamplesBroken(t *testing.T) {
	for _, f := range exampleFiles(t, "broken/*") {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			first, _, _ := strings.Cut(string(data), "\n")
			want, ok := strings.CutPrefix(first, "# want-error: ")
			if !ok {
				t.Fatalf("first line %q does not say which error the file must produce (# want-error: <path>: <text>)", first)
			}
			path, msg, ok := strings.Cut(want, ": ")
			if !ok {
				t.Fatalf("want-error %q is not <path>: <text>", want)
			}
			s, err := Parse(exampleName(f), data)
			if err == nil {
				s, err = Merge(s, nil)
			}
			if err == nil {
				t.Fatalf("accepted: %+v", s)
			}
			wantFieldError(t, err, path, msg)
		})
	}
}
