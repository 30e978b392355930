// Package haproxy is switchman's driver for the TLS-terminating path. It
// renders haproxy.cfg for structure (frontends, binds, certificates,
// schedulers, persistence) and reloads HAProxy only when that structure
// changes; every pool change (servers added or removed, weights, addresses)
// and every certificate content change goes through the runtime API on the
// admin socket, without a reload.
package haproxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/switchman-lb/switchman/internal/atomicfile"
	"github.com/switchman-lb/switchman/render"
)

// maxCertificateFile bounds a tls.certificate file: a certificate chain
// and its key take a few KiB, so 1 MiB leaves room for any real bundle.
const maxCertificateFile = 1 << 20

// Options configure the driver.
type Options struct {
	// Bin is the haproxy binary (default "haproxy", looked up in PATH).
	Bin string
	// Dir is the working directory: haproxy.cfg, the sockets, the
	// server-state file, the pidfile and certificates from etcd keys
	// (default /run/switchman/haproxy).
	Dir string
	// AttachSocket, when set, is the admin socket of a HAProxy someone else
	// runs on Dir/haproxy.cfg: the driver neither starts nor supervises it.
	// Pool and certificate changes go through this socket as usual; a
	// structural change is written and checked, then loaded through
	// AttachMasterSocket when set, and reported as an error otherwise.
	AttachSocket string
	// AttachMasterSocket is the attached HAProxy's master CLI socket (-S).
	AttachMasterSocket string
	// CommandTimeout bounds each runtime API command (default 2s).
	CommandTimeout time.Duration
	// RemoveWait bounds how long a removed server, in maintenance, may keep
	// its connections before they are shut down (default 5s).
	RemoveWait time.Duration
	// RestartBackoff and MaxRestartBackoff pace restarts of a HAProxy
	// that died (default 500ms doubling up to 30s).
	RestartBackoff, MaxRestartBackoff time.Duration
	// HardStopAfter bounds how long workers replaced by a reload keep
	// serving old connections (0: until they end).
	HardStopAfter time.Duration
	// Logger receives the driver's and HAProxy's messages.
	Logger *slog.Logger
}

// Driver programs HAProxy. Create it with New; it implements agent.Driver
// and agent.ConnectionCounter.
type Driver struct {
	log     *slog.Logger
	opts    Options
	rt      Runtime
	proc    process
	cfgPath string
	base    render.HAProxyOptions
	reloads atomic.Uint64
	// servers maps backend and server name to address, for Connections;
	// replaced at the end of each Apply.
	servers atomic.Pointer[map[string]map[string]netip.AddrPort]

	// mu serializes Apply. Only Apply takes it: it guards the driver's
	// record of what the running HAProxy holds, which Apply alone reads
	// and writes.
	mu       sync.Mutex
	dirOK    bool // Dir and Dir/certs exist
	running  bool
	skeleton string                       // running config without server lines
	loaded   map[string]prepared          // services in the running structure
	certs    map[string][sha256.Size]byte // cert path -> content HAProxy serves
	onDisk   []byte                       // content of cfgPath
}

// prepared is one service ready to render.
type prepared struct {
	svc      render.HAProxyService
	certPath string // file the frontend loads; "" for plain TCP
	fromEtcd bool   // certPath is ours to write
	pem      []byte // canonical certificate content
	skeleton string // the service rendered alone without servers
}

// New returns a driver. It creates Dir but starts nothing: HAProxy is
// started by the first Apply that has a HAProxy service. A Dir that cannot
// be created does not fail New: every HAProxy service fails with that
// reason instead (and Apply tries again), so the agent serves the rest.
func New(opts Options) (*Driver, error) {
	if opts.Bin == "" {
		opts.Bin = "haproxy"
	}
	if opts.Dir == "" {
		opts.Dir = DefaultDir
	}
	if opts.CommandTimeout <= 0 {
		opts.CommandTimeout = 2 * time.Second
	}
	if opts.RemoveWait <= 0 {
		opts.RemoveWait = 5 * time.Second
	}
	if opts.RestartBackoff <= 0 {
		opts.RestartBackoff = 500 * time.Millisecond
	}
	if opts.MaxRestartBackoff < opts.RestartBackoff {
		opts.MaxRestartBackoff = max(30*time.Second, opts.RestartBackoff)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, err
	}
	opts.Dir = dir
	admin := filepath.Join(dir, "admin.sock")
	master := filepath.Join(dir, "master.sock")
	if opts.AttachSocket != "" {
		admin, master = opts.AttachSocket, opts.AttachMasterSocket
	}
	proc := &execProcess{
		log: opts.Logger.With("component", "haproxy"), bin: opts.Bin, cfgPath: filepath.Join(dir, "haproxy.cfg"),
		adminSock: admin, masterSock: master, attach: opts.AttachSocket != "",
		timeout: opts.CommandTimeout, backoff: [2]time.Duration{opts.RestartBackoff, opts.MaxRestartBackoff},
	}
	return newDriver(opts, newSocketRuntime(admin, opts.CommandTimeout), proc, admin), nil
}

func newDriver(opts Options, rt Runtime, proc process, adminSock string) *Driver {
	d := &Driver{
		log: opts.Logger, opts: opts, rt: rt, proc: proc,
		cfgPath: filepath.Join(opts.Dir, "haproxy.cfg"),
		base:    baseOptions(opts.Dir, adminSock),
		loaded:  map[string]prepared{},
		certs:   map[string][sha256.Size]byte{},
	}
	d.base.HardStopAfter = opts.HardStopAfter
	if b, err := os.ReadFile(d.cfgPath); err == nil {
		d.onDisk = b
	}
	return d
}

// Name is "haproxy".
func (d *Driver) Name() string { return "haproxy" }

// Reloads counts the reloads this driver made HAProxy do.
func (d *Driver) Reloads() uint64 { return d.reloads.Load() }

// Close stops the HAProxy the driver started (an attached one is left
// alone).
func (d *Driver) Close() { d.proc.Close() }

// Apply makes HAProxy serve desired.HAProxy: a reload when the structure
// changed, runtime API commands for everything else.
func (d *Driver) Apply(ctx context.Context, desired *render.State) map[string]error {
	d.mu.Lock()
	defer d.mu.Unlock()
	errs := map[string]error{}
	err := d.proc.Available()
	if err == nil && len(desired.HAProxy) > 0 {
		err = d.makeDir()
	}
	if err != nil {
		for _, s := range desired.HAProxy {
			errs[s.Name] = err
		}
		return errs
	}
	if !d.running {
		if d.proc.Running(ctx) {
			// A HAProxy from before an agent restart, or an attached one.
			d.running = true
			d.skeleton = skeletonOf(d.onDisk)
		} else if len(desired.HAProxy) == 0 {
			return errs
		}
	}

	want := map[string]prepared{}
	var order []string
	for _, s := range desired.HAProxy {
		p, err := d.prepare(s)
		if err != nil {
			errs[s.Name] = err
			old, ok := d.loaded[s.Name]
			if !ok {
				continue
			}
			old.svc.Servers = s.Servers // keep the last good structure, serve the current pool
			p = old
		}
		want[s.Name] = p
		order = append(order, s.Name)
	}

	cfg, err := d.config(order, want)
	if err != nil { // prepare rendered each service alone, so this is unexpected
		for _, n := range order {
			errs[n] = err
		}
		return errs
	}
	if !d.running || skeletonOf(cfg) != d.skeleton {
		d.load(ctx, order, want, errs)
		if !d.running {
			return errs
		}
	} else {
		d.loaded = want
	}

	// Every service in the running structure gets its current pool; one
	// whose new structure was refused keeps its old structure.
	var synced []string
	for _, n := range order {
		p, ok := d.loaded[n]
		if !ok {
			continue
		}
		if w := want[n]; p.skeleton == w.skeleton {
			p = w
		} else {
			p.svc.Servers = w.svc.Servers
		}
		d.loaded[n] = p
		synced = append(synced, n)
		if err := d.syncServers(ctx, n, p.svc.Servers); err != nil {
			errs[n] = errors.Join(errs[n], err)
		}
	}
	d.swapCertificates(ctx, synced, errs)
	d.publishServers()

	// Keep haproxy.cfg on disk equal to what runs, servers included, so a
	// restart of HAProxy brings the current pool back. Only server lines
	// can differ from the validated file, so no new check is needed.
	if cur, err := d.config(slices.Sorted(maps.Keys(d.loaded)), d.loaded); err == nil && !bytes.Equal(cur, d.onDisk) {
		if err := writeAtomic(d.cfgPath, cur); err != nil {
			d.log.Warn("haproxy.cfg not updated with the current pool", "err", err)
		} else {
			d.onDisk = cur
		}
	}
	return errs
}

// makeDir creates the working directory and its certs folder once.
func (d *Driver) makeDir() error {
	if d.dirOK {
		return nil
	}
	if err := os.MkdirAll(filepath.Join(d.opts.Dir, "certs"), 0o700); err != nil {
		return fmt.Errorf("the HAProxy working directory (--haproxy-dir %s) cannot be created: %w", d.opts.Dir, err)
	}
	d.dirOK = true
	return nil
}

// prepare resolves a service's certificate and renders it alone, which
// both checks every value and gives its structural skeleton.
func (d *Driver) prepare(s render.HAProxyService) (prepared, error) {
	p := prepared{svc: s}
	if err := render.CheckHAProxyName(s.Name); err != nil {
		return p, err
	}
	switch {
	case s.CertificateKey != "":
		if len(s.CertificatePEM) == 0 {
			return p, fmt.Errorf("tls.certificate_key %q is missing or empty in etcd", s.CertificateKey)
		}
		pem, err := canonicalPEM(s.CertificatePEM)
		if err != nil {
			return p, fmt.Errorf("tls.certificate_key %q: %w", s.CertificateKey, err)
		}
		p.certPath, p.fromEtcd, p.pem = certPath(d.opts.Dir, s.Name), true, pem
	case s.Certificate != "":
		if err := render.CheckHAProxyPath("tls.certificate", s.Certificate); err != nil {
			return p, err
		}
		// A regular file of bounded size, opened without blocking: the
		// definition's writer chooses the path (/dev/zero, a FIFO).
		raw, err := atomicfile.ReadBounded(s.Certificate, maxCertificateFile)
		if err != nil {
			return p, fmt.Errorf("tls.certificate %q cannot be used: %w", s.Certificate, err)
		}
		pem, err := canonicalPEM(raw)
		if err != nil {
			return p, fmt.Errorf("tls.certificate %q: %w", s.Certificate, err)
		}
		p.certPath, p.pem = s.Certificate, pem
	}
	alone, err := render.HAProxyConfig([]render.HAProxyService{s}, d.renderOpts(map[string]prepared{s.Name: p}))
	if err != nil {
		return p, err
	}
	p.skeleton = skeletonOf(alone)
	return p, nil
}

func (d *Driver) renderOpts(set map[string]prepared) render.HAProxyOptions {
	o := d.base
	o.Certificates = map[string]string{}
	for n, p := range set {
		if p.fromEtcd {
			o.Certificates[n] = p.certPath
		}
	}
	return o
}

func (d *Driver) config(order []string, set map[string]prepared) ([]byte, error) {
	svcs := make([]render.HAProxyService, 0, len(order))
	for _, n := range order {
		svcs = append(svcs, set[n].svc)
	}
	return render.HAProxyConfig(svcs, d.renderOpts(set))
}

// skeletonOf is a config without its server lines: what needs a reload.
func skeletonOf(cfg []byte) string {
	var b strings.Builder
	for _, l := range strings.SplitAfter(string(cfg), "\n") {
		if !strings.HasPrefix(l, "    server ") {
			b.WriteString(l)
		}
	}
	return b.String()
}

// load writes, checks and loads a new structure (starting HAProxy if it
// is not running). When the check fails, the services whose structure
// changed fall back to their last good version (or are left out when new)
// and get the error; the others are loaded. On success it records the
// loaded services in d.loaded; on failure d.loaded stays as it was.
func (d *Driver) load(ctx context.Context, order []string, want map[string]prepared, errs map[string]error) {
	for _, n := range order {
		p := want[n]
		if p.fromEtcd {
			if err := writeAtomic(p.certPath, p.pem); err != nil {
				errs[n] = errors.Join(errs[n], fmt.Errorf("write certificate: %w", err))
			}
		}
	}
	cfg, err := d.config(order, want)
	if err == nil {
		err = d.check(ctx, cfg)
	}
	if err != nil {
		var changed []string
		fallback := map[string]prepared{}
		var keep []string
		for _, n := range order {
			old, had := d.loaded[n]
			if had && old.skeleton == want[n].skeleton {
				fallback[n] = want[n]
				keep = append(keep, n)
				continue
			}
			changed = append(changed, n)
			errs[n] = errors.Join(errs[n], err)
			if had {
				old.svc.Servers = want[n].svc.Servers
				fallback[n] = old
				keep = append(keep, n)
			}
		}
		if len(changed) == 0 {
			for _, n := range order {
				errs[n] = errors.Join(errs[n], err)
			}
			return
		}
		d.log.Warn("haproxy configuration rejected; keeping the last good version of the changed services", "services", changed, "err", err)
		order, want = keep, fallback
		if cfg, err = d.config(order, want); err == nil {
			err = d.check(ctx, cfg)
		}
		if err != nil {
			for _, n := range order {
				errs[n] = errors.Join(errs[n], err)
			}
			return
		}
		if skeletonOf(cfg) == d.skeleton && d.running {
			return // the fallback is what already runs
		}
	}
	prevDisk := d.onDisk
	if err := writeAtomic(d.cfgPath, cfg); err != nil {
		for _, n := range order {
			errs[n] = errors.Join(errs[n], fmt.Errorf("write haproxy.cfg: %w", err))
		}
		return
	}
	d.onDisk = cfg
	if d.running {
		if dump, err := d.rt.DumpServersState(ctx); err == nil {
			if err := writeAtomic(d.base.StateFile, dump); err != nil {
				d.log.Warn("server-state file not written", "err", err)
			}
		}
		err = d.proc.Reload(ctx)
		if err == nil {
			d.reloads.Add(1)
		}
	} else {
		err = d.proc.Start(ctx)
	}
	if err != nil {
		// Put the last good file back for the next start or reload.
		if prevDisk != nil && writeAtomic(d.cfgPath, prevDisk) == nil {
			d.onDisk = prevDisk
		}
		for _, n := range order {
			errs[n] = errors.Join(errs[n], fmt.Errorf("load haproxy.cfg: %w", err))
		}
		return
	}
	d.running = true
	d.skeleton = skeletonOf(cfg)
	d.loaded = map[string]prepared{}
	for _, n := range order {
		p := want[n]
		d.loaded[n] = p
		if p.certPath != "" {
			d.certs[p.certPath] = sha256.Sum256(p.pem)
		}
	}
}

// check validates cfg with haproxy -c before it replaces the running file.
func (d *Driver) check(ctx context.Context, cfg []byte) error {
	next := d.cfgPath + ".next"
	if err := writeAtomic(next, cfg); err != nil {
		return fmt.Errorf("write %s: %w", next, err)
	}
	defer os.Remove(next)
	return d.proc.Validate(ctx, next)
}

// syncServers makes a backend's servers match want: missing servers are
// added (they start in maintenance, so they are enabled), stray ones are
// put in maintenance and deleted once their connections end, and
// addresses, weights and maintenance are corrected. Additions come first
// so capacity never dips.
func (d *Driver) syncServers(ctx context.Context, service string, want []render.HAProxyServer) error {
	be := render.HAProxyBackendName(service)
	actual, err := d.rt.ServersState(ctx, be)
	if err != nil {
		return err
	}
	have := make(map[string]ServerState, len(actual))
	for _, a := range actual {
		have[a.Name] = a
	}
	var errs []error
	wanted := map[string]bool{}
	for _, s := range want {
		wanted[s.Name] = true
		ap := netip.AddrPortFrom(s.Address, s.Port)
		w := render.HAProxyWeight(s.Weight)
		a, ok := have[s.Name]
		if !ok {
			if err := d.rt.AddServer(ctx, be, s.Name, ap, w); err != nil {
				errs = append(errs, err)
				continue
			}
			errs = append(errs, d.rt.SetState(ctx, be, s.Name, StateReady))
			continue
		}
		if a.Addr != ap {
			errs = append(errs, d.rt.SetAddr(ctx, be, s.Name, ap))
		}
		if a.Weight != w {
			errs = append(errs, d.rt.SetWeight(ctx, be, s.Name, w))
		}
		if a.Maint {
			errs = append(errs, d.rt.SetState(ctx, be, s.Name, StateReady))
		}
	}
	for _, a := range actual {
		if !wanted[a.Name] {
			errs = append(errs, d.removeServer(ctx, be, a))
		}
	}
	return errors.Join(errs...)
}

// removeServer puts a server in maintenance (no new connections), waits up
// to RemoveWait for its connections to end, shuts down what is left and
// deletes it.
func (d *Driver) removeServer(ctx context.Context, be string, a ServerState) error {
	if !a.Maint {
		if err := d.rt.SetState(ctx, be, a.Name, StateMaint); err != nil {
			return err
		}
	}
	deadline := time.Now().Add(d.opts.RemoveWait)
	for {
		err := d.rt.DelServer(ctx, be, a.Name)
		if !errors.Is(err, ErrServerBusy) {
			return err
		}
		if !time.Now().Before(deadline) {
			d.log.Warn("removed server still has connections; shutting them down", "backend", be, "server", a.Name)
			if err := d.rt.ShutdownSessions(ctx, be, a.Name); err != nil {
				return err
			}
			deadline = time.Now().Add(d.opts.CommandTimeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(25 * time.Millisecond):
		}
	}
}

// swapCertificates hot-swaps every loaded certificate whose content
// differs from what HAProxy serves: written first (for an etcd key), then
// `set ssl cert` + `commit ssl cert` on the same path, without a reload.
func (d *Driver) swapCertificates(ctx context.Context, order []string, errs map[string]error) {
	done := map[string]error{}
	for _, n := range order {
		p := d.loaded[n]
		if p.certPath == "" {
			continue
		}
		if err, seen := done[p.certPath]; seen {
			if err != nil {
				errs[n] = errors.Join(errs[n], err)
			}
			continue
		}
		sum := sha256.Sum256(p.pem)
		if d.certs[p.certPath] == sum {
			done[p.certPath] = nil
			continue
		}
		var err error
		if p.fromEtcd {
			err = writeAtomic(p.certPath, p.pem)
		}
		if err == nil {
			err = d.rt.SetCertificate(ctx, p.certPath, p.pem)
		}
		if err != nil {
			err = fmt.Errorf("certificate %s: %w", p.certPath, err)
			errs[n] = errors.Join(errs[n], err)
		} else {
			d.certs[p.certPath] = sum
			d.log.Info("certificate replaced without reload", "service", n, "path", p.certPath)
		}
		done[p.certPath] = err
	}
}

func (d *Driver) publishServers() {
	m := map[string]map[string]netip.AddrPort{}
	for n, p := range d.loaded {
		s := map[string]netip.AddrPort{}
		for _, srv := range p.svc.Servers {
			s[srv.Name] = netip.AddrPortFrom(srv.Address, srv.Port)
		}
		m[render.HAProxyBackendName(n)] = s
	}
	d.servers.Store(&m)
}

// Connections returns the current connection count of every server of
// every HAProxy service, which lets the agent end a drain early.
func (d *Driver) Connections(ctx context.Context, services map[string]bool) (map[render.BackendRef]int, error) {
	m := d.servers.Load()
	if m == nil {
		return map[render.BackendRef]int{}, nil
	}
	st, err := d.rt.Sessions(ctx)
	if err != nil {
		return nil, err
	}
	out := map[render.BackendRef]int{}
	for be, servers := range *m {
		svc := strings.TrimPrefix(be, "be_")
		if !services[svc] {
			continue
		}
		for name, ap := range servers {
			if n, ok := st[be][name]; ok {
				out[render.BackendRef{Service: svc, Addr: ap}] = n
			}
		}
	}
	return out, nil
}
