package haproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/switchman-lb/switchman/internal/atomicfile"
	"github.com/switchman-lb/switchman/internal/backoff"
)

// process is the HAProxy process as the driver controls it.
type process interface {
	// Available reports why HAProxy cannot be used (binary missing), or nil.
	Available() error
	// Validate runs the configuration check on the file at path.
	Validate(ctx context.Context, path string) error
	// ProbeBind reports whether HAProxy could bind a new listener on addr
	// (a *BindError when not).
	ProbeBind(addr netip.AddrPort) error
	// Running reports whether HAProxy answers on its admin socket.
	Running(ctx context.Context) bool
	// Adopt supervises a running HAProxy this driver did not start (one
	// that outlived the agent before): when it dies, it is started again.
	// Attached HAProxies are not supervised.
	Adopt(ctx context.Context) error
	// Start starts HAProxy on the config file and supervises it. It
	// returns once a worker serves, or as soon as HAProxy exits, with its
	// reason.
	Start(ctx context.Context) error
	// Reload makes HAProxy load the config file again without dropping
	// connections or listeners. When HAProxy refuses the new file the
	// error wraps ErrReloadFailed and the old workers keep serving.
	Reload(ctx context.Context) error
	// Alive is false once the supervised HAProxy has exited (until it is
	// started again); true when nothing is supervised.
	Alive() bool
	// Restarts counts how often supervision started HAProxy again after
	// it died.
	Restarts() uint64
	// Close stops supervising and stops the supervised HAProxy.
	Close()
}

// ErrMissing marks errors caused by a missing haproxy binary.
var ErrMissing = errors.New("haproxy is not installed")

// ErrCannotReload: attached to a HAProxy without a master socket, the driver
// cannot make it load a new structure.
var ErrCannotReload = errors.New("attached HAProxy has no master socket to reload through")

// ErrReloadFailed: HAProxy did not load the new configuration (its master
// counted a failed reload); the workers of the last good one keep serving.
var ErrReloadFailed = errors.New("haproxy refused the new configuration and keeps serving the last good one")

// ErrStartFailed: HAProxy exited while starting.
var ErrStartFailed = errors.New("haproxy exited while starting")

// ErrCheckFailed: haproxy -c rejected the configuration.
var ErrCheckFailed = errors.New("haproxy -c rejected the configuration")

// ConfigError is HAProxy refusing a configuration file, with what it said
// about it. Err wraps ErrCheckFailed, ErrReloadFailed or ErrStartFailed.
type ConfigError struct {
	Err  error
	File string   // the configuration file HAProxy read
	Said []string // HAProxy's messages, oldest first
}

// Error is Err followed by HAProxy's alerts (all it said when it raised
// none).
func (e *ConfigError) Error() string {
	var alerts []string
	for _, l := range e.Said {
		if strings.Contains(l, "[ALERT]") {
			alerts = append(alerts, strings.TrimSpace(l))
		}
	}
	if len(alerts) == 0 {
		alerts = e.Said
	}
	if len(alerts) == 0 {
		return e.Err.Error()
	}
	return e.Err.Error() + ": haproxy said: " + strings.Join(alerts, " | ")
}

// Unwrap returns Err.
func (e *ConfigError) Unwrap() error { return e.Err }

// stopGrace bounds how long a HAProxy asked to stop (SIGTERM) may take
// before it is killed.
const stopGrace = 10 * time.Second

// execProcess runs HAProxy in master-worker mode in the foreground (-W -db)
// as a child, with its master CLI on a Unix socket, and starts it again
// with backoff when it dies. It supervises a HAProxy left running by an
// earlier agent the same way (its master's pid, watched through a pidfd).
// In attach mode it starts nothing: it talks to a HAProxy someone else
// runs.
type execProcess struct {
	log        *slog.Logger
	bin        string
	cfgPath    string
	pidFile    string
	adminSock  string
	masterSock string // "" in attach mode without a master socket
	attach     bool
	timeout    time.Duration
	restart    [2]time.Duration // first and longest restart delay
	// beforeRestart runs before supervision starts HAProxy again (the
	// driver brings haproxy.cfg up to date); it must not block.
	beforeRestart func()

	stderr   lineLog
	restarts atomic.Uint64

	mu  sync.Mutex // guards sup and cur
	sup *supervision
	cur *target
}

// target is one HAProxy master: our child, or one adopted by pid.
type target struct {
	pid    int
	cmd    *exec.Cmd // nil for an adopted master
	pidfd  *os.File  // adopted: readable once the process exited
	since  time.Time
	exited chan struct{} // closed once the process exited
	err    error         // why it exited; set before exited is closed
}

// supervision is the goroutine that starts HAProxy again when it dies.
type supervision struct {
	stop chan struct{} // closed to end supervision
	kill bool          // set before stop is closed: stop HAProxy too
	done chan struct{} // closed when the goroutine returned
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
		said := strings.Split(strings.TrimSpace(string(out)), "\n")
		return &ConfigError{Err: fmt.Errorf("%w (%v)", ErrCheckFailed, err), File: path, Said: said}
	}
	return nil
}

func (p *execProcess) ProbeBind(addr netip.AddrPort) error { return probeBind(addr) }

func (p *execProcess) Running(ctx context.Context) bool {
	_, err := cliExchange(ctx, p.adminSock, p.timeout, "show info", nil, false)
	return err == nil
}

func (p *execProcess) Alive() bool {
	p.mu.Lock()
	t := p.cur
	p.mu.Unlock()
	if t == nil {
		return true
	}
	select {
	case <-t.exited:
		return false
	default:
		return true
	}
}

func (p *execProcess) Restarts() uint64 { return p.restarts.Load() }

func (p *execProcess) Adopt(ctx context.Context) error {
	if p.attach || p.masterSock == "" {
		return nil
	}
	p.mu.Lock()
	if t := p.cur; t != nil && p.sup != nil {
		select {
		case <-t.exited:
		default:
			p.mu.Unlock()
			return nil // already supervised
		}
	}
	p.mu.Unlock()
	pid, err := p.masterPID(ctx)
	if err != nil {
		return fmt.Errorf("adopt the running haproxy: %w", err)
	}
	t, err := watchPID(pid)
	if err != nil {
		return fmt.Errorf("adopt the running haproxy (pid %d): %w", pid, err)
	}
	p.stopSupervision(false)
	p.supervise(t)
	p.log.Info("supervising a running haproxy", "pid", pid)
	return nil
}

// masterPID finds the master's pid: `show proc` on the master CLI, or the
// pidfile.
func (p *execProcess) masterPID(ctx context.Context) (int, error) {
	if st, err := p.showProc(ctx); err == nil && st.master > 0 {
		return st.master, nil
	}
	b, err := atomicfile.ReadBounded(p.pidFile, 64)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return 0, fmt.Errorf("pidfile %s: %q is not a pid", p.pidFile, b)
	}
	return pid, nil
}

// watchPID opens a pidfd on pid and closes the target's exited channel
// once the process exits.
func watchPID(pid int) (*target, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open: %w", err)
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	t := &target{pid: pid, pidfd: f, since: time.Now(), exited: make(chan struct{})}
	go func() {
		// A pidfd polls readable once its process exited; the Go poller
		// waits for that without a thread. Closing f ends the wait.
		err := rc.Read(func(fd uintptr) bool {
			n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
			return err == nil && n > 0
		})
		if err == nil {
			t.err = fmt.Errorf("adopted haproxy master (pid %d) exited", pid)
		} else {
			t.err = fmt.Errorf("watch haproxy master (pid %d): %w", pid, err)
		}
		close(t.exited)
	}()
	return t, nil
}

func (p *execProcess) Start(ctx context.Context) error {
	if p.Running(ctx) {
		// Started again by supervision meanwhile, a survivor of an agent
		// restart, or attached: it loads the file by a reload.
		if err := p.Adopt(ctx); err != nil {
			return err
		}
		return p.Reload(ctx)
	}
	if p.attach {
		return fmt.Errorf("attached HAProxy does not answer on %s", p.adminSock)
	}
	// A supervised HAProxy that does not answer is replaced.
	p.stopSupervision(true)
	mark := p.stderr.mark()
	t, err := p.spawn()
	if err != nil {
		return err
	}
	if err := p.waitWorker(ctx, t, procState{}); err != nil {
		p.terminate(t)
		return &ConfigError{Err: fmt.Errorf("%w: %v", ErrStartFailed, err), File: p.cfgPath, Said: p.stderr.since(mark)}
	}
	p.supervise(t)
	return nil
}

func (p *execProcess) spawn() (*target, error) {
	cmd := exec.Command(p.bin, "-W", "-db", "-f", p.cfgPath, "-S", p.masterSock+",mode,600")
	// Its own process group: a Ctrl-C to the agent does not kill HAProxy
	// behind the driver's back, and HAProxy keeps serving if the agent dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stdout = &p.stderr
	cmd.Stderr = &p.stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", p.bin, err)
	}
	t := &target{pid: cmd.Process.Pid, cmd: cmd, since: time.Now(), exited: make(chan struct{})}
	go func() {
		// Wait returns once the process exited and its output was copied.
		err := cmd.Wait()
		if err == nil {
			err = errors.New("exited with status 0")
		}
		t.err = err
		close(t.exited)
	}()
	return t, nil
}

// supervise makes t the supervised HAProxy: when it exits, it is started
// again after a backoff (internal/backoff), until supervision stops.
func (p *execProcess) supervise(t *target) {
	s := &supervision{stop: make(chan struct{}), done: make(chan struct{})}
	p.mu.Lock()
	p.sup, p.cur = s, t
	p.log.Debug("supervising haproxy", "pid", t.pid)
	p.mu.Unlock()
	go p.run(s, t)
}

func (p *execProcess) run(s *supervision, t *target) {
	defer close(s.done)
	bo := backoff.New(p.restart[0], p.restart[1], 0.2)
	for {
		select {
		case <-s.stop:
			if s.kill {
				p.terminate(t)
			}
			return
		case <-t.exited:
		}
		if time.Since(t.since) > time.Minute {
			bo.Reset() // it ran a while: a new failure starts the backoff again
		}
		delay := bo.Next()
		p.log.Error("haproxy exited; starting it again", "pid", t.pid, "err", t.err, "in", delay)
		timer := time.NewTimer(delay)
		select {
		case <-s.stop:
			timer.Stop()
			return
		case <-timer.C:
		}
		if p.beforeRestart != nil {
			p.beforeRestart()
		}
		nt, err := p.spawn()
		if err != nil {
			p.log.Error("haproxy could not be started again", "err", err)
			nt = &target{since: time.Now(), exited: make(chan struct{}), err: err}
			close(nt.exited)
		} else {
			p.restarts.Add(1)
		}
		t = nt
		p.mu.Lock()
		if p.sup == s {
			p.cur = t
		}
		p.mu.Unlock()
	}
}

// stopSupervision ends supervision; with kill, the supervised HAProxy is
// stopped too, otherwise it keeps running unsupervised (as when the agent
// exits).
func (p *execProcess) stopSupervision(kill bool) {
	p.mu.Lock()
	s, t := p.sup, p.cur
	p.sup, p.cur = nil, nil
	p.mu.Unlock()
	if s == nil {
		return
	}
	s.kill = kill
	close(s.stop)
	<-s.done
	if !kill && t != nil && t.pidfd != nil {
		t.pidfd.Close() // ends the watch of an adopted master
	}
}

// terminate stops t: SIGTERM, then SIGKILL after stopGrace.
func (p *execProcess) terminate(t *target) {
	if t.pid == 0 {
		return
	}
	signal := func(sig syscall.Signal) {
		if t.cmd != nil {
			_ = t.cmd.Process.Signal(sig)
		} else if t.pidfd != nil {
			_ = unix.PidfdSendSignal(int(t.pidfd.Fd()), sig, nil, 0)
		}
	}
	signal(syscall.SIGTERM)
	select {
	case <-t.exited:
	case <-time.After(stopGrace):
		signal(syscall.SIGKILL)
		<-t.exited
	}
	if t.pidfd != nil {
		t.pidfd.Close()
	}
}

// procState is what `show proc` on the master CLI says.
type procState struct {
	master          int
	reloads, failed int
	workers         []int // current workers (not old ones finishing)
	parsed          bool
}

// showProc reads the master's reload counters and the pids of the current
// workers (`show proc` on the master CLI).
func (p *execProcess) showProc(ctx context.Context) (procState, error) {
	var st procState
	out, err := cliExchange(ctx, p.masterSock, p.timeout, "show proc", nil, true)
	if err != nil {
		return st, err
	}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) < 3 {
			continue
		}
		pid, err := strconv.Atoi(f[0])
		if err != nil {
			continue
		}
		switch f[1] {
		case "master":
			// "<pid> master <reloads> [failed: <n>] <uptime> <version>"
			st.master, st.parsed = pid, true
			st.reloads, _ = strconv.Atoi(f[2])
			if len(f) >= 5 && f[3] == "[failed:" {
				st.failed, _ = strconv.Atoi(strings.TrimSuffix(f[4], "]"))
			}
		case "worker":
			if f[2] == "0" {
				// reloads column 0: a current worker, not an old one still
				// finishing its connections.
				st.workers = append(st.workers, pid)
			}
		}
	}
	if !st.parsed {
		return st, fmt.Errorf("unexpected show proc answer: %.120q", out)
	}
	return st, nil
}

// waitWorker polls until the master reports a current worker that was not
// in before and the admin socket answers. It returns early when t (when
// set) exits, and when the master counts a failed reload since before.
func (p *execProcess) waitWorker(ctx context.Context, t *target, before procState) error {
	deadline := time.Now().Add(10 * p.timeout)
	var last error
	for time.Now().Before(deadline) {
		if t != nil {
			select {
			case <-t.exited:
				return t.err
			default:
			}
		}
		if p.masterSock == "" {
			if p.Running(ctx) {
				return nil
			}
		} else if st, err := p.showProc(ctx); err == nil {
			if before.parsed && st.failed > before.failed {
				return ErrReloadFailed
			}
			for _, w := range st.workers {
				if !slices.Contains(before.workers, w) && p.Running(ctx) {
					return nil
				}
			}
		} else {
			last = err // the master re-executes itself during a reload
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
	before, err := p.showProc(ctx)
	if err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	mark := p.stderr.mark()
	if _, err := cliExchange(ctx, p.masterSock, p.timeout, "reload", nil, true); err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	p.mu.Lock()
	t := p.cur
	p.mu.Unlock()
	if err := p.waitWorker(ctx, t, before); err != nil {
		if errors.Is(err, ErrReloadFailed) {
			return &ConfigError{Err: err, File: p.cfgPath, Said: p.stderr.since(mark)}
		}
		return fmt.Errorf("reload: %w", err)
	}
	return nil
}

func (p *execProcess) Close() { p.stopSupervision(true) }

// release ends supervision and leaves HAProxy running, as an agent that
// exits does.
func (p *execProcess) release() { p.stopSupervision(false) }

// lineLog logs a child's output line by line and keeps the last lines,
// numbered, so an error can quote what HAProxy said about it.
type lineLog struct {
	log *slog.Logger

	mu      sync.Mutex
	partial []byte
	lines   []string // the last maxLines lines
	next    uint64   // number of the next line
}

const maxLines = 40

func (l *lineLog) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.partial = append(l.partial, b...)
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			break
		}
		line := string(l.partial[:i])
		l.partial = l.partial[i+1:]
		if l.log != nil {
			l.log.Info("haproxy", "line", line)
		}
		l.lines = append(l.lines, line)
		if len(l.lines) > maxLines {
			l.lines = l.lines[1:]
		}
		l.next++
	}
	return len(b), nil
}

// mark is the number of the next line.
func (l *lineLog) mark() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.next
}

// since returns the lines from mark on that are still kept.
func (l *lineLog) since(mark uint64) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := int(min(l.next-mark, uint64(len(l.lines))))
	if n <= 0 {
		return nil
	}
	return slices.Clone(l.lines[len(l.lines)-n:])
}
