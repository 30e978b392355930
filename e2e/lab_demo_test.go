//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// labOnlyBin returns SWITCHMAN_BIN inside the QEMU lab (E2E_LAB=1) and
// skips the test elsewhere. (Self-contained: it does not lean on the
// lab harness's helpers.)
func labOnlyBin(t *testing.T) string {
	t.Helper()
	if os.Getenv("E2E_LAB") != "1" {
		t.Skip("needs the real-kernel lab: run e2e/lab/run.sh (E2E_LAB=1 is not set)")
	}
	bin := os.Getenv("SWITCHMAN_BIN")
	if bin == "" {
		t.Fatal("SWITCHMAN_BIN is not set")
	}
	return bin
}

// TestLabDemo runs the README's first command on a kernel with IPVS:
// `switchman demo` for a few seconds builds its own namespaces, has the
// agent serve the demo service with IPVS, checks that the three backends
// take turns, and removes everything.
func TestLabDemo(t *testing.T) {
	bin := labOnlyBin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "demo", "--seconds", "6")
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	sc := bufio.NewScanner(pipe)
	listed := false
	for sc.Scan() {
		out.WriteString(sc.Text() + "\n")
		if !listed && strings.Contains(sc.Text(), "-> be") {
			// While it balances: what IPVS holds in the demo's namespace.
			listed = true
			list, err := exec.CommandContext(ctx, "/sbin/ip", "netns", "exec", "swm-demo-lb", "/sbin/ipvsadm", "-Ln").CombinedOutput()
			t.Logf("ipvsadm -Ln in swm-demo-lb:\n%s", list)
			if err != nil || !strings.Contains(string(list), "TCP  203.0.113.10:80 rr") || strings.Count(string(list), "Masq") != 3 {
				t.Errorf("IPVS in the demo's namespace: %v, want 203.0.113.10:80 rr with three Masq destinations", err)
			}
		}
	}
	err = cmd.Wait()
	t.Logf("switchman demo --seconds 6 took %s:\n%s", time.Since(start).Round(time.Millisecond), out.String())
	if err != nil {
		t.Fatalf("switchman demo: %v", err)
	}
	for _, want := range []string{"applied by the ipvs driver", "demo check:", "demo stopped:"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("the demo's output lacks %q", want)
		}
	}
	for _, ns := range []string{"swm-demo-lb", "swm-demo-client", "swm-demo-be1", "swm-demo-be2", "swm-demo-be3"} {
		if _, err := os.Stat("/run/netns/" + ns); err == nil {
			t.Errorf("namespace %s is still there after the demo", ns)
		}
	}
}
