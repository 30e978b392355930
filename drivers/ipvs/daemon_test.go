package ipvs_test

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"syscall"
	"testing"

	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/drivers/ipvs/ipvsfake"
)

func TestEnsureDaemons(t *testing.T) {
	ctx := context.Background()
	master := ipvs.SyncDaemon{Role: ipvs.Master, Interface: "eth1", SyncID: 5}
	backup := ipvs.SyncDaemon{Role: ipvs.Backup, Interface: "eth1", SyncID: 5}
	with := func(d ipvs.SyncDaemon, f func(*ipvs.SyncDaemon)) ipvs.SyncDaemon { f(&d); return d }
	tests := []struct {
		name        string
		running     []ipvs.SyncDaemon // started before
		want        []ipvs.SyncDaemon
		starts      int
		stops       int
		wantRunning map[ipvs.Role]ipvs.SyncDaemon // compared on the fields set
	}{
		{"none running, both wanted", nil, []ipvs.SyncDaemon{master, backup}, 2, 0, map[ipvs.Role]ipvs.SyncDaemon{ipvs.Master: master, ipvs.Backup: backup}},
		{"both running as wanted", []ipvs.SyncDaemon{master, backup}, []ipvs.SyncDaemon{master, backup}, 0, 0, nil},
		{"defaults named explicitly are the same", []ipvs.SyncDaemon{master}, []ipvs.SyncDaemon{with(master, func(d *ipvs.SyncDaemon) {
			d.Port, d.TTL, d.MaxLen, d.Group = 8848, 1, 1472, netip.MustParseAddr("224.0.0.81")
		})}, 0, 0, nil},
		{"sync id changed: restart master only", []ipvs.SyncDaemon{master, backup}, []ipvs.SyncDaemon{with(master, func(d *ipvs.SyncDaemon) { d.SyncID = 6 }), backup}, 1, 1,
			map[ipvs.Role]ipvs.SyncDaemon{ipvs.Master: with(master, func(d *ipvs.SyncDaemon) { d.SyncID = 6 })}},
		{"interface changed", []ipvs.SyncDaemon{backup}, []ipvs.SyncDaemon{with(backup, func(d *ipvs.SyncDaemon) { d.Interface = "eth2" })}, 1, 1, nil},
		{"group and port changed", []ipvs.SyncDaemon{master}, []ipvs.SyncDaemon{with(master, func(d *ipvs.SyncDaemon) {
			d.Group, d.Port = netip.MustParseAddr("239.0.0.9"), 9000
		})}, 1, 1, nil},
		{"an unwanted role is left alone", []ipvs.SyncDaemon{master, backup}, []ipvs.SyncDaemon{backup}, 0, 0,
			map[ipvs.Role]ipvs.SyncDaemon{ipvs.Master: master}},
		{"nothing wanted: nothing read or written", []ipvs.SyncDaemon{master}, nil, 0, 0, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := ipvsfake.New()
			for _, d := range tt.running {
				if err := k.StartDaemon(ctx, d); err != nil {
					t.Fatal(err)
				}
			}
			k.ResetCounts()
			if err := ipvs.EnsureDaemons(ctx, k, tt.want); err != nil {
				t.Fatal(err)
			}
			if k.Calls(ipvsfake.StartDaemon) != tt.starts || k.Calls(ipvsfake.StopDaemon) != tt.stops {
				t.Errorf("%d starts and %d stops, want %d and %d", k.Calls(ipvsfake.StartDaemon), k.Calls(ipvsfake.StopDaemon), tt.starts, tt.stops)
			}
			have, err := k.Daemons(ctx)
			if err != nil {
				t.Fatal(err)
			}
			byRole := map[ipvs.Role]ipvs.SyncDaemon{}
			for _, h := range have {
				byRole[h.Role] = h
			}
			for _, w := range tt.want {
				if h := byRole[w.Role]; h.Interface != w.Interface || h.SyncID != w.SyncID || (w.Port != 0 && h.Port != w.Port) {
					t.Errorf("%s runs as %+v, want %+v", w.Role, h, w)
				}
			}
			for r, w := range tt.wantRunning {
				if h := byRole[r]; h.Interface != w.Interface || h.SyncID != w.SyncID {
					t.Errorf("%s runs as %+v, want %+v", r, h, w)
				}
			}
			// Idempotent: a second call writes nothing.
			k.ResetCounts()
			if err := ipvs.EnsureDaemons(ctx, k, tt.want); err != nil {
				t.Fatal(err)
			}
			if k.Writes() != 0 {
				t.Errorf("second EnsureDaemons made %d writes", k.Writes())
			}
		})
	}
}

func TestEnsureDaemonsRefusesBadInput(t *testing.T) {
	tests := []struct {
		name  string
		want  []ipvs.SyncDaemon
		field string
	}{
		{"no role", []ipvs.SyncDaemon{{Interface: "eth1"}}, "role 0"},
		{"no interface", []ipvs.SyncDaemon{{Role: ipvs.Master}}, `interface ""`},
		{"long interface", []ipvs.SyncDaemon{{Role: ipvs.Master, Interface: "averyveryverylongname"}}, "averyveryverylongname"},
		{"unicast group", []ipvs.SyncDaemon{{Role: ipvs.Master, Interface: "eth1", Group: netip.MustParseAddr("10.0.0.1")}}, "10.0.0.1 is not a multicast"},
		{"backup max length", []ipvs.SyncDaemon{{Role: ipvs.Backup, Interface: "eth1", MaxLen: 100}}, "max length 100"},
		{"two masters", []ipvs.SyncDaemon{{Role: ipvs.Master, Interface: "eth1"}, {Role: ipvs.Master, Interface: "eth2"}}, "second master"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := ipvsfake.New()
			err := ipvs.EnsureDaemons(context.Background(), k, tt.want)
			if !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), tt.field) {
				t.Errorf("error %v, want EINVAL naming %q", err, tt.field)
			}
			if k.Calls(ipvsfake.Daemons)+k.Writes() != 0 {
				t.Error("bad input reached the kernel")
			}
		})
	}
}

func TestDaemonErrnos(t *testing.T) {
	ctx := context.Background()
	k := ipvsfake.New()
	d := ipvs.SyncDaemon{Role: ipvs.Backup, Interface: "eth1"}
	if err := k.StartDaemon(ctx, d); err != nil {
		t.Fatal(err)
	}
	if err := k.StartDaemon(ctx, d); !errors.Is(err, syscall.EEXIST) {
		t.Errorf("second start: %v, want EEXIST", err)
	}
	if err := k.StopDaemon(ctx, ipvs.Master); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("stop of a master that does not run: %v, want ESRCH", err)
	}
	if err := k.StopDaemon(ctx, ipvs.Backup); err != nil {
		t.Error(err)
	}
}

// TestSyncAndMixedFamilies: the kernel will not run connection sync while
// a service has a destination of another family (only tunnelling allows
// one), nor add such a destination while sync runs.
func TestSyncAndMixedFamilies(t *testing.T) {
	ctx := context.Background()
	k := ipvsfake.New()
	s := svc(vip4, 80, "rr")
	if err := k.AddService(ctx, s); err != nil {
		t.Fatal(err)
	}
	v6 := netip.MustParseAddr("2001:db8::9")
	if err := k.AddDestination(ctx, s, dst(v6, 80, 1, ipvs.Masq)); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("IPv6 NAT destination of an IPv4 service: %v, want EINVAL", err)
	}
	if err := k.AddDestination(ctx, s, dst(v6, 80, 1, ipvs.Tunnel)); err != nil {
		t.Fatal(err)
	}
	err := ipvs.EnsureDaemons(ctx, k, []ipvs.SyncDaemon{{Role: ipvs.Master, Interface: "eth1"}})
	if !errors.Is(err, ipvs.ErrSyncMixedFamily) || !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), "remove those destinations") {
		t.Errorf("start with a mixed-family service: %v, want ErrSyncMixedFamily (EINVAL) saying what to do", err)
	}
	if err := k.DeleteService(ctx, s); err != nil {
		t.Fatal(err)
	}
	if err := ipvs.EnsureDaemons(ctx, k, []ipvs.SyncDaemon{{Role: ipvs.Master, Interface: "eth1"}}); err != nil {
		t.Fatal(err)
	}
	if err := k.AddService(ctx, s); err != nil {
		t.Fatal(err)
	}
	if err := k.AddDestination(ctx, s, dst(v6, 80, 1, ipvs.Tunnel)); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("mixed-family destination while sync runs: %v, want EINVAL", err)
	}
}
