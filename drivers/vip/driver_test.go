package vip_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/switchman-lb/switchman/drivers/vip"
	"github.com/switchman-lb/switchman/drivers/vip/vipfake"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

var (
	vipA = netip.MustParseAddr("192.0.2.10")
	vipB = netip.MustParseAddr("192.0.2.11")
	vip6 = netip.MustParseAddr("2001:db8::10")
	be   = netip.MustParseAddr("10.1.1.1")
)

// procSys makes a fake /proc/sys with the given sysctls (path -> value);
// a path of "-" leaves net/ipv4/vs out, as on a kernel without IPVS.
func procSys(t *testing.T, values map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, v := range values {
		f := filepath.Join(root, filepath.FromSlash(p))
		if err := os.MkdirAll(filepath.Dir(f), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f, []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func allSysctls(v string) map[string]string {
	return map[string]string{
		"net/ipv4/ip_forward":            v,
		"net/ipv6/conf/all/forwarding":   v,
		"net/ipv4/vs/conntrack":          v,
		"net/ipv4/vs/expire_nodest_conn": v,
	}
}

func readSysctl(t *testing.T, root, p string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(p)))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// state builds a desired state with one service per VIP: an IPVS service
// with a NAT destination for the IPv4 ones unless dr, and the v6 one too.
func state(vips ...netip.Addr) *render.State {
	st := &render.State{}
	for i, a := range vips {
		name := "svc" + string(rune('a'+i))
		st.Services = append(st.Services, render.ServiceReport{Name: name, Driver: spec.DriverIPVS, Key: spec.Key{VIP: a, Port: 80, Protocol: spec.TCP}})
		st.IPVS = append(st.IPVS, render.L4Service{Service: name, Protocol: spec.TCP, Address: a, Port: 80, Scheduler: spec.RoundRobin,
			Destinations: []render.L4Destination{{Address: be, Port: 80, Weight: 1, Forwarding: spec.NAT}}})
	}
	st.VIPs = slices.Clone(vips)
	slices.SortFunc(st.VIPs, netip.Addr.Compare)
	st.VIPs = slices.Compact(st.VIPs)
	return st
}

func newDriver(t *testing.T, l vip.Links, root string, log *slog.Logger) *vip.Driver {
	t.Helper()
	d, err := vip.New(vip.Config{Links: l, ProcSys: root, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func TestAddressesLifecycle(t *testing.T) {
	ctx := context.Background()
	l := vipfake.New()
	d := newDriver(t, l, procSys(t, allSysctls("1")), nil)

	// Nothing wanted, no interface: nothing is created.
	if errs := d.Apply(ctx, &render.State{}); len(errs) != 0 || l.Writes() != 0 {
		t.Fatalf("empty state: errors %v, %d writes", errs, l.Writes())
	}
	if exists, _, _ := l.Interface("switchman0"); exists {
		t.Fatal("interface created with no VIP to hold")
	}

	if errs := d.Apply(ctx, state(vipA, vipB, vip6)); len(errs) != 0 {
		t.Fatal(errs)
	}
	exists, up, addrs := l.Interface("switchman0")
	want := prefixes("192.0.2.10/32", "192.0.2.11/32", "2001:db8::10/128", "fe80::1/64")
	if !exists || !up || !slices.Equal(addrs, want) {
		t.Fatalf("switchman0: exists %v up %v addrs %v, want up with %v", exists, up, addrs, want)
	}
	w := l.Writes()
	if errs := d.Apply(ctx, state(vipA, vipB, vip6)); len(errs) != 0 || l.Writes() != w {
		t.Errorf("second apply: errors %v, %d writes, want 0", errs, l.Writes()-w)
	}

	// A stray address on switchman0 goes; loopback is never touched.
	l.AddInterface("switchman0", true, append(want, netip.MustParsePrefix("198.51.100.7/32"))...)
	if errs := d.Apply(ctx, state(vipA)); len(errs) != 0 {
		t.Fatal(errs)
	}
	if _, _, addrs := l.Interface("switchman0"); !slices.Equal(addrs, prefixes("192.0.2.10/32", "fe80::1/64")) {
		t.Errorf("after shrinking: %v", addrs)
	}
	if errs := d.Apply(ctx, &render.State{}); len(errs) != 0 {
		t.Fatal(errs)
	}
	if _, _, addrs := l.Interface("switchman0"); !slices.Equal(addrs, prefixes("fe80::1/64")) {
		t.Errorf("after removing all VIPs: %v (the kernel's link-local must stay)", addrs)
	}
	if _, _, lo := l.Interface("lo"); !slices.Equal(lo, prefixes("127.0.0.1/8")) {
		t.Errorf("lo changed: %v", lo)
	}
}

func TestCustomInterfaceName(t *testing.T) {
	l := vipfake.New()
	d, err := vip.New(vip.Config{Links: l, Interface: "lbvip", ProcSys: procSys(t, allSysctls("1"))})
	if err != nil {
		t.Fatal(err)
	}
	if errs := d.Apply(context.Background(), state(vipA)); len(errs) != 0 {
		t.Fatal(errs)
	}
	if exists, _, addrs := l.Interface("lbvip"); !exists || !slices.Contains(addrs, netip.MustParsePrefix("192.0.2.10/32")) {
		t.Errorf("lbvip: %v %v", exists, addrs)
	}
	if exists, _, _ := l.Interface("switchman0"); exists {
		t.Error("switchman0 created although another name was configured")
	}
	for _, bad := range []string{"a/b", "much-too-long-name0", "a b"} {
		if _, err := vip.New(vip.Config{Links: l, Interface: bad}); err == nil {
			t.Errorf("interface name %q accepted", bad)
		}
	}
}

func TestErrorsMapToServices(t *testing.T) {
	tests := []struct {
		name   string
		method vipfake.Method
		fail   func(netip.Prefix) error
		want   []string // services failing
	}{
		{"one address refused", vipfake.AddAddress, func(p netip.Prefix) error {
			if p.Addr() == vipB {
				return syscall.EPERM
			}
			return nil
		}, []string{"svcb", "svcc"}},
		{"interface cannot be created", vipfake.AddDummy, func(netip.Prefix) error { return syscall.EPERM }, []string{"svca", "svcb", "svcc"}},
		{"addresses cannot be listed", vipfake.Addresses, func(netip.Prefix) error { return syscall.ENOBUFS }, []string{"svca", "svcb", "svcc"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := vipfake.New()
			l.Fail(tt.method, tt.fail)
			d := newDriver(t, l, procSys(t, allSysctls("1")), nil)
			errs := d.Apply(context.Background(), state(vipA, vipB, vipB)) // svcb and svcc share vipB
			var got []string
			for n, err := range errs {
				got = append(got, n)
				if !errors.Is(err, syscall.EPERM) && !errors.Is(err, syscall.ENOBUFS) {
					t.Errorf("%s: %v does not carry the errno", n, err)
				}
			}
			slices.Sort(got)
			if !slices.Equal(got, tt.want) {
				t.Errorf("failing %v, want %v", got, tt.want)
			}
			l.Fail(tt.method, nil)
			if errs := d.Apply(context.Background(), state(vipA, vipB, vipB)); len(errs) != 0 {
				t.Errorf("retry: %v", errs)
			}
		})
	}
}

func TestSysctls(t *testing.T) {
	masq := func(st *render.State) *render.State {
		st.Filters = append(st.Filters, render.Filter{Service: st.IPVS[0].Service, Masquerade: true})
		return st
	}
	dr := func(st *render.State) *render.State {
		for i := range st.IPVS {
			for j := range st.IPVS[i].Destinations {
				st.IPVS[i].Destinations[j].Forwarding = spec.Direct
			}
		}
		return st
	}
	tests := []struct {
		name  string
		state *render.State
		want  map[string]string // sysctl -> value after Apply, from all "0"
	}{
		{"nat v4", state(vipA), map[string]string{"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "0", "net/ipv4/vs/expire_nodest_conn": "1", "net/ipv4/vs/conntrack": "0"}},
		{"nat v6", state(vip6), map[string]string{"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "1", "net/ipv4/vs/expire_nodest_conn": "1", "net/ipv4/vs/conntrack": "0"}},
		{"dr needs no forwarding", dr(state(vipA)), map[string]string{"net/ipv4/ip_forward": "0", "net/ipv4/vs/expire_nodest_conn": "1", "net/ipv4/vs/conntrack": "0"}},
		{"masquerade needs vs conntrack", masq(state(vipA)), map[string]string{"net/ipv4/ip_forward": "1", "net/ipv4/vs/conntrack": "1", "net/ipv4/vs/expire_nodest_conn": "1"}},
		{"no ipvs services: nothing set", &render.State{VIPs: []netip.Addr{vipA}}, map[string]string{"net/ipv4/ip_forward": "0", "net/ipv4/vs/expire_nodest_conn": "0", "net/ipv4/vs/conntrack": "0"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := procSys(t, allSysctls("0"))
			var logs bytes.Buffer
			d := newDriver(t, vipfake.New(), root, slog.New(slog.NewTextHandler(&logs, nil)))
			if errs := d.Apply(context.Background(), tt.state); len(errs) != 0 {
				t.Fatal(errs)
			}
			for p, v := range tt.want {
				if got := readSysctl(t, root, p); got != v {
					t.Errorf("%s = %s, want %s", p, got, v)
				}
			}
			set := strings.Count(logs.String(), "set sysctl")
			logs.Reset()
			if errs := d.Apply(context.Background(), tt.state); len(errs) != 0 {
				t.Fatal(errs)
			}
			if strings.Contains(logs.String(), "set sysctl") {
				t.Errorf("second apply set sysctls again: %s", logs.String())
			}
			ones := 0
			for _, v := range tt.want {
				if v == "1" {
					ones++
				}
			}
			if set != ones {
				t.Errorf("%d 'set sysctl' log lines, want %d", set, ones)
			}
		})
	}
}

func TestNoIPVSSysctlsIsNotFatal(t *testing.T) {
	root := procSys(t, map[string]string{"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0"})
	l := vipfake.New()
	d := newDriver(t, l, root, nil)
	if errs := d.Apply(context.Background(), state(vipA)); len(errs) != 0 {
		t.Fatalf("without /proc/sys/net/ipv4/vs: %v", errs)
	}
	if _, _, addrs := l.Interface("switchman0"); !slices.Contains(addrs, netip.MustParsePrefix("192.0.2.10/32")) {
		t.Errorf("VIP not added: %v", addrs)
	}
	if readSysctl(t, root, "net/ipv4/ip_forward") != "1" {
		t.Error("ip_forward not set")
	}
}

func TestMissingForwardingSysctlFailsNATServices(t *testing.T) {
	root := procSys(t, map[string]string{"net/ipv4/vs/conntrack": "1", "net/ipv4/vs/expire_nodest_conn": "1", "net/ipv6/conf/all/forwarding": "1"})
	d := newDriver(t, vipfake.New(), root, nil)
	errs := d.Apply(context.Background(), state(vipA, vip6))
	if len(errs) != 1 || !errors.Is(errs["svca"], os.ErrNotExist) || !strings.Contains(errs["svca"].Error(), "net.ipv4.ip_forward") {
		t.Errorf("errors %v, want only svca failing on net.ipv4.ip_forward", errs)
	}
}
