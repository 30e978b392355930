//go:build nft_e2e

package nft

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/internal/netns"
	"github.com/switchman-lb/switchman/internal/netnstest"
)

// demoNamespaces are the namespaces `switchman demo` makes.
var demoNamespaces = []string{"swm-demo-lb", "swm-demo-client", "swm-demo-be1", "swm-demo-be2", "swm-demo-be3"}

// TestDemo runs `switchman demo` as the README's first command does: a
// run killed in the middle leaves its namespaces behind, the next run
// removes them, balances, checks that the backends take turns and cleans
// up after itself.
func TestDemo(t *testing.T) {
	netnstest.Require(t)
	bin := switchmanBin(t)
	for _, ns := range demoNamespaces {
		if netns.Exists(ns) {
			t.Skipf("namespace %s exists: a demo is running here", ns)
		}
	}

	// A run killed while it balances.
	killed := exec.Command(bin, "demo")
	out, err := killed.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := killed.Start(); err != nil {
		t.Fatal(err)
	}
	answers := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "-> be") {
				answers <- sc.Text()
			}
		}
		close(answers)
	}()
	select {
	case a, ok := <-answers:
		if !ok {
			t.Fatal("the demo ended before its first answer")
		}
		t.Logf("first answer of the run to kill: %s", a)
	case <-time.After(2 * waitLong):
		t.Fatal("no answer from the demo within 2 minutes")
	}
	killed.Process.Signal(syscall.SIGKILL)
	killed.Wait()
	for _, ns := range demoNamespaces {
		if !netns.Exists(ns) {
			t.Errorf("the killed demo left no namespace %s (nothing for the next run to clean)", ns)
		}
	}

	// The next run, bounded.
	var buf bytes.Buffer
	run := exec.Command(bin, "demo", "--seconds", "4")
	run.Stdout, run.Stderr = &buf, &buf
	start := time.Now()
	err = run.Run()
	t.Logf("switchman demo --seconds 4 took %s:\n%s", time.Since(start).Round(time.Millisecond), buf.String())
	if err != nil {
		t.Fatalf("switchman demo --seconds 4: %v", err)
	}
	for _, want := range []string{"removing network namespace swm-demo-lb left by an earlier demo", "applied by the ", "demo check:"} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("the demo's output lacks %q", want)
		}
	}
	for _, ns := range demoNamespaces {
		if netns.Exists(ns) {
			t.Errorf("namespace %s is still there after the demo", ns)
			netns.Delete(ns)
		}
	}
	if _, err := os.Stat("/run/switchman-demo/agent.pid"); err == nil {
		t.Error("the demo left its agent's pid file")
	}
}
