package lab

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// AgentStopTimeout is how long a SIGTERMed agent may take to exit.
const AgentStopTimeout = 60 * time.Second

// Agent is the switchman agent binary run as a child process, in the
// current network namespace or in NS (ip netns exec), logging to LogPath
// (appended to across restarts) and serving /metrics on MetricsAddr.
type Agent struct {
	NS          string
	LogPath     string
	MetricsAddr string
	// Env is added to the agent's environment at its next Spawn.
	Env []string

	mu   sync.Mutex
	proc *agentProc
}

// agentProc is a running agent process.
type agentProc struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has exited and been reaped
	err  error         // cmd.Wait's result, valid after done
}

// Spawn runs the agent binary with args (the global flags, "agent", its
// flags).
func (a *Agent) Spawn(t testing.TB, args ...string) {
	t.Helper()
	logf, err := os.OpenFile(a.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(logf, "=== e2e: starting the agent at %s\n", time.Now().Format(time.RFC3339Nano))
	name := SwitchmanBin(t)
	if a.NS != "" {
		args = append([]string{"netns", "exec", a.NS, name}, args...)
		name = IPBin
	}
	cmd := exec.Command(name, args...)
	if len(a.Env) > 0 {
		cmd.Env = append(os.Environ(), a.Env...)
	}
	cmd.Stdout = logf
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start agent: %v", err)
	}
	p := &agentProc{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	a.mu.Lock()
	a.proc = p
	a.mu.Unlock()
}

func (a *Agent) take() *agentProc {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.proc
	a.proc = nil
	return p
}

// Stop sends SIGTERM and waits for the agent to exit (SIGKILL after
// AgentStopTimeout, which fails the test). It returns how long the agent
// took to exit; 0 when none was running.
func (a *Agent) Stop(t testing.TB) time.Duration {
	t.Helper()
	p := a.take()
	if p == nil {
		return 0
	}
	start := time.Now()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		var ee *exec.ExitError
		if p.err != nil && !errors.As(p.err, &ee) {
			t.Errorf("agent: %v", p.err)
		} else if p.err != nil {
			t.Errorf("agent exited with %v after SIGTERM", p.err)
		}
	case <-time.After(AgentStopTimeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		t.Errorf("agent did not exit within %s of SIGTERM; killed", AgentStopTimeout)
	}
	return time.Since(start)
}

// Kill sends SIGKILL and waits until the process is reaped.
func (a *Agent) Kill() {
	if p := a.take(); p != nil {
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// Signal sends sig to the agent without waiting, so a test can time what
// follows; the process is still reaped by Stop or Kill afterwards.
func (a *Agent) Signal(sig os.Signal) error {
	a.mu.Lock()
	p := a.proc
	a.mu.Unlock()
	if p == nil {
		return errors.New("the agent is not running")
	}
	return p.cmd.Process.Signal(sig)
}

// Alive returns an error when the agent is not running or has exited.
func (a *Agent) Alive() error {
	a.mu.Lock()
	p := a.proc
	a.mu.Unlock()
	if p == nil {
		return errors.New("the agent is not running")
	}
	select {
	case <-p.done:
		return fmt.Errorf("the agent exited: %v\n%s", p.err, TailFile(a.LogPath, 40))
	default:
		return nil
	}
}

// Check fails the test when the agent is not running.
func (a *Agent) Check(t testing.TB) {
	t.Helper()
	if err := a.Alive(); err != nil {
		t.Fatal(err)
	}
}

// PID is the agent's process id (of ip netns exec, which execs the agent
// in place); 0 when it is not running.
func (a *Agent) PID() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.proc == nil {
		return 0
	}
	return a.proc.cmd.Process.Pid
}

// Metrics scrapes the agent's /metrics and returns every sample as
// `name{labels}` -> value. An agent in a namespace is scraped from there.
func (a *Agent) Metrics() (map[string]float64, error) {
	c := http.Client{Timeout: 10 * time.Second}
	if a.NS != "" {
		c = *HTTPClientNS(a.NS)
	}
	resp, err := c.Get("http://" + a.MetricsAddr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	return ParseMetrics(resp.Body)
}

// ParseMetrics reads the Prometheus text format into `name{labels}` ->
// value, skipping comments and lines it cannot read.
func ParseMetrics(r io.Reader) (map[string]float64, error) {
	out := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		out[line[:i]] = v
	}
	if err := sc.Err(); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return out, nil
}
