// Package nsagent runs the switchman agent binary, and an etcd for it,
// inside a network namespace, and talks to both from outside: for the
// demo, the namespace end-to-end suite and the benchmarks, which give the
// agent a namespace of its own so that the tables it programs are its
// own too.
package nsagent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/switchman-lb/switchman/internal/netns"
	"github.com/switchman-lb/switchman/watcher/embedded"
)

// StartEtcd starts a single-node etcd in this process with its listeners
// in namespace ns (clientAddr and peerAddr are host:port there), its data
// in dir.
func StartEtcd(ns, dir, clientAddr, peerAddr string) (*embedded.Server, error) {
	var srv *embedded.Server
	err := netns.Do(ns, func() (err error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		srv, err = embedded.Start(ctx, slog.New(slog.DiscardHandler), embedded.Options{
			Dir: dir, ClientURL: "http://" + clientAddr, PeerURL: "http://" + peerAddr, Name: "nsagent"})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("start etcd in %s: %w", ns, err)
	}
	return srv, nil
}

// Client returns an etcd client whose connections are made inside
// namespace ns, to addr (host:port there).
func Client(ns, addr string) (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{
		Endpoints:          []string{"http://" + addr},
		DialTimeout:        5 * time.Second,
		MaxCallSendMsgSize: 16 << 20,
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) {
			return netns.Dial(ctx, ns, nil, "tcp", a)
		})},
	})
}

// Agent is an agent process running in a namespace.
type Agent struct {
	Cmd    *exec.Cmd
	thread *netns.Thread
	done   chan struct{}
	err    error
}

// Start runs bin with args in namespace ns, its output appended to
// logPath. The agent gets deathSignal when this process ends (or Stop's
// thread goes); with group it runs in a process group of its own, so a
// terminal's Ctrl-C reaches only this process, which stops it in order.
func Start(ns, bin, logPath string, deathSignal syscall.Signal, group bool, args ...string) (*Agent, error) {
	t, err := netns.NewThread(ns)
	if err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Close()
		return nil, err
	}
	fmt.Fprintf(logf, "=== starting the agent at %s\n", time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: deathSignal, Setpgid: group}
	if err := t.Start(cmd); err != nil {
		t.Close()
		logf.Close()
		return nil, fmt.Errorf("start the agent: %w", err)
	}
	a := &Agent{Cmd: cmd, thread: t, done: make(chan struct{})}
	go func() {
		a.err = cmd.Wait()
		logf.Close()
		close(a.done)
	}()
	return a, nil
}

// Done is closed when the agent has exited.
func (a *Agent) Done() <-chan struct{} { return a.done }

// Exited returns an error when the agent has exited: how it ended.
func (a *Agent) Exited() error {
	select {
	case <-a.done:
		if a.err == nil {
			return errors.New("the agent exited")
		}
		return fmt.Errorf("the agent exited: %w", a.err)
	default:
		return nil
	}
}

// Stop sends SIGTERM and waits up to timeout for the agent to exit, then
// kills it. It returns how the agent ended: nil for a clean exit after
// SIGTERM.
func (a *Agent) Stop(timeout time.Duration) error {
	defer a.thread.Close()
	_ = a.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
		return a.err
	case <-time.After(timeout):
		_ = a.Cmd.Process.Kill()
		<-a.done
		return fmt.Errorf("the agent did not exit within %s of SIGTERM; killed", timeout)
	}
}

// Metrics scrapes the agent's /metrics at addr (host:port inside
// namespace ns): `name{labels}` -> value.
func Metrics(ns, addr string) (map[string]float64, error) {
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: netns.Dialer(ns), DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if i := strings.LastIndexByte(line, ' '); i > 0 && !strings.HasPrefix(line, "#") {
			if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
				out[line[:i]] = v
			}
		}
	}
	return out, sc.Err()
}
