package main

import (
	"context"
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
	"time"

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
			"--data-dir", t.TempDir(), "--node", "lb-test", "--drivers", "none",
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
		out, err := ctl("put", "/switchman/services/web", `{"vip":"192.0.2.10","port":80,"backends":[{"address":"10.1.1.2"}]}`)
		return err == nil, out
	})
	if out, err := ctl("put", "/switchman/services/outside", `{"vip":"198.51.100.7","port":80,"backends":[{"address":"10.1.1.2"}]}`); err != nil {
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
	waitFor("status of web", func() (bool, string) {
		st, out := status("web")
		return st != nil && st["state"] == "applied" && st["vip"] == "192.0.2.10:80/tcp", out
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
