package ipvs

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// Kernel is what the driver needs from the kernel's IPVS. Reads return the
// kernel's state; writes fail with the kernel's errno (wrapped): EEXIST when
// adding what exists, ESRCH when the service is missing, ENOENT when the
// destination is missing. An implementation whose kernel has no IPVS wraps
// ErrUnavailable. Every call honours its context's deadline.
type Kernel interface {
	Services(ctx context.Context) ([]Service, error)
	Destinations(ctx context.Context, s Service) ([]Destination, error)
	AddService(ctx context.Context, s Service) error
	UpdateService(ctx context.Context, s Service) error
	DeleteService(ctx context.Context, s Service) error
	AddDestination(ctx context.Context, s Service, d Destination) error
	UpdateDestination(ctx context.Context, s Service, d Destination) error
	DeleteDestination(ctx context.Context, s Service, d Destination) error
}

// DefaultCallTimeout bounds one kernel call when Config leaves it zero.
const DefaultCallTimeout = 10 * time.Second

// Config configures a Driver.
type Config struct {
	Kernel Kernel
	// DataDir holds the ownership record (StateFile); it is created (0700)
	// when missing.
	DataDir string
	Logger  *slog.Logger
	// CallTimeout bounds each kernel call; 0 means DefaultCallTimeout.
	CallTimeout time.Duration
	// FullResync is how often every owned service's destinations are read
	// back from the kernel even when the desired state did not change, in
	// the background; the Sync after a read-back repairs what it found
	// different. Otherwise a pass reads only the services whose desired
	// state changed (and the service list, always). 0 means
	// DefaultFullResync.
	FullResync time.Duration
	// ConnSync says connection sync is configured (--ipvs-sync-interface):
	// a service with a destination of another address family than its
	// VIP is refused, since the kernel runs no sync daemon while such a
	// destination exists, nor adds one while a daemon runs.
	ConnSync bool
}

// DefaultFullResync is the default Config.FullResync.
const DefaultFullResync = 30 * time.Second

// Driver programs IPVS virtual services. It implements the agent's Driver
// and ConnectionCounter.
type Driver struct {
	kernel  Kernel
	path    string
	log     *slog.Logger
	timeout time.Duration
	writes  atomic.Uint64
	turn    chan struct{} // one Apply at a time; waiting honours ctx

	// Used only by Apply and Sync, under turn: what the last pass
	// programmed and confirmed per service, and when the Sync that started
	// the last read-back (readback.go) began.
	resync   time.Duration
	applied  map[Key]Desired
	lastFull time.Time
	connSync bool
	rb       readBack

	mu    sync.Mutex
	owned map[Key]string // key -> switchman service, as last recorded
}

// New returns a Driver, reading the ownership record from cfg.DataDir.
func New(cfg Config) (*Driver, error) {
	if cfg.Kernel == nil {
		return nil, errors.New("ipvs driver: no kernel")
	}
	if cfg.DataDir == "" {
		return nil, errors.New("ipvs driver: no data directory for the ownership record")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = DefaultCallTimeout
	}
	if cfg.FullResync <= 0 {
		cfg.FullResync = DefaultFullResync
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("ipvs driver: %w", err)
	}
	path := filepath.Join(cfg.DataDir, StateFile)
	owned, err := loadOwned(path)
	if err != nil {
		return nil, err
	}
	d := &Driver{kernel: cfg.Kernel, path: path, log: cfg.Logger, timeout: cfg.CallTimeout, owned: owned, turn: make(chan struct{}, 1),
		resync: cfg.FullResync, applied: map[Key]Desired{}, lastFull: time.Now(), connSync: cfg.ConnSync}
	return d, nil
}

// Name is "ipvs".
func (d *Driver) Name() string { return "ipvs" }

// Writes returns how many kernel writes the driver has made (attempted).
func (d *Driver) Writes() uint64 { return d.writes.Load() }

// Owned returns a copy of the ownership record: key -> switchman service.
func (d *Driver) Owned() map[Key]string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return maps.Clone(d.owned)
}

// Sync makes the kernel's IPVS match the IPVS part of all (every service
// this driver serves) for the services this driver owns, and returns the
// switchman services it could not program. It lists the kernel's services
// and reads back the destinations of every owned service it does not
// trust, and of those the last background read-back found different
// (one runs every FullResync, started by a Sync): the repair path.
func (d *Driver) Sync(ctx context.Context, all []*render.ServiceState) map[string]error {
	return d.syncL4(ctx, ipvsParts(all))
}

// ipvsParts collects the IPVS part of each state.
func ipvsParts(states []*render.ServiceState) []render.L4Service {
	var out []render.L4Service
	for _, s := range states {
		if p, ok := s.Part(render.PartIPVS); ok {
			out = append(out, p.(render.L4Service))
		}
	}
	return out
}

func (d *Driver) syncL4(ctx context.Context, services []render.L4Service) map[string]error {
	errs := map[string]error{}
	want, bad := DesiredFrom(services)
	if d.connSync {
		want = refuseMixedFamilies(want, bad)
	}
	maps.Copy(errs, bad)
	select {
	case d.turn <- struct{}{}:
		defer func() { <-d.turn }()
	case <-ctx.Done():
		failAll(errs, want, ctx.Err())
		return errs
	}
	owned := d.Owned()
	if len(want) == 0 && len(owned) == 0 {
		return errs // nothing to do: do not even ask the kernel
	}
	list, err := call(ctx, d.timeout, d.kernel.Services)
	if err != nil {
		failAll(errs, want, err)
		return errs
	}
	actual := make(map[Key]Observed, len(list))
	listed := make(map[Key]bool, len(list))
	for _, s := range list {
		actual[s.Key()] = Observed{Service: s}
		listed[s.Key()] = true
	}
	wantKeys := make(map[Key]bool, len(want)+len(bad))
	for _, w := range want {
		wantKeys[w.Service.Key()] = true
	}
	for _, s := range services {
		if _, failed := bad[s.Service]; failed {
			// Not convertible this time: keep whatever the kernel has.
			k := Key{Protocol: protocolOf(s.Protocol), Address: s.Address.Unmap(), Port: s.Port}
			wantKeys[k] = true
			delete(actual, k)
		}
	}
	// Read destinations only where a diff needs them: desired services
	// this driver owns. A cold start reads none, and a service whose
	// desired state is what the last pass programmed is taken to have
	// those destinations (its service attributes are still compared with
	// the list), which keeps a pass at one dump per change, unless the
	// last background read-back found it otherwise (readBack).
	got := d.takeReadBack()
	start := time.Now()
	var ready []Desired
	var trusted []Key
	for _, w := range want {
		k := w.Service.Key()
		obs, present := actual[k]
		if last, ok := d.applied[k]; ok && present && reflect.DeepEqual(last, w) && !drifted(got, w) {
			obs.Destinations = w.Destinations
			actual[k] = obs
			ready = append(ready, w)
			trusted = append(trusted, k)
			continue
		}
		if _, mine := owned[k]; present && mine {
			dsts, err := call(ctx, d.timeout, func(c context.Context) ([]Destination, error) { return d.kernel.Destinations(c, obs.Service) })
			if err != nil {
				errs[w.Name] = err
				delete(actual, k) // neither add nor delete what we could not read
				continue
			}
			obs.Destinations = dsts
			actual[k] = obs
		}
		ready = append(ready, w)
	}
	ops, refused := Diff(ready, actual, owned)
	maps.Copy(errs, refused)

	// Forget services that are gone from the kernel and not wanted.
	next := maps.Clone(owned)
	for k := range next {
		if !listed[k] && !wantKeys[k] {
			delete(next, k)
		}
	}
	d.commit(ctx, ops, ready, next, errs)
	// Remember what this pass left in the kernel for the services it
	// programmed without an error (every write of theirs succeeded); a
	// failed one is read again next time. One service failing on every
	// pass (a foreign service on its address) must not make every Sync
	// read all the others.
	clear(d.applied)
	for _, w := range ready {
		if errs[w.Name] == nil {
			d.applied[w.Service.Key()] = w
		}
	}
	// Due after nine tenths of FullResync, so that Syncs every FullResync
	// (the agent's --resync) each start one although their start times
	// jitter; while the last one still runs, the next Sync starts it.
	if start.Sub(d.lastFull) >= d.resync*9/10 && len(trusted) > 0 && d.startReadBack(trusted) {
		d.lastFull = start
	}
	return errs
}

// commit records ownership, runs ops and records it again. next is the
// ownership record before the writes: the owner of each service about to
// be created is recorded before creating it, so a crash in between leaves a
// record of a missing service (harmless) rather than an unrecorded service
// (which would be refused as foreign).
func (d *Driver) commit(ctx context.Context, ops []Op, ready []Desired, next map[Key]string, errs map[string]error) {
	for _, w := range ready {
		k := w.Service.Key()
		if name, mine := next[k]; mine && name != w.Name {
			next[k] = w.Name // the vip:port changed hands between definitions
		}
	}
	for _, op := range ops {
		if op.Kind == AddService {
			next[op.Service.Key()] = op.Owner
		}
	}
	if err := d.record(next); err != nil {
		for _, op := range ops {
			if op.Kind == AddService {
				errs[op.Owner] = err
			}
		}
		ops = dropOwners(ops, errs)
		next = d.Owned()
	}
	if d.apply(ctx, ops, next, errs) {
		if err := d.record(next); err != nil {
			d.log.Error("record IPVS ownership", "error", err)
		}
	}
}

// apply runs ops in order. A failed write fails its owner: the owner's
// later writes are skipped. After a call times out, the rest of the pass is
// given up (the kernel is not answering) and retried on the next Apply.
// It updates next for created and deleted services and reports whether it
// did. When the kernel is a Batcher the writes go in batches (applyBatched)
// with the same outcome.
func (d *Driver) apply(ctx context.Context, ops []Op, next map[Key]string, errs map[string]error) bool {
	if b, ok := d.kernel.(Batcher); ok {
		return d.applyBatched(ctx, b, ops, next, errs)
	}
	changed := false
	var stop error
	for _, op := range ops {
		if _, failed := errs[op.Owner]; failed && op.Owner != "" {
			continue
		}
		if stop != nil {
			if op.Owner != "" {
				errs[op.Owner] = stop
			}
			continue
		}
		d.writes.Add(1)
		c, s := d.settle(ctx, op, d.write(ctx, op), next, errs)
		changed = changed || c
		stop = cmp.Or(stop, s)
	}
	return changed
}

// BatchSize is the most writes the driver hands a Batcher in one call; each
// call is bounded by Config.CallTimeout.
const BatchSize = 4096

// applyBatched is apply for a Batcher, in two phases so that a write is
// never sent after one it depends on has failed: first every service write
// (deletions, creations, updates: each on a key of its own), then, once
// their answers are in, the destination writes of the services whose
// service writes all succeeded. A destination write depends only on its
// service, so a service's destination writes go out together; the first
// to fail fails the service (its siblings in the same batch are sent all
// the same, and are harmless: they are retried with the service). Answers
// are handled in op order exactly as apply handles them, and after a batch
// times out, nothing more is sent.
func (d *Driver) applyBatched(ctx context.Context, b Batcher, ops []Op, next map[Key]string, errs map[string]error) bool {
	var services, dests []Op
	for _, op := range ops {
		switch op.Kind {
		case AddService, UpdateService, DeleteService:
			services = append(services, op)
		default:
			dests = append(dests, op)
		}
	}
	changed := false
	var stop error
	for _, phase := range [][]Op{services, dests} {
		var send []Op
		for _, op := range phase {
			if _, failed := errs[op.Owner]; failed && op.Owner != "" {
				continue
			}
			if stop != nil {
				if op.Owner != "" {
					errs[op.Owner] = stop
				}
				continue
			}
			send = append(send, op)
		}
		for part := range slices.Chunk(send, BatchSize) {
			if stop != nil {
				for _, op := range part {
					if _, failed := errs[op.Owner]; !failed && op.Owner != "" {
						errs[op.Owner] = stop
					}
				}
				continue
			}
			d.writes.Add(uint64(len(part)))
			c, cancel := context.WithTimeout(ctx, d.timeout)
			answers := b.ApplyBatch(c, part)
			cancel()
			if len(answers) != len(part) {
				answers = batchMismatch(answers, len(part))
			}
			for i, op := range part {
				err := answers[i]
				if err != nil && stop != nil {
					// Unanswered after the time-out: not logged one by one.
					if _, failed := errs[op.Owner]; !failed && op.Owner != "" {
						errs[op.Owner] = stop
					}
					continue
				}
				ch, s := d.settle(ctx, op, err, next, errs)
				changed = changed || ch
				stop = cmp.Or(stop, s)
			}
		}
	}
	return changed
}

// batchMismatch stands in for the answers of a Batcher that broke its
// contract (one answer per op): every op fails.
func batchMismatch(answers []error, n int) []error {
	err := fmt.Errorf("IPVS batch returned %d answers for %d writes", len(answers), n)
	out := make([]error, n)
	for i := range out {
		out[i] = err
	}
	return out
}

// settle records the outcome of one write: it updates next for services
// created or deleted, fails the write's owner (keeping the owner's first
// error), and returns whether next changed and, when the rest of the pass
// must be given up (ctx ended, or a call timed out), why.
func (d *Driver) settle(ctx context.Context, op Op, err error, next map[Key]string, errs map[string]error) (changed bool, stop error) {
	switch {
	case err == nil:
		if op.Kind == DeleteService {
			delete(next, op.Service.Key())
			return true, nil
		}
		return false, nil
	case op.Kind == DeleteService && errors.Is(err, syscall.ESRCH):
		delete(next, op.Service.Key()) // already gone
		return true, nil
	case op.Kind == AddService && errors.Is(err, syscall.EEXIST):
		// Someone else created it since we listed: not ours.
		delete(next, op.Service.Key())
		changed = true
		err = &ForeignServiceError{Key: op.Service.Key()}
	case op.Kind == AddService && !uncertain(err):
		// The kernel refused it, so it does not exist. (After a
		// time-out it may: the record stays, and the next pass sees.)
		delete(next, op.Service.Key())
		changed = true
	case op.Kind == AddDestination && errors.Is(err, syscall.EINVAL) && FamilyOf(op.Destination.Address) != op.Service.Family():
		// Allowed with tunnelling, but never while a sync daemon runs
		// (one switchman did not start, since with --ipvs-sync-interface
		// such a service is refused before it gets here).
		err = fmt.Errorf("%w (the kernel refuses a real server of another address family than the VIP while an IPVS sync daemon runs; see ipvsadm -L --daemon)", err)
	}
	d.log.Warn("IPVS write failed", "op", op.String(), "service", op.Owner, "error", err)
	if _, failed := errs[op.Owner]; !failed && op.Owner != "" {
		errs[op.Owner] = err
	}
	if ctx.Err() != nil {
		stop = fmt.Errorf("not applied: %w", ctx.Err())
	} else if errors.Is(err, context.DeadlineExceeded) {
		stop = fmt.Errorf("not applied: an earlier IPVS call timed out (%w); retried on the next apply", err)
	}
	return changed, stop
}

// uncertain tells whether a write that failed with err may have taken
// effect all the same: it timed out, was cancelled, or its acknowledgement
// was lost (ENOBUFS).
func uncertain(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) || errors.Is(err, syscall.ENOBUFS)
}

func (d *Driver) write(ctx context.Context, op Op) error {
	c, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	switch op.Kind {
	case AddService:
		return d.kernel.AddService(c, op.Service)
	case UpdateService:
		return d.kernel.UpdateService(c, op.Service)
	case DeleteService:
		return d.kernel.DeleteService(c, op.Service)
	case AddDestination:
		return d.kernel.AddDestination(c, op.Service, op.Destination)
	case UpdateDestination:
		return d.kernel.UpdateDestination(c, op.Service, op.Destination)
	case DeleteDestination:
		return d.kernel.DeleteDestination(c, op.Service, op.Destination)
	}
	return fmt.Errorf("unknown IPVS write %v", op.Kind)
}

// record saves next as the ownership record when it differs from the
// current one, then makes it current.
func (d *Driver) record(next map[Key]string) error {
	d.mu.Lock()
	same := maps.Equal(d.owned, next)
	d.mu.Unlock()
	if same {
		return nil
	}
	if err := saveOwned(d.path, next); err != nil {
		return err
	}
	d.mu.Lock()
	d.owned = maps.Clone(next)
	d.mu.Unlock()
	return nil
}

// Connections returns the connections still open on every destination of
// the named services this driver owns, keyed by switchman service and
// backend address: ActiveConn for TCP (InActConn is mostly TIME_WAIT, which
// needs no backend), and InActConn for UDP, where every entry is inactive.
func (d *Driver) Connections(ctx context.Context, services map[string]bool) (map[render.BackendRef]int, error) {
	owned := d.Owned()
	out := map[render.BackendRef]int{}
	for k, name := range owned {
		if !services[name] {
			continue
		}
		dsts, found, err := destinationsOf(ctx, d.kernel, d.timeout, k)
		if err != nil {
			return nil, err
		}
		if !found {
			continue // not created yet, or already removed
		}
		for _, dst := range dsts {
			n := dst.ActiveConn
			if k.Protocol == UDP {
				n = dst.InActConn
			}
			out[render.BackendRef{Service: name, Addr: dst.AddrPort()}] += n
		}
	}
	return out, nil
}

// DesiredFrom converts render's IPVS services to the kernel's terms, and
// reports the ones that cannot be converted.
func DesiredFrom(services []render.L4Service) ([]Desired, map[string]error) {
	out := make([]Desired, 0, len(services))
	bad := map[string]error{}
	for _, s := range services {
		w, err := desiredService(s)
		if err != nil {
			bad[s.Service] = err
			continue
		}
		out = append(out, w)
	}
	return out, bad
}

func desiredService(s render.L4Service) (Desired, error) {
	addr := s.Address.Unmap()
	svc := Service{Address: addr, Port: s.Port, Scheduler: string(s.Scheduler)}
	if svc.Protocol = protocolOf(s.Protocol); svc.Protocol == 0 {
		return Desired{}, fmt.Errorf("protocol %q is not tcp or udp", s.Protocol)
	}
	// ipvsadm's defaults: one client address is the persistence unit.
	if addr.Is4() {
		svc.Netmask = math.MaxUint32
	} else {
		svc.Netmask = 128
	}
	for _, f := range s.Flags {
		switch f {
		case spec.FlagSHFallback:
			svc.Flags |= FlagSHFallback
		case spec.FlagSHPort:
			svc.Flags |= FlagSHPort
		case spec.FlagMHFallback:
			svc.Flags |= FlagMHFallback
		case spec.FlagMHPort:
			svc.Flags |= FlagMHPort
		default:
			return Desired{}, fmt.Errorf("scheduler flag %q is not known to IPVS", f)
		}
	}
	if s.Persistence > 0 {
		svc.Flags |= FlagPersistent
		svc.Timeout = uint32((s.Persistence + time.Second - 1) / time.Second)
	}
	w := Desired{Name: s.Service, Service: svc, Destinations: make([]Destination, 0, len(s.Destinations))}
	for _, dst := range s.Destinations {
		var fwd Forwarding
		switch dst.Forwarding {
		case spec.NAT, "":
			fwd = Masq
		case spec.Direct:
			fwd = Route
		case spec.Tunnel:
			fwd = Tunnel
		default:
			return Desired{}, fmt.Errorf("forwarding %q is not nat, dr or tun", dst.Forwarding)
		}
		w.Destinations = append(w.Destinations, Destination{Address: dst.Address.Unmap(), Port: dst.Port, Weight: dst.Weight, Forwarding: fwd})
	}
	return w, nil
}

// refuseMixedFamilies moves the services that have a destination of
// another address family than their VIP from want to bad, saying why:
// connection sync cannot carry them, and the kernel refuses them while a
// sync daemon runs (and refuses the daemon while they exist).
func refuseMixedFamilies(want []Desired, bad map[string]error) []Desired {
	out := want[:0]
	for _, w := range want {
		if err := mixedFamily(w); err != nil {
			bad[w.Name] = err
			continue
		}
		out = append(out, w)
	}
	return out
}

// mixedFamily returns ErrMixedFamilyUnderSync (wrapping EINVAL) naming the
// first destination of w whose family is not its VIP's.
func mixedFamily(w Desired) error {
	for _, d := range w.Destinations {
		if FamilyOf(d.Address) != w.Service.Family() {
			return fmt.Errorf("backends: %s is not in the family of vip %s: %w", d.AddrPort(), w.Service.Address, ErrMixedFamilyUnderSync)
		}
	}
	return nil
}

// ErrMixedFamilyUnderSync is why a service with a destination of another
// address family is refused while connection sync is configured. It wraps
// EINVAL, the errno the kernel gives.
var ErrMixedFamilyUnderSync = fmt.Errorf("%w; the kernel also refuses such a real server while sync runs: %w", ErrSyncMixedFamily, syscall.EINVAL)

// destinationReader reads the destinations of a virtual service.
type destinationReader interface {
	Destinations(ctx context.Context, s Service) ([]Destination, error)
}

// destinationsOf reads the destinations of the service k names, bounded by
// timeout; found is false when the kernel has no such service (ESRCH).
func destinationsOf(ctx context.Context, r destinationReader, timeout time.Duration, k Key) (dsts []Destination, found bool, err error) {
	dsts, err = call(ctx, timeout, func(c context.Context) ([]Destination, error) { return r.Destinations(c, k.Service()) })
	if errors.Is(err, syscall.ESRCH) {
		return nil, false, nil
	}
	return dsts, err == nil, err
}

// call runs one kernel read bounded by timeout.
func call[T any](ctx context.Context, timeout time.Duration, f func(context.Context) (T, error)) (T, error) {
	c, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return f(c)
}

func failAll(errs map[string]error, want []Desired, err error) {
	for _, w := range want {
		errs[w.Name] = err
	}
}

func dropOwners(ops []Op, errs map[string]error) []Op {
	out := ops[:0]
	for _, op := range ops {
		if _, failed := errs[op.Owner]; failed && op.Owner != "" {
			continue
		}
		out = append(out, op)
	}
	return out
}

func protocolOf(p spec.Protocol) Protocol {
	switch p {
	case spec.TCP:
		return TCP
	case spec.UDP:
		return UDP
	}
	return 0
}
