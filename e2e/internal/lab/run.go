package lab

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// CmdError is returned by Run when a command fails; it carries the output.
type CmdError struct {
	Cmd    string
	Output string
	Err    error
}

func (e *CmdError) Error() string {
	return fmt.Sprintf("%s: %v\n%s", e.Cmd, e.Err, strings.TrimRight(e.Output, "\n"))
}

func (e *CmdError) Unwrap() error { return e.Err }

// Run runs name with args, killing it after timeout (CmdTimeout when 0), and
// returns its combined stdout and stderr. A failure, a non-zero exit or the
// timeout is a *CmdError that includes the output.
func Run(timeout time.Duration, name string, args ...string) (string, error) {
	if timeout <= 0 {
		timeout = CmdTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = 5 * time.Second // do not hang on children holding the pipes
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	if ctx.Err() == context.DeadlineExceeded {
		err = fmt.Errorf("timed out after %s", timeout)
	}
	if err != nil {
		return out.String(), &CmdError{Cmd: strings.Join(append([]string{name}, args...), " "), Output: out.String(), Err: err}
	}
	return out.String(), nil
}

// MustRun is Run with CmdTimeout that fails the test on error.
func MustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := Run(0, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// RunNS runs name with args in network namespace ns (ip netns exec), like Run.
func RunNS(timeout time.Duration, ns, name string, args ...string) (string, error) {
	return Run(timeout, IPBin, append([]string{"netns", "exec", ns, name}, args...)...)
}

// MustRunNS is RunNS with CmdTimeout that fails the test on error.
func MustRunNS(t testing.TB, ns, name string, args ...string) string {
	t.Helper()
	out, err := RunNS(0, ns, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// WaitFor polls cond until it returns nil and fails the test with cond's
// last error when timeout (WaitTimeout when 0) passes first. It polls often
// at first and backs off to once a second, so it costs little when the
// condition already holds. what names the condition in the failure.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	if err := Poll(timeout, cond); err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}

// Poll is WaitFor without a test: it returns nil as soon as cond does, or
// cond's last error wrapped with the time waited.
func Poll(timeout time.Duration, cond func() error) error {
	if timeout <= 0 {
		timeout = WaitTimeout
	}
	start := time.Now()
	deadline := start.Add(timeout)
	interval := 20 * time.Millisecond
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still not true after %s: %w", time.Since(start).Round(time.Millisecond), err)
		}
		time.Sleep(interval)
		if interval < time.Second {
			interval = min(interval*2, time.Second)
		}
	}
}

// StartProcess starts name with args in the background with its output in
// logPath, and stops it at cleanup (SIGTERM, then SIGKILL after 20 s). When
// the test failed, the cleanup logs the last 60 lines of logPath. env adds
// KEY=VALUE pairs to the environment.
func StartProcess(t testing.TB, logPath string, env []string, name string, args ...string) *exec.Cmd {
	t.Helper()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(done)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("last lines of %s:\n%s", logPath, TailFile(logPath, 60))
		}
	})
	return cmd
}

// TailFile returns the last n lines of path, or a note why it cannot.
func TailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// CountLines counts the lines of path that contain substr (0 when the file
// cannot be read).
func CountLines(path, substr string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, substr) {
			n++
		}
	}
	return n
}
