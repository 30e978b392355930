package main

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/switchman-lb/switchman/status"
)

// run runs the CLI in-process and returns its output and error.
func run(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	app := newApp()
	app.Writer, app.ErrWriter = &out, &errOut
	app.ExitErrHandler = func(*cli.Context, error) {} // no os.Exit in tests
	err = app.Run(append([]string{"switchman"}, args...))
	return out.String(), errOut.String(), err
}

func writeDefs(t *testing.T, files map[string]string) []string {
	t.Helper()
	dir := t.TempDir()
	var paths []string
	for name, body := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	return paths
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name    string
		files   map[string]string
		wantErr bool
		want    []string // lines that must appear in stderr
	}{
		{
			name:  "valid",
			files: map[string]string{"web.yaml": "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.1.1.2\n"},
		},
		{
			name:    "every error named with file, field and value",
			files:   map[string]string{"web.yaml": "vip: 192.0.2.300\nport: 80\nscheduler: fastest\nbackends:\n  - address: 10.1.1.2\n    port: 70000\n"},
			wantErr: true,
			want: []string{
				`web.yaml: vip: "192.0.2.300" is not an IPv4 or IPv6 address`,
				`web.yaml: scheduler: "fastest" is not one of rr, wrr, lc, wlc, sh, mh`,
				`web.yaml: backends[0].port: 70000 is out of range 1-65535`,
			},
		},
		{
			name: "conflict across files names the winner",
			files: map[string]string{
				"a.yaml": "vip: 192.0.2.10\nport: 80\nbackends: [{address: 10.1.1.2}]\n",
				"b.yaml": "vip: 192.0.2.10\nport: 80\nbackends: [{address: 10.1.1.3}]\n",
			},
			wantErr: true,
			want:    []string{`already claimed by service "a"`},
		},
		{
			name:    "bad file name is a bad service name",
			files:   map[string]string{"Web_1.yaml": "vip: 192.0.2.10\nport: 80\nbackends: [{address: 10.1.1.2}]\n"},
			wantErr: true,
			want:    []string{`name: "Web_1" is not a DNS label`},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			paths := writeDefs(t, tc.files)
			// Sort so "a" comes before "b" (file order decides conflicts).
			if len(paths) > 1 && filepath.Base(paths[0]) > filepath.Base(paths[1]) {
				paths[0], paths[1] = paths[1], paths[0]
			}
			_, stderr, err := run(t, append([]string{"validate"}, paths...)...)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v; stderr:\n%s", err, tc.wantErr, stderr)
			}
			if tc.wantErr {
				if ec, ok := err.(cli.ExitCoder); !ok || ec.ExitCode() != 1 {
					t.Fatalf("exit code: %v, want 1", err)
				}
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr)
				}
			}
		})
	}
}

func TestPlanPrintsNFTablesRuleset(t *testing.T) {
	paths := writeDefs(t, map[string]string{
		"web.yaml": "vip: 192.0.2.10\nport: 80\nscheduler: mh\nbackends:\n  - {address: 10.1.1.2, port: 8080, weight: 3}\n  - {address: 10.1.1.3, port: 8080}\n",
	})
	stdout, stderr, err := run(t, append([]string{"plan", "--l4-driver", "nftables"}, paths...)...)
	if err != nil {
		t.Fatalf("plan: %v\n%s", err, stderr)
	}
	for _, want := range []string{"# nf_tables: 1 service(s)", "table ip switchman {", "192.0.2.10 . tcp . 80 : goto svc-web", "0 : 10.1.1.2 . 8080", "map @slots-web"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("plan lacks %q:\n%s", want, stdout)
		}
	}
	// IPVS-only settings are refused for nf_tables, naming field and value.
	paths = writeDefs(t, map[string]string{"lc.yaml": "vip: 192.0.2.11\nport: 80\nscheduler: lc\nbackends: [{address: 10.1.1.2}]\n"})
	if _, stderr, err := run(t, append([]string{"validate", "--l4-driver", "nftables"}, paths...)...); err == nil || !strings.Contains(stderr, `scheduler: "lc" is not supported by driver nftables`) {
		t.Errorf("validate lc with nftables: %v\n%s", err, stderr)
	}
}

func TestPlanPrintsIPVSLines(t *testing.T) {
	paths := writeDefs(t, map[string]string{
		"web.yaml": "vip: 192.0.2.10\nport: 80\nscheduler: mh\nscheduler_flags: [mh-port, mh-fallback]\npersistence: 300s\nbackends:\n  - {address: 10.1.1.2, port: 8080, weight: 3}\n  - {address: 10.1.1.3, port: 8080}\n",
	})
	stdout, stderr, err := run(t, append([]string{"plan", "--l4-driver", "ipvs"}, paths...)...)
	if err != nil {
		t.Fatalf("plan: %v\n%s", err, stderr)
	}
	want := "-A -t 192.0.2.10:80 -s mh -b mh-fallback,mh-port -p 300\n" +
		"-a -t 192.0.2.10:80 -r 10.1.1.2:8080 -m -w 3\n" +
		"-a -t 192.0.2.10:80 -r 10.1.1.3:8080 -m -w 1\n"
	if !strings.Contains(stdout, want) {
		t.Fatalf("plan output lacks\n%s\ngot:\n%s", want, stdout)
	}
}

// TestPlanPrintsHTTPFrontend: two mode http services sharing port 80
// plan to one frontend, a routing map and two slots; a third claiming one
// of their routes is refused naming the winner.
func TestPlanPrintsHTTPFrontend(t *testing.T) {
	paths := writeDefs(t, map[string]string{
		"a-www.yaml": "vip: 192.0.2.60\nport: 80\nmode: http\nroutes: [{host: www.example.com}]\nbackends: [{address: 10.1.1.2, port: 8080}]\n",
		"b-api.yaml": "vip: 192.0.2.60\nport: 80\nmode: http\nroutes: [{host: www.example.com, path_prefix: /api}]\nbackends: [{address: 10.1.1.3, port: 9000}]\n",
		"c-dup.yaml": "vip: 192.0.2.60\nport: 80\nmode: http\nroutes: [{host: WWW.example.com, path_prefix: /api/}]\nbackends: [{address: 10.1.1.4, port: 9000}]\n",
	})
	slices.Sort(paths) // the order of the arguments is the order of creation
	stdout, stderr, err := run(t, append([]string{"plan"}, paths...)...)
	if err == nil {
		t.Fatalf("plan accepted a route claimed twice:\n%s", stdout)
	}
	if !strings.Contains(stderr, `routes[0]: www.example.com/api on 192.0.2.60:80/tcp is already claimed by service "b-api"`) {
		t.Errorf("stderr does not name the route and its winner:\n%s", stderr)
	}
	for _, want := range []string{
		"# HAProxy: 2 service(s)", "frontend fe_http_192.0.2.60_80\n", "bind 192.0.2.60:80\n",
		"    # service a-www 192.0.2.60:80\n    server s10.1.1.2_8080 10.1.1.2:8080 weight 1\n",
		"# routing map of fe_http_192.0.2.60_80", "www.example.com/api/ be_http_rr_2\nwww.example.com/ be_http_rr_1\n",
		"# backend slots rr (balance roundrobin): 2 of 130 in use: a-www=be_http_rr_1 b-api=be_http_rr_2",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("plan lacks %q:\n%s", want, stdout)
		}
	}
}

func TestStatusRows(t *testing.T) {
	rows := statusRows(map[string]map[string]status.Status{
		"lb2": {"web": {State: "applied", Driver: "ipvs", VIP: "192.0.2.10:80/tcp", FailingOpen: true,
			Backends: []status.BackendStatus{{Healthy: false}, {Healthy: false}}}},
		"lb1": {
			"web": {State: "applied", Driver: "ipvs", VIP: "192.0.2.10:80/tcp", Backends: []status.BackendStatus{{Healthy: true}, {Healthy: false}}},
			"bad": {State: "rejected", Error: "port: 70000 is out of range 1-65535", Backends: []status.BackendStatus{}},
			"big": {State: "applied", Driver: "ipvs", VIP: "192.0.2.11:80/tcp", Backends: []status.BackendStatus{{Healthy: true}},
				Summary: &status.Summary{Total: 19999, Healthy: 19000, Listed: 1}},
		},
	})
	want := []string{
		"bad\tlb1\t-\t\trejected\t0/0\tport: 70000 is out of range 1-65535",
		"big\tlb1\t192.0.2.11:80/tcp\tipvs\tapplied\t19000/19999\t-",
		"web\tlb1\t192.0.2.10:80/tcp\tipvs\tapplied\t1/2\t-",
		"web\tlb2\t192.0.2.10:80/tcp\tipvs\tapplied (failing open)\t0/2\t-",
	}
	if strings.Join(rows, "\n") != strings.Join(want, "\n") {
		t.Fatalf("rows:\n%s\nwant:\n%s", strings.Join(rows, "\n"), strings.Join(want, "\n"))
	}
}

func TestEnvVarsNameEveryFlag(t *testing.T) {
	app := newApp()
	check := func(where string, flags []cli.Flag) {
		for _, f := range flags {
			name := f.Names()[0]
			if name == "help" || name == "version" {
				continue // urfave/cli's own
			}
			want := "SWITCHMAN_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
			ev, ok := f.(interface{ GetEnvVars() []string })
			if !ok || len(ev.GetEnvVars()) != 1 || ev.GetEnvVars()[0] != want {
				t.Errorf("%s --%s does not read %s", where, name, want)
			}
		}
	}
	check("switchman", app.Flags)
	for _, cmd := range app.Commands {
		check(cmd.Name, cmd.Flags)
	}
}

// TestRefusedEtcdFailsAtOnce: status and plan against a port nobody
// listens on fail with the refusal, not after 15 s as "did not answer in
// time".
func TestRefusedEtcdFailsAtOnce(t *testing.T) {
	ep := "http://" + freeAddr(t)
	for _, args := range [][]string{{"status", "--etcd-endpoints", ep}, {"plan", "--etcd-endpoints", ep}} {
		t.Run(args[0], func(t *testing.T) {
			_, _, err := run(t, args...)
			if err == nil || !strings.Contains(err.Error(), "connection refused") || !strings.Contains(err.Error(), ep) {
				t.Fatalf("error = %v; want the refusal, naming %s", err, ep)
			}
		})
	}
}

// TestStatusRowsEscapeEtcdText: node and service names come from etcd
// keys and the rest from values anyone with write access may set: a
// terminal escape, a newline or a tab is printed escaped, never raw.
func TestStatusRowsEscapeEtcdText(t *testing.T) {
	rows := statusRows(map[string]map[string]status.Status{
		"lb\x1b[2J1": {"web\nfake\tline": {State: "applied\x1b]0;pwned\x07", Driver: "ipvs\r", VIP: "192.0.2.10:80/tcp\u202e",
			Error: "bad\x1b[31m red", Backends: []status.BackendStatus{{Healthy: true}}}},
	})
	if len(rows) != 1 {
		t.Fatalf("rows: %q", rows)
	}
	want := `"web\nfake\tline"` + "\t" + `"lb\x1b[2J1"` + "\t" + `"192.0.2.10:80/tcp\u202e"` + "\t" + `"ipvs\r"` + "\t" + `"applied\x1b]0;pwned\a"` + "\t1/1\t" + `"bad\x1b[31m red"`
	if rows[0] != want {
		t.Fatalf("row:\n%q\nwant:\n%q", rows[0], want)
	}
	for _, field := range strings.Split(rows[0], "\t") {
		for _, r := range field {
			if r < 0x20 || r == 0x7f || r == '\u202e' {
				t.Fatalf("raw control character %U in field %q", r, field)
			}
		}
	}
}

// TestPlanFailsOnInvalidFiles: like validate, plan exits 1 when a file
// given is invalid (it exited 0 even when every file was), and still
// prints the plan of the valid ones.
func TestPlanFailsOnInvalidFiles(t *testing.T) {
	valid := "vip: 192.0.2.10\nport: 80\nbackends:\n  - address: 10.1.1.2\n"
	tests := []struct {
		name  string
		files map[string]string
		want  string // in stdout
	}{
		{"every file invalid", map[string]string{"a.yaml": "vip: 192.0.2.300\nport: 80\n", "b.yaml": "port: 0120\n"}, "# nothing to program"},
		{"one valid, one invalid", map[string]string{"web.yaml": valid, "bad.yaml": "vip: 255.255.255.255\nport: 80\n"}, "-A -t 192.0.2.10:80 -s rr"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			stdout, stderr, err := run(t, append([]string{"plan", "--l4-driver", "ipvs"}, writeDefs(t, tc.files)...)...)
			if ec, ok := err.(cli.ExitCoder); !ok || ec.ExitCode() != 1 {
				t.Fatalf("err = %v; want exit code 1", err)
			}
			if !strings.Contains(stdout, tc.want) || !strings.Contains(stderr, "skipped:") {
				t.Errorf("stdout lacks %q or stderr lacks the skipped files:\n%s\n%s", tc.want, stdout, stderr)
			}
		})
	}
	if _, stderr, err := run(t, append([]string{"plan"}, writeDefs(t, map[string]string{"web.yaml": valid})...)...); err != nil {
		t.Fatalf("plan of a valid file: %v\n%s", err, stderr)
	}
}

// TestHelpSaysWhoStartsEtcd: only the agent starts an embedded etcd; the
// help of status and plan said they did.
func TestHelpSaysWhoStartsEtcd(t *testing.T) {
	for _, cmd := range []string{"agent", "status", "plan"} {
		stdout, _, err := run(t, cmd, "--help")
		if err != nil {
			t.Fatal(err)
		}
		if starts := strings.Contains(stdout, "starts an embedded"); starts != (cmd == "agent") {
			t.Errorf("%s --help says it starts an embedded etcd: %v\n%s", cmd, starts, stdout)
		}
	}
}
