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
)

var (
	vipA = netip.MustParseAddr("192.0.2.10")
	vipB = netip.MustParseAddr("192.0.2.11")
	vip6 = netip.MustParseAddr("2001:db8::10")
)

// procSys makes a fake /proc/sys with the given sysctls (path -> value).
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
		"net/ipv4/ip_nonlocal_bind":      v,
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

// svc is the state of one service holding vip in group ("" for
// "default"), needing the given sysctls.
func svc(name string, vip netip.Addr, group string, sysctls ...string) *render.ServiceState {
	if group == "" {
		group = "default"
	}
	return &render.ServiceState{Name: name, VIP: vip, Group: group, Sysctls: sysctls}
}

// gone is the state that removes a service.
func gone(name string) *render.ServiceState { return &render.ServiceState{Name: name} }

func states(s ...*render.ServiceState) []*render.ServiceState { return s }

type fixture struct {
	t     *testing.T
	links *vipfake.Links
	root  string
	dir   string
	logs  *bytes.Buffer
}

func newFixture(t *testing.T) *fixture {
	return &fixture{t: t, links: vipfake.New(), root: procSys(t, allSysctls("1")), dir: t.TempDir(), logs: &bytes.Buffer{}}
}

func (f *fixture) driver(mod func(*vip.Config)) *vip.Driver {
	f.t.Helper()
	cfg := vip.Config{Links: f.links, ProcSys: f.root, StateDir: f.dir, Logger: slog.New(slog.NewTextHandler(f.logs, nil))}
	if mod != nil {
		mod(&cfg)
	}
	d, err := vip.New(cfg)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(d.Close)
	return d
}

func (f *fixture) addrs(iface string) []netip.Prefix {
	_, _, a := f.links.Interface(iface)
	return a
}

func prefixes(ss ...string) []netip.Prefix {
	out := []netip.Prefix{}
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	slices.SortFunc(out, func(x, y netip.Prefix) int { return x.Addr().Compare(y.Addr()) })
	return out
}

func noErrs(t *testing.T, what string, errs map[string]error) {
	t.Helper()
	if len(errs) != 0 {
		t.Fatalf("%s: %v", what, errs)
	}
}

func TestSingleHostLifecycle(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	d := f.driver(nil)

	// Nothing wanted, no interface: nothing is created.
	noErrs(t, "empty sync", d.Sync(ctx, nil))
	if exists, _, _ := f.links.Interface("switchman0"); exists || f.links.Writes() != 0 {
		t.Fatalf("interface created (%v) or %d writes with no VIP to hold", exists, f.links.Writes())
	}

	// svcb and svcc share vipB: one address, held while either wants it.
	noErrs(t, "apply", d.Apply(ctx, states(svc("svca", vipA, ""), svc("svcb", vipB, ""), svc("svcc", vipB, ""), svc("svcd", vip6, ""))))
	exists, up, _ := f.links.Interface("switchman0")
	want := prefixes("192.0.2.10/32", "192.0.2.11/32", "2001:db8::10/128", "fe80::1/64")
	if got := f.addrs("switchman0"); !exists || !up || !slices.Equal(got, want) {
		t.Fatalf("switchman0: exists %v up %v addrs %v, want up with %v", exists, up, got, want)
	}
	if f.links.Lifetime("switchman0", netip.MustParsePrefix("192.0.2.10/32")) != 0 {
		t.Error("a single-host VIP has a lifetime")
	}
	w := f.links.Writes()
	noErrs(t, "same again", d.Apply(ctx, states(svc("svcb", vipB, ""))))
	noErrs(t, "sync", d.Sync(ctx, states(svc("svca", vipA, ""), svc("svcb", vipB, ""), svc("svcc", vipB, ""), svc("svcd", vip6, ""))))
	if f.links.Writes() != w {
		t.Errorf("repeated apply and a sync with nothing changed made %d writes", f.links.Writes()-w)
	}

	noErrs(t, "remove svcb", d.Apply(ctx, states(gone("svcb"))))
	if !slices.Contains(f.addrs("switchman0"), netip.MustParsePrefix("192.0.2.11/32")) {
		t.Error("vipB removed while svcc still uses it")
	}
	noErrs(t, "remove svcc", d.Apply(ctx, states(gone("svcc"))))
	if slices.Contains(f.addrs("switchman0"), netip.MustParsePrefix("192.0.2.11/32")) {
		t.Error("vipB kept after its last service went")
	}

	// Sync repairs: a stray address on switchman0 goes, a missing VIP
	// comes back; lo is never touched.
	f.links.AddInterface("switchman0", true, append(prefixes("192.0.2.10/32", "fe80::1/64"), netip.MustParsePrefix("198.51.100.7/32"))...)
	noErrs(t, "repair", d.Sync(ctx, states(svc("svca", vipA, ""), svc("svcd", vip6, ""))))
	if got, want := f.addrs("switchman0"), prefixes("192.0.2.10/32", "2001:db8::10/128", "fe80::1/64"); !slices.Equal(got, want) {
		t.Errorf("after the repair: %v, want %v", got, want)
	}
	noErrs(t, "all gone", d.Sync(ctx, nil))
	if got := f.addrs("switchman0"); !slices.Equal(got, prefixes("fe80::1/64")) {
		t.Errorf("after removing all VIPs: %v (the kernel's link-local must stay)", got)
	}
	if got := f.addrs("lo"); !slices.Equal(got, prefixes("127.0.0.1/8")) {
		t.Errorf("lo changed: %v", got)
	}
}

// TestApplyReadsNothing: the incremental path never lists addresses, and
// touches only the services it is given.
func TestApplyReadsNothing(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	d := f.driver(nil)
	noErrs(t, "apply a", d.Apply(ctx, states(svc("svca", vipA, ""))))
	f.links.Fail(vipfake.Addresses, func(netip.Prefix) error { return syscall.EIO })
	noErrs(t, "apply b", d.Apply(ctx, states(svc("svcb", vipB, ""))))
	noErrs(t, "remove a", d.Apply(ctx, states(gone("svca"))))
	if got := f.addrs("switchman0"); !slices.Equal(got, prefixes("192.0.2.11/32", "fe80::1/64")) {
		t.Errorf("switchman0: %v", got)
	}
}

// TestFallbackToLo: on a kernel without dummy interfaces the VIPs go on
// lo, which the host shares: the driver removes only what its record says
// it added, across restarts.
func TestFallbackToLo(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	f.links.Fail(vipfake.AddDummy, func(netip.Prefix) error { return syscall.EOPNOTSUPP })
	hostOwn := prefixes("127.0.0.1/8", "192.0.2.99/32", "192.0.2.12/32")
	f.links.AddInterface("lo", true, hostOwn...)
	vipC := netip.MustParseAddr("192.0.2.12") // already on lo: the host's

	d := f.driver(nil)
	noErrs(t, "apply", d.Apply(ctx, states(svc("svca", vipA, ""), svc("svcb", vipB, ""), svc("svcc", vipC, ""))))
	if exists, _, _ := f.links.Interface("switchman0"); exists {
		t.Fatal("switchman0 exists although the kernel cannot create it")
	}
	if got, want := f.addrs("lo"), prefixes("127.0.0.1/8", "192.0.2.10/32", "192.0.2.11/32", "192.0.2.12/32", "192.0.2.99/32"); !slices.Equal(got, want) {
		t.Fatalf("lo: %v, want %v", got, want)
	}
	if !strings.Contains(f.logs.String(), "cannot create dummy interfaces") {
		t.Errorf("the fallback was not logged: %s", f.logs.String())
	}

	// Restart with svca gone while the agent was down and svcc gone too:
	// svca's address (ours) goes; 192.0.2.12 (the host's) stays.
	d2 := f.driver(nil)
	w := f.links.Writes()
	noErrs(t, "sync after restart", d2.Sync(ctx, states(svc("svcb", vipB, ""))))
	if got, want := f.addrs("lo"), prefixes("127.0.0.1/8", "192.0.2.11/32", "192.0.2.12/32", "192.0.2.99/32"); !slices.Equal(got, want) {
		t.Errorf("lo after the restart: %v, want %v", got, want)
	}
	if f.links.Writes()-w != 2 { // AddDummy (refused) and one removal
		t.Errorf("restart made %d writes, want 2", f.links.Writes()-w)
	}
	noErrs(t, "last gone", d2.Apply(ctx, states(gone("svcb"))))
	if got := f.addrs("lo"); !slices.Equal(got, hostOwn) {
		t.Errorf("lo at the end: %v, want the host's own %v", got, hostOwn)
	}
	b, err := os.ReadFile(filepath.Join(f.dir, vip.RecordFile))
	if err != nil || strings.Contains(string(b), "192.0.2") {
		t.Errorf("record at the end: %s %v", b, err)
	}
}

func TestErrorsMapToServices(t *testing.T) {
	tests := []struct {
		name   string
		method vipfake.Method
		fail   func(netip.Prefix) error
		errno  error
		want   []string // services failing
	}{
		{"one address refused", vipfake.AddAddress, func(p netip.Prefix) error {
			if p.Addr() == vipB {
				return syscall.EPERM
			}
			return nil
		}, syscall.EPERM, []string{"svcb", "svcc"}},
		{"interface cannot be created", vipfake.AddDummy, func(netip.Prefix) error { return syscall.EPERM }, syscall.EPERM, []string{"svca", "svcb", "svcc"}},
		{"interface cannot be looked up", vipfake.Link, func(netip.Prefix) error { return syscall.ENOBUFS }, syscall.ENOBUFS, []string{"svca", "svcb", "svcc"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			f.links.Fail(tt.method, tt.fail)
			d := f.driver(nil)
			all := states(svc("svca", vipA, ""), svc("svcb", vipB, ""), svc("svcc", vipB, ""))
			errs := d.Apply(context.Background(), all)
			var got []string
			for n, err := range errs {
				got = append(got, n)
				if !errors.Is(err, tt.errno) {
					t.Errorf("%s: %v does not carry the errno", n, err)
				}
			}
			slices.Sort(got)
			if !slices.Equal(got, tt.want) {
				t.Errorf("failing %v, want %v", got, tt.want)
			}
			f.links.Fail(tt.method, nil)
			noErrs(t, "retry", d.Sync(context.Background(), all))
		})
	}
}

func TestSysctls(t *testing.T) {
	tests := []struct {
		name string
		svcs []*render.ServiceState
		want map[string]string // sysctl -> value after Apply, from all "0"
	}{
		{"nat v4 ipvs", states(svc("a", vipA, "", "net/ipv4/ip_forward", "net/ipv4/vs/expire_nodest_conn")),
			map[string]string{"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "0", "net/ipv4/vs/expire_nodest_conn": "1", "net/ipv4/vs/conntrack": "0"}},
		{"two services, one setting each", states(svc("a", vipA, "", "net/ipv6/conf/all/forwarding"), svc("b", vipB, "", "net/ipv4/vs/conntrack")),
			map[string]string{"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "1", "net/ipv4/vs/conntrack": "1"}},
		{"haproxy nonlocal bind", states(svc("a", vipA, "", "net/ipv4/ip_nonlocal_bind")),
			map[string]string{"net/ipv4/ip_nonlocal_bind": "1", "net/ipv4/ip_forward": "0"}},
		{"none asked", states(svc("a", vipA, "")),
			map[string]string{"net/ipv4/ip_forward": "0", "net/ipv4/vs/expire_nodest_conn": "0", "net/ipv4/vs/conntrack": "0"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			f.root = procSys(t, allSysctls("0"))
			d := f.driver(nil)
			noErrs(t, "apply", d.Apply(context.Background(), tt.svcs))
			for p, v := range tt.want {
				if got := readSysctl(t, f.root, p); got != v {
					t.Errorf("%s = %s, want %s", p, got, v)
				}
			}
			set := strings.Count(f.logs.String(), "set sysctl")
			f.logs.Reset()
			noErrs(t, "sync", d.Sync(context.Background(), tt.svcs))
			if strings.Contains(f.logs.String(), "set sysctl") {
				t.Errorf("the sync set sysctls again: %s", f.logs.String())
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
			// Removing the services turns nothing off.
			noErrs(t, "remove", d.Apply(context.Background(), states(gone("a"), gone("b"))))
			for p, v := range tt.want {
				if got := readSysctl(t, f.root, p); got != v {
					t.Errorf("after removal %s = %s, want %s", p, got, v)
				}
			}
		})
	}
}

func TestSysctlErrors(t *testing.T) {
	f := newFixture(t)
	f.root = procSys(t, map[string]string{"net/ipv6/conf/all/forwarding": "1"}) // no net/ipv4/vs, no ip_forward
	d := f.driver(nil)
	errs := d.Apply(context.Background(), states(
		svc("ipvs", vipA, "", "net/ipv4/vs/expire_nodest_conn"),
		svc("nat4", vipB, "", "net/ipv4/ip_forward"),
		svc("nat6", vip6, "", "net/ipv6/conf/all/forwarding"),
		svc("bad", vipB, "", "../../etc/passwd"),
	))
	if len(errs) != 2 || !errors.Is(errs["nat4"], os.ErrNotExist) || !strings.Contains(errs["nat4"].Error(), "net.ipv4.ip_forward") {
		t.Errorf("errors %v: want nat4 failing on net.ipv4.ip_forward (missing), no IPVS settings skipped quietly", errs)
	}
	if err := errs["bad"]; err == nil || !strings.Contains(err.Error(), "../../etc/passwd") {
		t.Errorf("a sysctl outside /proc/sys: %v", err)
	}
	if !slices.Contains(f.addrs("switchman0"), netip.MustParsePrefix("192.0.2.10/32")) {
		t.Error("the VIP of a service on a kernel without IPVS settings was not added")
	}
}

func TestConfigErrors(t *testing.T) {
	l := vipfake.New()
	for _, c := range []vip.Config{
		{Links: l, Interface: "a/b"},
		{Links: l, Interface: "much-too-long-name0"},
		{Links: l, HAInterface: "a b"},
		{Links: l, Fallback: "x:y"},
		{Links: l, HAInterface: "eth0", Lifetime: 500 * 1000 * 1000},
		{},
	} {
		if _, err := vip.New(c); err == nil {
			t.Errorf("config %+v accepted", c)
		}
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, vip.RecordFile), []byte(`{"version":1,"addresses":[{"interface":"lo","address":"nonsense"}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := vip.New(vip.Config{Links: l, StateDir: dir}); err == nil || !strings.Contains(err.Error(), vip.RecordFile) {
		t.Errorf("a broken record: %v", err)
	}
}

func TestCustomInterfaceName(t *testing.T) {
	f := newFixture(t)
	d := f.driver(func(c *vip.Config) { c.Interface = "lbvip" })
	noErrs(t, "apply", d.Apply(context.Background(), states(svc("a", vipA, ""))))
	if !slices.Contains(f.addrs("lbvip"), netip.MustParsePrefix("192.0.2.10/32")) {
		t.Errorf("lbvip: %v", f.addrs("lbvip"))
	}
	if exists, _, _ := f.links.Interface("switchman0"); exists {
		t.Error("switchman0 created although another name was configured")
	}
}
