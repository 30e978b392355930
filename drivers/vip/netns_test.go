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

	"github.com/switchman-lb/switchman/drivers/vip"
	"github.com/switchman-lb/switchman/render"
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

func (c *countingLinks) AddAddress(ctx context.Context, name string, p netip.Prefix) error {
	c.writes.Add(1)
	return c.Netlink.AddAddress(ctx, name, p)
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
// hosts have no CONFIG_DUMMY) the test gives it a veth named switchman0,
// which exercises everything but the creation.
func TestRealNetnsVIPs(t *testing.T) {
	ns := newNetns(t)
	ipIn(t, ns, "link", "add", "other0", "type", "veth", "peer", "name", "other1")
	ipIn(t, ns, "addr", "add", "198.51.100.1/24", "dev", "other0")
	ipIn(t, ns, "link", "set", "other0", "up")
	otherBefore := addrsOf(t, ns, "other0")

	dummy := exec.Command("ip", "-n", ns, "link", "add", "probe0", "type", "dummy").Run() == nil
	if dummy {
		ipIn(t, ns, "link", "del", "probe0")
	} else {
		t.Log("this kernel cannot create dummy interfaces: testing on a veth named switchman0 made beforehand")
		ipIn(t, ns, "link", "add", "switchman0", "type", "veth", "peer", "name", "switchman1")
	}

	n := vip.NewNetlink("/run/netns/" + ns)
	defer n.Close()
	links := &countingLinks{Netlink: n}
	d, err := vip.New(vip.Config{Links: links, ProcSys: procSys(t, allSysctls("1"))})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	st := state(vipA, vipB, vip6)
	if errs := d.Apply(ctx, st); len(errs) != 0 {
		t.Fatal(errs)
	}
	want := prefixes("192.0.2.10/32", "192.0.2.11/32", "2001:db8::10/128")
	if got := addrsOf(t, ns, "switchman0"); !slices.Equal(got, want) {
		t.Errorf("switchman0 has %v, want %v", got, want)
	}
	out := string(ipIn(t, ns, "-d", "link", "show", "switchman0"))
	if !strings.Contains(out, "UP") || (dummy && !strings.Contains(out, "dummy")) {
		t.Errorf("switchman0 is not an up dummy interface: %s", out)
	}
	before := links.writes.Load()
	if errs := d.Apply(ctx, st); len(errs) != 0 {
		t.Fatal(errs)
	}
	if w := links.writes.Load() - before; w != 0 {
		t.Errorf("second apply made %d writes, want 0", w)
	}
	if errs := d.Apply(ctx, state(vipB)); len(errs) != 0 {
		t.Fatal(errs)
	}
	if got := addrsOf(t, ns, "switchman0"); !slices.Equal(got, prefixes("192.0.2.11/32")) {
		t.Errorf("after shrinking, switchman0 has %v", got)
	}
	if errs := d.Apply(ctx, &render.State{}); len(errs) != 0 {
		t.Fatal(errs)
	}
	if got := addrsOf(t, ns, "switchman0"); len(got) != 0 {
		t.Errorf("after removing every VIP, switchman0 has %v", got)
	}
	if got := addrsOf(t, ns, "other0"); !slices.Equal(got, otherBefore) {
		t.Errorf("other0 changed: %v -> %v", otherBefore, got)
	}
}

// TestRealNetnsNoDummySupport checks the error a kernel without dummy
// interfaces gives: it must say what is missing.
func TestRealNetnsNoDummySupport(t *testing.T) {
	ns := newNetns(t)
	if exec.Command("ip", "-n", ns, "link", "add", "probe0", "type", "dummy").Run() == nil {
		t.Skip("this kernel has dummy interfaces")
	}
	n := vip.NewNetlink("/run/netns/" + ns)
	defer n.Close()
	d, err := vip.New(vip.Config{Links: n, ProcSys: procSys(t, allSysctls("1"))})
	if err != nil {
		t.Fatal(err)
	}
	errs := d.Apply(context.Background(), state(vipA))
	if err := errs["svca"]; err == nil || !strings.Contains(err.Error(), "CONFIG_DUMMY") {
		t.Errorf("error %v, want one naming CONFIG_DUMMY", err)
	}
}
