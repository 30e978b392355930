package vip_test

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/drivers/vip"
	"github.com/switchman-lb/switchman/drivers/vip/vipfake"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// announcements records what the driver announced; with links set, it
// also records every announcement of an address that is not on its
// interface at that moment (announcing an address this host does not
// hold draws traffic into a black hole).
type announcements struct {
	links *vipfake.Links
	mu    sync.Mutex
	sent  map[string][]netip.Addr // iface -> every address announced, in order
	stray []string
}

func (a *announcements) announce(_ context.Context, iface string, addrs []netip.Addr) error {
	var held []netip.Prefix
	if a.links != nil {
		_, _, held = a.links.Interface(iface)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.sent == nil {
		a.sent = map[string][]netip.Addr{}
	}
	a.sent[iface] = append(a.sent[iface], addrs...)
	for _, x := range addrs {
		if a.links != nil && !slices.ContainsFunc(held, func(p netip.Prefix) bool { return p.Addr() == x }) {
			a.stray = append(a.stray, x.String()+" on "+iface)
		}
	}
	return nil
}

func (a *announcements) count(iface string, addr netip.Addr) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, x := range a.sent[iface] {
		if x == addr {
			n++
		}
	}
	return n
}

// haFixture is the fake host of an HA agent: eth1 (the HA interface,
// holding the host's own 10.20.0.11/24) and eth2 (the backend side,
// 10.10.0.21/24).
func haFixture(t *testing.T, ann *announcements, lifetime time.Duration) (*fixture, func() *vip.Driver) {
	f := newFixture(t)
	ann.links = f.links
	f.links.AddInterface("eth1", true, prefixes("10.20.0.11/24", "fe80::1/64")...)
	f.links.AddInterface("eth2", true, prefixes("10.10.0.21/24")...)
	return f, func() *vip.Driver {
		return f.driver(func(c *vip.Config) {
			c.HAInterface = "eth1"
			c.Lifetime = lifetime
			c.Announce = ann.announce
			c.AnnounceSchedule = []time.Duration{0, 20 * time.Millisecond, 40 * time.Millisecond}
		})
	}
}

var gateway = []spec.GroupAddress{{Address: netip.MustParsePrefix("10.10.0.254/24"), Interface: "eth2"}}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("still not true after 10s: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestHAHoldsOnlyOwnedGroups(t *testing.T) {
	ctx := context.Background()
	ann := &announcements{}
	f, newDriver := haFixture(t, ann, 3*time.Second)
	d := newDriver()
	all := states(svc("web", vipA, "g1"), svc("dns", vipA, "g1"), svc("api", vipB, "g2"), svc("v6", vip6, "g1"))
	noErrs(t, "sync", d.Sync(ctx, all))
	if got := f.addrs("eth1"); !slices.Equal(got, prefixes("10.20.0.11/24", "fe80::1/64")) {
		t.Fatalf("a standby holds %v", got)
	}

	d.Hold("g1", true, gateway)
	if got, want := f.addrs("eth1"), prefixes("10.20.0.11/24", "192.0.2.10/32", "2001:db8::10/128", "fe80::1/64"); !slices.Equal(got, want) {
		t.Errorf("eth1 with g1 held: %v, want %v", got, want)
	}
	if got, want := f.addrs("eth2"), prefixes("10.10.0.21/24", "10.10.0.254/24"); !slices.Equal(got, want) {
		t.Errorf("eth2 with g1 held: %v, want %v", got, want)
	}
	for _, k := range []struct {
		iface string
		p     string
	}{{"eth1", "192.0.2.10/32"}, {"eth2", "10.10.0.254/24"}} {
		if lt := f.links.Lifetime(k.iface, netip.MustParsePrefix(k.p)); lt != 3*time.Second {
			t.Errorf("%s on %s has lifetime %v, want 3s", k.p, k.iface, lt)
		}
	}
	waitFor(t, "three rounds of announcements of each held address", func() bool {
		return ann.count("eth1", vipA) == 3 && ann.count("eth1", vip6) == 3 && ann.count("eth2", netip.MustParseAddr("10.10.0.254")) == 3
	})
	if ann.count("eth1", vipB) != 0 {
		t.Error("g2's VIP announced")
	}

	// A service joining and leaving the held group moves its VIP at once;
	// a shared VIP stays while one of its services remains.
	vipC := netip.MustParseAddr("192.0.2.12")
	noErrs(t, "join", d.Apply(ctx, states(svc("new", vipC, "g1"))))
	if !slices.Contains(f.addrs("eth1"), netip.MustParsePrefix("192.0.2.12/32")) {
		t.Error("the VIP of a service joining a held group was not added")
	}
	noErrs(t, "leave", d.Apply(ctx, states(gone("new"), gone("web"))))
	if slices.Contains(f.addrs("eth1"), netip.MustParsePrefix("192.0.2.12/32")) {
		t.Error("the VIP of a service that left was kept")
	}
	if !slices.Contains(f.addrs("eth1"), netip.MustParsePrefix("192.0.2.10/32")) {
		t.Error("a VIP shared by two services went with the first of them")
	}

	// Drop: everything goes at once.
	w := f.links.Writes()
	d.Hold("g1", false, nil)
	if got := f.addrs("eth1"); !slices.Equal(got, prefixes("10.20.0.11/24", "fe80::1/64")) {
		t.Errorf("eth1 after the drop: %v", got)
	}
	if got := f.addrs("eth2"); !slices.Equal(got, prefixes("10.10.0.21/24")) {
		t.Errorf("eth2 after the drop: %v", got)
	}
	if f.links.Writes()-w != 3 { // vipA, vip6 and the gateway
		t.Errorf("the drop made %d writes, want 3", f.links.Writes()-w)
	}
}

// TestHASharedVIPAcrossGroups: one address cannot move with two groups;
// the group that claimed it first keeps it and the other service fails.
func TestHASharedVIPAcrossGroups(t *testing.T) {
	f, newDriver := haFixture(t, &announcements{}, 0)
	d := newDriver()
	noErrs(t, "first", d.Apply(context.Background(), states(svc("a", vipA, "g1"))))
	errs := d.Apply(context.Background(), states(svc("b", vipA, "g2")))
	if err := errs["b"]; err == nil || !strings.Contains(err.Error(), `"g1"`) || !strings.Contains(err.Error(), `"g2"`) {
		t.Fatalf("b: %v, want an error naming both groups", err)
	}
	d.Hold("g2", true, nil)
	if slices.Contains(f.addrs("eth1"), netip.MustParsePrefix("192.0.2.10/32")) {
		t.Error("the VIP moved with the group of the second claimant")
	}
	d.Hold("g1", true, nil)
	if !slices.Contains(f.addrs("eth1"), netip.MustParsePrefix("192.0.2.10/32")) {
		t.Error("the VIP did not move with the group that claimed it first")
	}
	// Once a leaves, the address moves with b's group, which is held.
	d.Hold("g1", false, nil)
	noErrs(t, "a leaves", d.Apply(context.Background(), states(gone("a"))))
	noErrs(t, "b again", d.Apply(context.Background(), states(svc("b", vipA, "g2"))))
	if !slices.Contains(f.addrs("eth1"), netip.MustParsePrefix("192.0.2.10/32")) {
		t.Error("the VIP did not pass to g2 once g1's service left")
	}
}

func TestHAFloatingChange(t *testing.T) {
	f, newDriver := haFixture(t, &announcements{}, 0)
	d := newDriver()
	d.Hold("g1", true, gateway)
	d.Hold("g1", true, []spec.GroupAddress{{Address: netip.MustParsePrefix("10.10.0.253/24"), Interface: "eth2"}})
	if got, want := f.addrs("eth2"), prefixes("10.10.0.21/24", "10.10.0.253/24"); !slices.Equal(got, want) {
		t.Errorf("eth2 after the floating addresses changed: %v, want %v", got, want)
	}
	if f.links.Lifetime("eth2", netip.MustParsePrefix("10.10.0.253/24")) != 0 {
		t.Error("lifetime set although none is configured")
	}
}

// TestHALeftoversAndRenewal: a new run removes what a crashed run held
// (the record says what it was), never the host's own addresses; then it
// renews the lifetime of what it holds, putting back an address that
// expired.
func TestHALeftoversAndRenewal(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f, newDriver := haFixture(t, &announcements{}, time.Second)
	crashed := newDriver()
	noErrs(t, "sync", crashed.Sync(ctx, states(svc("web", vipA, "g1"))))
	crashed.Hold("g1", true, gateway)
	if len(f.addrs("eth1")) != 3 || len(f.addrs("eth2")) != 2 {
		t.Fatalf("the first run holds %v and %v", f.addrs("eth1"), f.addrs("eth2"))
	}

	d := newDriver() // the record is still there: no Hold(false) ran
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	waitFor(t, "the leftovers removed", func() bool { return len(f.addrs("eth1")) == 2 && len(f.addrs("eth2")) == 1 })
	if got := f.addrs("eth1"); !slices.Equal(got, prefixes("10.20.0.11/24", "fe80::1/64")) {
		t.Errorf("eth1: %v", got)
	}

	noErrs(t, "sync", d.Sync(ctx, states(svc("web", vipA, "g1"))))
	d.Hold("g1", true, gateway)
	f.links.RemoveAddress("eth1", netip.MustParsePrefix("192.0.2.10/32")) // as the kernel does when it expires
	waitFor(t, "the expired VIP renewed", func() bool {
		return slices.Contains(f.addrs("eth1"), netip.MustParsePrefix("192.0.2.10/32"))
	})
	d.Hold("g1", false, nil)
	cancel()
	if err := <-done; err != context.Canceled {
		t.Errorf("Run: %v", err)
	}
	if got := f.addrs("eth1"); len(got) != 2 {
		t.Errorf("a renewal put back a dropped address: %v", got)
	}
}

// TestHAConcurrentHoldAndApply toggles ownership while the loop applies
// and syncs (run with -race): at the end the addresses match the last
// Hold, and a dropped group's address is never announced after its drop.
func TestHAConcurrentHoldAndApply(t *testing.T) {
	ctx := context.Background()
	ann := &announcements{}
	f, newDriver := haFixture(t, ann, 0)
	d := newDriver()
	var svcs []string
	for i := range 20 {
		svcs = append(svcs, fmt.Sprintf("s%d", i))
	}
	var all []*render.ServiceState
	for j, n := range svcs {
		all = append(all, svc(n, netip.AddrFrom4([4]byte{192, 0, 2, byte(20 + j)}), "g1"))
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range 50 {
			if i%5 == 0 {
				d.Sync(ctx, all)
			} else {
				d.Apply(ctx, all[i%20:i%20+1])
			}
		}
	}()
	for i := range 50 {
		d.Hold("g1", i%2 == 0, gateway)
	}
	wg.Wait()
	d.Hold("g1", false, nil)
	d.Sync(ctx, all)
	if got := f.addrs("eth1"); len(got) != 2 {
		t.Errorf("after the last drop eth1 holds %v", got)
	}
	d.Hold("g1", true, gateway)
	if got := f.addrs("eth1"); len(got) != 22 {
		t.Errorf("held again: eth1 has %d addresses, want 22", len(got))
	}
	// Held for good, the addresses are announced. (Each earlier round may
	// have found its group dropped already: the toggles above come faster
	// than an announcing goroutine starts.)
	waitFor(t, "an announcement on eth1", func() bool {
		ann.mu.Lock()
		defer ann.mu.Unlock()
		return len(ann.sent["eth1"]) > 0
	})
	d.Hold("g1", false, nil)
	d.Close() // waits for the announcements in progress
	ann.mu.Lock()
	defer ann.mu.Unlock()
	if len(ann.stray) > 0 {
		t.Errorf("announced addresses this host did not hold: %v", ann.stray)
	}
}
