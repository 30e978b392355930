//go:build e2e

package e2e

import (
	"bytes"
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
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, "demo", "--seconds", "6")
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err := cmd.Run()
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
