package ipvs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/switchman-lb/switchman/internal/atomicfile"
	"github.com/switchman-lb/switchman/internal/clock"
	"github.com/switchman-lb/switchman/internal/sysctl"
)

// Connection sync: the kernel's IPVS sync daemons, run in both roles on
// every agent so that a standby knows the connections its peers schedule
// and a takeover (or the failback after it) keeps them.
//
// ConnSync is a component of its own beside the driver, not part of the
// driver's Sync, because:
//   - the daemons belong to the host, not to a service: a daemon that cannot
//     start fails no service (the driver reports per service), and its
//     error goes to the node key instead;
//   - the connection count must be read periodically outside the reconcile
//     loop anyway, so one goroutine owns everything about sync: the
//     sysctls, the daemons, the count and the report;
//   - it has a netlink socket of its own, so a slow daemon start (the kernel
//     takes the rtnl lock and starts threads) never delays the programming
//     of services;
//   - the order with the driver does not matter: while sync is configured
//     the driver itself refuses destinations of another address family
//     (Config.ConnSync), which is the one thing the kernel refuses a daemon
//     for, whether the daemon runs yet or not.

// SyncStateFile is the name of the file, in the data directory, that
// records the sync daemons switchman started, so that an agent started
// without --ipvs-sync-interface stops them, and only them.
const SyncStateFile = "ipvs-sync.json"

// DefaultSyncInterval is how often ConnSync checks the daemons and the
// sysctls and counts the connections, when the config leaves it zero.
const DefaultSyncInterval = 10 * time.Second

// SyncSettings are the connection-sync settings of an agent
// (--ipvs-sync-interface and friends). Zero optional fields take the
// kernel's defaults: group 224.0.0.81, port 8848, TTL 1.
type SyncSettings struct {
	Interface string
	SyncID    uint8
	Group     netip.Addr
	Port      uint16
	TTL       uint8
}

// Daemons returns the daemons the settings ask for: a master and a backup
// with the same settings. Every agent runs both, so state flows both ways:
// the owner's master sends, the standbys' backups listen, and after a
// takeover the new owner's master keeps the old owner (once back) up to
// date, so a failback loses nothing either.
func (s SyncSettings) Daemons() []SyncDaemon {
	d := SyncDaemon{Interface: s.Interface, SyncID: s.SyncID, Group: s.Group, Port: s.Port, TTL: s.TTL}
	m, b := d, d
	m.Role, b.Role = Master, Backup
	return []SyncDaemon{m, b}
}

// Check reports what is wrong with the settings, naming the flag.
func (s SyncSettings) Check() error {
	for _, d := range s.Daemons() {
		if err := checkDaemon(d); err != nil {
			return fmt.Errorf("--ipvs-sync-*: %w", err)
		}
	}
	return nil
}

// Sysctl is one kernel setting ConnSync keeps, with the reason.
type Sysctl struct {
	// Path is relative to /proc/sys, slash-separated.
	Path string
	// Value is what is written; read back, whitespace is not significant.
	Value string
	Why   string
}

// SyncSysctls are the net.ipv4.vs settings ConnSync keeps while
// connection sync is configured, each written only when it differs. The
// kernel defaults of sync_qlen_max (a memory-based bound of the send
// queue), sync_sock_size (0: the socket defaults, and raising it needs
// net.core.rmem_max and wmem_max raised too, which are the host's) and
// sync_ports (1 thread; it must be equal on every host and only applies
// when the daemons start) are left to the operator.
func SyncSysctls() []Sysctl {
	return []Sysctl{
		{"net/ipv4/vs/sync_version", "1",
			"protocol version 1 carries IPv6 connections and each connection's timeout; version 0 carries neither"},
		{"net/ipv4/vs/sync_threshold", "3 0",
			"sync_period 0: sync by time (sync_refresh_period) instead of every 50th packet, so a connection is sent as soon as it is established, again while it lives, and a busy one is not sent on every 50th packet"},
		{"net/ipv4/vs/sync_refresh_period", "10",
			"send a living connection again once its timer moved 10 s since the last send: a host that comes back (failback) learns every active connection within 10 s, at most one message per connection per 10 s"},
		{"net/ipv4/vs/sync_retries", "3",
			"sync messages are UDP: send a new connection up to 3 more times, 1.25 s apart (sync_refresh_period/8), so one lost datagram does not lose it"},
		{"net/ipv4/vs/sync_persist_mode", "0",
			"sync every connection, not only the persistence templates (mode 1 would need sloppy_tcp on the backups to survive)"},
		{"net/ipv4/vs/backup_only", "0",
			"every agent runs a backup daemon; backup_only 1 would stop every host from balancing while it does"},
	}
}

// SyncKernel is what ConnSync needs from the kernel: the daemons, and the
// destinations' connection counters.
type SyncKernel interface {
	DaemonKernel
	Destinations(ctx context.Context, s Service) ([]Destination, error)
}

// ConnSyncConfig configures a ConnSync.
type ConnSyncConfig struct {
	Kernel SyncKernel
	// Settings asks for connection sync; nil means none: the daemons an
	// earlier run started (StateDir's record) are stopped, nothing else.
	Settings *SyncSettings
	// StateDir holds SyncStateFile.
	StateDir string
	// ProcSys is where the sysctls are (default /proc/sys).
	ProcSys string
	// Interval is how often the daemons are checked and the connections
	// counted (DefaultSyncInterval when 0). A count that takes long
	// stretches it, so counting takes at most a tenth of the time.
	Interval time.Duration
	// Services returns the IPVS services whose connections are counted
	// (the driver's Owned).
	Services func() map[Key]string
	Clock    clock.Clock
	Logger   *slog.Logger
	// CallTimeout bounds each kernel call (DefaultCallTimeout when 0).
	CallTimeout time.Duration
}

// SyncStatus is what ConnSync found at its last check.
type SyncStatus struct {
	// Settings are the configured settings, nil when sync is off.
	Settings *SyncSettings
	// Running lists the roles whose daemon runs as configured.
	Running []Role
	// Err says why a daemon does not run as configured, or what else
	// failed (a sysctl, the record); nil when all is well.
	Err error
	// Active and Inactive are the connections the kernel holds for the
	// counted services (ActiveConn and InActConn summed over their
	// destinations); Counted is when, zero before the first count.
	Active, Inactive int
	Counted          time.Time
}

// Runs reports whether the daemon of role runs as configured.
func (s SyncStatus) Runs(r Role) bool { return slices.Contains(s.Running, r) }

// ConnSync keeps the IPVS connection-sync daemons and sysctls, and counts
// the connections the kernel holds. Its methods are safe for concurrent
// use; Ensure and Count are called from Run's goroutine (and once before,
// at start).
type ConnSync struct {
	cfg ConnSyncConfig

	mu     sync.Mutex
	status SyncStatus
	notify chan struct{}
}

// NewConnSync returns a ConnSync; it does nothing until Ensure or Run.
func NewConnSync(cfg ConnSyncConfig) (*ConnSync, error) {
	if cfg.Kernel == nil {
		return nil, errors.New("ipvs connection sync: no kernel")
	}
	if cfg.StateDir == "" {
		return nil, errors.New("ipvs connection sync: no data directory for the record of the daemons")
	}
	if cfg.Settings != nil {
		if err := cfg.Settings.Check(); err != nil {
			return nil, err
		}
		s := *cfg.Settings
		cfg.Settings = &s
	}
	if cfg.ProcSys == "" {
		cfg.ProcSys = "/proc/sys"
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultSyncInterval
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = DefaultCallTimeout
	}
	if cfg.Services == nil {
		cfg.Services = func() map[Key]string { return nil }
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.Real{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &ConnSync{cfg: cfg, status: SyncStatus{Settings: cfg.Settings}, notify: make(chan struct{}, 1)}, nil
}

// Status returns what the last check and count found.
func (c *ConnSync) Status() SyncStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.status
	st.Running = slices.Clone(st.Running)
	return st
}

// Changed signals (without blocking the sender, coalesced) each time the
// daemons' part of Status changes: roles running, or the error.
func (c *ConnSync) Changed() <-chan struct{} { return c.notify }

func (c *ConnSync) setDaemons(running []Role, err error) {
	c.mu.Lock()
	old := c.status
	c.status.Running, c.status.Err = running, err
	changed := !slices.Equal(old.Running, running) || errText(old.Err) != errText(err)
	c.mu.Unlock()
	if changed {
		select {
		case c.notify <- struct{}{}:
		default:
		}
	}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// Ensure brings the daemons and the sysctls to what the settings ask for,
// writing only what differs, and records the outcome in Status. Without
// settings it stops the daemons an earlier run of switchman started (its
// record) and forgets the record; it touches nothing else, and a daemon
// someone else started, or one since restarted with other settings, is
// left alone. The daemons keep running when the agent stops: an agent
// restart does not interrupt sync.
func (c *ConnSync) Ensure(ctx context.Context) error {
	if c.cfg.Settings == nil {
		err := c.stopRecorded(ctx)
		c.setDaemons(nil, err)
		return err
	}
	want := c.cfg.Settings.Daemons()
	// Read first: it loads ip_vs if needed (the sysctls appear with it)
	// and fails plainly on a kernel without IPVS.
	if _, err := call(ctx, c.cfg.CallTimeout, c.cfg.Kernel.Daemons); err != nil {
		c.setDaemons(nil, err)
		return err
	}
	var errs []error
	if err := c.ensureSysctls(); err != nil {
		errs = append(errs, err)
	}
	// Recorded before they start: a crash in between leaves a record of
	// a daemon that does not run, which a later stop skips (ESRCH).
	if err := c.record(want); err != nil {
		errs = append(errs, err)
	} else {
		ectx, cancel := context.WithTimeout(ctx, 2*c.cfg.CallTimeout)
		err := EnsureDaemons(ectx, c.cfg.Kernel, want)
		cancel()
		if err != nil {
			errs = append(errs, err)
		}
	}
	running, err := c.running(ctx, want)
	if err != nil {
		errs = append(errs, err)
	}
	err = errors.Join(errs...)
	c.setDaemons(running, err)
	return err
}

// running reads back which of want run as asked.
func (c *ConnSync) running(ctx context.Context, want []SyncDaemon) ([]Role, error) {
	have, err := call(ctx, c.cfg.CallTimeout, c.cfg.Kernel.Daemons)
	if err != nil {
		return nil, err
	}
	var out []Role
	for _, w := range want {
		for _, h := range have {
			if daemonMatches(h, w) {
				out = append(out, w.Role)
			}
		}
	}
	return out, nil
}

// ensureSysctls writes each of SyncSysctls that differs.
func (c *ConnSync) ensureSysctls() error {
	var errs []error
	for _, s := range SyncSysctls() {
		old, wrote, err := sysctl.Ensure(c.cfg.ProcSys, s.Path, s.Value)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if wrote {
			c.cfg.Logger.Info("set sysctl for IPVS connection sync", "name", sysctl.Name(s.Path), "old", old, "new", s.Value, "why", s.Why)
		}
	}
	return errors.Join(errs...)
}

// syncRecord is the content of SyncStateFile.
type syncRecord struct {
	Version int            `json:"version"`
	Daemons []recordDaemon `json:"daemons"`
}

type recordDaemon struct {
	Role      string     `json:"role"`
	Interface string     `json:"interface"`
	SyncID    uint8      `json:"sync_id"`
	Group     netip.Addr `json:"group,omitzero"`
	Port      uint16     `json:"port,omitempty"`
	TTL       uint8      `json:"ttl,omitempty"`
}

func (c *ConnSync) recordPath() string { return filepath.Join(c.cfg.StateDir, SyncStateFile) }

// record writes the record of want when it differs from the file.
func (c *ConnSync) record(want []SyncDaemon) error {
	r := syncRecord{Version: 1}
	for _, d := range want {
		r.Daemons = append(r.Daemons, recordDaemon{Role: d.Role.String(), Interface: d.Interface, SyncID: d.SyncID, Group: d.Group, Port: d.Port, TTL: d.TTL})
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode the record of the IPVS sync daemons: %w", err)
	}
	b = append(b, '\n')
	if old, err := os.ReadFile(c.recordPath()); err == nil && string(old) == string(b) {
		return nil
	}
	if err := atomicfile.Write(c.recordPath(), b, 0o600); err != nil {
		return fmt.Errorf("write the record of the IPVS sync daemons: %w", err)
	}
	return nil
}

// loadRecord reads the record; none when the file is missing.
func (c *ConnSync) loadRecord() ([]SyncDaemon, bool, error) {
	b, err := atomicfile.ReadBounded(c.recordPath(), 64<<10)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read the record of the IPVS sync daemons: %w", err)
	}
	var r syncRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, false, fmt.Errorf("read the record of the IPVS sync daemons %s: %w", c.recordPath(), err)
	}
	if r.Version != 1 {
		return nil, false, fmt.Errorf("read the record of the IPVS sync daemons %s: version %d, want 1", c.recordPath(), r.Version)
	}
	var out []SyncDaemon
	for i, d := range r.Daemons {
		var role Role
		switch d.Role {
		case Master.String():
			role = Master
		case Backup.String():
			role = Backup
		default:
			return nil, false, fmt.Errorf("read the record of the IPVS sync daemons %s: daemons[%d].role: %q is not master or backup", c.recordPath(), i, d.Role)
		}
		out = append(out, SyncDaemon{Role: role, Interface: d.Interface, SyncID: d.SyncID, Group: d.Group, Port: d.Port, TTL: d.TTL})
	}
	return out, true, nil
}

// stopRecorded stops the recorded daemons that still run as recorded,
// then removes the record. Without a record it asks the kernel nothing.
func (c *ConnSync) stopRecorded(ctx context.Context) error {
	recorded, ok, err := c.loadRecord()
	if err != nil || !ok {
		return err
	}
	have, err := call(ctx, c.cfg.CallTimeout, c.cfg.Kernel.Daemons)
	if err != nil {
		return fmt.Errorf("connection sync is no longer configured, but the daemons an earlier run started cannot be read: %w", err)
	}
	var errs []error
	for _, r := range recorded {
		for _, h := range have {
			if h.Role != r.Role {
				continue
			}
			if !daemonMatches(h, r) {
				c.cfg.Logger.Warn("an IPVS sync daemon runs with other settings than switchman started it with; left alone", "role", r.Role, "interface", h.Interface, "sync_id", h.SyncID)
				continue
			}
			sctx, cancel := context.WithTimeout(ctx, c.cfg.CallTimeout)
			err := c.cfg.Kernel.StopDaemon(sctx, r.Role)
			cancel()
			if err != nil && !errors.Is(err, syscall.ESRCH) {
				errs = append(errs, err)
				continue
			}
			c.cfg.Logger.Info("stopped the IPVS sync daemon: --ipvs-sync-interface is no longer given", "role", r.Role, "interface", h.Interface)
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if err := os.Remove(c.recordPath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove the record of the IPVS sync daemons: %w", err)
	}
	return nil
}

// Count sums the connection counters of the destinations of the counted
// services: one destination dump per service, so its cost grows with the
// services, never with the connections. A service gone meanwhile is
// skipped.
func (c *ConnSync) Count(ctx context.Context) error {
	var active, inactive int
	for k := range c.cfg.Services() {
		dsts, _, err := destinationsOf(ctx, c.cfg.Kernel, c.cfg.CallTimeout, k)
		if err != nil {
			return fmt.Errorf("count IPVS connections: %w", err)
		}
		for _, d := range dsts {
			active += d.ActiveConn
			inactive += d.InActConn
		}
	}
	c.mu.Lock()
	c.status.Active, c.status.Inactive, c.status.Counted = active, inactive, c.cfg.Clock.Now()
	c.mu.Unlock()
	return nil
}

// Run checks and counts every Interval until ctx ends; a count that took
// more than a tenth of the interval stretches the wait to ten times its
// duration. It never stops the daemons: they outlive the agent.
func (c *ConnSync) Run(ctx context.Context) error {
	timer := c.cfg.Clock.NewTimer()
	defer timer.Stop()
	for {
		if err := c.Ensure(ctx); err != nil && ctx.Err() == nil {
			c.cfg.Logger.Warn("IPVS connection sync", "error", err)
		}
		start := c.cfg.Clock.Now()
		if err := c.Count(ctx); err != nil && ctx.Err() == nil {
			c.cfg.Logger.Warn("count IPVS connections", "error", err)
		}
		wait := max(c.cfg.Interval, 10*c.cfg.Clock.Now().Sub(start))
		timer.ResetAt(c.cfg.Clock.Now().Add(wait))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-timer.C():
		}
	}
}
