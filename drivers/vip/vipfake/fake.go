// Package vipfake is a stateful, in-memory stand-in for the kernel's
// interface and address tables, for tests of code that uses vip.Links. It
// rejects misuse with the kernel's errno (EEXIST, EADDRNOTAVAIL, ENODEV),
// counts writes, and can be told to fail a call.
package vipfake

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/switchman-lb/switchman/drivers/vip"
)

// Method names one vip.Links method.
type Method string

// The methods of vip.Links.
const (
	Link          Method = "Link"
	AddDummy      Method = "AddDummy"
	SetUp         Method = "SetUp"
	Addresses     Method = "Addresses"
	AddAddress    Method = "AddAddress"
	RenewAddress  Method = "RenewAddress"
	DeleteAddress Method = "DeleteAddress"
)

type link struct {
	up    bool
	addrs []netip.Prefix
	// lifetime of each address given one (0 or absent: permanent)
	lifetime map[netip.Prefix]time.Duration
}

// Links is the fake. Use New.
type Links struct {
	mu     sync.Mutex
	links  map[string]*link
	writes int
	fail   map[Method]func(netip.Prefix) error
}

var _ vip.Links = (*Links)(nil)

// linkLocal is the address the kernel gives an interface that comes up.
var linkLocal = netip.MustParsePrefix("fe80::1/64")

// New returns a fake with a loopback interface "lo" holding 127.0.0.1/8.
func New() *Links {
	return &Links{
		links: map[string]*link{"lo": {up: true, addrs: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/8")}}},
		fail:  map[Method]func(netip.Prefix) error{},
	}
}

// Fail makes calls of m fail with what f returns for the address concerned
// (the zero prefix for calls without one); f returning nil lets the call
// through. A nil f clears it.
func (l *Links) Fail(m Method, f func(netip.Prefix) error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if f == nil {
		delete(l.fail, m)
		return
	}
	l.fail[m] = f
}

// Writes returns how many write calls were made, failed ones included.
func (l *Links) Writes() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.writes
}

// Interface returns whether name exists, whether it is up, and its
// addresses, sorted.
func (l *Links) Interface(name string) (exists, up bool, addrs []netip.Prefix) {
	l.mu.Lock()
	defer l.mu.Unlock()
	k, ok := l.links[name]
	if !ok {
		return false, false, nil
	}
	a := slices.Clone(k.addrs)
	slices.SortFunc(a, func(x, y netip.Prefix) int { return x.Addr().Compare(y.Addr()) })
	return true, k.up, a
}

// AddInterface creates an interface directly (as another program would).
func (l *Links) AddInterface(name string, up bool, addrs ...netip.Prefix) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.links[name] = &link{up: up, addrs: addrs}
}

func (l *Links) enter(ctx context.Context, m Method, write bool, p netip.Prefix) error {
	l.mu.Lock()
	if write {
		l.writes++
	}
	if err := ctx.Err(); err != nil {
		l.mu.Unlock()
		return err
	}
	if f := l.fail[m]; f != nil {
		if err := f(p); err != nil {
			l.mu.Unlock()
			return fmt.Errorf("fake %s %s: %w", m, p, err)
		}
	}
	return nil
}

// Link reports whether name exists and is up.
func (l *Links) Link(ctx context.Context, name string) (bool, bool, error) {
	if err := l.enter(ctx, Link, false, netip.Prefix{}); err != nil {
		return false, false, err
	}
	defer l.mu.Unlock()
	k, ok := l.links[name]
	if !ok {
		return false, false, nil
	}
	return true, k.up, nil
}

// AddDummy creates a down interface; EEXIST when the name is taken.
func (l *Links) AddDummy(ctx context.Context, name string) error {
	if err := l.enter(ctx, AddDummy, true, netip.Prefix{}); err != nil {
		return err
	}
	defer l.mu.Unlock()
	if _, ok := l.links[name]; ok {
		return fmt.Errorf("fake add dummy %s: %w", name, syscall.EEXIST)
	}
	l.links[name] = &link{}
	return nil
}

// SetUp brings name up, adding an IPv6 link-local address as the kernel
// does; ENODEV when missing.
func (l *Links) SetUp(ctx context.Context, name string) error {
	if err := l.enter(ctx, SetUp, true, netip.Prefix{}); err != nil {
		return err
	}
	defer l.mu.Unlock()
	k, ok := l.links[name]
	if !ok {
		return fmt.Errorf("fake set up %s: %w", name, syscall.ENODEV)
	}
	if !k.up && !slices.Contains(k.addrs, linkLocal) {
		k.addrs = append(k.addrs, linkLocal)
	}
	k.up = true
	return nil
}

// Addresses lists name's addresses; ENODEV when missing.
func (l *Links) Addresses(ctx context.Context, name string) ([]netip.Prefix, error) {
	if err := l.enter(ctx, Addresses, false, netip.Prefix{}); err != nil {
		return nil, err
	}
	defer l.mu.Unlock()
	k, ok := l.links[name]
	if !ok {
		return nil, fmt.Errorf("fake addresses of %s: %w", name, syscall.ENODEV)
	}
	return slices.Clone(k.addrs), nil
}

// AddAddress adds p with lifetime (0: permanent); EEXIST when present,
// ENODEV when name is missing.
func (l *Links) AddAddress(ctx context.Context, name string, p netip.Prefix, lifetime time.Duration) error {
	if err := l.enter(ctx, AddAddress, true, p); err != nil {
		return err
	}
	defer l.mu.Unlock()
	k, ok := l.links[name]
	if !ok {
		return fmt.Errorf("fake add %s to %s: %w", p, name, syscall.ENODEV)
	}
	if !p.IsValid() || p.Addr().Is4In6() {
		return fmt.Errorf("fake add %s to %s: %w", p, name, syscall.EINVAL)
	}
	if slices.Contains(k.addrs, p) {
		return fmt.Errorf("fake add %s to %s: %w", p, name, syscall.EEXIST)
	}
	k.addrs = append(k.addrs, p)
	k.setLifetime(p, lifetime)
	return nil
}

// RenewAddress sets p's lifetime, adding p when missing; ENODEV when name
// is missing.
func (l *Links) RenewAddress(ctx context.Context, name string, p netip.Prefix, lifetime time.Duration) error {
	if err := l.enter(ctx, RenewAddress, true, p); err != nil {
		return err
	}
	defer l.mu.Unlock()
	k, ok := l.links[name]
	if !ok {
		return fmt.Errorf("fake renew %s on %s: %w", p, name, syscall.ENODEV)
	}
	if !slices.Contains(k.addrs, p) {
		k.addrs = append(k.addrs, p)
	}
	k.setLifetime(p, lifetime)
	return nil
}

func (k *link) setLifetime(p netip.Prefix, lifetime time.Duration) {
	if k.lifetime == nil {
		k.lifetime = map[netip.Prefix]time.Duration{}
	}
	if lifetime > 0 {
		k.lifetime[p] = lifetime
	} else {
		delete(k.lifetime, p)
	}
}

// Lifetime returns the lifetime the address p on name was last given (0:
// permanent or absent).
func (l *Links) Lifetime(name string, p netip.Prefix) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	if k, ok := l.links[name]; ok {
		return k.lifetime[p]
	}
	return 0
}

// RemoveAddress removes p from name directly (as an operator or the
// kernel's lifetime expiry would), without counting a write.
func (l *Links) RemoveAddress(name string, p netip.Prefix) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if k, ok := l.links[name]; ok {
		k.addrs = slices.DeleteFunc(k.addrs, func(x netip.Prefix) bool { return x == p })
		delete(k.lifetime, p)
	}
}

// DeleteAddress removes p; EADDRNOTAVAIL when absent, ENODEV when name is
// missing.
func (l *Links) DeleteAddress(ctx context.Context, name string, p netip.Prefix) error {
	if err := l.enter(ctx, DeleteAddress, true, p); err != nil {
		return err
	}
	defer l.mu.Unlock()
	k, ok := l.links[name]
	if !ok {
		return fmt.Errorf("fake remove %s from %s: %w", p, name, syscall.ENODEV)
	}
	i := slices.Index(k.addrs, p)
	if i < 0 {
		return fmt.Errorf("fake remove %s from %s: %w", p, name, syscall.EADDRNOTAVAIL)
	}
	k.addrs = slices.Delete(k.addrs, i, i+1)
	delete(k.lifetime, p)
	return nil
}
