package vip_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/drivers/vip"
	"github.com/switchman-lb/switchman/spec"
)

// countingLinks counts the writes made through the real adapter.
type countingLinks struct {
	*vip.Netlink
	writes atomic.Int64
}

func (c *countingLinks) AddDummy(ctx context.Context, name string) error {
	c.writes.Add(1)
	return c.Netlink.AddDummy(ctx, name)
}

func (c *countingLinks) SetUp(ctx context.Context, name string) error {
	c.writes.Add(1)
	return c.Netlink.SetUp(ctx, name)
}

func (c *countingLinks) AddAddress(ctx context.Context, name string, p netip.Prefix, lifetime time.Duration) error {
	c.writes.Add(1)
	return c.Netlink.AddAddress(ctx, name, p, lifetime)
}

func (c *countingLinks) RenewAddress(ctx context.Context, name string, p netip.Prefix, lifetime time.Duration) error {
	c.writes.Add(1)
	return c.Netlink.RenewAddress(ctx, name, p, lifetime)
}

func (c *countingLinks) DeleteAddress(ctx context.Context, name string, p netip.Prefix) error {
	c.writes.Add(1)
	return c.Netlink.DeleteAddress(ctx, name, p)
}

// newNetns creates a network namespace named swm-vip-<random> and removes
// it when the test ends.
func newNetns(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace")
	}
	ip, err := exec.LookPath("ip")
	if err != nil {
		t.Skip("needs the ip command (iproute2)")
	}
	b := make([]byte, 4)
	rand.Read(b)
	name := "swm-vip-" + hex.EncodeToString(b)
	if out, err := exec.Command(ip, "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("cannot create a network namespace: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command(ip, "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("remove netns %s: %v: %s", name, err, out)
		}
	})
	return name
}

func ipIn(t *testing.T, ns string, args ...string) []byte {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip -n %s %v: %v: %s", ns, args, err, out)
	}
	return out
}

// addrsOf lists the global addresses of dev as ip -j shows them.
func addrsOf(t *testing.T, ns, dev string) []netip.Prefix {
	t.Helper()
	var links []struct {
		AddrInfo []struct {
			Local     string `json:"local"`
			Prefixlen int    `json:"prefixlen"`
			Scope     string `json:"scope"`
		} `json:"addr_info"`
	}
	if err := json.Unmarshal(ipIn(t, ns, "-j", "addr", "show", "dev", dev), &links); err != nil {
		t.Fatal(err)
	}
	var out []netip.Prefix
	for _, l := range links {
		for _, a := range l.AddrInfo {
			if a.Scope == "link" {
				continue
			}
			out = append(out, netip.PrefixFrom(netip.MustParseAddr(a.Local), a.Prefixlen))
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out
}

// TestRealNetnsVIPs runs the driver with the real adapter in a network
// namespace the test creates. On a kernel that can make dummy interfaces
// the driver creates switchman0 itself; on one that cannot (the build
// hosts have no CONFIG_DUMMY) the driver falls back to lo, where it must
// leave the host's own addresses alone, across a restart.
func TestRealNetnsVIPs(t *testing.T) {
	ns := newNetns(t)
	ipIn(t, ns, "link", "add", "other0", "type", "veth", "peer", "name", "other1")
	ipIn(t, ns, "addr", "add", "198.51.100.1/24", "dev", "other0")
	ipIn(t, ns, "link", "set", "other0", "up")
	otherBefore := addrsOf(t, ns, "other0")

	dummy := exec.Command("ip", "-n", ns, "link", "add", "probe0", "type", "dummy").Run() == nil
	iface := "switchman0"
	if dummy {
		ipIn(t, ns, "link", "del", "probe0")
	} else {
		t.Log("this kernel cannot create dummy interfaces: the VIPs go on lo")
		iface = "lo"
		ipIn(t, ns, "link", "set", "lo", "up")
		ipIn(t, ns, "addr", "add", "192.0.2.99/32", "dev", "lo") // the host's own
	}
	hostOwn := addrsOf(t, ns, iface)

	n := vip.NewNetlink("/run/netns/" + ns)
	defer n.Close()
	links := &countingLinks{Netlink: n}
	dir := t.TempDir()
	newDriver := func() *vip.Driver {
		d, err := vip.New(vip.Config{Links: links, ProcSys: procSys(t, allSysctls("1")), StateDir: dir})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(d.Close)
		return d
	}
	d := newDriver()
	ctx := context.Background()
	all := states(svc("svca", vipA, ""), svc("svcb", vipB, ""), svc("svcc", vip6, ""))
	noErrs(t, "apply", d.Apply(ctx, all))
	want := append(prefixes("192.0.2.10/32", "192.0.2.11/32", "2001:db8::10/128"), hostOwn...)
	slices.SortFunc(want, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	if got := addrsOf(t, ns, iface); !slices.Equal(got, want) {
		t.Errorf("%s has %v, want %v", iface, got, want)
	}
	out := string(ipIn(t, ns, "-d", "link", "show", iface))
	if !strings.Contains(out, "UP") || (dummy && !strings.Contains(out, "dummy")) {
		t.Errorf("%s is not up (or not a dummy interface): %s", iface, out)
	}

	// A restart with nothing changed writes nothing (on lo: but the
	// refused creation of switchman0); one with a service gone removes
	// only its address.
	d = newDriver()
	before := links.writes.Load()
	noErrs(t, "sync after restart", d.Sync(ctx, all))
	if w := links.writes.Load() - before; (dummy && w != 0) || (!dummy && w != 1) {
		t.Errorf("a restart with nothing changed made %d writes", w)
	}
	d = newDriver()
	noErrs(t, "sync with fewer", d.Sync(ctx, states(svc("svcb", vipB, ""))))
	want = append(prefixes("192.0.2.11/32"), hostOwn...)
	slices.SortFunc(want, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	if got := addrsOf(t, ns, iface); !slices.Equal(got, want) {
		t.Errorf("after shrinking, %s has %v, want %v", iface, got, want)
	}
	noErrs(t, "sync with none", d.Sync(ctx, nil))
	if got := addrsOf(t, ns, iface); !slices.Equal(got, hostOwn) {
		t.Errorf("after removing every VIP, %s has %v, want %v", iface, got, hostOwn)
	}
	if got := addrsOf(t, ns, "other0"); !slices.Equal(got, otherBefore) {
		t.Errorf("other0 changed: %v -> %v", otherBefore, got)
	}
}

// TestRealNetnsHALifetime holds a group's addresses in HA mode with a
// lifetime of 1s and no renewal (no Run): the kernel removes them by
// itself, which is what happens to the addresses of an agent killed on a
// living host. Held with Run renewing them, they stay past their
// lifetime.
func TestRealNetnsHALifetime(t *testing.T) {
	ns := newNetns(t)
	ipIn(t, ns, "link", "add", "eth1", "type", "veth", "peer", "name", "peer1")
	ipIn(t, ns, "addr", "add", "10.20.0.11/24", "dev", "eth1")
	ipIn(t, ns, "link", "set", "eth1", "up")
	ipIn(t, ns, "link", "set", "peer1", "up")
	n := vip.NewNetlink("/run/netns/" + ns)
	defer n.Close()
	newDriver := func(lifetime time.Duration) *vip.Driver {
		d, err := vip.New(vip.Config{Links: n, ProcSys: procSys(t, allSysctls("1")), HAInterface: "eth1", Lifetime: lifetime,
			StateDir: t.TempDir(), Announce: func(context.Context, string, []netip.Addr) error { return nil }})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(d.Close)
		return d
	}
	ctx := context.Background()
	crashed := newDriver(time.Second)
	noErrs(t, "sync", crashed.Sync(ctx, states(svc("web", vipA, "g1"))))
	crashed.Hold("g1", true, []spec.GroupAddress{{Address: netip.MustParsePrefix("10.20.0.254/24"), Interface: "eth1"}})
	if got, want := addrsOf(t, ns, "eth1"), prefixes("10.20.0.11/24", "10.20.0.254/24", "192.0.2.10/32"); !slices.Equal(got, want) {
		t.Fatalf("eth1 holds %v, want %v", got, want)
	}
	start := time.Now()
	deadline := start.Add(15 * time.Second)
	for len(addrsOf(t, ns, "eth1")) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("the addresses of a run that stopped renewing are still there after 15s: %v", addrsOf(t, ns, "eth1"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("the kernel removed the addresses %v after the last renewal", time.Since(start).Round(10*time.Millisecond))

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Renewed every second, a 3s lifetime survives a busy machine; an
	// address not renewed would be gone within 4s.
	d := newDriver(3 * time.Second)
	go d.Run(runCtx)
	noErrs(t, "sync", d.Sync(ctx, states(svc("web", vipA, "g1"))))
	d.Hold("g1", true, nil)
	held := time.Now()
	for time.Since(held) < 6*time.Second {
		if !slices.Contains(addrsOf(t, ns, "eth1"), netip.MustParsePrefix("192.0.2.10/32")) {
			t.Fatalf("a held, renewed address went away after %v", time.Since(held))
		}
		time.Sleep(100 * time.Millisecond)
	}
}
