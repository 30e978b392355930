package netfilter

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/internal/netns"
	"github.com/switchman-lb/switchman/internal/netnstest"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// These tests run the real iptables and ip6tables (go-iptables) inside
// network namespaces they create, named swm-nf-*, and remove afterwards.
// Traffic stays inside those namespaces.

func requireNetns(t testing.TB) {
	t.Helper()
	netnstest.Require(t, "iptables", "ip6tables")
}

func randomHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// newNetns creates a network namespace swm-nf-ROLE-*, removed when the
// test ends.
func newNetns(t testing.TB, role string) string {
	t.Helper()
	return netnstest.New(t, "swm-nf", role)
}

// counting counts the writes to the real tables.
type counting struct {
	Tables
	writes, reads int
}

func (c *counting) ListTable(table string) ([]string, error) {
	c.reads++
	return c.Tables.ListTable(table)
}

func (c *counting) NewChain(table, chain string) error {
	c.writes++
	return c.Tables.NewChain(table, chain)
}

func (c *counting) DeleteChain(table, chain string) error {
	c.writes++
	return c.Tables.DeleteChain(table, chain)
}

func (c *counting) Append(table, chain string, rule ...string) error {
	c.writes++
	return c.Tables.Append(table, chain, rule...)
}

func (c *counting) Insert(table, chain string, pos int, rule ...string) error {
	c.writes++
	return c.Tables.Insert(table, chain, pos, rule...)
}

func (c *counting) Delete(table, chain string, rule ...string) error {
	c.writes++
	return c.Tables.Delete(table, chain, rule...)
}

// realDriver is a driver over the real binaries that counts writes.
type realDriver struct {
	d      *Driver
	tables [2]*counting
}

func newRealDriver(t testing.TB) *realDriver {
	rd := &realDriver{}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	rd.d = newDriver(log, func(v6 bool) (Tables, error) {
		tb, err := openIPTables(v6)
		if err != nil {
			return nil, err
		}
		i := 0
		if v6 {
			i = 1
		}
		rd.tables[i] = &counting{Tables: tb}
		return rd.tables[i], nil
	})
	return rd
}

func (rd *realDriver) writes() int {
	n := 0
	for _, c := range rd.tables {
		if c != nil {
			n += c.writes
		}
	}
	return n
}

func (rd *realDriver) reads() int {
	n := 0
	for _, c := range rd.tables {
		if c != nil {
			n += c.reads
		}
	}
	return n
}

// apply runs Apply inside the namespace and fails the test on any error.
func (rd *realDriver) apply(t testing.TB, ns string, filters ...render.Filter) {
	t.Helper()
	var errs map[string]error
	if err := netns.Do(ns, func() error {
		errs = rd.d.Sync(context.Background(), states(filters...))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(errs) > 0 {
		t.Fatalf("Apply: %v", errs)
	}
}

// chainRules lists one chain inside the namespace with the iptables binary
// itself, as the -A lines without "-A CHAIN ".
func chainRules(t *testing.T, ns, bin, table, chain string) []string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(netnstest.Exec(t, ns, bin, "-w", "-t", table, "-S", chain), "\n") {
		if rest, ok := strings.CutPrefix(line, "-A "+chain+" "); ok {
			out = append(out, strings.ReplaceAll(rest, `"`, ""))
		}
	}
	return out
}

func TestNetnsRules(t *testing.T) {
	requireNetns(t)
	ns := newNetns(t, "rules")
	ipt := func(bin string, args ...string) {
		netnstest.Exec(t, ns, append([]string{bin, "-w"}, args...)...)
	}
	// Rules that are not ours.
	for _, bin := range []string{"iptables", "ip6tables"} {
		ipt(bin, "-N", "FOREIGN")
		ipt(bin, "-A", "FOREIGN", "-j", "DROP")
		ipt(bin, "-t", "nat", "-N", "FOREIGN-NAT")
	}
	ipt("iptables", "-A", "INPUT", "-s", "203.0.113.9/32", "-j", "ACCEPT")
	ipt("ip6tables", "-A", "INPUT", "-s", "2001:db8:9::9/128", "-j", "ACCEPT")
	ipt("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.9.0.0/16", "-j", "MASQUERADE")
	hostBefore := netnstest.Run(t, "iptables", "-w", "-S")

	web := "web-" + randomHex(t, 3) // unique, to check the host's tables
	filters := []render.Filter{
		allow(web, "192.0.2.10", 443, "198.51.100.0/24", "10.0.0.0/8"),
		{Service: "dns", Protocol: spec.UDP, VIP: netip.MustParseAddr("2001:db8::53"), Port: 53, AllowCIDRs: prefixes("2001:db8:1::/48")},
		masq("api", "192.0.2.11", 80, "10.1.1.2:8080", "10.1.1.3:8080"),
		masq("api6", "2001:db8::11", 80, "[2001:db8:2::2]:8080"),
	}
	rd := newRealDriver(t)
	rd.apply(t, ns, filters...)

	want := []struct {
		bin, table, chain string
		rules             []string
	}{
		{"iptables", "filter", "INPUT", []string{"-m comment --comment switchman -j SWITCHMAN-FILTER", "-s 203.0.113.9/32 -j ACCEPT"}},
		{"iptables", "filter", "SWITCHMAN-FILTER", []string{"-d 192.0.2.10/32 -p tcp -m tcp --dport 443 -m comment --comment switchman:" + web + " -j " + serviceChain(web)}},
		{"iptables", "filter", serviceChain(web), []string{
			"-s 10.0.0.0/8 -m comment --comment switchman:" + web + " -j RETURN",
			"-s 198.51.100.0/24 -m comment --comment switchman:" + web + " -j RETURN",
			"-m comment --comment switchman:" + web + " -j DROP",
		}},
		{"iptables", "filter", "FOREIGN", []string{"-j DROP"}},
		{"iptables", "nat", "POSTROUTING", []string{"-m comment --comment switchman -j SWITCHMAN-POSTROUTING", "-s 10.9.0.0/16 -j MASQUERADE"}},
		{"iptables", "nat", "SWITCHMAN-POSTROUTING", []string{
			"-d 10.1.1.2/32 -p tcp -m tcp --dport 8080 -m conntrack --ctorigdst 192.0.2.11 --ctorigdstport 80 -m comment --comment switchman:api -j MASQUERADE",
			"-d 10.1.1.3/32 -p tcp -m tcp --dport 8080 -m conntrack --ctorigdst 192.0.2.11 --ctorigdstport 80 -m comment --comment switchman:api -j MASQUERADE",
		}},
		{"ip6tables", "filter", "INPUT", []string{"-m comment --comment switchman -j SWITCHMAN-FILTER", "-s 2001:db8:9::9/128 -j ACCEPT"}},
		{"ip6tables", "filter", "SWITCHMAN-FILTER", []string{"-d 2001:db8::53/128 -p udp -m udp --dport 53 -m comment --comment switchman:dns -j " + serviceChain("dns")}},
		{"ip6tables", "filter", serviceChain("dns"), []string{
			"-s 2001:db8:1::/48 -m comment --comment switchman:dns -j RETURN",
			"-m comment --comment switchman:dns -j DROP",
		}},
		{"ip6tables", "nat", "SWITCHMAN-POSTROUTING", []string{
			"-d 2001:db8:2::2/128 -p tcp -m tcp --dport 8080 -m conntrack --ctorigdst 2001:db8::11 --ctorigdstport 80 -m comment --comment switchman:api6 -j MASQUERADE",
		}},
	}
	for _, w := range want {
		equalLines(t, w.bin+" "+w.table+"/"+w.chain, chainRules(t, ns, w.bin, w.table, w.chain), w.rules)
	}
	if strings.Contains(netnstest.Run(t, "iptables", "-w", "-S"), serviceChain(web)) || netnstest.Run(t, "iptables", "-w", "-S") != hostBefore {
		t.Fatal("the host's own iptables changed: the driver did not run inside the namespace")
	}

	// A second reconcile changes nothing.
	dump := func() string {
		var b strings.Builder
		for _, bin := range []string{"iptables", "ip6tables"} {
			for _, table := range []string{"filter", "nat"} {
				b.WriteString(netnstest.Exec(t, ns, bin, "-w", "-t", table, "-S"))
			}
		}
		return b.String()
	}
	before, writes, reads := dump(), rd.writes(), rd.reads()
	rd.apply(t, ns, filters...)
	if n := rd.writes() - writes; n != 0 {
		t.Errorf("second Apply made %d writes", n)
	}
	if n := rd.reads() - reads; n != 4 {
		t.Errorf("second Apply read %d times, want 4 (filter and nat, two families)", n)
	}
	if after := dump(); after != before {
		t.Errorf("second Apply changed the rules:\nbefore:\n%s\nafter:\n%s", before, after)
	}

	// A new driver (an agent restart) over the same rules writes nothing.
	rd2 := newRealDriver(t)
	rd2.apply(t, ns, filters...)
	if rd2.writes() != 0 {
		t.Errorf("Apply after a restart made %d writes", rd2.writes())
	}

	// Change one range: one insert, one delete.
	filters[0] = allow(web, "192.0.2.10", 443, "172.16.0.0/12", "10.0.0.0/8")
	writes = rd.writes()
	rd.apply(t, ns, filters...)
	if n := rd.writes() - writes; n != 2 {
		t.Errorf("changing one range made %d writes, want 2", n)
	}
	equalLines(t, "changed chain", chainRules(t, ns, "iptables", "filter", serviceChain(web)), []string{
		"-s 10.0.0.0/8 -m comment --comment switchman:" + web + " -j RETURN",
		"-s 172.16.0.0/12 -m comment --comment switchman:" + web + " -j RETURN",
		"-m comment --comment switchman:" + web + " -j DROP",
	})

	// The incremental path on real iptables: a new driver (nothing known)
	// applies one service's change after reading it back; then a removal
	// through Apply takes the jump out before the chain.
	rd3 := newRealDriver(t)
	filters[0] = allow(web, "192.0.2.10", 443, "198.51.100.0/24")
	var errs map[string]error
	if err := netns.Do(ns, func() error {
		errs = rd3.d.Apply(context.Background(), states(filters[0]))
		return nil
	}); err != nil || len(errs) > 0 {
		t.Fatalf("Apply: %v %v", err, errs)
	}
	equalLines(t, "chain after Apply", chainRules(t, ns, "iptables", "filter", serviceChain(web)), []string{
		"-s 198.51.100.0/24 -m comment --comment switchman:" + web + " -j RETURN",
		"-m comment --comment switchman:" + web + " -j DROP",
	})
	if err := netns.Do(ns, func() error {
		errs = rd3.d.Apply(context.Background(), []*render.ServiceState{{Name: web}})
		return nil
	}); err != nil || len(errs) > 0 {
		t.Fatalf("Apply removal: %v %v", err, errs)
	}
	if strings.Contains(dump(), "switchman:"+web) {
		t.Errorf("%s left after its removal through Apply:\n%s", web, dump())
	}
	filters = filters[1:]

	// Removal: everything of ours goes but the base chains and jumps.
	rd.apply(t, ns)
	all := dump()
	for _, gone := range []string{serviceChainPrefix, "switchman:"} {
		if strings.Contains(all, gone) {
			t.Errorf("%q left after removal:\n%s", gone, all)
		}
	}
	for _, w := range []struct{ bin, table, chain, rule string }{
		{"iptables", "filter", "INPUT", "-s 203.0.113.9/32 -j ACCEPT"},
		{"iptables", "filter", "FOREIGN", "-j DROP"},
		{"iptables", "nat", "POSTROUTING", "-s 10.9.0.0/16 -j MASQUERADE"},
		{"ip6tables", "filter", "INPUT", "-s 2001:db8:9::9/128 -j ACCEPT"},
		{"ip6tables", "filter", "FOREIGN", "-j DROP"},
	} {
		if !slices.Contains(chainRules(t, ns, w.bin, w.table, w.chain), w.rule) {
			t.Errorf("foreign rule %s %s/%s %q did not survive", w.bin, w.table, w.chain, w.rule)
		}
	}
	for _, bin := range []string{"iptables", "ip6tables"} {
		if !strings.Contains(netnstest.Exec(t, ns, bin, "-w", "-t", "nat", "-S"), "-N FOREIGN-NAT") {
			t.Errorf("%s: foreign chain FOREIGN-NAT did not survive", bin)
		}
	}
}

// dialFrom connects from src (inside ns) to dst and returns what the
// server wrote, or the error.
func dialFrom(ns string, src netip.Addr, dst netip.AddrPort, timeout time.Duration) (string, error) {
	var got string
	err := netns.Do(ns, func() error {
		d := net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
		c, err := d.Dial("tcp", dst.String())
		if err != nil {
			return err
		}
		defer c.Close()
		if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
			return err
		}
		b, err := io.ReadAll(c)
		got = string(b)
		return err
	})
	return got, err
}

// eventually polls dial until it succeeds or the deadline passes.
func eventually(t *testing.T, what string, dial func() (string, error)) string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		got, err := dial()
		if err == nil {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after 20s: %v", what, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// blocked asserts that a connection attempt times out (dropped), rather
// than being refused or succeeding.
func blocked(t *testing.T, what string, dial func() (string, error)) {
	t.Helper()
	_, err := dial()
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("%s: got %v, want a timeout", what, err)
	}
}

// serve accepts on a listener made inside ns and writes the peer's
// address to every connection.
func serve(t *testing.T, ns string, addr netip.AddrPort) {
	t.Helper()
	var ln net.Listener
	if err := netns.Do(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(c, c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap().String())
			c.Close()
		}
	}()
}

// TestNetnsTraffic shows allow_cidrs at work on real traffic: a client
// namespace with one address inside and one outside the allowed range
// talks through a veth pair to a listener on the VIP in an "lb" namespace.
func TestNetnsTraffic(t *testing.T) {
	requireNetns(t)
	lb, client := newNetns(t, "lb"), newNetns(t, "cl")
	netnstest.IP(t, "-n", client, "link", "add", "c0", "type", "veth", "peer", "name", "l0", "netns", lb)
	netnstest.IP(t, "-n", lb, "addr", "add", "192.0.2.1/24", "dev", "l0")
	netnstest.IP(t, "-n", lb, "addr", "add", "2001:db8:c::1/64", "dev", "l0", "nodad")
	netnstest.IP(t, "-n", lb, "addr", "add", "198.51.100.10/32", "dev", "lo")
	netnstest.IP(t, "-n", lb, "addr", "add", "2001:db8:f::10/128", "dev", "lo")
	netnstest.IP(t, "-n", lb, "link", "set", "l0", "up")
	netnstest.IP(t, "-n", client, "addr", "add", "192.0.2.2/24", "dev", "c0")
	netnstest.IP(t, "-n", client, "addr", "add", "192.0.2.130/24", "dev", "c0")
	netnstest.IP(t, "-n", client, "addr", "add", "2001:db8:c::2/64", "dev", "c0", "nodad")
	netnstest.IP(t, "-n", client, "addr", "add", "2001:db8:c::82/64", "dev", "c0", "nodad")
	netnstest.IP(t, "-n", client, "link", "set", "c0", "up")
	netnstest.IP(t, "-n", client, "route", "add", "198.51.100.0/24", "via", "192.0.2.1")
	netnstest.IP(t, "-n", client, "-6", "route", "add", "2001:db8:f::/64", "via", "2001:db8:c::1")

	cases := []struct {
		name    string
		vip     netip.AddrPort
		allowed string // the range
		in, out netip.Addr
	}{
		{name: "ipv4", vip: netip.MustParseAddrPort("198.51.100.10:8080"), allowed: "192.0.2.0/25",
			in: netip.MustParseAddr("192.0.2.2"), out: netip.MustParseAddr("192.0.2.130")},
		{name: "ipv6", vip: netip.MustParseAddrPort("[2001:db8:f::10]:8080"), allowed: "2001:db8:c::/121",
			in: netip.MustParseAddr("2001:db8:c::2"), out: netip.MustParseAddr("2001:db8:c::82")},
	}
	var filters []render.Filter
	for _, c := range cases {
		serve(t, lb, c.vip)
		filters = append(filters, allow("svc-"+c.name, c.vip.Addr().String(), c.vip.Port(), c.allowed))
	}
	dial := func(src netip.Addr, dst netip.AddrPort, timeout time.Duration) func() (string, error) {
		return func() (string, error) { return dialFrom(client, src, dst, timeout) }
	}
	// Before any rule, both sources get through (the setup works).
	for _, c := range cases {
		for _, src := range []netip.Addr{c.in, c.out} {
			if got := eventually(t, c.name+" before rules from "+src.String(), dial(src, c.vip, 2*time.Second)); got != src.String() {
				t.Errorf("%s: server saw %q, want %s", c.name, got, src)
			}
		}
	}
	rd := newRealDriver(t)
	rd.apply(t, lb, filters...)
	for _, c := range cases {
		eventually(t, c.name+" allowed source", dial(c.in, c.vip, 2*time.Second))
		blocked(t, c.name+" source outside allow_cidrs", dial(c.out, c.vip, time.Second))
	}
	// The service is removed: everyone gets through again.
	rd.apply(t, lb)
	for _, c := range cases {
		eventually(t, c.name+" after removal", dial(c.out, c.vip, 2*time.Second))
	}
}

// TestNetnsMasquerade checks the masquerade rule on real traffic. The
// kernel here has no IPVS, so a DNAT rule in nat PREROUTING (not ours)
// stands in for it: like IPVS with net.ipv4.vs.conntrack=1, it leaves a
// conntrack entry whose original destination is VIP:port while the packet
// goes to the backend. The backend has no route back to the client, so a
// connection works only when masqueraded, and the backend sees the load
// balancer's address.
func TestNetnsMasquerade(t *testing.T) {
	requireNetns(t)
	lb, client, backend := newNetns(t, "lb"), newNetns(t, "cl"), newNetns(t, "be")
	netnstest.IP(t, "-n", client, "link", "add", "c0", "type", "veth", "peer", "name", "l0", "netns", lb)
	netnstest.IP(t, "-n", backend, "link", "add", "b0", "type", "veth", "peer", "name", "l1", "netns", lb)
	netnstest.IP(t, "-n", lb, "addr", "add", "192.0.2.1/24", "dev", "l0")
	netnstest.IP(t, "-n", lb, "addr", "add", "203.0.113.1/24", "dev", "l1")
	netnstest.IP(t, "-n", client, "addr", "add", "192.0.2.2/24", "dev", "c0")
	netnstest.IP(t, "-n", backend, "addr", "add", "203.0.113.2/24", "dev", "b0")
	for ns, dev := range map[string]string{lb: "l0", client: "c0", backend: "b0"} {
		netnstest.IP(t, "-n", ns, "link", "set", dev, "up")
	}
	netnstest.IP(t, "-n", lb, "link", "set", "l1", "up")
	netnstest.IP(t, "-n", client, "route", "add", "198.51.100.0/24", "via", "192.0.2.1")
	netnstest.Exec(t, lb, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
	vip := netip.MustParseAddrPort("198.51.100.20:80")
	be := netip.MustParseAddrPort("203.0.113.2:8080")
	netnstest.Exec(t, lb, "iptables", "-w", "-t", "nat", "-A", "PREROUTING",
		"-d", vip.Addr().String(), "-p", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination", be.String())
	serve(t, backend, be)
	src := netip.MustParseAddr("192.0.2.2")
	dial := func(timeout time.Duration) func() (string, error) {
		return func() (string, error) { return dialFrom(client, src, vip, timeout) }
	}
	// The backend itself is up (reachable from the lb's own address).
	eventually(t, "backend from the lb", func() (string, error) { return dialFrom(lb, netip.MustParseAddr("203.0.113.1"), be, 2*time.Second) })
	// Without masquerade the backend cannot answer the client.
	blocked(t, "before masquerade", dial(time.Second))

	rd := newRealDriver(t)
	f := masq("api", vip.Addr().String(), vip.Port(), be.String())
	rd.apply(t, lb, f)
	if got := eventually(t, "masqueraded", dial(2*time.Second)); got != "203.0.113.1" {
		t.Errorf("backend saw the client as %q, want the lb's 203.0.113.1", got)
	}
	// A rule for another backend port does not masquerade this one.
	rd.apply(t, lb, masq("api", vip.Addr().String(), vip.Port(), "203.0.113.2:9090"))
	blocked(t, "masquerade for another backend port", dial(time.Second))
	rd.apply(t, lb)
	blocked(t, "after removal", dial(time.Second))
}

// BenchmarkNetnsApplyUnchanged measures an Apply that finds nothing to
// change, with 500 services with two allowed ranges each (1,500 rules in
// 501 chains): the cost the agent pays on every reconcile.
func BenchmarkNetnsApplyUnchanged(b *testing.B) {
	requireNetns(b)
	ns := newNetns(b, "bench")
	var filters []render.Filter
	for i := range 500 {
		vip := netip.AddrFrom4([4]byte{198, 18, byte(i / 250), byte(i%250 + 1)})
		filters = append(filters, allow(fmt.Sprintf("svc-%d", i), vip.String(), 443, "192.0.2.0/24", "198.51.100.0/24"))
	}
	rd := newRealDriver(b)
	rd.apply(b, ns, filters...)
	writes := rd.writes()
	b.ResetTimer()
	for range b.N {
		rd.apply(b, ns, filters...)
	}
	b.StopTimer()
	if n := rd.writes() - writes; n != 0 {
		b.Fatalf("unchanged Apply made %d writes", n)
	}
}
