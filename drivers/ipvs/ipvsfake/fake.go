// Package ipvsfake is a stateful, in-memory stand-in for the kernel's IPVS,
// for tests of code that uses ipvs.Kernel. It keeps services and their
// destinations, rejects misuse with the errno the kernel gives (EEXIST,
// ESRCH, ENOENT, EINVAL), counts every call, and can be told to fail or hang
// a call or to behave as a kernel without IPVS.
package ipvsfake

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"syscall"

	"github.com/switchman-lb/switchman/drivers/ipvs"
)

// Method names one ipvs.Kernel method.
type Method string

// The methods of ipvs.Kernel.
const (
	Services          Method = "Services"
	Destinations      Method = "Destinations"
	AddService        Method = "AddService"
	UpdateService     Method = "UpdateService"
	DeleteService     Method = "DeleteService"
	AddDestination    Method = "AddDestination"
	UpdateDestination Method = "UpdateDestination"
	DeleteDestination Method = "DeleteDestination"
	// ApplyBatch counts batches; each op in one also counts as a call of
	// its own method.
	ApplyBatch  Method = "ApplyBatch"
	Daemons     Method = "Daemons"
	StartDaemon Method = "StartDaemon"
	StopDaemon  Method = "StopDaemon"
)

// Schedulers the fake kernel knows; others fail with ENOENT as a missing
// ip_vs_<name> module does.
var knownSchedulers = []string{"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos"}

type service struct {
	svc   ipvs.Service
	dests []ipvs.Destination // in the order added, as the kernel lists them
}

// Kernel is the fake. The zero value is not usable; call New.
type Kernel struct {
	mu          sync.Mutex
	services    []*service // in the order added
	index       map[ipvs.Key]*service
	calls       map[Method]int
	writes      int
	fail        map[Method]error
	hang        map[Method]bool
	unavailable bool
	daemons     map[ipvs.Role]ipvs.SyncDaemon
}

var (
	_ ipvs.Kernel       = (*Kernel)(nil)
	_ ipvs.Batcher      = (*Kernel)(nil)
	_ ipvs.DaemonKernel = (*Kernel)(nil)
)

// New returns an empty fake kernel.
func New() *Kernel {
	return &Kernel{index: map[ipvs.Key]*service{}, calls: map[Method]int{}, fail: map[Method]error{}, hang: map[Method]bool{},
		daemons: map[ipvs.Role]ipvs.SyncDaemon{}}
}

// Fail makes every later call of m fail with err (nil clears it).
func (k *Kernel) Fail(m Method, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err == nil {
		delete(k.fail, m)
		return
	}
	k.fail[m] = err
}

// Hang makes every later call of m block until its context ends, then
// return the context's error, as the real adapter does when it abandons a
// stuck netlink call. Hang(m, false) clears it.
func (k *Kernel) Hang(m Method, on bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.hang[m] = on
}

// SetUnavailable makes every call fail as on a kernel without IPVS.
func (k *Kernel) SetUnavailable(on bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.unavailable = on
}

// Calls returns how many times m was called.
func (k *Kernel) Calls(m Method) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.calls[m]
}

// Writes returns how many write calls (add, update, delete) were made,
// failed ones included.
func (k *Kernel) Writes() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.writes
}

// ResetCounts zeroes the call and write counters.
func (k *Kernel) ResetCounts() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.calls = map[Method]int{}
	k.writes = 0
}

// State returns every service with its destinations, as the kernel would
// list them (the hashed flag set).
func (k *Kernel) State() map[ipvs.Key]ipvs.Observed {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make(map[ipvs.Key]ipvs.Observed, len(k.services))
	for _, s := range k.services {
		out[s.svc.Key()] = ipvs.Observed{Service: listed(s.svc), Destinations: slices.Clone(s.dests)}
	}
	return out
}

// SetConnections sets the ActiveConn and InActConn counters of a
// destination, as traffic would.
func (k *Kernel) SetConnections(key ipvs.Key, dst netip.AddrPort, active, inactive int) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	s := k.find(key)
	if s == nil {
		return fmt.Errorf("set connections of %s: %w", key, syscall.ESRCH)
	}
	i := s.destIndex(dst)
	if i < 0 {
		return fmt.Errorf("set connections of %s in %s: %w", dst, key, syscall.ENOENT)
	}
	s.dests[i].ActiveConn, s.dests[i].InActConn = active, inactive
	return nil
}

func listed(s ipvs.Service) ipvs.Service {
	s.Flags |= ipvs.FlagHashed
	return s
}

func (k *Kernel) find(key ipvs.Key) *service { return k.index[key] }

func (s *service) destIndex(ap netip.AddrPort) int {
	for i, d := range s.dests {
		if d.AddrPort() == ap {
			return i
		}
	}
	return -1
}

// enter counts the call and applies the configured failure or hang. It
// returns with k.mu held when err is nil.
func (k *Kernel) enter(ctx context.Context, m Method, write bool) error {
	k.mu.Lock()
	k.calls[m]++
	if write {
		k.writes++
	}
	if k.hang[m] {
		k.mu.Unlock()
		<-ctx.Done()
		return fmt.Errorf("fake %s: netlink call abandoned: %w", m, context.Cause(ctx))
	}
	if err := ctx.Err(); err != nil {
		k.mu.Unlock()
		return fmt.Errorf("fake %s: %w", m, err)
	}
	if k.unavailable {
		k.mu.Unlock()
		return fmt.Errorf("fake %s: %w (%w)", m, ipvs.ErrUnavailable, syscall.ENOENT)
	}
	if err := k.fail[m]; err != nil {
		k.mu.Unlock()
		return fmt.Errorf("fake %s: %w", m, err)
	}
	return nil
}

func validService(s ipvs.Service) error {
	if !s.Address.IsValid() || (s.Protocol != ipvs.TCP && s.Protocol != ipvs.UDP) {
		return syscall.EINVAL
	}
	if s.Address.Is4In6() {
		return syscall.EINVAL // the driver must send plain IPv4
	}
	if s.Family() == ipvs.IPv6 && (s.Netmask < 1 || s.Netmask > 128) {
		return syscall.EINVAL // the kernel checks the IPv6 prefix length
	}
	if !slices.Contains(knownSchedulers, s.Scheduler) {
		return syscall.ENOENT // no ip_vs_<scheduler> module
	}
	return nil
}

// validDestination checks d as the kernel does for service s; syncing
// tells whether a sync daemon runs.
func validDestination(s ipvs.Service, d ipvs.Destination, syncing bool) error {
	if !d.Address.IsValid() {
		return syscall.EINVAL
	}
	if ipvs.FamilyOf(d.Address) != s.Family() && (syncing || d.Forwarding != ipvs.Tunnel) {
		// Another family only with tunnelling, and never under sync.
		return syscall.EINVAL
	}
	if d.Weight < 0 || d.Weight > 65535 {
		return syscall.ERANGE
	}
	if d.Forwarding > ipvs.Route {
		return syscall.EINVAL
	}
	return nil
}

// Services lists services in the order they were added.
func (k *Kernel) Services(ctx context.Context) ([]ipvs.Service, error) {
	if err := k.enter(ctx, Services, false); err != nil {
		return nil, err
	}
	defer k.mu.Unlock()
	out := make([]ipvs.Service, 0, len(k.services))
	for _, s := range k.services {
		out = append(out, listed(s.svc))
	}
	return out, nil
}

// Destinations lists the destinations of s; ESRCH when s is missing.
func (k *Kernel) Destinations(ctx context.Context, s ipvs.Service) ([]ipvs.Destination, error) {
	if err := k.enter(ctx, Destinations, false); err != nil {
		return nil, err
	}
	defer k.mu.Unlock()
	have := k.find(s.Key())
	if have == nil {
		return nil, fmt.Errorf("fake list destinations of %s: %w", s.Key(), syscall.ESRCH)
	}
	return slices.Clone(have.dests), nil
}

// AddService creates s; EEXIST when it exists.
func (k *Kernel) AddService(ctx context.Context, s ipvs.Service) error {
	if err := k.enter(ctx, AddService, true); err != nil {
		return err
	}
	defer k.mu.Unlock()
	if k.find(s.Key()) != nil {
		return fmt.Errorf("fake add service %s: %w", s.Key(), syscall.EEXIST)
	}
	if err := validService(s); err != nil {
		return fmt.Errorf("fake add service %s: %w", s.Key(), err)
	}
	n := &service{svc: s.Settings()}
	k.services = append(k.services, n)
	k.index[s.Key()] = n
	return nil
}

// UpdateService replaces the settings of s; ESRCH when it is missing.
func (k *Kernel) UpdateService(ctx context.Context, s ipvs.Service) error {
	if err := k.enter(ctx, UpdateService, true); err != nil {
		return err
	}
	defer k.mu.Unlock()
	have := k.find(s.Key())
	if have == nil {
		return fmt.Errorf("fake update service %s: %w", s.Key(), syscall.ESRCH)
	}
	if err := validService(s); err != nil {
		return fmt.Errorf("fake update service %s: %w", s.Key(), err)
	}
	have.svc = s.Settings()
	return nil
}

// DeleteService removes s and its destinations; ESRCH when it is missing.
func (k *Kernel) DeleteService(ctx context.Context, s ipvs.Service) error {
	if err := k.enter(ctx, DeleteService, true); err != nil {
		return err
	}
	defer k.mu.Unlock()
	for i, have := range k.services {
		if have.svc.Key() == s.Key() {
			k.services = slices.Delete(k.services, i, i+1)
			delete(k.index, s.Key())
			return nil
		}
	}
	return fmt.Errorf("fake delete service %s: %w", s.Key(), syscall.ESRCH)
}

// AddDestination adds d to s; ESRCH when s is missing, EEXIST when d exists.
func (k *Kernel) AddDestination(ctx context.Context, s ipvs.Service, d ipvs.Destination) error {
	if err := k.enter(ctx, AddDestination, true); err != nil {
		return err
	}
	defer k.mu.Unlock()
	have := k.find(s.Key())
	if have == nil {
		return fmt.Errorf("fake add destination to %s: %w", s.Key(), syscall.ESRCH)
	}
	if err := validDestination(have.svc, d, len(k.daemons) > 0); err != nil {
		return fmt.Errorf("fake add destination %s to %s: %w", d.AddrPort(), s.Key(), err)
	}
	if have.destIndex(d.AddrPort()) >= 0 {
		return fmt.Errorf("fake add destination %s to %s: %w", d.AddrPort(), s.Key(), syscall.EEXIST)
	}
	d.ActiveConn, d.InActConn = 0, 0
	have.dests = append(have.dests, d)
	return nil
}

// UpdateDestination sets the weight and forwarding of d in s; ESRCH when s
// is missing, ENOENT when d is.
func (k *Kernel) UpdateDestination(ctx context.Context, s ipvs.Service, d ipvs.Destination) error {
	if err := k.enter(ctx, UpdateDestination, true); err != nil {
		return err
	}
	defer k.mu.Unlock()
	have := k.find(s.Key())
	if have == nil {
		return fmt.Errorf("fake update destination of %s: %w", s.Key(), syscall.ESRCH)
	}
	if err := validDestination(have.svc, d, len(k.daemons) > 0); err != nil {
		return fmt.Errorf("fake update destination %s of %s: %w", d.AddrPort(), s.Key(), err)
	}
	i := have.destIndex(d.AddrPort())
	if i < 0 {
		return fmt.Errorf("fake update destination %s of %s: %w", d.AddrPort(), s.Key(), syscall.ENOENT)
	}
	have.dests[i].Weight, have.dests[i].Forwarding = d.Weight, d.Forwarding
	return nil
}

// DeleteDestination removes d from s; ESRCH when s is missing, ENOENT when
// d is.
func (k *Kernel) DeleteDestination(ctx context.Context, s ipvs.Service, d ipvs.Destination) error {
	if err := k.enter(ctx, DeleteDestination, true); err != nil {
		return err
	}
	defer k.mu.Unlock()
	have := k.find(s.Key())
	if have == nil {
		return fmt.Errorf("fake delete destination of %s: %w", s.Key(), syscall.ESRCH)
	}
	i := have.destIndex(d.AddrPort())
	if i < 0 {
		return fmt.Errorf("fake delete destination %s of %s: %w", d.AddrPort(), s.Key(), syscall.ENOENT)
	}
	have.dests = slices.Delete(have.dests, i, i+1)
	return nil
}

// ApplyBatch runs ops in order through the single calls, so each op gets
// the errno its single call would (and Fail and Hang apply per method).
// Once ctx has ended, the ops not yet run fail with its error without being
// run, as a real batch leaves them unanswered.
func (k *Kernel) ApplyBatch(ctx context.Context, ops []ipvs.Op) []error {
	k.mu.Lock()
	k.calls[ApplyBatch]++
	k.mu.Unlock()
	out := make([]error, len(ops))
	for i, op := range ops {
		if err := ctx.Err(); err != nil {
			out[i] = fmt.Errorf("fake batch: not answered: %w", err)
			continue
		}
		switch op.Kind {
		case ipvs.AddService:
			out[i] = k.AddService(ctx, op.Service)
		case ipvs.UpdateService:
			out[i] = k.UpdateService(ctx, op.Service)
		case ipvs.DeleteService:
			out[i] = k.DeleteService(ctx, op.Service)
		case ipvs.AddDestination:
			out[i] = k.AddDestination(ctx, op.Service, op.Destination)
		case ipvs.UpdateDestination:
			out[i] = k.UpdateDestination(ctx, op.Service, op.Destination)
		case ipvs.DeleteDestination:
			out[i] = k.DeleteDestination(ctx, op.Service, op.Destination)
		default:
			out[i] = fmt.Errorf("fake batch: op %v: %w", op.Kind, syscall.EINVAL)
		}
	}
	return out
}

// Daemons lists the sync daemons that run, with the kernel's defaults
// filled in.
func (k *Kernel) Daemons(ctx context.Context) ([]ipvs.SyncDaemon, error) {
	if err := k.enter(ctx, Daemons, false); err != nil {
		return nil, err
	}
	defer k.mu.Unlock()
	var out []ipvs.SyncDaemon
	for _, r := range []ipvs.Role{ipvs.Master, ipvs.Backup} {
		if d, ok := k.daemons[r]; ok {
			out = append(out, d)
		}
	}
	return out, nil
}

// StartDaemon starts d: EEXIST when its role runs, EINVAL (with
// ipvs.ErrSyncMixedFamily) when a service has destinations of another
// family, EINVAL for a bad role, interface or group. Settings left zero
// take the kernel's defaults (group 224.0.0.81, port 8848, TTL 1, and the
// message size of a 1500-byte MTU).
func (k *Kernel) StartDaemon(ctx context.Context, d ipvs.SyncDaemon) error {
	if err := k.enter(ctx, StartDaemon, true); err != nil {
		return err
	}
	defer k.mu.Unlock()
	if d.Role != ipvs.Master && d.Role != ipvs.Backup || d.Interface == "" || len(d.Interface) > 15 ||
		(d.Group.IsValid() && !d.Group.IsMulticast()) {
		return fmt.Errorf("fake start sync daemon %+v: %w", d, syscall.EINVAL)
	}
	for _, s := range k.services {
		for _, dst := range s.dests {
			if ipvs.FamilyOf(dst.Address) != s.svc.Family() {
				return fmt.Errorf("fake start %s sync daemon: %w (%s has real server %s): %w", d.Role, ipvs.ErrSyncMixedFamily, s.svc.Key(), dst.AddrPort(), syscall.EINVAL)
			}
		}
	}
	if _, ok := k.daemons[d.Role]; ok {
		return fmt.Errorf("fake start %s sync daemon: %w", d.Role, syscall.EEXIST)
	}
	hlen := uint16(28)
	if !d.Group.IsValid() {
		d.Group = netip.AddrFrom4([4]byte{224, 0, 0, 81})
	} else if !d.Group.Is4() {
		hlen = 48
	}
	if d.MaxLen == 0 {
		d.MaxLen = 1500 - hlen
	}
	if d.Port == 0 {
		d.Port = 8848
	}
	if d.TTL == 0 {
		d.TTL = 1
	}
	k.daemons[d.Role] = d
	return nil
}

// StopDaemon stops the daemon of role; ESRCH when none runs.
func (k *Kernel) StopDaemon(ctx context.Context, role ipvs.Role) error {
	if err := k.enter(ctx, StopDaemon, true); err != nil {
		return err
	}
	defer k.mu.Unlock()
	if _, ok := k.daemons[role]; !ok {
		return fmt.Errorf("fake stop %s sync daemon: %w", role, syscall.ESRCH)
	}
	delete(k.daemons, role)
	return nil
}
