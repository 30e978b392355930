package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/switchman-lb/switchman/internal/etcdtest"
)

func freeAddr(t *testing.T) string { return etcdtest.FreeAddr(t) }

// TestAgentOnEmbeddedEtcdWithEtcdctl is the README's first command: the agent
// starts its own etcd, Debian's etcdctl writes a definition into it, and the
// agent writes the status key and the node key.
func TestAgentOnEmbeddedEtcdWithEtcdctl(t *testing.T) {
	etcdctl, err := exec.LookPath("etcdctl")
	if err != nil {
		t.Skip("etcdctl not installed (apt-get install etcd-client)")
	}
	client := freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- newApp().RunContext(ctx, []string{"switchman", "--log-level", "warn", "agent",
			"--data-dir", t.TempDir(), "--node", "lb-test", "--drivers", "none", "--l4-driver", "ipvs",
			"--embedded-etcd-client-url", "http://" + client, "--embedded-etcd-peer-url", "http://" + freeAddr(t),
			"--metrics-addr", freeAddr(t), "--vip-cidrs", "192.0.2.0/24"})
	}()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("agent: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("agent did not stop")
		}
	}()
	ctl := func(args ...string) (string, error) {
		cmd := exec.Command(etcdctl, append([]string{"--endpoints", client, "--dial-timeout", "2s"}, args...)...)
		cmd.Env = append(cmd.Environ(), "ETCDCTL_API=3")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	waitFor := func(what string, cond func() (bool, string)) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		last := ""
		for time.Now().Before(deadline) {
			var ok bool
			if ok, last = cond(); ok {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Fatalf("%s: not within 60s; last: %s", what, last)
	}
	waitFor("etcdctl put", func() (bool, string) {
		out, err := ctl("put", "/switchman/services/web", `{"vip":"192.0.2.10","port":80,"health":{"protocol":"none"},"backends":[{"address":"10.1.1.2"}]}`)
		return err == nil, out
	})
	if out, err := ctl("put", "/switchman/services/outside", `{"vip":"198.51.100.7","port":80,"health":{"protocol":"none"},"backends":[{"address":"10.1.1.2"}]}`); err != nil {
		t.Fatal(out)
	}
	status := func(name string) (map[string]any, string) {
		out, err := ctl("get", "--print-value-only", "/switchman/status/lb-test/"+name)
		if err != nil || strings.TrimSpace(out) == "" {
			return nil, out
		}
		var st map[string]any
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			return nil, out
		}
		return st, out
	}
	// With --drivers none nothing serves the service: failed, saying why.
	waitFor("status of web", func() (bool, string) {
		st, out := status("web")
		return st != nil && st["state"] == "failed" && st["vip"] == "192.0.2.10:80/tcp" && strings.Contains(st["error"].(string), "no ipvs driver runs on this agent (add ipvs to --drivers)"), out
	})
	waitFor("VIP outside --vip-cidrs rejected", func() (bool, string) {
		st, out := status("outside")
		return st != nil && st["state"] == "rejected" && strings.Contains(st["error"].(string), "vip: 198.51.100.7 is outside the ranges this agent may serve (--vip-cidrs 192.0.2.0/24)"), out
	})
	out, err := ctl("get", "--print-value-only", "/switchman/nodes/lb-test")
	if err != nil || !strings.Contains(out, `"version"`) {
		t.Fatalf("node key: %v %s", err, out)
	}
	// switchman status reads the same keys.
	stdout, _, err := run(t, "status", "--etcd-endpoints", "http://"+client)
	if err != nil || !strings.Contains(stdout, "web      lb-test  192.0.2.10:80/tcp") {
		t.Fatalf("status: %v\n%s", err, stdout)
	}
}

// safeAgentFlags run an agent that touches nothing outside the test: no
// drivers, its own data directory, etcd and metrics on free ports.
func safeAgentFlags(t *testing.T) []string {
	return []string{"--data-dir", t.TempDir(), "--node", "lb-test", "--drivers", "none",
		"--embedded-etcd-client-url", "http://" + freeAddr(t), "--embedded-etcd-peer-url", "http://" + freeAddr(t),
		"--metrics-addr", freeAddr(t), "--vip-cidrs", "192.0.2.0/24"}
}

// runFor runs the CLI until it returns or 30 s pass (an agent that
// started runs until then and returns nil).
func runFor(t *testing.T, args ...string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	app := newApp()
	app.Writer, app.ErrWriter = io.Discard, io.Discard
	return app.RunContext(ctx, append([]string{"switchman", "--log-level", "error"}, args...))
}

// TestPositionalArgumentsRejected: flag parsing stops at the first
// positional argument, so `agent stray --data-dir /x` used to run an agent
// with every later flag ignored, and `agent extra --help` started one.
func TestPositionalArgumentsRejected(t *testing.T) {
	tests := [][]string{
		append(append([]string{"agent"}, safeAgentFlags(t)...), "stray", "--data-dir", t.TempDir()),
		append(append([]string{"agent"}, safeAgentFlags(t)...), "extra", "--help"),
		{"status", "--etcd-endpoints", "http://" + freeAddr(t), "stray", "--prefix", "/x"},
	}
	for _, args := range tests {
		t.Run(strings.Join(args[:1], " "), func(t *testing.T) {
			err := runFor(t, args...)
			stray := args[len(args)-3]
			if args[len(args)-1] == "--help" {
				stray = args[len(args)-2]
			}
			if err == nil || !strings.Contains(err.Error(), strconv.Quote(stray)) || !strings.Contains(err.Error(), "takes no arguments") {
				t.Fatalf("error = %v; want one naming %q", err, stray)
			}
		})
	}
}

// TestDriversCheckedBeforeEtcd: a bad --drivers value is refused before
// the embedded etcd starts (or an external one is waited for).
func TestDriversCheckedBeforeEtcd(t *testing.T) {
	dataDir := t.TempDir()
	args := append([]string{"agent"}, safeAgentFlags(t)...)
	args = append(args, "--data-dir", dataDir, "--drivers", "ipvs,bogus")
	err := runFor(t, args...)
	if err == nil || !strings.Contains(err.Error(), `--drivers: "bogus"`) {
		t.Fatalf("error = %v; want --drivers naming \"bogus\"", err)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "etcd")); err == nil {
		t.Error("the embedded etcd was started before --drivers was checked")
	}
}

// TestResyncCheckedBeforeEtcd: a --resync under 1s is refused, naming the
// flag and the value, before etcd is started.
func TestResyncCheckedBeforeEtcd(t *testing.T) {
	dataDir := t.TempDir()
	args := append([]string{"agent"}, safeAgentFlags(t)...)
	args = append(args, "--data-dir", dataDir, "--resync", "200ms")
	err := runFor(t, args...)
	if err == nil || !strings.Contains(err.Error(), "--resync 200ms") {
		t.Fatalf("error = %v; want --resync naming 200ms", err)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "etcd")); err == nil {
		t.Error("the embedded etcd was started before --resync was checked")
	}
}

// TestAgentRunsWithoutHAProxyDir: a --haproxy-dir that cannot be created
// fails the HAProxy services, with the reason in their status; the agent
// runs on (it used to exit at start).
func TestAgentRunsWithoutHAProxyDir(t *testing.T) {
	if _, err := exec.LookPath("haproxy"); err != nil {
		t.Skip("haproxy not installed")
	}
	blocker := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(blocker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	client := freeAddr(t)
	args := []string{"switchman", "--log-level", "error", "agent", "--data-dir", t.TempDir(), "--node", "lb-test",
		"--drivers", "haproxy", "--haproxy-dir", filepath.Join(blocker, "haproxy"),
		"--embedded-etcd-client-url", "http://" + client, "--embedded-etcd-peer-url", "http://" + freeAddr(t),
		"--metrics-addr", freeAddr(t), "--vip-cidrs", "127.0.0.0/8"}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- newApp().RunContext(ctx, args) }()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("agent did not stop")
		}
	}()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"http://" + client}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	deadline := time.Now().Add(60 * time.Second)
	put := false
	for time.Now().Before(deadline) {
		select {
		case err := <-done:
			done <- err // for the deferred wait
			t.Fatalf("the agent stopped: %v", err)
		default:
		}
		rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
		if !put {
			_, err := cli.Put(rctx, "/switchman/services/web", `{"vip":"127.0.0.10","port":8080,"driver":"haproxy","backends":[{"address":"127.0.0.1","port":1}]}`)
			put = err == nil
		}
		resp, err := cli.Get(rctx, "/switchman/status/lb-test/web")
		rcancel()
		if err == nil && len(resp.Kvs) == 1 {
			var st map[string]any
			_ = json.Unmarshal(resp.Kvs[0].Value, &st)
			if st["state"] == "failed" && strings.Contains(fmt.Sprint(st["error"]), "--haproxy-dir") {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("no failed status naming --haproxy-dir within 60s")
}
