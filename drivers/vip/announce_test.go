package vip_test

import (
	"context"
	"net"
	"net/netip"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/switchman-lb/switchman/drivers/vip"
)

// inNetns runs f on a thread inside the named network namespace. The
// thread is never handed back to the runtime, so it cannot leak the
// namespace to other goroutines.
func inNetns(t *testing.T, ns string, f func() error) error {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // no Unlock: the thread ends with the goroutine
		h, err := netns.GetFromPath("/run/netns/" + ns)
		if err != nil {
			errc <- err
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			errc <- err
			return
		}
		errc <- f()
	}()
	return <-errc
}

// neighbour returns the link-layer address ns holds for addr on dev.
func neighbour(t *testing.T, ns, dev, addr string) string {
	t.Helper()
	out := string(ipIn(t, ns, "neigh", "show", addr, "dev", dev))
	f := strings.Fields(out)
	for i, w := range f {
		if w == "lladdr" && i+1 < len(f) {
			return f[i+1]
		}
	}
	return ""
}

// TestRealNetnsAnnounce moves an address between "hosts" the way a
// takeover does: a neighbour still has the old owner's MAC for the IPv4
// and the IPv6 address; after Announce from the new owner its neighbour
// table has the new owner's MAC.
func TestRealNetnsAnnounce(t *testing.T) {
	owner, client := newNetns(t), newNetns(t)
	for _, ns := range []string{owner, client} {
		if out, err := exec.Command("ip", "netns", "exec", ns, "sh", "-c",
			"echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad; echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad").CombinedOutput(); err != nil {
			t.Fatalf("disable DAD in %s: %v: %s", ns, err, out)
		}
	}
	ipIn(t, owner, "link", "add", "lb0", "type", "veth", "peer", "name", "cl0", "netns", client)
	ipIn(t, owner, "addr", "add", "198.51.100.1/24", "dev", "lb0")
	ipIn(t, owner, "addr", "add", "198.51.100.10/32", "dev", "lb0")
	ipIn(t, owner, "addr", "add", "2001:db8:99::10/64", "dev", "lb0", "nodad")
	ipIn(t, owner, "link", "set", "lb0", "up")
	ipIn(t, client, "addr", "add", "198.51.100.2/24", "dev", "cl0")
	ipIn(t, client, "addr", "add", "2001:db8:99::2/64", "dev", "cl0", "nodad")
	ipIn(t, client, "link", "set", "cl0", "up")
	const old = "02:00:00:00:00:01"
	ipIn(t, client, "neigh", "replace", "198.51.100.10", "lladdr", old, "dev", "cl0", "nud", "stale")
	ipIn(t, client, "neigh", "replace", "2001:db8:99::10", "lladdr", old, "dev", "cl0", "nud", "stale")

	var mac string
	if err := inNetns(t, owner, func() error {
		ifi, err := net.InterfaceByName("lb0")
		if err != nil {
			return err
		}
		mac = ifi.HardwareAddr.String()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"198.51.100.10", "2001:db8:99::10"} {
		if got := neighbour(t, client, "cl0", a); got != old {
			t.Fatalf("before the announcement the client has %q for %s, want the old %s", got, a, old)
		}
	}
	// IPv6 is ready on each side once its link-local address is there
	// (the sender needs it as its source; the receiver drops multicast
	// until its routes for it are in).
	for _, side := range [][2]string{{owner, "lb0"}, {client, "cl0"}} {
		deadline := time.Now().Add(10 * time.Second)
		for !strings.Contains(string(ipIn(t, side[0], "-6", "addr", "show", "dev", side[1], "scope", "link")), "fe80") {
			if time.Now().After(deadline) {
				t.Fatalf("no link-local address on %s", side[1])
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(string(ipIn(t, client, "-6", "route", "show", "table", "local", "dev", "cl0")), "ff00::/8") {
		if time.Now().After(deadline) {
			t.Fatal("no multicast route on cl0")
		}
		time.Sleep(10 * time.Millisecond)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs := []netip.Addr{netip.MustParseAddr("198.51.100.10"), netip.MustParseAddr("2001:db8:99::10")}
	if err := inNetns(t, owner, func() error {
		return vip.AnnounceOn(ctx, "lb0", addrs, []time.Duration{0, 100 * time.Millisecond, 500 * time.Millisecond, time.Second})
	}); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"198.51.100.10", "2001:db8:99::10"} {
		deadline := time.Now().Add(5 * time.Second)
		for neighbour(t, client, "cl0", a) != mac {
			if time.Now().After(deadline) {
				t.Fatalf("after the announcement the client has %q for %s, want %s", neighbour(t, client, "cl0", a), a, mac)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// TestAnnounceErrors: a missing interface is an error naming it.
func TestAnnounceErrors(t *testing.T) {
	err := vip.Announce(context.Background(), "no-such-if0", []netip.Addr{netip.MustParseAddr("192.0.2.1")})
	if err == nil || !strings.Contains(err.Error(), "no-such-if0") {
		t.Fatalf("error %v does not name the interface", err)
	}
}
