// Package vip gives this host the service addresses (VIPs) it must hold and
// sets the kernel settings (sysctls) the rendered services need.
//
// Single host (no HA interface): every VIP goes on a dummy interface of the
// driver's own (switchman0 by default); everything on it but the kernel's
// link-local address is the driver's. On a kernel that cannot create dummy
// interfaces (EOPNOTSUPP) the VIPs go on the fallback interface, lo by
// default, which the host shares: there the driver removes only addresses
// it added itself, as its record (RecordFile in the state directory) says,
// so a restart neither removes the host's own addresses nor leaks its own.
//
// HA (an HA interface given): the driver is the ha.Holder. It holds the
// VIPs of the services whose HA group this agent owns, as /32 or /128 on
// the HA interface, and each owned group's floating addresses on their own
// interfaces; it adds and removes them at once when ownership changes
// (Hold), announces each address it adds (gratuitous ARP, unsolicited
// neighbour advertisements) in the background, and at start removes what
// an earlier run left behind (Run). With a lifetime, held addresses carry
// the kernel's valid and preferred lifetimes and Run renews them, so the
// addresses of an agent killed on a living host expire by themselves.
package vip

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/switchman-lb/switchman/internal/atomicfile"
	"github.com/switchman-lb/switchman/internal/sysctl"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// Links is what the driver needs from the kernel's interface and address
// tables. Errors wrap the kernel's errno (EEXIST for an address already
// present, EADDRNOTAVAIL for one missing, ENODEV for a missing interface,
// EOPNOTSUPP for a link type the kernel lacks). Every call honours its
// context's deadline.
type Links interface {
	// Link reports whether the interface exists and is up.
	Link(ctx context.Context, name string) (exists, up bool, err error)
	AddDummy(ctx context.Context, name string) error
	SetUp(ctx context.Context, name string) error
	// Addresses lists every address of the interface with its prefix
	// length.
	Addresses(ctx context.Context, name string) ([]netip.Prefix, error)
	// AddAddress adds p to the interface. With a lifetime above zero the
	// kernel removes the address after lifetime (whole seconds, rounded
	// up) unless RenewAddress renews it first.
	AddAddress(ctx context.Context, name string, p netip.Prefix, lifetime time.Duration) error
	// RenewAddress sets p's lifetime anew, adding p when it is missing.
	RenewAddress(ctx context.Context, name string, p netip.Prefix, lifetime time.Duration) error
	DeleteAddress(ctx context.Context, name string, p netip.Prefix) error
}

// Defaults for Config.
const (
	DefaultInterface   = "switchman0"
	DefaultFallback    = "lo"
	DefaultProcSys     = "/proc/sys"
	DefaultCallTimeout = 10 * time.Second
)

// Config configures a Driver.
type Config struct {
	Links Links
	// Interface is the single-host dummy interface holding the VIPs
	// (DefaultInterface).
	Interface string
	// Fallback holds the VIPs on a single host whose kernel cannot create
	// dummy interfaces (DefaultFallback).
	Fallback string
	// HAInterface, when set, makes the driver hold only the addresses of
	// the HA groups this agent owns (see Hold), the VIPs on this
	// interface.
	HAInterface string
	// Lifetime, in HA mode, is the kernel lifetime of each held address,
	// renewed every third of it by Run; 0 keeps addresses until removed.
	// At least a second.
	Lifetime time.Duration
	// StateDir holds RecordFile; empty keeps no record (then a restart
	// does not know which addresses on a shared interface it added).
	StateDir string
	// ProcSys is where sysctls are read and written (DefaultProcSys).
	ProcSys string
	Logger  *slog.Logger
	// CallTimeout bounds each netlink call (DefaultCallTimeout).
	CallTimeout time.Duration
	// Announce sends one round of announcements for addrs on iface; the
	// default sends gratuitous ARP and neighbour advertisements
	// (AnnounceOn with a single round).
	Announce func(ctx context.Context, iface string, addrs []netip.Addr) error
	// AnnounceSchedule is when rounds are sent after an address is added
	// in HA mode (DefaultAnnounceSchedule).
	AnnounceSchedule []time.Duration
}

// Driver holds VIPs and sets sysctls. It implements the agent's Driver
// and, in HA mode, ha.Holder. Apply and Sync come from the agent's worker,
// Hold from the elector, Run's renewals and the announcements from their
// own goroutines: one lock guards the state, taken for one kernel call at
// a time, so a drop (Hold) never waits behind a long batch.
type Driver struct {
	links    Links
	ifname   string
	fallback string
	ha       string
	lifetime time.Duration
	record   string
	procSys  string
	log      *slog.Logger
	timeout  time.Duration
	announce func(ctx context.Context, iface string, addrs []netip.Addr) error
	schedule []time.Duration

	bg   context.Context
	stop context.CancelFunc
	wg   sync.WaitGroup

	mu sync.Mutex
	// svc is each service's VIP and group; users the services of each VIP.
	svc   map[string]render.VIPPart
	users map[netip.Addr]map[string]bool
	// vipGroup is the HA group each VIP moves with: the group of the
	// first service that claimed it (services sharing a VIP must share
	// the group); groupVIPs is the reverse.
	vipGroup  map[netip.Addr]string
	groupVIPs map[string]map[netip.Addr]bool
	// held lists the floating addresses of each group this agent holds;
	// floats the held groups naming each floating address.
	held   map[string][]slot
	floats map[slot]map[string]bool
	// on: addresses the driver put in place (or found and knows are its
	// own) and believes present; rec: what the record says (a superset
	// of on: written before an add, pruned after a removal); foreign:
	// wanted addresses found present that belong to someone else.
	on, rec, foreign map[slot]bool
	// gen counts the driver's own changes of slots; changedAt is the
	// count at each slot's latest change, so a Sync ignores what its dump
	// says of a slot changed after the dump began.
	gen       uint64
	changedAt map[slot]uint64
	written   []byte // the record's content as last written
	dirty     bool   // rec changed since it was last written
	// iface is where single-host VIPs go now (ifname or fallback), ""
	// until an address was wanted; ready: it exists and is up.
	iface string
	ready bool
	noVS  bool // net/ipv4/vs was missing last time (logged once)
}

// New returns a Driver; it reads the record in cfg.StateDir.
func New(cfg Config) (*Driver, error) {
	if cfg.Links == nil {
		return nil, errors.New("vip driver: no netlink")
	}
	if cfg.Interface == "" {
		cfg.Interface = DefaultInterface
	}
	if cfg.Fallback == "" {
		cfg.Fallback = DefaultFallback
	}
	for _, n := range []struct{ what, name string }{{"interface", cfg.Interface}, {"fallback interface", cfg.Fallback}, {"HA interface", cfg.HAInterface}} {
		if n.name != "" && !ifaceName(n.name) {
			return nil, fmt.Errorf("vip driver: %s name %q is not a valid Linux interface name", n.what, n.name)
		}
	}
	if cfg.Lifetime < 0 || (cfg.Lifetime > 0 && cfg.Lifetime < time.Second) {
		return nil, fmt.Errorf("vip driver: address lifetime %v must be 0 (none) or at least 1s", cfg.Lifetime)
	}
	if cfg.ProcSys == "" {
		cfg.ProcSys = DefaultProcSys
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = DefaultCallTimeout
	}
	if cfg.Announce == nil {
		cfg.Announce = func(ctx context.Context, iface string, addrs []netip.Addr) error {
			return AnnounceOn(ctx, iface, addrs, []time.Duration{0})
		}
	}
	if cfg.AnnounceSchedule == nil {
		cfg.AnnounceSchedule = DefaultAnnounceSchedule()
	}
	d := &Driver{links: cfg.Links, ifname: cfg.Interface, fallback: cfg.Fallback, ha: cfg.HAInterface, procSys: cfg.ProcSys,
		log: cfg.Logger, timeout: cfg.CallTimeout, announce: cfg.Announce, schedule: cfg.AnnounceSchedule,
		svc: map[string]render.VIPPart{}, users: map[netip.Addr]map[string]bool{},
		vipGroup: map[netip.Addr]string{}, groupVIPs: map[string]map[netip.Addr]bool{},
		held: map[string][]slot{}, floats: map[slot]map[string]bool{},
		on: map[slot]bool{}, foreign: map[slot]bool{}, changedAt: map[slot]uint64{}}
	if d.ha != "" {
		d.lifetime = cfg.Lifetime
	}
	if cfg.StateDir != "" {
		d.record = filepath.Join(cfg.StateDir, RecordFile)
	}
	rec, err := loadRecord(d.record)
	if err != nil {
		return nil, fmt.Errorf("vip driver: %w", err)
	}
	d.rec = rec
	d.written = encodeRecord(rec)
	d.bg, d.stop = context.WithCancel(context.Background())
	return d, nil
}

// Name is "vip".
func (d *Driver) Name() string { return "vip" }

// Close stops the announcements in progress.
func (d *Driver) Close() {
	d.stop()
	d.wg.Wait()
}

// Apply holds the VIPs of the changed services (in HA mode: those of the
// groups this agent owns) and releases the VIPs no service uses any more;
// it reads nothing but the interface's state on first use. A service
// fails when its address cannot be added, when it shares its VIP with a
// service of another HA group, or when a sysctl it needs cannot be set.
func (d *Driver) Apply(ctx context.Context, changed []*render.ServiceState) map[string]error {
	errs := map[string]error{}
	d.mu.Lock()
	var touched []netip.Addr
	for _, s := range changed {
		touched = append(touched, d.setService(s)...)
	}
	d.regroup(touched)
	d.mu.Unlock()
	return d.finish(ctx, changed, touched, nil, errs)
}

// Sync makes the interfaces match all: it reads the addresses of the VIP
// interface (the HA interface in HA mode), of the held floating
// addresses' interfaces and of every interface in the record, adds what is
// missing and removes what is the driver's own and not wanted. When
// nothing differs it writes nothing.
func (d *Driver) Sync(ctx context.Context, all []*render.ServiceState) map[string]error {
	errs := map[string]error{}
	d.mu.Lock()
	clear(d.svc)
	clear(d.users)
	var touched []netip.Addr
	for _, s := range all {
		touched = append(touched, d.setService(s)...)
	}
	for v := range d.vipGroup {
		touched = append(touched, v)
	}
	d.regroup(touched)
	d.mu.Unlock()
	present := map[slot]bool{}
	return d.finish(ctx, all, touched, present, errs)
}

// finish brings the slots of the touched VIPs (and, for a Sync, every
// slot the driver may own) to what is wanted, then sets the services'
// sysctls and maps failures to services.
func (d *Driver) finish(ctx context.Context, states []*render.ServiceState, touched []netip.Addr, present map[slot]bool, errs map[string]error) map[string]error {
	sync := present != nil
	d.mu.Lock()
	check := sync && d.iface != ""
	for _, v := range touched {
		check = check || len(d.users[v]) > 0
	}
	d.mu.Unlock()
	var ifaceErr error
	if d.ha == "" && check {
		ifaceErr = d.ensure(ctx, sync)
	}
	var slots []slot
	var since uint64
	if sync {
		var err error
		if slots, since, err = d.readBack(ctx, present); err != nil && ifaceErr == nil {
			ifaceErr = err
		}
	}
	d.mu.Lock()
	slots = append(slots, d.vipSlots(touched)...)
	d.mu.Unlock()
	var failed map[slot]error
	var added []slot
	if ifaceErr == nil {
		failed, added = d.converge(ctx, slots, present, since)
	}
	d.announceAdded(added)

	d.mu.Lock()
	for _, s := range states {
		p, ok := d.svc[s.Name]
		if !ok {
			continue
		}
		if g, claimed := d.vipGroup[p.VIP]; d.ha != "" && claimed && g != p.Group {
			errs[s.Name] = d.conflict(s.Name, p)
			continue
		}
		if ifaceErr != nil && (d.ha == "" || d.isHeld(p.Group)) {
			errs[s.Name] = ifaceErr
			continue
		}
		if err := failed[d.vipSlot(p.VIP)]; err != nil {
			errs[s.Name] = err
		}
	}
	d.mu.Unlock()
	d.sysctls(states, errs)
	return errs
}

// setService records one service's VIP part and returns the VIPs it
// touched (its old and its new one). Called with mu held.
func (d *Driver) setService(s *render.ServiceState) []netip.Addr {
	var touched []netip.Addr
	if old, ok := d.svc[s.Name]; ok {
		delete(d.users[old.VIP], s.Name)
		if len(d.users[old.VIP]) == 0 {
			delete(d.users, old.VIP)
		}
		delete(d.svc, s.Name)
		touched = append(touched, old.VIP)
	}
	part, ok := s.Part(render.PartVIP)
	if !ok {
		return touched
	}
	p := part.(render.VIPPart)
	p.VIP = p.VIP.Unmap()
	if !p.VIP.IsValid() {
		return touched
	}
	d.svc[s.Name] = p
	if d.users[p.VIP] == nil {
		d.users[p.VIP] = map[string]bool{}
	}
	d.users[p.VIP][s.Name] = true
	return append(touched, p.VIP)
}

// regroup settles which HA group each touched VIP moves with: the group
// it moved with stays while a service of that group uses it; otherwise
// the group of the first service (by name) using it. Called with mu held.
func (d *Driver) regroup(vips []netip.Addr) {
	if d.ha == "" {
		return
	}
	for _, v := range vips {
		cur, has := d.vipGroup[v]
		names := make([]string, 0, len(d.users[v]))
		keep := false
		for n := range d.users[v] {
			names = append(names, n)
			keep = keep || (has && d.svc[n].Group == cur)
		}
		if keep {
			continue
		}
		if has {
			delete(d.vipGroup, v)
			delete(d.groupVIPs[cur], v)
			if len(d.groupVIPs[cur]) == 0 {
				delete(d.groupVIPs, cur)
			}
		}
		if len(names) == 0 {
			continue
		}
		slices.Sort(names)
		g := d.svc[names[0]].Group
		d.vipGroup[v] = g
		if d.groupVIPs[g] == nil {
			d.groupVIPs[g] = map[netip.Addr]bool{}
		}
		d.groupVIPs[g][v] = true
	}
}

func (d *Driver) conflict(name string, p render.VIPPart) error {
	g := d.vipGroup[p.VIP]
	var other string
	for n := range d.users[p.VIP] {
		if d.svc[n].Group == g && (other == "" || n < other) {
			other = n
		}
	}
	return fmt.Errorf("VIP %s moves with HA group %q (service %s), but this service's ha_group is %q: services sharing a VIP must share the HA group", p.VIP, g, other, p.Group)
}

func (d *Driver) isHeld(group string) bool {
	_, ok := d.held[group]
	return ok
}

// vipSlot is where the VIP v goes: the VIP interface (single host) or the
// HA interface, as a host prefix. Called with mu held.
func (d *Driver) vipSlot(v netip.Addr) slot {
	iface := d.ha
	if iface == "" {
		iface = d.iface
	}
	return slot{Iface: iface, Addr: netip.PrefixFrom(v, v.BitLen())}
}

func (d *Driver) vipSlots(vips []netip.Addr) []slot {
	if d.ha == "" && d.iface == "" {
		return nil
	}
	out := make([]slot, 0, len(vips))
	for _, v := range vips {
		out = append(out, d.vipSlot(v))
	}
	return out
}

// wanted reports whether the driver must hold k now. Called with mu held.
func (d *Driver) wanted(k slot) bool {
	if d.ha == "" {
		return d.iface != "" && k.Iface == d.iface && isHost(k.Addr) && len(d.users[k.Addr.Addr()]) > 0
	}
	if k.Iface == d.ha && isHost(k.Addr) {
		if g, ok := d.vipGroup[k.Addr.Addr()]; ok && d.isHeld(g) {
			return true
		}
	}
	return len(d.floats[k]) > 0
}

// ours reports whether an address found on an interface is the driver's
// own: the record says so, or ownedByRule. Called with mu held.
func (d *Driver) ours(k slot) bool { return d.rec[k] || d.ownedByRule(k) }

// ownedByRule reports whether an address is the driver's own even without
// a record of it: anything but link-local on its own dummy interface, and
// in HA mode the VIP of a known service on the HA interface or a held
// group's floating address. Called with mu held.
func (d *Driver) ownedByRule(k slot) bool {
	if d.ha == "" {
		return d.iface != "" && d.iface != d.fallback && k.Iface == d.iface && !k.Addr.Addr().IsLinkLocalUnicast()
	}
	if k.Iface == d.ha && isHost(k.Addr) && len(d.users[k.Addr.Addr()]) > 0 {
		return true
	}
	return len(d.floats[k]) > 0
}

func isHost(p netip.Prefix) bool { return p.Bits() == p.Addr().BitLen() }

// ensure makes the single-host VIP interface exist and be up: the dummy
// interface, created when missing, or the fallback interface on a kernel
// that cannot create dummy interfaces. With force it looks again even
// when it was ready.
func (d *Driver) ensure(ctx context.Context, force bool) error {
	d.mu.Lock()
	name, ready := d.iface, d.ready
	d.mu.Unlock()
	if ready && !force {
		return nil
	}
	if name == "" {
		name = d.ifname
	}
	var exists, up bool
	err := d.call(ctx, func(c context.Context) (err error) { exists, up, err = d.links.Link(c, name); return err })
	if err != nil {
		return fmt.Errorf("VIP interface: %w", err)
	}
	if !exists {
		if name == d.fallback {
			return fmt.Errorf("VIP interface: the fallback interface %s does not exist: %w", name, syscall.ENODEV)
		}
		err := d.call(ctx, func(c context.Context) error { return d.links.AddDummy(c, name) })
		switch {
		case errors.Is(err, syscall.EOPNOTSUPP):
			d.log.Warn("this kernel cannot create dummy interfaces (no CONFIG_DUMMY); holding the VIPs on the fallback interface, removing only the addresses recorded as added by switchman",
				"interface", name, "fallback", d.fallback, "record", d.record)
			name = d.fallback
			if err := d.call(ctx, func(c context.Context) (err error) { exists, up, err = d.links.Link(c, name); return err }); err != nil {
				return fmt.Errorf("VIP interface: %w", err)
			}
			if !exists {
				return fmt.Errorf("VIP interface: this kernel cannot create the dummy interface %s and the fallback %s does not exist: %w", d.ifname, name, syscall.ENODEV)
			}
		case err != nil:
			return fmt.Errorf("VIP interface: %w", err)
		default:
			d.log.Info("created VIP interface", "interface", name)
		}
	}
	if !up {
		if err := d.call(ctx, func(c context.Context) error { return d.links.SetUp(c, name) }); err != nil {
			return fmt.Errorf("VIP interface: %w", err)
		}
	}
	d.mu.Lock()
	d.iface, d.ready = name, true
	d.mu.Unlock()
	return nil
}

// readBack lists the addresses of every interface the driver may hold
// something on into present, and returns the slots found there that the
// driver may have to act on, with every slot of the record, and the
// change count when it began. An error reading the VIP interface itself is
// returned; a missing floating or recorded interface just holds nothing.
func (d *Driver) readBack(ctx context.Context, present map[slot]bool) ([]slot, uint64, error) {
	d.mu.Lock()
	since := d.gen
	main := d.ha
	if main == "" {
		main = d.iface
	}
	ifaces := map[string]bool{}
	if main != "" {
		ifaces[main] = true
	}
	for k := range d.floats {
		ifaces[k.Iface] = true
	}
	var slots []slot
	for k := range d.rec {
		ifaces[k.Iface] = true
		slots = append(slots, k)
	}
	for k := range d.floats {
		slots = append(slots, k)
	}
	d.mu.Unlock()
	var mainErr error
	for _, name := range slices.Sorted(maps.Keys(ifaces)) {
		var have []netip.Prefix
		err := d.call(ctx, func(c context.Context) (err error) { have, err = d.links.Addresses(c, name); return err })
		if err != nil {
			if name == main {
				mainErr = fmt.Errorf("VIP interface: %w", err)
			} else if !errors.Is(err, syscall.ENODEV) {
				d.log.Warn("cannot list the addresses of an interface the VIP driver holds addresses on", "interface", name, "error", err)
			}
			continue
		}
		for _, p := range have {
			k := slot{Iface: name, Addr: p}
			present[k] = true
			slots = append(slots, k)
		}
	}
	return slots, since, mainErr
}

// converge brings each slot to what is wanted now, removals first. present,
// when not nil, is what readBack found from change count since on (Sync);
// otherwise the driver trusts its own view (Apply, Hold). It returns the
// slots it could not bring to their wanted state, with the reason, and
// those it added.
func (d *Driver) converge(ctx context.Context, slots []slot, present map[slot]bool, since uint64) (map[slot]error, []slot) {
	slices.SortFunc(slots, compareSlots)
	slots = slices.Compact(slots)
	failed := map[slot]error{}
	// Phase A: take in what was read, and record every address about to
	// be added before adding it.
	fresh := map[slot]bool{}
	d.mu.Lock()
	for _, k := range slots {
		if present != nil && d.changedAt[k] <= since {
			d.observe(k, present[k]) // else it changed since the dump
		}
		if d.wanted(k) && !d.on[k] && !d.foreign[k] && !d.rec[k] {
			d.recSet(k)
			fresh[k] = true
		}
	}
	if present != nil {
		for k, at := range d.changedAt {
			if at <= since {
				delete(d.changedAt, k) // older than this dump: no longer needed
			}
		}
	}
	d.save()
	d.mu.Unlock()
	// Phase B: one kernel call per locked step, deciding again each time
	// (an owner change may have come in between): removals, then adds.
	var added []slot
	for _, adding := range []bool{false, true} {
		for _, k := range slots {
			if ctx.Err() != nil {
				failed[k] = ctx.Err()
				continue
			}
			d.mu.Lock()
			if d.wanted(k) == adding {
				var err error
				var add bool
				if adding {
					add, err = d.addLocked(ctx, k, fresh[k])
				} else {
					err = d.removeLocked(ctx, k)
				}
				if err != nil {
					failed[k] = err
				}
				if add {
					added = append(added, k)
				}
			}
			d.mu.Unlock()
		}
	}
	// Phase C: the record after the removals (and failed adds).
	d.mu.Lock()
	for k := range fresh {
		if !d.on[k] && !d.wanted(k) {
			d.recDel(k)
		}
	}
	d.save()
	d.mu.Unlock()
	return failed, added
}

// observe takes in whether a dump found k. Called with mu held.
func (d *Driver) observe(k slot, found bool) {
	if !found {
		delete(d.on, k)
		delete(d.foreign, k)
		if d.rec[k] && !d.wanted(k) {
			d.recDel(k) // gone already
		}
		return
	}
	if d.on[k] || d.foreign[k] {
		return
	}
	switch {
	case d.ours(k):
		d.on[k] = true
		d.recSet(k)
	case d.wanted(k):
		d.foreign[k] = true // someone else's address that a service names
	}
}

// addLocked adds a wanted slot unless it is in place. fresh says the
// record gained k just now, so an EEXIST means someone else's address.
// Called with mu held.
func (d *Driver) addLocked(ctx context.Context, k slot, fresh bool) (added bool, err error) {
	if d.on[k] || d.foreign[k] {
		return false, nil
	}
	if !d.rec[k] {
		d.recSet(k)
		fresh = true
		d.save()
	}
	err = d.call(ctx, func(c context.Context) error { return d.links.AddAddress(c, k.Iface, k.Addr, d.lifetime) })
	d.gen++
	d.changedAt[k] = d.gen
	switch {
	case err == nil:
		d.on[k] = true
		d.log.Info("added VIP", "interface", k.Iface, "address", k.Addr)
		return true, nil
	case errors.Is(err, syscall.EEXIST) && (!fresh || d.ownedByRule(k)):
		d.on[k] = true // ours already
		return false, nil
	case errors.Is(err, syscall.EEXIST):
		d.recDel(k)
		d.foreign[k] = true
		d.log.Info("a wanted VIP is already on the interface and was not added by switchman; it is used as it is and never removed", "interface", k.Iface, "address", k.Addr)
		return false, nil
	default:
		if errors.Is(err, syscall.ENODEV) {
			d.ready = false
		}
		if fresh {
			d.recDel(k)
		}
		d.log.Warn("add VIP failed", "interface", k.Iface, "address", k.Addr, "error", err)
		return false, err
	}
}

// removeLocked removes a slot the driver holds and no longer wants.
// Called with mu held.
func (d *Driver) removeLocked(ctx context.Context, k slot) error {
	if d.foreign[k] {
		delete(d.foreign, k)
		return nil
	}
	if !d.on[k] && !d.rec[k] {
		return nil
	}
	err := d.call(ctx, func(c context.Context) error { return d.links.DeleteAddress(c, k.Iface, k.Addr) })
	d.gen++
	d.changedAt[k] = d.gen
	if err != nil && !errors.Is(err, syscall.EADDRNOTAVAIL) && !errors.Is(err, syscall.ENODEV) {
		d.log.Warn("remove VIP failed", "interface", k.Iface, "address", k.Addr, "error", err)
		return err
	}
	if err == nil {
		d.log.Info("removed VIP", "interface", k.Iface, "address", k.Addr)
	}
	delete(d.on, k)
	d.recDel(k)
	return nil
}

func (d *Driver) recSet(k slot) {
	if !d.rec[k] {
		d.rec[k], d.dirty = true, true
	}
}

func (d *Driver) recDel(k slot) {
	if d.rec[k] {
		delete(d.rec, k)
		d.dirty = true
	}
}

// save writes the record when it changed. Called with mu held. A record
// that cannot be written is logged: the addresses still work, but a
// restart may not know them; the next change tries again.
func (d *Driver) save() {
	if !d.dirty || d.record == "" {
		return
	}
	b := encodeRecord(d.rec)
	if string(b) == string(d.written) {
		d.dirty = false
		return
	}
	if err := atomicfile.Write(d.record, b, 0o600); err != nil {
		d.log.Error("cannot write the VIP ownership record; after a restart the driver may not know which addresses it added", "file", d.record, "error", err)
		return
	}
	d.written, d.dirty = b, false
}

func (d *Driver) call(ctx context.Context, f func(context.Context) error) error {
	c, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	return f(c)
}

// sysctls sets what each service needs to 1. It never turns anything off:
// the host may need it for other reasons. IPVS settings are skipped on a
// kernel without IPVS (the ipvs driver reports that).
func (d *Driver) sysctls(states []*render.ServiceState, errs map[string]error) {
	done := map[string]error{}
	for _, s := range states {
		if _, ok := s.Part(render.PartVIP); !ok {
			continue
		}
		for _, p := range s.Sysctls {
			err, seen := done[p]
			if !seen {
				err = d.ensureSysctl(p)
				done[p] = err
			}
			if err != nil && errs[s.Name] == nil {
				errs[s.Name] = err
			}
		}
	}
}

// ensureSysctl sets the sysctl at path (relative to ProcSys,
// slash-separated) to 1 unless it is already.
func (d *Driver) ensureSysctl(path string) error {
	if strings.HasPrefix(path, "net/ipv4/vs/") {
		dir := filepath.Join(d.procSys, "net/ipv4/vs")
		if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
			if !d.noVS {
				d.log.Warn("no IPVS sysctls (is ip_vs loaded?); skipping net.ipv4.vs settings", "dir", dir)
				d.noVS = true
			}
			return nil
		}
		d.noVS = false
	}
	old, wrote, err := sysctl.Ensure(d.procSys, path, "1")
	if wrote {
		d.log.Info("set sysctl", "name", sysctl.Name(path), "old", old, "new", "1")
	}
	return err
}

// floating returns the slots of a group's floating addresses.
func floating(addrs []spec.GroupAddress) []slot {
	out := make([]slot, 0, len(addrs))
	for _, a := range addrs {
		p := netip.PrefixFrom(a.Address.Addr().Unmap(), a.Address.Bits())
		out = append(out, slot{Iface: a.Interface, Addr: p})
	}
	return out
}
