package ipvs_test

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/drivers/ipvs/ipvsfake"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// procSys makes a /proc/sys stand-in holding the IPVS sysctls at the
// kernel's defaults.
func procSys(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	vs := filepath.Join(dir, "net", "ipv4", "vs")
	if err := os.MkdirAll(vs, 0o755); err != nil {
		t.Fatal(err)
	}
	defaults := map[string]string{"sync_version": "1", "sync_threshold": "3\t50", "sync_refresh_period": "0",
		"sync_retries": "0", "sync_persist_mode": "0", "backup_only": "0", "sync_ports": "1"}
	for name, v := range defaults {
		if err := os.WriteFile(filepath.Join(vs, name), []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func readSysctl(t *testing.T, dir, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "net", "ipv4", "vs", name))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(strings.Fields(string(b)), " ")
}

func sysctlTimes(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	entries, err := os.ReadDir(filepath.Join(dir, "net", "ipv4", "vs"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = info.ModTime().UnixNano()
	}
	return out
}

func newConnSync(t *testing.T, k ipvs.SyncKernel, settings *ipvs.SyncSettings, stateDir, proc string, services func() map[ipvs.Key]string) *ipvs.ConnSync {
	t.Helper()
	c, err := ipvs.NewConnSync(ipvs.ConnSyncConfig{Kernel: k, Settings: settings, StateDir: stateDir, ProcSys: proc, Services: services})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestConnSyncRunsBothRoles(t *testing.T) {
	ctx := context.Background()
	k := ipvsfake.New()
	dir, proc := t.TempDir(), procSys(t)
	settings := &ipvs.SyncSettings{Interface: "eth2", SyncID: 7}
	c := newConnSync(t, k, settings, dir, proc, nil)
	if err := c.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	have, _ := k.Daemons(ctx)
	if len(have) != 2 || have[0].Role != ipvs.Master || have[1].Role != ipvs.Backup {
		t.Fatalf("daemons %+v, want a master and a backup", have)
	}
	for _, h := range have {
		if h.Interface != "eth2" || h.SyncID != 7 {
			t.Errorf("%s daemon %+v, want eth2 and sync id 7", h.Role, h)
		}
	}
	st := c.Status()
	if !st.Runs(ipvs.Master) || !st.Runs(ipvs.Backup) || st.Err != nil {
		t.Errorf("status %+v, want both roles running and no error", st)
	}
	select {
	case <-c.Changed():
	default:
		t.Error("no change signalled after the daemons started")
	}
	for _, s := range ipvs.SyncSysctls() {
		name := strings.TrimPrefix(s.Path, "net/ipv4/vs/")
		if got := readSysctl(t, proc, name); got != s.Value {
			t.Errorf("sysctl %s = %q, want %q", name, got, s.Value)
		}
	}

	// A second round, and a restarted agent (a new ConnSync on the same
	// data directory), write nothing: sync is never interrupted.
	before := sysctlTimes(t, proc)
	for _, c := range []*ipvs.ConnSync{c, newConnSync(t, k, settings, dir, proc, nil)} {
		k.ResetCounts()
		if err := c.Ensure(ctx); err != nil {
			t.Fatal(err)
		}
		if k.Writes() != 0 {
			t.Errorf("Ensure with everything in place made %d kernel writes", k.Writes())
		}
		if !c.Status().Runs(ipvs.Master) || !c.Status().Runs(ipvs.Backup) {
			t.Errorf("status %+v after a second Ensure", c.Status())
		}
	}
	if after := sysctlTimes(t, proc); !equalMaps(before, after) {
		t.Errorf("sysctls rewritten although unchanged: %v -> %v", before, after)
	}

	// Someone stopped the backup: the next round starts it again.
	if err := k.StopDaemon(ctx, ipvs.Backup); err != nil {
		t.Fatal(err)
	}
	k.ResetCounts()
	if err := c.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	if k.Calls(ipvsfake.StartDaemon) != 1 || k.Calls(ipvsfake.StopDaemon) != 0 || !c.Status().Runs(ipvs.Backup) {
		t.Errorf("%d starts, %d stops, status %+v; want the backup started again and nothing stopped", k.Calls(ipvsfake.StartDaemon), k.Calls(ipvsfake.StopDaemon), c.Status())
	}

	// The sync id changes (a restart with another --ipvs-sync-id): both
	// daemons are restarted with it.
	changed := &ipvs.SyncSettings{Interface: "eth2", SyncID: 9}
	k.ResetCounts()
	if err := newConnSync(t, k, changed, dir, proc, nil).Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	have, _ = k.Daemons(ctx)
	if k.Calls(ipvsfake.StopDaemon) != 2 || k.Calls(ipvsfake.StartDaemon) != 2 || have[0].SyncID != 9 || have[1].SyncID != 9 {
		t.Errorf("%d stops, %d starts, daemons %+v; want both restarted with sync id 9", k.Calls(ipvsfake.StopDaemon), k.Calls(ipvsfake.StartDaemon), have)
	}
}

func equalMaps(a, b map[string]int64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestConnSyncStopsOnlyWhatItStarted: without settings, the daemons an
// earlier run started are stopped (once), a daemon someone else runs is
// left alone, and an agent that never ran sync asks the kernel nothing.
func TestConnSyncStopsOnlyWhatItStarted(t *testing.T) {
	ctx := context.Background()
	settings := &ipvs.SyncSettings{Interface: "eth2", SyncID: 7}
	tests := []struct {
		name      string
		started   bool                          // an earlier run with settings
		foreign   map[ipvs.Role]ipvs.SyncDaemon // running besides, or instead
		wantRoles []ipvs.Role                   // still running at the end
		wantCalls int                           // kernel calls of the stopping run
	}{
		{name: "never configured: nothing asked", wantCalls: 0},
		{name: "configured before: both stopped", started: true, wantRoles: nil, wantCalls: 3},
		{name: "backup restarted by someone else with another id: left alone", started: true,
			foreign: map[ipvs.Role]ipvs.SyncDaemon{ipvs.Backup: {Role: ipvs.Backup, Interface: "eth2", SyncID: 3}}, wantRoles: []ipvs.Role{ipvs.Backup}, wantCalls: 2},
		{name: "someone else's daemon, never configured: left alone",
			foreign: map[ipvs.Role]ipvs.SyncDaemon{ipvs.Master: {Role: ipvs.Master, Interface: "eth1"}}, wantRoles: []ipvs.Role{ipvs.Master}, wantCalls: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := ipvsfake.New()
			dir, proc := t.TempDir(), procSys(t)
			if tt.started {
				if err := newConnSync(t, k, settings, dir, proc, nil).Ensure(ctx); err != nil {
					t.Fatal(err)
				}
			}
			for role, d := range tt.foreign {
				_ = k.StopDaemon(ctx, role)
				if err := k.StartDaemon(ctx, d); err != nil {
					t.Fatal(err)
				}
			}
			k.ResetCounts()
			off := newConnSync(t, k, nil, dir, proc, nil)
			if err := off.Ensure(ctx); err != nil {
				t.Fatal(err)
			}
			calls := k.Calls(ipvsfake.Daemons) + k.Calls(ipvsfake.StopDaemon) + k.Calls(ipvsfake.StartDaemon)
			if calls != tt.wantCalls {
				t.Errorf("%d kernel calls, want %d", calls, tt.wantCalls)
			}
			have, _ := k.Daemons(ctx)
			var roles []ipvs.Role
			for _, h := range have {
				roles = append(roles, h.Role)
			}
			if !slices.Equal(roles, tt.wantRoles) {
				t.Errorf("running %v, want %v", roles, tt.wantRoles)
			}
			if _, err := os.Stat(filepath.Join(dir, ipvs.SyncStateFile)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the record is still there: %v", err)
			}
			// Once the record is gone, later rounds ask nothing.
			k.ResetCounts()
			if err := off.Ensure(ctx); err != nil {
				t.Fatal(err)
			}
			if n := k.Calls(ipvsfake.Daemons); n != 0 {
				t.Errorf("a later round read the daemons %d times", n)
			}
		})
	}
}

func TestConnSyncReportsFailures(t *testing.T) {
	ctx := context.Background()
	settings := &ipvs.SyncSettings{Interface: "eth2", SyncID: 7}

	t.Run("mixed families", func(t *testing.T) {
		k := ipvsfake.New()
		s := svc(vip4, 80, "rr")
		if err := k.AddService(ctx, s); err != nil {
			t.Fatal(err)
		}
		v6 := netip.MustParseAddr("2001:db8::9")
		if err := k.AddDestination(ctx, s, dst(v6, 80, 1, ipvs.Tunnel)); err != nil {
			t.Fatal(err)
		}
		c := newConnSync(t, k, settings, t.TempDir(), procSys(t), nil)
		err := c.Ensure(ctx)
		st := c.Status()
		if !errors.Is(err, ipvs.ErrSyncMixedFamily) || !errors.Is(st.Err, ipvs.ErrSyncMixedFamily) || len(st.Running) != 0 {
			t.Fatalf("error %v, status %+v; want ErrSyncMixedFamily and nothing running", err, st)
		}
		for _, want := range []string{"192.0.2.10:80/tcp", "[2001:db8::9]:80", "--ipvs-sync-interface"} {
			if !strings.Contains(st.Err.Error(), want) {
				t.Errorf("status error %q does not name %s", st.Err, want)
			}
		}
	})

	t.Run("no IPVS", func(t *testing.T) {
		k := ipvsfake.New()
		k.SetUnavailable(true)
		c := newConnSync(t, k, settings, t.TempDir(), procSys(t), nil)
		if err := c.Ensure(ctx); !errors.Is(err, ipvs.ErrUnavailable) || !errors.Is(c.Status().Err, ipvs.ErrUnavailable) {
			t.Errorf("Ensure: %v, status %+v; want ErrUnavailable", err, c.Status())
		}
	})

	t.Run("missing sysctl", func(t *testing.T) {
		k := ipvsfake.New()
		proc := procSys(t)
		if err := os.Remove(filepath.Join(proc, "net/ipv4/vs/sync_retries")); err != nil {
			t.Fatal(err)
		}
		c := newConnSync(t, k, settings, t.TempDir(), proc, nil)
		err := c.Ensure(ctx)
		if err == nil || !strings.Contains(err.Error(), "net.ipv4.vs.sync_retries") {
			t.Errorf("Ensure: %v, want an error naming net.ipv4.vs.sync_retries", err)
		}
		if st := c.Status(); !st.Runs(ipvs.Master) || !st.Runs(ipvs.Backup) {
			t.Errorf("the daemons do not run although only a sysctl failed: %+v", st)
		}
	})

	t.Run("bad settings", func(t *testing.T) {
		_, err := ipvs.NewConnSync(ipvs.ConnSyncConfig{Kernel: ipvsfake.New(), StateDir: t.TempDir(),
			Settings: &ipvs.SyncSettings{Interface: "eth2", Group: netip.MustParseAddr("10.0.0.1")}})
		if !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), "10.0.0.1") {
			t.Errorf("NewConnSync: %v, want EINVAL naming the group", err)
		}
	})
}

// TestConnSyncCount: the connections are the destinations' counters of the
// counted services, read one service at a time; a service gone since is
// skipped.
func TestConnSyncCount(t *testing.T) {
	ctx := context.Background()
	k := ipvsfake.New()
	a, b := svc(vip4, 80, "rr"), svc(vip4, 81, "rr")
	for _, s := range []ipvs.Service{a, b} {
		if err := k.AddService(ctx, s); err != nil {
			t.Fatal(err)
		}
		for _, be := range []netip.Addr{be1, be2} {
			if err := k.AddDestination(ctx, s, dst(be, 80, 1, ipvs.Masq)); err != nil {
				t.Fatal(err)
			}
		}
	}
	set := func(s ipvs.Service, be netip.Addr, active, inactive int) {
		if err := k.SetConnections(s.Key(), netip.AddrPortFrom(be, 80), active, inactive); err != nil {
			t.Fatal(err)
		}
	}
	set(a, be1, 3, 1)
	set(a, be2, 2, 0)
	set(b, be1, 5, 7)
	gone := key(ipvs.TCP, vip4, 99)
	counted := map[ipvs.Key]string{a.Key(): "a", gone: "gone"}
	c := newConnSync(t, k, nil, t.TempDir(), procSys(t), func() map[ipvs.Key]string { return counted })
	if err := c.Count(ctx); err != nil {
		t.Fatal(err)
	}
	if st := c.Status(); st.Active != 5 || st.Inactive != 1 || st.Counted.IsZero() {
		t.Errorf("counted %d active, %d inactive (at %v); want 5 and 1 (service b is not counted)", st.Active, st.Inactive, st.Counted)
	}
	if n := k.Calls(ipvsfake.Destinations); n != 2 {
		t.Errorf("%d destination reads, want one per counted service (2)", n)
	}
}

// TestDriverRefusesMixedFamiliesUnderSync: with connection sync
// configured, a service with a real server of another family is failed
// naming it and the flag, and the others are programmed.
func TestDriverRefusesMixedFamiliesUnderSync(t *testing.T) {
	ctx := context.Background()
	k := ipvsfake.New()
	d, err := ipvs.New(ipvs.Config{Kernel: k, DataDir: t.TempDir(), ConnSync: true})
	if err != nil {
		t.Fatal(err)
	}
	v6 := netip.MustParseAddr("2001:db8::9")
	mixed := webService("mixed", vip4, 80, rdst(be1, 80, 1), render.L4Destination{Address: v6, Port: 80, Weight: 1, Forwarding: spec.Tunnel})
	plain := webService("plain", vip4, 81, rdst(be1, 80, 1))
	errs := d.Sync(ctx, []*render.ServiceState{state(mixed), state(plain)})
	err = errs["mixed"]
	if !errors.Is(err, ipvs.ErrMixedFamilyUnderSync) || !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("mixed: %v, want ErrMixedFamilyUnderSync (EINVAL)", err)
	}
	for _, want := range []string{"[2001:db8::9]:80", "--ipvs-sync-interface"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	if errs["plain"] != nil {
		t.Errorf("plain: %v", errs["plain"])
	}
	state := k.State()
	if _, ok := state[key(ipvs.TCP, vip4, 80)]; ok {
		t.Error("the mixed-family service was programmed")
	}
	if _, ok := state[key(ipvs.TCP, vip4, 81)]; !ok {
		t.Error("the plain service was not programmed")
	}
}
