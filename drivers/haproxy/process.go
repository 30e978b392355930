package haproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// process is the HAProxy process as the driver controls it.
type process interface {
	// Available reports why HAProxy cannot be used (binary missing), or nil.
	Available() error
	// Validate runs the configuration check on the file at path.
	Validate(ctx context.Context, path string) error
	// Running reports whether HAProxy answers.
	Running(ctx context.Context) bool
	// Start starts HAProxy on the config file (no-op when running).
	Start(ctx context.Context) error
	// Reload makes HAProxy load the config file again without dropping
	// connections or listeners.
	Reload(ctx context.Context) error
	// Close stops what Start started.
	Close()
}

// ErrMissing marks errors caused by a missing haproxy binary.
var ErrMissing = errors.New("haproxy is not installed")

// ErrCannotReload: attached to a HAProxy without a master socket, the driver
// cannot make it load a new structure.
var ErrCannotReload = errors.New("attached HAProxy has no master socket to reload through")

// execProcess runs HAProxy in master-worker mode in the foreground (-W -db)
// as a child, with its master CLI on a Unix socket, and restarts it with
// backoff when it dies. In attach mode it starts nothing: it talks to a
// HAProxy someone else runs.
type execProcess struct {
	log        *slog.Logger
	bin        string
	cfgPath    string
	adminSock  string
	masterSock string // "" in attach mode without a master socket
	attach     bool
	timeout    time.Duration
	backoff    [2]time.Duration // first and longest restart delay

	mu       sync.Mutex // guards the fields below; held only briefly
	cmd      *exec.Cmd
	stopping bool
	done     chan struct{} // closed when the supervisor exits
}

func (p *execProcess) Available() error {
	if _, err := exec.LookPath(p.bin); err != nil {
		return fmt.Errorf("%w: %q not found (%v): install it (apt-get install haproxy) or point --haproxy-bin at it", ErrMissing, p.bin, err)
	}
	return nil
}

func (p *execProcess) Validate(ctx context.Context, path string) error {
	out, err := exec.CommandContext(ctx, p.bin, "-c", "-q", "-f", path).CombinedOutput()
	if err != nil {
		return fmt.Errorf("haproxy -c rejected the configuration: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (p *execProcess) Running(ctx context.Context) bool {
	_, err := cliExchange(ctx, p.adminSock, p.timeout, "show info", nil, false)
	return err == nil
}

func (p *execProcess) Start(ctx context.Context) error {
	if p.Running(ctx) {
		return nil // ours, a survivor of an agent restart, or attached
	}
	if p.attach {
		return fmt.Errorf("attached HAProxy does not answer on %s", p.adminSock)
	}
	p.mu.Lock()
	if p.done == nil {
		p.done = make(chan struct{})
		p.mu.Unlock()
		started := make(chan error, 1)
		go p.supervise(started)
		if err := <-started; err != nil {
			return err
		}
	} else {
		p.mu.Unlock()
	}
	return p.waitWorker(ctx, 0)
}

func (p *execProcess) spawn() (*exec.Cmd, error) {
	cmd := exec.Command(p.bin, "-W", "-db", "-f", p.cfgPath, "-S", p.masterSock+",mode,600")
	// Its own process group: a Ctrl-C to the agent does not kill HAProxy
	// behind the driver's back, and HAProxy keeps serving if the agent dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout = cmd.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", p.bin, err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			p.log.Info("haproxy", "line", sc.Text())
		}
	}()
	return cmd, nil
}

// supervise runs HAProxy and starts it again, with backoff, whenever it
// exits while the driver is not closing.
func (p *execProcess) supervise(started chan<- error) {
	defer close(p.done)
	delay := p.backoff[0]
	first := true
	for {
		cmd, err := p.spawn()
		if first {
			started <- err
			first = false
			if err != nil {
				p.mu.Lock()
				p.done = nil
				p.mu.Unlock()
				return
			}
		}
		t0 := time.Now()
		if err == nil {
			p.mu.Lock()
			p.cmd = cmd
			p.mu.Unlock()
			err = cmd.Wait()
		}
		p.mu.Lock()
		p.cmd = nil
		stopping := p.stopping
		p.mu.Unlock()
		if stopping {
			return
		}
		if time.Since(t0) > time.Minute {
			delay = p.backoff[0]
		}
		p.log.Error("haproxy exited; restarting", "err", err, "in", delay)
		time.Sleep(delay)
		delay = min(2*delay, p.backoff[1])
	}
}

// showProc returns the master's reload count and the pids of the current
// workers (`show proc` on the master CLI).
func (p *execProcess) showProc(ctx context.Context) (workers []int, err error) {
	out, err := cliExchange(ctx, p.masterSock, p.timeout, "show proc", nil, true)
	if err != nil {
		return nil, err
	}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) >= 3 && f[1] == "worker" && f[2] == "0" {
			// reloads column 0: a current worker, not an old one still
			// finishing its connections.
			if pid, err := strconv.Atoi(f[0]); err == nil {
				workers = append(workers, pid)
			}
		}
	}
	return workers, nil
}

// waitWorker polls until the master reports a current worker other than
// old and the admin socket answers.
func (p *execProcess) waitWorker(ctx context.Context, old int) error {
	deadline := time.Now().Add(10 * p.timeout)
	var last error
	for time.Now().Before(deadline) {
		if p.masterSock == "" {
			if p.Running(ctx) {
				return nil
			}
		} else if ws, err := p.showProc(ctx); err == nil {
			for _, w := range ws {
				if w != old && p.Running(ctx) {
					return nil
				}
			}
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return fmt.Errorf("haproxy did not come up with a new worker: %v", last)
}

func (p *execProcess) Reload(ctx context.Context) error {
	if p.masterSock == "" {
		return ErrCannotReload
	}
	ws, err := p.showProc(ctx)
	if err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	old := 0
	if len(ws) > 0 {
		old = ws[0]
	}
	if _, err := cliExchange(ctx, p.masterSock, p.timeout, "reload", nil, true); err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	return p.waitWorker(ctx, old)
}

func (p *execProcess) Close() {
	p.mu.Lock()
	p.stopping = true
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd != nil && cmd.Process != nil {
		_ = cmd.Process.Signal(syscall.SIGTERM)
	}
	if done != nil {
		<-done
	}
}
