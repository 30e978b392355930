package spec

import (
	"errors"
	"strings"
	"testing"
)

// minimal is the smallest valid definition; the cases below add to it.
const minimal = "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n"

// fieldErrors returns the FieldErrors of err, failing the test when err is
// not a spec.Errors.
func fieldErrors(t *testing.T, err error) Errors {
	t.Helper()
	var list Errors
	if !errors.As(err, &list) {
		t.Fatalf("error %v (%T) is not a spec.Errors", err, err)
	}
	return list
}

// wantFieldError fails the test unless err holds a FieldError whose path is
// exactly path and whose message contains every one of msg.
func wantFieldError(t *testing.T, err error, path string, msg ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want %s: %q", path, msg)
	}
	list := fieldErrors(t, err)
	for _, fe := range list {
		if fe.Path != path {
			continue
		}
		ok := true
		for _, m := range msg {
			if !strings.Contains(fe.Msg, m) {
				ok = false
			}
		}
		if ok {
			return
		}
	}
	t.Fatalf("error %q has no problem at path %q containing %q", err, path, msg)
}

func TestParseRejects(t *testing.T) {
	tests := []struct {
		name string
		svc  string // service name; "web" when empty
		doc  string
		path string
		msg  []string
	}{
		// decode.go: document shape, unknown fields, types.
		{name: "empty document", doc: "", path: "", msg: []string{"empty"}},
		{name: "blank document", doc: "  \n\t\n", path: "", msg: []string{"empty"}},
		{name: "list document", doc: "- vip: 192.0.2.10\n", path: "", msg: []string{"a list", "not a mapping"}},
		{name: "number document", doc: "42", path: "", msg: []string{"42", "not a mapping"}},
		{name: "string document", doc: `"hello"`, path: "", msg: []string{`"hello"`, "not a mapping"}},
		{name: "null document", doc: "null", path: "", msg: []string{"null", "not a mapping"}},
		{name: "not yaml", doc: "vip: [", path: "", msg: []string{"not valid JSON or YAML"}},
		{name: "not json", doc: `{"vip": "192.0.2.10",`, path: "", msg: []string{"not valid JSON or YAML"}},
		{name: "duplicate key", doc: minimal + "vip: 192.0.2.11\n", path: "", msg: []string{`"vip"`, "already set"}},
		{name: "duplicate key in json", doc: `{"vip": "192.0.2.10", "port": 80, "port": 81}`, path: "", msg: []string{`"port"`, "already set"}},
		{name: "duplicate nested key", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n    address: 10.0.0.2\n", path: "", msg: []string{`"address"`, "already set"}},
		{name: "second yaml document", doc: minimal + "---\nvip: 192.0.2.11\nport: 81\n", path: "", msg: []string{"more than one document"}},
		{name: "second json value", doc: `{"vip": "192.0.2.10", "port": 80} {"bogus": 1}`, path: "", msg: []string{"after the definition"}},
		{name: "oversized", doc: minimal + "#" + strings.Repeat("x", maxDefinitionSize), path: "", msg: []string{"more than the limit"}},
		{name: "unknown top-level field", doc: minimal + "bogus: 1\n", path: "bogus", msg: []string{"unknown field", "vip"}},
		{name: "unknown health field", doc: minimal + "health:\n  intervl: 2s\n", path: "health.intervl", msg: []string{"unknown field", "interval"}},
		{name: "unknown backend field", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n  - adress: 10.0.0.2\n", path: "backends[1].adress", msg: []string{"unknown field", "address"}},
		{name: "unknown tls field", doc: minimal + "tls:\n  cert: /etc/c.pem\n", path: "tls.cert", msg: []string{"unknown field", "certificate"}},
		{name: "string port", doc: "vip: 192.0.2.10\nport: \"80\"\n", path: "port", msg: []string{`"80"`, "not a number"}},
		{name: "fraction port", doc: "vip: 192.0.2.10\nport: 80.5\n", path: "port", msg: []string{"80.5", "not a whole number"}},
		{name: "list vip", doc: "vip: [192.0.2.10]\nport: 80\n", path: "vip", msg: []string{"a list", "not a string"}},
		{name: "number vip", doc: "vip: 3221226010\nport: 80\n", path: "vip", msg: []string{"3221226010", "not a string"}},
		{name: "fraction weight", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n    weight: 1.5\n", path: "backends[0].weight", msg: []string{"1.5", "not a whole number"}},
		{name: "backends a mapping", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  address: 10.0.0.1\n", path: "backends", msg: []string{"a mapping", "not a list"}},
		{name: "backend a string", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - 10.0.0.1\n", path: "backends[0]", msg: []string{`"10.0.0.1"`, "not a mapping"}},
		{name: "health a string", doc: minimal + "health: tcp\n", path: "health", msg: []string{`"tcp"`, "not a mapping"}},
		{name: "fail_open a string", doc: minimal + "fail_open: \"true\"\n", path: "fail_open", msg: []string{`"true"`, "not true or false"}},
		{name: "allow_cidrs a string", doc: minimal + "allow_cidrs: 10.0.0.0/8\n", path: "allow_cidrs", msg: []string{`"10.0.0.0/8"`, "not a list"}},
		{name: "scheduler_flags item a number", doc: minimal + "scheduler_flags: [1]\n", path: "scheduler_flags[0]", msg: []string{"1", "not a string"}},

		// Service name.
		{name: "name upper case", svc: "Web", doc: minimal, path: "name", msg: []string{`"Web"`, "DNS label"}},
		{name: "name underscore", svc: "web_1", doc: minimal, path: "name", msg: []string{`"web_1"`}},
		{name: "name leading hyphen", svc: "-web", doc: minimal, path: "name", msg: []string{`"-web"`}},
		{name: "name trailing hyphen", svc: "web-", doc: minimal, path: "name", msg: []string{`"web-"`}},
		{name: "name empty", svc: "", doc: minimal, path: "name", msg: []string{`""`}},
		{name: "name 64 characters", svc: strings.Repeat("a", 64), doc: minimal, path: "name", msg: []string{strings.Repeat("a", 64)}},
		{name: "name with dot", svc: "web.example", doc: minimal, path: "name", msg: []string{`"web.example"`}},

		// vip.
		{name: "vip missing", doc: "port: 80\n", path: "vip", msg: []string{"missing"}},
		{name: "vip bad", doc: "vip: 192.0.2.300\nport: 80\n", path: "vip", msg: []string{`"192.0.2.300"`, "not an IPv4 or IPv6 address"}},
		{name: "vip hostname", doc: "vip: lb.example.com\nport: 80\n", path: "vip", msg: []string{`"lb.example.com"`}},
		{name: "vip cidr", doc: "vip: 192.0.2.10/32\nport: 80\n", path: "vip", msg: []string{`"192.0.2.10/32"`}},
		{name: "vip v6 bad", doc: "vip: \"2001:db8::g\"\nport: 80\n", path: "vip", msg: []string{`"2001:db8::g"`}},
		{name: "vip with zone", doc: "vip: \"fe80::1%eth0\"\nport: 80\n", path: "vip", msg: []string{`"fe80::1%eth0"`, "zone"}},
		{name: "vip multicast v4", doc: "vip: 224.0.0.1\nport: 80\n", path: "vip", msg: []string{`"224.0.0.1"`, "unicast"}},
		{name: "vip multicast v6", doc: "vip: \"ff02::1\"\nport: 80\n", path: "vip", msg: []string{`"ff02::1"`, "unicast"}},
		{name: "vip unspecified v4", doc: "vip: 0.0.0.0\nport: 80\n", path: "vip", msg: []string{`"0.0.0.0"`, "unicast"}},
		{name: "vip unspecified v6", doc: "vip: \"::\"\nport: 80\n", path: "vip", msg: []string{`"::"`, "unicast"}},
		{name: "vip limited broadcast", doc: "vip: 255.255.255.255\nport: 80\n", path: "vip", msg: []string{`"255.255.255.255"`, "unicast", "broadcast"}},
		{name: "vip this network", doc: "vip: 0.1.2.3\nport: 80\n", path: "vip", msg: []string{`"0.1.2.3"`, "unicast", "this network"}},
		{name: "vip v4-mapped unspecified", doc: "vip: \"::ffff:0.0.0.0\"\nport: 80\n", path: "vip", msg: []string{`"::ffff:0.0.0.0"`, "unicast"}},
		{name: "vip v4-mapped broadcast", doc: "vip: \"::ffff:255.255.255.255\"\nport: 80\n", path: "vip", msg: []string{`"::ffff:255.255.255.255"`, "broadcast"}},
		{name: "vip link-local v4", doc: "vip: 169.254.169.254\nport: 80\n", path: "vip", msg: []string{`"169.254.169.254"`, "link-local"}},
		{name: "vip link-local v6", doc: "vip: \"fe80::1\"\nport: 80\n", path: "vip", msg: []string{`"fe80::1"`, "link-local"}},

		// Ports.
		{name: "port missing", doc: "vip: 192.0.2.10\n", path: "port", msg: []string{"missing"}},
		{name: "port zero", doc: "vip: 192.0.2.10\nport: 0\n", path: "port", msg: []string{"0 is out of range 1-65535"}},
		{name: "port negative", doc: "vip: 192.0.2.10\nport: -1\n", path: "port", msg: []string{"-1 is out of range"}},
		{name: "port too big", doc: "vip: 192.0.2.10\nport: 65536\n", path: "port", msg: []string{"65536 is out of range"}},
		{name: "backend port too big", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n  - address: 10.0.0.2\n    port: 70000\n", path: "backends[1].port", msg: []string{"70000 is out of range 1-65535"}},
		{name: "backend port zero", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n    port: 0\n", path: "backends[0].port", msg: []string{"0 is out of range"}},
		{name: "health port too big", doc: minimal + "health:\n  port: 65536\n", path: "health.port", msg: []string{"65536 is out of range"}},
		{name: "health port zero", doc: minimal + "health:\n  port: 0\n", path: "health.port", msg: []string{"0 is out of range"}},
		// YAML 1.1 reads 0120 as octal 80, YAML 1.2 as 120: refused, not guessed.
		{name: "port leading zero", doc: "vip: 192.0.2.10\nport: 0120\n", path: "port", msg: []string{"0120", "leading zero", "octal (80)"}},
		{name: "port leading zero in json", doc: `{"vip": "192.0.2.10", "port": 0120}`, path: "port", msg: []string{"0120", "leading zero"}},
		{name: "port leading zero not octal", doc: "vip: 192.0.2.10\nport: 0080\n", path: "port", msg: []string{"0080", "leading zero"}},
		{name: "port negative leading zero", doc: "vip: 192.0.2.10\nport: -010\n", path: "port", msg: []string{"-010", "leading zero"}},
		{name: "port hex", doc: "vip: 192.0.2.10\nport: 0x50\n", path: "port", msg: []string{"0x50", "not a plain decimal number", "80"}},
		{name: "port 0o octal", doc: "vip: 192.0.2.10\nport: 0o120\n", path: "port", msg: []string{"0o120", "not a plain decimal"}},
		{name: "port binary", doc: "vip: 192.0.2.10\nport: 0b1010000\n", path: "port", msg: []string{"0b1010000", "not a plain decimal"}},
		{name: "port underscores", doc: "vip: 192.0.2.10\nport: 8_0\n", path: "port", msg: []string{"8_0", "not a plain decimal"}},
		{name: "weight leading zero", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n  - address: 10.0.0.2\n    weight: 010\n", path: "backends[1].weight", msg: []string{"010", "leading zero", "octal (8)"}},
		{name: "health rise leading zero", doc: minimal + "health:\n  rise: 03\n", path: "health.rise", msg: []string{"03", "leading zero"}},
		{name: "float leading zero", doc: "vip: 192.0.2.10\nport: 080.5\n", path: "port", msg: []string{"080.5", "leading zero"}},
		{name: "leading zero in a string field", doc: minimal + "persistence: 0300\n", path: "persistence", msg: []string{"0300", "leading zero"}},

		// Enums.
		{name: "protocol", doc: minimal + "protocol: sctp\n", path: "protocol", msg: []string{`"sctp"`, "tcp, udp"}},
		{name: "protocol upper case", doc: minimal + "protocol: TCP\n", path: "protocol", msg: []string{`"TCP"`}},
		{name: "scheduler", doc: minimal + "scheduler: lblc\n", path: "scheduler", msg: []string{`"lblc"`, "rr, wrr, lc, wlc, sh, mh"}},
		{name: "forwarding", doc: minimal + "forwarding: fullnat\n", path: "forwarding", msg: []string{`"fullnat"`, "nat, dr, tun"}},
		{name: "driver", doc: minimal + "driver: nginx\n", path: "driver", msg: []string{`"nginx"`, "ipvs, nftables, haproxy"}},
		{name: "nftables lc", doc: minimal + "driver: nftables\nscheduler: lc\n", path: "scheduler", msg: []string{`"lc"`, "driver nftables"}},
		{name: "nftables wlc", doc: minimal + "driver: nftables\nscheduler: wlc\n", path: "scheduler", msg: []string{`"wlc"`, "driver nftables"}},
		{name: "nftables tun", doc: minimal + "driver: nftables\nforwarding: tun\n", path: "forwarding", msg: []string{`"tun"`, "driver nftables"}},
		{name: "nftables dr", doc: minimal + "driver: nftables\nforwarding: dr\n", path: "forwarding", msg: []string{`"dr"`, "driver nftables"}},
		{name: "nftables scheduler flags", doc: minimal + "driver: nftables\nscheduler: mh\nscheduler_flags: [mh-port]\n", path: "scheduler_flags[0]", msg: []string{`"mh-port"`, "IPVS only"}},
		{name: "nftables tls", doc: minimal + "driver: nftables\ntls:\n  certificate: /etc/x.pem\n", path: "driver", msg: []string{`"nftables"`, "cannot terminate TLS"}},
		{name: "ha_group not a label", doc: minimal + "ha_group: Web_1\n", path: "ha_group", msg: []string{`"Web_1"`, "DNS label"}},
		{name: "health protocol", doc: minimal + "health:\n  protocol: icmp\n", path: "health.protocol", msg: []string{`"icmp"`, "tcp, http, https, udp, none"}},

		// Durations.
		{name: "persistence fraction of a second", doc: minimal + "persistence: 1500ms\n", path: "persistence", msg: []string{`"1500ms"`, "whole number of seconds"}},
		{name: "persistence negative", doc: minimal + "persistence: -5s\n", path: "persistence", msg: []string{`"-5s"`, "negative"}},
		{name: "persistence unparsable", doc: minimal + "persistence: 5 minutes\n", path: "persistence", msg: []string{`"5 minutes"`, "not a duration"}},
		{name: "persistence bare number", doc: minimal + "persistence: \"300\"\n", path: "persistence", msg: []string{`"300"`, "not a duration"}},
		{name: "persistence too long", doc: minimal + "persistence: 577h\n", path: "persistence", msg: []string{`"577h"`, "more than the limit of 576h0m0s"}},
		{name: "drain unparsable", doc: minimal + "drain: forever\n", path: "drain", msg: []string{`"forever"`, "not a duration"}},
		{name: "drain negative", doc: minimal + "drain: -1s\n", path: "drain", msg: []string{`"-1s"`, "negative"}},
		{name: "interval unparsable", doc: minimal + "health:\n  interval: fast\n", path: "health.interval", msg: []string{`"fast"`}},
		{name: "timeout unparsable", doc: minimal + "health:\n  timeout: 1 second\n", path: "health.timeout", msg: []string{`"1 second"`}},
		{name: "interval zero", doc: minimal + "health:\n  interval: 0s\n", path: "health.interval", msg: []string{`"0s"`, "more than 0"}},
		{name: "timeout zero", doc: minimal + "health:\n  timeout: 0s\n", path: "health.timeout", msg: []string{`"0s"`, "more than 0"}},
		{name: "timeout equals interval", doc: minimal + "health:\n  interval: 1s\n  timeout: 1s\n", path: "health.timeout", msg: []string{"1s must be less than health.interval 1s"}},
		{name: "timeout above default interval", doc: minimal + "health:\n  timeout: 3s\n", path: "health.timeout", msg: []string{"3s", "health.interval 2s"}},
		{name: "timeout above interval", doc: minimal + "health:\n  interval: 500ms\n  timeout: 750ms\n", path: "health.timeout", msg: []string{"750ms", "500ms"}},

		// Rise and fall.
		{name: "rise zero", doc: minimal + "health:\n  rise: 0\n", path: "health.rise", msg: []string{"0 is out of range 1-1000"}},
		{name: "rise negative", doc: minimal + "health:\n  rise: -2\n", path: "health.rise", msg: []string{"-2 is out of range"}},
		{name: "fall too big", doc: minimal + "health:\n  fall: 1001\n", path: "health.fall", msg: []string{"1001 is out of range"}},

		// Health fields that belong to other check kinds.
		{name: "path with tcp check", doc: minimal + "health:\n  path: /healthz\n", path: "health.path", msg: []string{`"/healthz"`, `"tcp"`}},
		{name: "path with udp check", doc: minimal + "protocol: udp\nhealth:\n  protocol: udp\n  path: /healthz\n", path: "health.path", msg: []string{`"/healthz"`, `"udp"`}},
		{name: "path with space", doc: minimal + "health:\n  protocol: http\n  path: /a b\n", path: "health.path", msg: []string{`"/a b"`, "request path"}},
		{name: "path with newline", doc: minimal + "health:\n  protocol: http\n  path: \"/a\\r\\nHost: evil\"\n", path: "health.path", msg: []string{`"/a\r\nHost: evil"`}},
		{name: "path relative", doc: minimal + "health:\n  protocol: https\n  path: healthz\n", path: "health.path", msg: []string{`"healthz"`}},
		{name: "path empty", doc: minimal + "health:\n  protocol: http\n  path: \"\"\n", path: "health.path", msg: []string{`""`}},
		{name: "path bad escape", doc: minimal + "health:\n  protocol: http\n  path: /%zz\n", path: "health.path", msg: []string{`"/%zz"`, `"%zz"`, "percent-encoding"}},
		{name: "path escape cut short", doc: minimal + "health:\n  protocol: http\n  path: /a%2\n", path: "health.path", msg: []string{`"/a%2"`, `"%2"`}},
		{name: "path lone percent", doc: minimal + "health:\n  protocol: https\n  path: /a?q=100%\n", path: "health.path", msg: []string{`"/a?q=100%"`, `"%"`}},
		{name: "path bad escape after a good one", doc: minimal + "health:\n  protocol: http\n  path: /a%2Fb%g1\n", path: "health.path", msg: []string{`"%g1"`}},
		{name: "path too long", doc: minimal + "health:\n  protocol: http\n  path: /" + strings.Repeat("a", 1024) + "\n", path: "health.path", msg: []string{"/aaaa"}},
		{name: "sni with http check", doc: minimal + "health:\n  protocol: http\n  sni: api.example.com\n", path: "health.sni", msg: []string{`"api.example.com"`, `"http"`}},
		{name: "sni with default tcp check", doc: minimal + "health:\n  sni: api.example.com\n", path: "health.sni", msg: []string{`"api.example.com"`, `"tcp"`}},
		{name: "sni with underscore", doc: minimal + "health:\n  protocol: https\n  sni: bad_name.example.com\n", path: "health.sni", msg: []string{`"bad_name.example.com"`, "not a DNS name"}},
		{name: "sni with space", doc: minimal + "health:\n  protocol: https\n  sni: \"a b\"\n", path: "health.sni", msg: []string{`"a b"`}},
		{name: "sni empty", doc: minimal + "health:\n  protocol: https\n  sni: \"\"\n", path: "health.sni", msg: []string{`""`}},
		{name: "sni trailing dot", doc: minimal + "health:\n  protocol: https\n  sni: api.example.com.\n", path: "health.sni", msg: []string{`"api.example.com."`}},
		{name: "verify with http check", doc: minimal + "health:\n  protocol: http\n  verify: true\n", path: "health.verify", msg: []string{`"http"`, "https"}},
		{name: "verify false with tcp check", doc: minimal + "health:\n  verify: false\n", path: "health.verify", msg: []string{`"tcp"`}},
		{name: "payload with tcp check", doc: minimal + "health:\n  payload: ping\n", path: "health.payload", msg: []string{`"ping"`, `"tcp"`}},
		{name: "payload too big", doc: minimal + "protocol: udp\nhealth:\n  protocol: udp\n  payload: " + strings.Repeat("p", 513) + "\n", path: "health.payload", msg: []string{"513 bytes"}},

		// TLS and driver rules across fields.
		{name: "tls with udp", doc: minimal + "protocol: udp\ntls:\n  certificate: /etc/switchman/certs/api.pem\n", path: "tls", msg: []string{`"udp"`}},
		{name: "tls with driver ipvs", doc: minimal + "driver: ipvs\ntls:\n  certificate: /etc/switchman/certs/api.pem\n", path: "driver", msg: []string{`"ipvs"`, "TLS"}},
		{name: "haproxy with udp", doc: minimal + "protocol: udp\ndriver: haproxy\n", path: "protocol", msg: []string{`"udp"`, "haproxy"}},
		{name: "haproxy with dr", doc: minimal + "driver: haproxy\nforwarding: dr\n", path: "forwarding", msg: []string{`"dr"`, "IPVS only"}},
		{name: "haproxy with tun", doc: minimal + "driver: haproxy\nforwarding: tun\n", path: "forwarding", msg: []string{`"tun"`}},
		{name: "tls with dr", doc: minimal + "forwarding: dr\ntls:\n  certificate: /etc/switchman/certs/api.pem\n", path: "forwarding", msg: []string{`"dr"`}},
		{name: "tls with neither", doc: minimal + "tls: {}\n", path: "tls", msg: []string{"neither"}},
		{name: "tls with both", doc: minimal + "tls:\n  certificate: /etc/a.pem\n  certificate_key: /switchman/certs/a\n", path: "tls", msg: []string{`"/etc/a.pem"`, `"/switchman/certs/a"`, "both"}},
		{name: "tls a string", doc: minimal + "tls: /etc/a.pem\n", path: "tls", msg: []string{`"/etc/a.pem"`, "not a mapping"}},

		// Certificate paths.
		{name: "certificate with space", doc: minimal + "tls:\n  certificate: /etc/certs/my cert.pem\n", path: "tls.certificate", msg: []string{`"/etc/certs/my cert.pem"`}},
		{name: "certificate with newline", doc: minimal + "tls:\n  certificate: \"/etc/a.pem\\n  bind :1\"\n", path: "tls.certificate", msg: []string{`"/etc/a.pem\n  bind :1"`}},
		{name: "certificate with semicolon", doc: minimal + "tls:\n  certificate: \"/etc/a.pem;reboot\"\n", path: "tls.certificate", msg: []string{`"/etc/a.pem;reboot"`}},
		{name: "certificate with dot-dot", doc: minimal + "tls:\n  certificate: /etc/switchman/../shadow\n", path: "tls.certificate", msg: []string{`"/etc/switchman/../shadow"`, "'..'"}},
		{name: "certificate ending in dot-dot", doc: minimal + "tls:\n  certificate: /etc/switchman/..\n", path: "tls.certificate", msg: []string{`"/etc/switchman/.."`}},
		{name: "certificate relative", doc: minimal + "tls:\n  certificate: certs/api.pem\n", path: "tls.certificate", msg: []string{`"certs/api.pem"`, "absolute"}},
		{name: "certificate with quote", doc: minimal + "tls:\n  certificate: \"/etc/a\\\".pem\"\n", path: "tls.certificate", msg: []string{`"/etc/a\".pem"`}},
		{name: "certificate empty", doc: minimal + "tls:\n  certificate: \"\"\n", path: "tls.certificate", msg: []string{`""`}},
		{name: "certificate_key with space", doc: minimal + "tls:\n  certificate_key: /switchman/certs/a b\n", path: "tls.certificate_key", msg: []string{`"/switchman/certs/a b"`}},
		{name: "certificate_key with dot-dot", doc: minimal + "tls:\n  certificate_key: /switchman/../etc\n", path: "tls.certificate_key", msg: []string{`"/switchman/../etc"`}},

		// Scheduler flags.
		{name: "mh flag with rr", doc: minimal + "scheduler_flags: [mh-port]\n", path: "scheduler_flags[0]", msg: []string{`"mh-port"`, "scheduler mh, not rr"}},
		{name: "sh flag with mh", doc: minimal + "scheduler: mh\nscheduler_flags: [mh-fallback, sh-port]\n", path: "scheduler_flags[1]", msg: []string{`"sh-port"`, "scheduler sh, not mh"}},
		{name: "unknown flag", doc: minimal + "scheduler: sh\nscheduler_flags: [sh-sticky]\n", path: "scheduler_flags[0]", msg: []string{`"sh-sticky"`, "not a scheduler flag"}},
		{name: "flag with haproxy", doc: minimal + "scheduler: sh\ndriver: haproxy\nscheduler_flags: [sh-port]\n", path: "scheduler_flags[0]", msg: []string{`"sh-port"`, "IPVS only"}},

		// allow_cidrs.
		{name: "allow_cidrs empty", doc: minimal + "allow_cidrs: []\n", path: "allow_cidrs", msg: []string{"empty"}},
		{name: "allow_cidrs bad", doc: minimal + "allow_cidrs: [10.0.0.0/33]\n", path: "allow_cidrs[0]", msg: []string{`"10.0.0.0/33"`, "not a CIDR"}},
		{name: "allow_cidrs garbage", doc: minimal + "allow_cidrs: [198.51.100.0/24, office]\n", path: "allow_cidrs[1]", msg: []string{`"office"`}},
		{name: "allow_cidrs v6 for v4 vip", doc: minimal + "allow_cidrs: [\"2001:db8::/32\"]\n", path: "allow_cidrs[0]", msg: []string{`"2001:db8::/32"`, "IPv6", "IPv4"}},
		{name: "allow_cidrs v4 for v6 vip", doc: "vip: \"2001:db8::10\"\nport: 80\nbackends:\n  - address: \"fd00::1\"\nallow_cidrs: [198.51.100.0/24]\n", path: "allow_cidrs[0]", msg: []string{`"198.51.100.0/24"`, "IPv4", "IPv6"}},
		{name: "allow_cidrs bare v6 address for v4 vip", doc: minimal + "allow_cidrs: [\"2001:db8::1\"]\n", path: "allow_cidrs[0]", msg: []string{`"2001:db8::1"`}},
		{name: "allow_cidrs address with zone", doc: "vip: \"2001:db8::10\"\nport: 80\nallow_cidrs: [\"fe80::1%eth0\"]\n", path: "allow_cidrs[0]", msg: []string{`"fe80::1%eth0"`}},

		// mode and routes.
		{name: "mode unknown", doc: minimal + "mode: https\n", path: "mode", msg: []string{`"https"`, "tcp, http"}},
		{name: "mode http on ipvs", doc: minimal + "mode: http\ndriver: ipvs\n", path: "driver", msg: []string{`"ipvs"`, "mode http needs driver haproxy"}},
		{name: "mode http on nftables", doc: minimal + "mode: http\ndriver: nftables\n", path: "driver", msg: []string{`"nftables"`}},
		{name: "mode http over udp", doc: minimal + "mode: http\nprotocol: udp\n", path: "protocol", msg: []string{`"udp" is not supported by driver haproxy`}},
		{name: "routes in mode tcp", doc: minimal + "routes: [{host: www.example.com}]\n", path: "routes", msg: []string{`mode is "tcp"`, "need mode http"}},
		{name: "routes in mode tcp through haproxy", doc: minimal + "driver: haproxy\nroutes: [{host: www.example.com}]\n", path: "routes", msg: []string{"need mode http"}},
		{name: "routes empty", doc: minimal + "mode: http\nroutes: []\n", path: "routes", msg: []string{"empty", "leave it out"}},
		{name: "route unknown field", doc: minimal + "mode: http\nroutes: [{hostname: a.example.com}]\n", path: "routes[0].hostname", msg: []string{"unknown field", "host"}},
		{name: "route host empty", doc: minimal + "mode: http\nroutes: [{host: \"\"}]\n", path: "routes[0].host", msg: []string{"empty", "leave host out"}},
		{name: "route host star", doc: minimal + "mode: http\nroutes: [{host: \"*\"}]\n", path: "routes[0].host", msg: []string{`"*"`, "leave host out"}},
		{name: "route host with port", doc: minimal + "mode: http\nroutes: [{host: \"www.example.com:80\"}]\n", path: "routes[0].host", msg: []string{"has a port"}},
		{name: "route host ipv6", doc: minimal + "mode: http\nroutes: [{host: \"[::1]\"}]\n", path: "routes[0].host", msg: []string{"IPv6"}},
		{name: "route wildcard inside", doc: minimal + "mode: http\nroutes: [{host: \"www.*.example.com\"}]\n", path: "routes[0].host", msg: []string{"whole leading label"}},
		{name: "route wildcard partial label", doc: minimal + "mode: http\nroutes: [{host: \"w*.example.com\"}]\n", path: "routes[0].host", msg: []string{"whole leading label"}},
		{name: "route double wildcard", doc: minimal + "mode: http\nroutes: [{host: \"*.*.example.com\"}]\n", path: "routes[0].host", msg: []string{"whole leading label"}},
		{name: "route wildcard alone with dot", doc: minimal + "mode: http\nroutes: [{host: \"*.\"}]\n", path: "routes[0].host", msg: []string{"not a host name"}},
		{name: "route host underscore", doc: minimal + "mode: http\nroutes: [{host: \"my_host.example.com\"}]\n", path: "routes[0].host", msg: []string{"not a host name"}},
		{name: "route host trailing dot", doc: minimal + "mode: http\nroutes: [{host: \"www.example.com.\"}]\n", path: "routes[0].host", msg: []string{"not a host name"}},
		{name: "route host unicode", doc: minimal + "mode: http\nroutes: [{host: \"bücher.example\"}]\n", path: "routes[0].host", msg: []string{"xn--"}},
		{name: "route host label too long", doc: minimal + "mode: http\nroutes: [{host: \"" + strings.Repeat("a", 64) + ".example.com\"}]\n", path: "routes[0].host", msg: []string{"not a host name"}},
		{name: "route host too long", doc: minimal + "mode: http\nroutes: [{host: \"" + strings.Repeat("a.", 127) + "com\"}]\n", path: "routes[0].host", msg: []string{"longer than 253"}},
		{name: "route host injection newline", doc: minimal + "mode: http\nroutes: [{host: \"a.example.com\\n    use_backend be_x\"}]\n", path: "routes[0].host", msg: []string{"not a host name"}},
		{name: "route host injection space", doc: minimal + "mode: http\nroutes: [{host: \"a.example.com be_http_rr_1\"}]\n", path: "routes[0].host", msg: []string{"not a host name"}},
		{name: "route host injection semicolon", doc: minimal + "mode: http\nroutes: [{host: \"a.example.com;clear map x\"}]\n", path: "routes[0].host", msg: []string{"not a host name"}},
		{name: "route host injection hash", doc: minimal + "mode: http\nroutes: [{host: \"a.example.com#\"}]\n", path: "routes[0].host", msg: []string{"not a host name"}},
		{name: "route path relative", doc: minimal + "mode: http\nroutes: [{path_prefix: api}]\n", path: "routes[0].path_prefix", msg: []string{`"api"`, "absolute"}},
		{name: "route path double slash", doc: minimal + "mode: http\nroutes: [{path_prefix: /a//b}]\n", path: "routes[0].path_prefix", msg: []string{"empty segment"}},
		{name: "route path dotdot", doc: minimal + "mode: http\nroutes: [{path_prefix: /a/../admin}]\n", path: "routes[0].path_prefix", msg: []string{"'..'"}},
		{name: "route path dot", doc: minimal + "mode: http\nroutes: [{path_prefix: /./a}]\n", path: "routes[0].path_prefix", msg: []string{"'.'"}},
		{name: "route path query", doc: minimal + "mode: http\nroutes: [{path_prefix: \"/a?b=1\"}]\n", path: "routes[0].path_prefix", msg: []string{"character other than"}},
		{name: "route path space", doc: minimal + "mode: http\nroutes: [{path_prefix: \"/a b\"}]\n", path: "routes[0].path_prefix", msg: []string{"character other than"}},
		{name: "route path injection newline", doc: minimal + "mode: http\nroutes: [{path_prefix: \"/a\\nadd map x y\"}]\n", path: "routes[0].path_prefix", msg: []string{"character other than"}},
		{name: "route path injection semicolon", doc: minimal + "mode: http\nroutes: [{path_prefix: \"/a;del map x\"}]\n", path: "routes[0].path_prefix", msg: []string{"character other than"}},
		{name: "route path injection hash", doc: minimal + "mode: http\nroutes: [{path_prefix: \"/a#\"}]\n", path: "routes[0].path_prefix", msg: []string{"character other than"}},
		{name: "route path injection backslash", doc: minimal + "mode: http\nroutes: [{path_prefix: \"/a\\\\b\"}]\n", path: "routes[0].path_prefix", msg: []string{"character other than"}},
		{name: "route path bad escape", doc: minimal + "mode: http\nroutes: [{path_prefix: \"/a%zz\"}]\n", path: "routes[0].path_prefix", msg: []string{`"%zz"`, "percent-encoding"}},
		{name: "route path too long", doc: minimal + "mode: http\nroutes: [{path_prefix: \"/" + strings.Repeat("a", 1024) + "\"}]\n", path: "routes[0].path_prefix", msg: []string{"longer than 1024"}},
		{name: "route twice", doc: minimal + "mode: http\nroutes: [{host: a.example.com, path_prefix: /api}, {host: A.example.com, path_prefix: /api/}]\n", path: "routes[1]", msg: []string{"a.example.com/api", "same route as routes[0]"}},
		{name: "routes over the limit", doc: minimal + "mode: http\nroutes:\n" + strings.Repeat("  - {path_prefix: /a}\n", MaxRoutes+1), path: "routes", msg: []string{"more than the limit"}},

		// Backends.
		{name: "backend address missing", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n  - port: 8080\n", path: "backends[1].address", msg: []string{"missing"}},
		{name: "backend address bad", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.256\n", path: "backends[0].address", msg: []string{`"10.0.0.256"`}},
		{name: "backend address multicast", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 239.1.1.1\n", path: "backends[0].address", msg: []string{`"239.1.1.1"`, "unicast"}},
		{name: "backend address unspecified", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 0.0.0.0\n", path: "backends[0].address", msg: []string{`"0.0.0.0"`}},
		{name: "backend address broadcast", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 255.255.255.255\n", path: "backends[0].address", msg: []string{`"255.255.255.255"`, "broadcast"}},
		{name: "backend address this network", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 0.0.0.1\n", path: "backends[0].address", msg: []string{`"0.0.0.1"`, "this network"}},
		{name: "backend address v4-mapped unspecified", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: \"::ffff:0.0.0.0\"\n", path: "backends[0].address", msg: []string{`"::ffff:0.0.0.0"`, "unicast"}},
		{name: "backend address metadata service", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 169.254.169.254\n", path: "backends[0].address", msg: []string{`"169.254.169.254"`, "link-local"}},
		{name: "backend address link-local v6", doc: "vip: \"2001:db8::10\"\nport: 80\nbackends:\n  - address: \"fe80::2\"\n", path: "backends[0].address", msg: []string{`"fe80::2"`, "link-local"}},
		{name: "weight negative", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n    weight: -1\n", path: "backends[0].weight", msg: []string{"-1 is out of range 0-65535"}},
		{name: "weight too big", doc: "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n  - address: 10.0.0.2\n    weight: 65536\n", path: "backends[1].weight", msg: []string{"65536 is out of range 0-65535"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			name := tt.svc
			if name == "" && !strings.HasPrefix(tt.name, "name ") {
				name = "web"
			}
			s, err := Parse(name, []byte(tt.doc))
			if s != nil {
				t.Errorf("Parse returned a service along with the error")
			}
			wantFieldError(t, err, tt.path, tt.msg...)
		})
	}
}

// TestParseErrorFormat pins the text an operator sees, and that every
// problem of a definition is reported at once, not only the first.
func TestParseErrorFormat(t *testing.T) {
	doc := "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.0.0.1\n  - address: 10.0.0.2\n    port: 70000\n"
	_, err := Parse("web", []byte(doc))
	if err == nil || err.Error() != "backends[1].port: 70000 is out of range 1-65535" {
		t.Fatalf("error = %v; want exactly %q", err, "backends[1].port: 70000 is out of range 1-65535")
	}

	doc = "vip: 192.0.2.300\nport: 0\nprotocol: sctp\nbackends:\n  - address: nope\n"
	_, err = Parse("Web", []byte(doc))
	list := fieldErrors(t, err)
	var paths []string
	for _, fe := range list {
		paths = append(paths, fe.Path)
	}
	// The name is checked (and its error kept) before the document.
	if got := strings.Join(paths, ","); got != "name" {
		t.Errorf("paths with a bad name = %s; want only name (the document is not read)", got)
	}
	_, err = Parse("web", []byte(doc))
	paths = nil
	for _, fe := range fieldErrors(t, err) {
		paths = append(paths, fe.Path)
	}
	want := "vip,port,protocol,backends[0].address"
	if got := strings.Join(paths, ","); got != want {
		t.Errorf("paths = %s; want %s", got, want)
	}

	// Unknown fields are all reported, in sorted order.
	_, err = Parse("web", []byte(minimal+"zeta: 1\nalpha: 2\n"))
	paths = nil
	for _, fe := range fieldErrors(t, err) {
		paths = append(paths, fe.Path)
	}
	if got := strings.Join(paths, ","); got != "alpha,zeta" {
		t.Errorf("unknown-field paths = %s; want alpha,zeta", got)
	}
}

func TestFieldErrorString(t *testing.T) {
	if got := (&FieldError{Msg: "the definition is empty"}).Error(); got != "the definition is empty" {
		t.Errorf("no-path error = %q", got)
	}
	if got := (&FieldError{Path: "vip", Msg: "missing"}).Error(); got != "vip: missing" {
		t.Errorf("error = %q", got)
	}
	errs := Errors{{Path: "a", Msg: "x"}, {Path: "b", Msg: "y"}}
	if got := errs.Error(); got != "a: x; b: y" {
		t.Errorf("Errors.Error = %q", got)
	}
	if Errors(nil).Err() != nil {
		t.Error("empty Errors.Err() is not nil")
	}
	if err := errs.Err(); err == nil {
		t.Error("non-empty Errors.Err() is nil")
	}
}

func TestValidateName(t *testing.T) {
	for _, ok := range []string{"a", "0", "web", "web-1", "a1-b2-c3", strings.Repeat("a", 63)} {
		if err := ValidateName(ok); err != nil {
			t.Errorf("ValidateName(%q) = %v; want nil", ok, err)
		}
	}
	for _, bad := range []string{"", "-", "a-", "-a", "A", "a_b", "a.b", "a b", "ä", strings.Repeat("a", 64), "web\n"} {
		err := ValidateName(bad)
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Path != "name" {
			t.Errorf("ValidateName(%q) = %v; want a FieldError at name", bad, err)
		}
	}
}
