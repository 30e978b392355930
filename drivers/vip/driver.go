// Package vip gives this host the service addresses (VIPs) it must own, on
// a dummy interface of its own (switchman0 by default), and sets the
// forwarding and IPVS sysctls the rendered services need. It touches no
// other interface: an address on switchman0 that no service wants is
// removed, addresses elsewhere are never looked at.
package vip

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// Links is what the driver needs from the kernel's interface and address
// tables. Errors wrap the kernel's errno (EEXIST for an address already
// present, EADDRNOTAVAIL for one missing). Every call honours its context's
// deadline.
type Links interface {
	// Link reports whether the interface exists and is up.
	Link(ctx context.Context, name string) (exists, up bool, err error)
	AddDummy(ctx context.Context, name string) error
	SetUp(ctx context.Context, name string) error
	// Addresses lists every address of the interface with its prefix
	// length.
	Addresses(ctx context.Context, name string) ([]netip.Prefix, error)
	AddAddress(ctx context.Context, name string, p netip.Prefix) error
	DeleteAddress(ctx context.Context, name string, p netip.Prefix) error
}

// Defaults for Config.
const (
	DefaultInterface   = "switchman0"
	DefaultProcSys     = "/proc/sys"
	DefaultCallTimeout = 10 * time.Second
)

// Config configures a Driver.
type Config struct {
	Links Links
	// Interface is the dummy interface holding the VIPs (DefaultInterface).
	Interface string
	// ProcSys is where sysctls are read and written (DefaultProcSys).
	ProcSys string
	Logger  *slog.Logger
	// CallTimeout bounds each netlink call (DefaultCallTimeout).
	CallTimeout time.Duration
}

// Driver programs VIPs and sysctls. It implements the agent's Driver.
type Driver struct {
	links   Links
	ifname  string
	procSys string
	log     *slog.Logger
	timeout time.Duration
	turn    chan struct{}
	noVS    bool // /proc/sys/net/ipv4/vs was missing last time (logged once)
}

// New returns a Driver.
func New(cfg Config) (*Driver, error) {
	if cfg.Links == nil {
		return nil, errors.New("vip driver: no netlink")
	}
	if cfg.Interface == "" {
		cfg.Interface = DefaultInterface
	}
	if len(cfg.Interface) > 15 || strings.ContainsAny(cfg.Interface, "/ \t\n:") {
		return nil, fmt.Errorf("vip driver: interface name %q is not a valid Linux interface name", cfg.Interface)
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
	return &Driver{links: cfg.Links, ifname: cfg.Interface, procSys: cfg.ProcSys, log: cfg.Logger, timeout: cfg.CallTimeout, turn: make(chan struct{}, 1)}, nil
}

// Name is "vip".
func (d *Driver) Name() string { return "vip" }

// Apply gives the interface exactly desired.VIPs (each as /32 or /128) and
// sets the sysctls the services need. A failed address fails the services
// using that VIP; a failed sysctl fails the services that need it.
func (d *Driver) Apply(ctx context.Context, desired *render.State) map[string]error {
	errs := map[string]error{}
	select {
	case d.turn <- struct{}{}:
		defer func() { <-d.turn }()
	case <-ctx.Done():
		for _, s := range desired.Services {
			errs[s.Name] = ctx.Err()
		}
		return errs
	}
	byVIP := map[netip.Addr][]string{}
	for _, s := range desired.Services {
		byVIP[s.Key.VIP.Unmap()] = append(byVIP[s.Key.VIP.Unmap()], s.Name)
	}
	if err := d.addresses(ctx, desired.VIPs, byVIP, errs); err != nil {
		for _, s := range desired.Services {
			errs[s.Name] = err
		}
	}
	d.sysctls(desired, errs)
	return errs
}

// addresses reconciles the interface; it returns an error that fails every
// service (the interface itself), and records per-address failures in errs.
func (d *Driver) addresses(ctx context.Context, vips []netip.Addr, byVIP map[netip.Addr][]string, errs map[string]error) error {
	want := map[netip.Prefix]bool{}
	for _, a := range vips {
		a = a.Unmap()
		want[netip.PrefixFrom(a, a.BitLen())] = true
	}
	var exists, up bool
	err := d.call(ctx, func(c context.Context) (err error) { exists, up, err = d.links.Link(c, d.ifname); return err })
	if err != nil {
		return fmt.Errorf("VIP interface: %w", err)
	}
	if !exists {
		if len(want) == 0 {
			return nil // nothing to hold, nothing to clean
		}
		if err := d.call(ctx, func(c context.Context) error { return d.links.AddDummy(c, d.ifname) }); err != nil {
			if errors.Is(err, syscall.EOPNOTSUPP) {
				return fmt.Errorf("VIP interface: this kernel cannot create dummy interfaces (load the dummy module or use a kernel with CONFIG_DUMMY, or create %s yourself, of any type): %w", d.ifname, err)
			}
			return fmt.Errorf("VIP interface: %w", err)
		}
		d.log.Info("created VIP interface", "interface", d.ifname)
	}
	if !up && len(want) > 0 {
		if err := d.call(ctx, func(c context.Context) error { return d.links.SetUp(c, d.ifname) }); err != nil {
			return fmt.Errorf("VIP interface: %w", err)
		}
	}
	var have []netip.Prefix
	if err := d.call(ctx, func(c context.Context) (err error) { have, err = d.links.Addresses(c, d.ifname); return err }); err != nil {
		return fmt.Errorf("VIP interface: %w", err)
	}
	present := map[netip.Prefix]bool{}
	for _, p := range have {
		present[p] = true
	}
	add := make([]netip.Prefix, 0, len(want))
	for p := range want {
		if !present[p] {
			add = append(add, p)
		}
	}
	slices.SortFunc(add, comparePrefix)
	for _, p := range add {
		if err := d.call(ctx, func(c context.Context) error { return d.links.AddAddress(c, d.ifname, p) }); err != nil {
			d.log.Warn("add VIP failed", "interface", d.ifname, "address", p, "error", err)
			for _, name := range byVIP[p.Addr()] {
				errs[name] = err
			}
			continue
		}
		d.log.Info("added VIP", "interface", d.ifname, "address", p)
	}
	for _, p := range have {
		// The kernel's own IPv6 link-local address is not a VIP.
		if want[p] || p.Addr().IsLinkLocalUnicast() {
			continue
		}
		if err := d.call(ctx, func(c context.Context) error { return d.links.DeleteAddress(c, d.ifname, p) }); err != nil {
			d.log.Warn("remove VIP failed", "interface", d.ifname, "address", p, "error", err)
			continue
		}
		d.log.Info("removed VIP", "interface", d.ifname, "address", p)
	}
	return nil
}

func (d *Driver) call(ctx context.Context, f func(context.Context) error) error {
	c, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	return f(c)
}

// sysctls turns on what the services need. It never turns anything off:
// the host may need it for other reasons.
func (d *Driver) sysctls(desired *render.State, errs map[string]error) {
	var nat4, nat6, ipvsAll, masq []string
	for _, s := range desired.IPVS {
		ipvsAll = append(ipvsAll, s.Service)
		nat := false
		for _, dst := range s.Destinations {
			if dst.Forwarding == spec.NAT || dst.Forwarding == "" {
				nat = true
			}
		}
		if !nat {
			continue
		}
		if s.Address.Unmap().Is4() {
			nat4 = append(nat4, s.Service)
		} else {
			nat6 = append(nat6, s.Service)
		}
	}
	for _, f := range desired.Filters {
		if f.Masquerade {
			masq = append(masq, f.Service)
		}
	}
	fail := func(names []string, err error) {
		for _, n := range names {
			if errs[n] == nil {
				errs[n] = err
			}
		}
	}
	if len(nat4) > 0 {
		if err := d.ensure("net/ipv4/ip_forward"); err != nil {
			fail(nat4, err)
		}
	}
	if len(nat6) > 0 {
		if err := d.ensure("net/ipv6/conf/all/forwarding"); err != nil {
			fail(nat6, err)
		}
	}
	if len(ipvsAll) == 0 && len(masq) == 0 {
		return
	}
	if _, err := os.Stat(filepath.Join(d.procSys, "net/ipv4/vs")); errors.Is(err, fs.ErrNotExist) {
		// No IPVS in this kernel: the ipvs driver reports it for these
		// services; VIPs work regardless.
		if !d.noVS {
			d.log.Warn("no IPVS sysctls (is ip_vs loaded?); skipping net.ipv4.vs settings", "dir", filepath.Join(d.procSys, "net/ipv4/vs"))
			d.noVS = true
		}
		return
	}
	d.noVS = false
	if len(ipvsAll) > 0 {
		if err := d.ensure("net/ipv4/vs/expire_nodest_conn"); err != nil {
			fail(ipvsAll, err)
		}
	}
	if len(masq) > 0 {
		if err := d.ensure("net/ipv4/vs/conntrack"); err != nil {
			fail(masq, err)
		}
	}
}

// ensure sets the sysctl at path (relative to ProcSys, slash-separated) to
// 1 unless it is already.
func (d *Driver) ensure(path string) error {
	name := strings.ReplaceAll(path, "/", ".")
	file := filepath.Join(d.procSys, filepath.FromSlash(path))
	b, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("read sysctl %s: %w", name, err)
	}
	old := strings.TrimSpace(string(b))
	if old == "1" {
		return nil
	}
	if err := os.WriteFile(file, []byte("1\n"), 0o644); err != nil {
		return fmt.Errorf("set sysctl %s=1: %w", name, err)
	}
	d.log.Info("set sysctl", "name", name, "old", old, "new", "1")
	return nil
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}
