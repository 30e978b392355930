// Package haproxy is switchman's driver for the TLS-terminating path. It
// keeps a record of the services the running HAProxy holds and works in
// proportion to what changed: a pool change of a service (servers added,
// removed, reweighted, failed) is runtime API commands on that service's
// backend alone, a certificate content change is a hot swap, and only a
// structural change (a service added or removed, a bind, a certificate
// path, a scheduler, persistence) renders haproxy.cfg, checks it and
// reloads HAProxy once, seamlessly. A bind HAProxy could not make is found
// before the reload and fails only the service that asks for it.
package haproxy

import (
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
	// pidfile and certificates from etcd keys (default
	// /run/switchman/haproxy).
	Dir string
	// AttachSocket, when set, is the admin socket of a HAProxy someone else
	// runs on Dir/haproxy.cfg: the driver neither starts nor supervises it.
	// Pool and certificate changes go through this socket as usual; a
	// structural change is written and checked, then loaded through
	// AttachMasterSocket when set, and reported as an error otherwise.
	AttachSocket string
	// AttachMasterSocket is the attached HAProxy's master CLI socket (-S).
	AttachMasterSocket string
	// CommandTimeout bounds each runtime API command (default 2s); a
	// reload or start may take ten times as long.
	CommandTimeout time.Duration
	// RestartBackoff and MaxRestartBackoff pace restarts of a HAProxy
	// that died (default 500ms doubling up to 30s).
	RestartBackoff, MaxRestartBackoff time.Duration
	// HardStopAfter bounds how long workers replaced by a reload keep
	// serving old connections (0: until they end).
	HardStopAfter time.Duration
	// HTTPSpareSlots is how many spare backend slots a pool of http
	// services keeps when it is created or grown by a reload (default
	// render.DefaultHTTPSpareSlots): the new http services a HAProxy can
	// take without a reload.
	HTTPSpareSlots int
	// Logger receives the driver's and HAProxy's messages.
	Logger *slog.Logger
}

// Driver programs HAProxy. Create it with New; it implements agent.Driver
// and agent.ConnectionCounter. The agent calls it from one goroutine; a
// mutex makes other callers safe too.
type Driver struct {
	log     *slog.Logger
	opts    Options
	rt      Runtime
	proc    process
	cfgPath string
	base    render.HAProxyOptions
	header  []byte // the header of haproxy.cfg this driver renders
	reloads atomic.Uint64

	mu       sync.Mutex
	dirOK    bool   // Dir and Dir/certs exist
	running  bool   // HAProxy runs the structure in loaded
	recorded bool   // loaded is a record (of a load or an adoption)
	restarts uint64 // proc.Restarts() when last looked at
	// runHeader is the header of the running configuration.
	runHeader []byte
	// loaded are the services in the running structure, by name.
	loaded map[string]*service
	// certs maps a certificate path to the content HAProxy serves from
	// it; a path that is absent is not known (it is read back first).
	certs map[string][sha256.Size]byte
	// files maps a certificate file written from an etcd key to its
	// content on disk; absent: not known.
	files map[string][sha256.Size]byte
	// onDisk is the content of cfgPath; dirty says a section of loaded
	// changed since it was written. Pool changes only mark it dirty: the
	// file is brought up to date by loads, by each Sync and before
	// supervision starts HAProxy again, not by every change.
	onDisk []byte
	dirty  bool
	// loads counts the structures loaded (reloads and starts).
	loads uint64

	// layout is the http part of the running structure: its frontends,
	// pools of backend slots, and which http service holds which slot.
	layout render.HTTPLayout
	// spare is Options.HTTPSpareSlots with its default.
	spare int
	// maps is the content of each routing map file as HAProxy holds it;
	// a path that is absent is not known (it is pushed again).
	maps map[string][]byte
	// crtLists is the certificates of each crt-list as HAProxy holds
	// them; absent: not known (read back first).
	crtLists map[string][]string
	// releasing are the slots whose former service's servers are still
	// closing connections: not given out again until they are empty.
	releasing map[string]bool
}

// New returns a driver. It creates Dir but starts nothing: HAProxy is
// started (or a running one adopted) by the first pass that has a HAProxy
// service. A Dir that cannot be created does not fail New: every HAProxy
// service fails with that reason instead (and each pass tries again), so
// the agent serves the rest.
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
	log := opts.Logger.With("component", "haproxy")
	proc := &execProcess{
		log: log, bin: opts.Bin, cfgPath: filepath.Join(dir, "haproxy.cfg"), pidFile: filepath.Join(dir, "haproxy.pid"),
		adminSock: admin, masterSock: master, attach: opts.AttachSocket != "",
		timeout: opts.CommandTimeout, restart: [2]time.Duration{opts.RestartBackoff, opts.MaxRestartBackoff},
		stderr: lineLog{log: log},
	}
	d, err := newDriver(opts, newSocketRuntime(admin, opts.CommandTimeout), proc, admin)
	if err != nil {
		return nil, err
	}
	proc.beforeRestart = d.flush
	return d, nil
}

func newDriver(opts Options, rt Runtime, proc process, adminSock string) (*Driver, error) {
	d := &Driver{
		log: opts.Logger, opts: opts, rt: rt, proc: proc,
		cfgPath: filepath.Join(opts.Dir, "haproxy.cfg"),
		base:    baseOptions(opts.Dir, adminSock),
		loaded:  map[string]*service{},
		certs:   map[string][sha256.Size]byte{},
		files:   map[string][sha256.Size]byte{},
		maps:    map[string][]byte{}, crtLists: map[string][]string{}, releasing: map[string]bool{},
		spare: opts.HTTPSpareSlots,
	}
	if d.spare <= 0 {
		d.spare = render.DefaultHTTPSpareSlots
	}
	d.base.HardStopAfter = opts.HardStopAfter
	h, err := render.HAProxyHeader(d.base)
	if err != nil {
		return nil, fmt.Errorf("haproxy: %w", err)
	}
	d.header = h
	return d, nil
}

// Name is "haproxy".
func (d *Driver) Name() string { return "haproxy" }

// Reloads counts the reloads this driver made HAProxy do.
func (d *Driver) Reloads() uint64 { return d.reloads.Load() }

// Close stops supervising HAProxy and stops the HAProxy the driver
// supervises (started or adopted); an attached one is left alone. The
// agent does not call it: HAProxy keeps serving through an agent restart.
func (d *Driver) Close() { d.proc.Close() }

// Apply brings each given service to its desired state and touches
// nothing else: a pool change is runtime API commands on the service's
// backend, a new certificate is swapped in memory, and a structural change
// reloads HAProxy once for all the services that need it. A service whose
// HAProxy part is nil is removed. Apply reads only what these services need:
// nothing, when the record of what HAProxy holds is current.
func (d *Driver) Apply(ctx context.Context, changed []*render.ServiceState) map[string]error {
	return d.pass(ctx, changed, false)
}

// Sync makes HAProxy match all: it reads back the backends, every server
// and every certificate HAProxy serves, repairs what differs (a missing
// backend or a stray one reloads the recorded structure), removes the
// services not in all, and writes nothing when nothing differs. It adopts
// a HAProxy left running by an earlier agent without a reload.
func (d *Driver) Sync(ctx context.Context, all []*render.ServiceState) map[string]error {
	return d.pass(ctx, all, true)
}

// change is a structural change of one service.
type change struct {
	name string
	next *service // nil: remove the service
}

// pass is Apply (full false: the services named) and Sync (full: all of
// them, read back from HAProxy).
func (d *Driver) pass(ctx context.Context, states []*render.ServiceState, full bool) map[string]error {
	d.mu.Lock()
	defer d.mu.Unlock()
	errs := map[string]error{}
	desired := make(map[string]*render.HAProxyService, len(states))
	wantAny := false
	for _, st := range states {
		desired[st.Name] = st.HAProxy
		wantAny = wantAny || st.HAProxy != nil
	}
	failAll := func(err error) map[string]error {
		for n, h := range desired {
			if h != nil || d.loaded[n] != nil {
				errs[n] = err
			}
		}
		return errs
	}
	err := d.proc.Available()
	if err == nil && wantAny {
		err = d.makeDir()
	}
	if err != nil {
		return failAll(err)
	}
	d.observe(ctx, wantAny || (full && !d.recorded))
	if !d.running && !wantAny && len(d.loaded) == 0 {
		return errs
	}
	if full {
		for n := range d.loaded {
			if _, ok := desired[n]; !ok {
				desired[n] = nil // not in all: removed
			}
		}
	}
	names := slices.Sorted(maps.Keys(desired))

	// A Sync reads back what HAProxy holds: a backend missing from it, or
	// one it holds that the record does not, is structural drift.
	forced := map[string]bool{}
	forceAll := d.running && string(d.runHeader) != string(d.header)
	var actual map[string][]ServerState
	readBack := full
	if full && d.running {
		var err error
		actual, forceAll, err = d.readBack(ctx, forced, forceAll)
		if err != nil {
			return failAll(fmt.Errorf("read back HAProxy: %w", err))
		}
	}

	var changes []change
	pools := map[string][]render.HAProxyServer{}
	prepared := map[string]*service{}
	web := map[string]*service{} // http services that change: at run time when the layout's skeleton allows
	for _, n := range names {
		h, e := desired[n], d.loaded[n]
		if h == nil {
			switch {
			case e != nil && e.http:
				web[n] = nil
			case e != nil:
				changes = append(changes, change{name: n})
			}
			continue
		}
		p, err := d.prepare(*h)
		if err != nil {
			errs[n] = err
			if e != nil {
				pools[n] = h.Servers // the last good structure serves the current pool
				if forced[n] && !e.http {
					changes = append(changes, change{name: n, next: e})
				}
			}
			continue
		}
		prepared[n] = p
		pools[n] = h.Servers
		switch {
		case e != nil && e.http != p.http: // tcp <-> http: a section comes or goes
			changes = append(changes, change{name: n, next: p})
		case p.http:
			web[n] = p
		case e == nil || e.skeleton != p.skeleton || forced[n]:
			changes = append(changes, change{name: n, next: p})
		default:
			e.adoptStructure(p)
		}
	}
	var webLayout render.HTTPLayout
	if len(web) > 0 {
		// A change of the layout's skeleton (a vip:port, TLS, a pool that
		// runs out) is loaded with the structural changes; the rest is
		// made at run time.
		var err error
		if d.keepSlots(web) {
			webLayout = d.layout // routes, pools, certificate contents: no slot moves
		} else {
			webLayout, err = d.layoutOf(d.withHTTP(web))
		}
		if err != nil || webLayout.Skeleton() != d.layout.Skeleton() || !d.running || forceAll || len(forced) > 0 {
			for _, n := range slices.Sorted(maps.Keys(web)) {
				changes = append(changes, change{name: n, next: web[n]})
			}
			web = nil
		}
	}

	if len(changes) > 0 || forceAll || (!d.running && len(d.loaded) > 0) {
		loads := d.loads
		err := d.restructure(ctx, changes, forceAll, errs)
		if d.loads != loads {
			actual, readBack = nil, false // new workers hold the recorded pools
		}
		if err != nil {
			for _, n := range names {
				if errs[n] == nil && (desired[n] != nil || d.loaded[n] != nil) {
					errs[n] = err
				}
			}
		}
	}
	if !d.running {
		return errs
	}
	if len(web) > 0 {
		d.applyHTTP(ctx, web, webLayout, pools, full, errs)
	}

	certDone := map[string]error{}
	for _, n := range names {
		e := d.loaded[n]
		servers, ok := pools[n]
		if e == nil || !ok {
			continue
		}
		act, seen := actual[e.backend()]
		if err := d.syncPool(ctx, e, servers, act, readBack, seen); err != nil {
			errs[n] = errors.Join(errs[n], err)
		}
		p := prepared[n]
		if p == nil || p.certPath == "" || e.certPath != p.certPath {
			continue // plain TCP, or a new certificate path that did not load
		}
		e.pem, e.fromEtcd = p.pem, p.fromEtcd
		err, done := certDone[e.certPath]
		if !done {
			err = d.syncCert(ctx, e, readBack)
			certDone[e.certPath] = err
		}
		if err != nil {
			errs[n] = errors.Join(errs[n], err)
		}
	}
	if full {
		d.syncHTTP(ctx, actual, errs)
		d.persist(true)
	} else {
		d.retryReleases(ctx)
	}
	return errs
}

// flush brings haproxy.cfg up to date before supervision starts HAProxy
// again. It does not wait for a pass in progress: that pass, or the next,
// notices the restart and reads back what HAProxy holds.
func (d *Driver) flush() {
	if !d.mu.TryLock() {
		return
	}
	defer d.mu.Unlock()
	d.persist(false)
}

// observe notes what happened to HAProxy since the last pass: it died
// (then it is started again by this pass), supervision restarted it (what
// it holds is read back before it is trusted), or it runs without this
// driver having started it (it is adopted, without a reload). look asks
// to look for a running HAProxy even when no service is recorded.
func (d *Driver) observe(ctx context.Context, look bool) {
	if d.running && !d.proc.Alive() {
		d.log.Warn("haproxy is not running; starting it again")
		d.running = false
	}
	if r := d.proc.Restarts(); r != d.restarts {
		d.restarts = r
		d.unverify()
	}
	if d.running || (!look && len(d.loaded) == 0) || !d.proc.Running(ctx) {
		return
	}
	if !d.recorded {
		// A HAProxy from before an agent restart, or an attached one: its
		// structure is what the driver last wrote to haproxy.cfg.
		cfg, err := os.ReadFile(d.cfgPath)
		if err != nil {
			d.log.Warn("a running haproxy was found but haproxy.cfg cannot be read; its structure will be loaded again", "err", err)
		}
		d.runHeader, d.loaded, d.layout = parseConfig(cfg, d.opts.Dir)
		d.adoptHTTPFiles()
		d.onDisk = cfg
		d.recorded = true
		d.log.Info("adopted a running haproxy", "services", len(d.loaded))
	}
	d.running = true
	d.unverify()
	if err := d.proc.Adopt(ctx); err != nil {
		d.log.Warn("the running haproxy cannot be supervised", "err", err)
	}
}

// unverify forgets what the record says HAProxy holds at run time (pools,
// certificates): the next pass that touches a service reads it back.
func (d *Driver) unverify() {
	for _, e := range d.loaded {
		e.poolKnown = false
	}
	clear(d.certs)
	clear(d.maps)
	clear(d.crtLists)
}

// readBack reads the backends and every server HAProxy holds. It marks in
// forced the recorded services whose backend is missing, and returns
// forceAll set when HAProxy holds a backend the record does not.
func (d *Driver) readBack(ctx context.Context, forced map[string]bool, forceAll bool) (map[string][]ServerState, bool, error) {
	backends, err := d.rt.Backends(ctx)
	if err != nil {
		return nil, forceAll, err
	}
	actual, err := d.rt.AllServersState(ctx)
	if err != nil {
		return nil, forceAll, err
	}
	have := map[string]bool{}
	recorded := map[string]bool{}
	for _, be := range d.layout.Backends() {
		recorded[be] = true
	}
	for _, e := range d.loaded {
		if !e.http {
			recorded[e.backend()] = true
		}
	}
	for _, be := range backends {
		have[be] = true
		if strings.HasPrefix(be, "be_") && !recorded[be] {
			d.log.Warn("haproxy holds a backend switchman did not record; loading the recorded structure", "backend", be)
			forceAll = true
		}
	}
	for be := range recorded {
		if !have[be] {
			d.log.Warn("haproxy lacks a recorded backend; loading the recorded structure", "backend", be)
			forceAll = true
		}
	}
	for n, e := range d.loaded {
		be := e.backend()
		if !have[be] {
			forced[n] = true
			continue
		}
		if actual[be] == nil {
			actual[be] = []ServerState{} // present, without servers
		}
	}
	for be := range recorded {
		if have[be] && actual[be] == nil {
			actual[be] = []ServerState{}
		}
	}
	return actual, forceAll, nil
}

// makeDir creates the working directory and its certs folder once.
func (d *Driver) makeDir() error {
	if d.dirOK {
		return nil
	}
	for _, sub := range []string{"certs", "maps"} {
		if err := os.MkdirAll(filepath.Join(d.opts.Dir, sub), 0o700); err != nil {
			return fmt.Errorf("the HAProxy working directory (--haproxy-dir %s) cannot be created: %w", d.opts.Dir, err)
		}
	}
	d.dirOK = true
	return nil
}

// Connections returns the current connection count of every server of the
// named services, one `show stat` of each service's backend, which lets
// the agent end a drain early.
func (d *Driver) Connections(ctx context.Context, services map[string]bool) (map[render.BackendRef]int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[render.BackendRef]int{}
	for _, name := range slices.Sorted(maps.Keys(services)) {
		e := d.loaded[name]
		if e == nil || !services[name] {
			continue
		}
		st, err := d.rt.Sessions(ctx, e.backend())
		if err != nil {
			return nil, err
		}
		for _, s := range e.svc.Servers {
			if n, ok := st[s.Name]; ok {
				out[render.BackendRef{Service: name, Addr: netip.AddrPortFrom(s.Address, s.Port)}] = n
			}
		}
	}
	return out, nil
}
