//go:build e2e

package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/drivers/vip"
	"github.com/switchman-lb/switchman/e2e/internal/lab"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// ipvsDriverTimeout bounds one netlink call of the drivers under test; the
// lab runs under software emulation.
const ipvsDriverTimeout = 30 * time.Second

// newIPVSDriver returns the real IPVS driver on the root namespace's
// kernel, keeping its ownership record in dir.
func newIPVSDriver(t testing.TB, dir string) *ipvs.Driver {
	t.Helper()
	k := ipvs.NewNetlink("")
	t.Cleanup(k.Close)
	d, err := ipvs.New(ipvs.Config{Kernel: k, DataDir: dir, CallTimeout: ipvsDriverTimeout, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func mustApply(t testing.TB, d interface {
	Sync(context.Context, []*render.ServiceState) map[string]error
}, st *render.State) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if errs := d.Sync(ctx, render.Split(st)); len(errs) != 0 {
		t.Fatalf("apply: %v", errs)
	}
}

// mustHold hands the VIP driver one service's state.
func mustHold(t testing.TB, d *vip.Driver, st *render.ServiceState) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if errs := d.Apply(ctx, []*render.ServiceState{st}); len(errs) != 0 {
		t.Fatalf("vip apply: %v", errs)
	}
}

// rsvc builds a desired IPVS service on the lab's backends.
func rsvc(name string, proto spec.Protocol, vipAddr string, port uint16, sched spec.Scheduler, flags []string, fwd spec.Forwarding, backends ...string) render.L4Service {
	s := render.L4Service{Service: name, Protocol: proto, Address: netip.MustParseAddr(vipAddr), Port: port, Scheduler: sched, Flags: flags}
	for i, b := range backends {
		s.Destinations = append(s.Destinations, render.L4Destination{Address: netip.MustParseAddr(b), Port: port, Weight: i + 1, Forwarding: fwd})
	}
	return s
}

// ipvsKeyOf returns how ipvsadm -Ln names s: "TCP", "192.0.2.10:80".
func ipvsKeyOf(s render.L4Service) (string, string) {
	return strings.ToUpper(string(s.Protocol)), lab.IPVSHostPort(s.Address.String(), int(s.Port))
}

// checkListed compares ipvsadm -Ln with the desired services.
func checkListed(t *testing.T, svcs []lab.L4Service, want []render.L4Service) {
	t.Helper()
	for _, w := range want {
		proto, addr := ipvsKeyOf(w)
		got, ok := lab.FindIPVSService(svcs, proto, addr)
		if !ok {
			t.Errorf("%s %s missing from ipvsadm -Ln", proto, addr)
			continue
		}
		if got.Scheduler != string(w.Scheduler) {
			t.Errorf("%s: scheduler %s, want %s", got.Key(), got.Scheduler, w.Scheduler)
		}
		for _, f := range w.Flags {
			if !got.HasFlag(f) {
				t.Errorf("%s: flags %v lack %s", got.Key(), got.Flags, f)
			}
		}
		if len(got.Flags) != len(w.Flags) {
			t.Errorf("%s: flags %v, want %v", got.Key(), got.Flags, w.Flags)
		}
		if wantP := int(w.Persistence / time.Second); got.Persistent != wantP {
			t.Errorf("%s: persistent %d, want %d", got.Key(), got.Persistent, wantP)
		}
		if got.Netmask != "" {
			t.Errorf("%s: persistence mask %s, want one client address (no mask shown)", got.Key(), got.Netmask)
		}
		if len(got.Dests) != len(w.Destinations) {
			t.Errorf("%s: %d real servers, want %d", got.Key(), len(got.Dests), len(w.Destinations))
		}
		for _, wd := range w.Destinations {
			ap := lab.IPVSHostPort(wd.Address.String(), int(wd.Port))
			d, ok := got.Dest(ap)
			if !ok {
				t.Errorf("%s: real server %s missing", got.Key(), ap)
				continue
			}
			if lab.ForwardingName(d.Forward) != string(wd.Forwarding) || d.Weight != wd.Weight {
				t.Errorf("%s: real server %s is %s weight %d, want %s weight %d", got.Key(), ap, d.Forward, d.Weight, wd.Forwarding, wd.Weight)
			}
		}
	}
}

func TestIPVSDriver(t *testing.T) {
	lab.RequireLab(t)
	dir := t.TempDir()
	d := newIPVSDriver(t, dir)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if errs := d.Sync(ctx, render.Split(&render.State{})); len(errs) != 0 {
			t.Errorf("cleanup apply: %v", errs)
		}
	})
	be1, be2, be3 := lab.Backends[0], lab.Backends[1], lab.Backends[2]

	t.Run("kinds", func(t *testing.T) {
		const v = "192.0.2.50"
		persistent := rsvc("persist", spec.TCP, v, 8443, spec.RoundRobin, nil, spec.NAT, be1.Addr)
		persistent.Persistence = 300 * time.Second
		all := []render.L4Service{
			rsvc("rr", spec.TCP, v, 1001, spec.RoundRobin, nil, spec.NAT, be1.Addr, be2.Addr),
			rsvc("wrr", spec.TCP, v, 1002, spec.WeightedRoundRobin, nil, spec.NAT, be1.Addr, be2.Addr, be3.Addr),
			rsvc("lc", spec.TCP, v, 1003, spec.LeastConnection, nil, spec.NAT, be1.Addr),
			rsvc("wlc", spec.TCP, v, 1004, spec.WeightedLeastConnection, nil, spec.NAT, be1.Addr, be2.Addr),
			rsvc("sh", spec.TCP, v, 1005, spec.SourceHashing, []string{"sh-fallback", "sh-port"}, spec.NAT, be1.Addr, be2.Addr),
			rsvc("mh", spec.TCP, v, 1006, spec.MaglevHashing, []string{"mh-fallback", "mh-port"}, spec.NAT, be1.Addr, be2.Addr),
			rsvc("mhport", spec.TCP, v, 1007, spec.MaglevHashing, []string{"mh-port"}, spec.NAT, be1.Addr),
			rsvc("dr", spec.TCP, v, 1008, spec.RoundRobin, nil, spec.Direct, be1.Addr, be2.Addr),
			rsvc("tun", spec.TCP, v, 1009, spec.RoundRobin, nil, spec.Tunnel, be1.Addr),
			rsvc("udp", spec.UDP, v, 53, spec.RoundRobin, nil, spec.NAT, be1.Addr, be2.Addr),
			rsvc("v6", spec.TCP, "2001:db8:100::50", 80, spec.WeightedRoundRobin, nil, spec.NAT, be1.Addr6, be2.Addr6),
			rsvc("v6udp", spec.UDP, "2001:db8:100::50", 53, spec.MaglevHashing, []string{"mh-fallback"}, spec.Direct, be1.Addr6),
			persistent,
		}
		st := &render.State{IPVS: all}
		mustApply(t, d, st)
		checkListed(t, lab.MustIPVSList(t), all)

		w := d.Writes()
		mustApply(t, d, st)
		if n := d.Writes() - w; n != 0 {
			t.Errorf("second apply of the same state made %d writes, want 0", n)
		}

		// Change every kind of setting in place.
		all[0].Scheduler = spec.WeightedLeastConnection // UpdateService
		all[4].Flags = []string{"sh-port"}              // UpdateService
		all[7].Destinations[0].Forwarding = spec.Tunnel // UpdateDestination
		all[12].Persistence = 60 * time.Second          // UpdateService
		all[10].Destinations[1].Weight = 9              // UpdateDestination
		w = d.Writes()
		mustApply(t, d, st)
		if n := d.Writes() - w; n != 5 {
			t.Errorf("five in-place changes made %d writes, want 5", n)
		}
		checkListed(t, lab.MustIPVSList(t), all)

		// Remove all but two: the rest leave the kernel.
		st.IPVS = all[:2]
		mustApply(t, d, st)
		svcs := lab.MustIPVSList(t)
		checkListed(t, svcs, all[:2])
		for _, gone := range all[2:] {
			if p, a := ipvsKeyOf(gone); func() bool { _, ok := lab.FindIPVSService(svcs, p, a); return ok }() {
				t.Errorf("%s %s still present after it left the desired state", p, a)
			}
		}
		mustApply(t, d, &render.State{})
	})

	t.Run("weight-change-keeps-service", func(t *testing.T) {
		const v = "192.0.2.51"
		// The VIP driver puts the address on a dummy interface of its own.
		vd, err := vip.New(vip.Config{Links: vip.NewNetlink(""), Interface: "swm-e2e0", Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _, _ = lab.Run(0, lab.IPBin, "link", "del", "swm-e2e0") })
		web := rsvc("web", spec.TCP, v, 80, spec.RoundRobin, nil, spec.NAT, be1.Addr, be2.Addr)
		web.Destinations[1].Weight = 1
		st := &render.State{
			IPVS:     []render.L4Service{web},
			VIPs:     []netip.Addr{netip.MustParseAddr(v)},
			Services: []render.ServiceReport{{Name: "web", Driver: spec.DriverIPVS, Key: spec.Key{VIP: netip.MustParseAddr(v), Port: 80, Protocol: spec.TCP}}},
		}
		mustHold(t, vd, &render.ServiceState{Name: "web", VIP: netip.MustParseAddr(v)})
		mustApply(t, d, st)
		url := "http://" + lab.IPVSHostPort(v, 80) + "/"
		client := lab.HTTPClientNS(lab.ClientNS)
		get := func() (string, error) {
			resp, err := client.Get(url)
			if err != nil {
				return "", err
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			return strings.TrimSpace(string(b)), err
		}
		lab.WaitFor(t, 0, "the VIP answering", func() error { _, err := get(); return err })
		before := lab.Tally(4, get)
		if before["be1"] != 2 || before["be2"] != 2 {
			t.Errorf("rr over be1,be2: %s, want 2 each", lab.TallyString(before))
		}
		// The kernel folds its per-CPU counters into the totals ipvsadm
		// shows every couple of seconds: poll.
		svcAddr := lab.IPVSHostPort(v, 80)
		var connsBefore int
		lab.WaitFor(t, 0, "the service's connection counter to count the requests", func() error {
			if connsBefore = lab.StatsConns(t, "TCP", svcAddr); connsBefore < 5 {
				return fmt.Errorf("Conns %d, want at least 5", connsBefore)
			}
			return nil
		})
		// An open connection shows as ActiveConn on the backend IPVS chose
		// (finished requests linger only as InActConn, in TIME_WAIT).
		held, err := lab.DialNS("client", "tcp", svcAddr, 20*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer held.Close()
		lab.WaitFor(t, 0, "the held connection in Connections", func() error {
			counts, err := d.Connections(context.Background(), map[string]bool{"web": true})
			if err != nil {
				return err
			}
			total := 0
			for _, n := range counts {
				total += n
			}
			if total < 1 {
				return fmt.Errorf("Connections %v, want one active connection", counts)
			}
			return nil
		})

		st.IPVS[0].Destinations[0].Weight = 0 // drain be1
		w := d.Writes()
		mustApply(t, d, st)
		if n := d.Writes() - w; n != 1 {
			t.Errorf("a weight change made %d writes, want 1", n)
		}
		s, _ := lab.FindIPVSService(lab.MustIPVSList(t), "TCP", lab.IPVSHostPort(v, 80))
		if dd, _ := s.Dest(lab.IPVSHostPort(be1.Addr, 80)); dd.Weight != 0 {
			t.Errorf("be1 weight %d, want 0", dd.Weight)
		}
		got := lab.Tally(3, get)
		if got["be2"] != 3 {
			t.Errorf("with be1 at weight 0: %s, want be2=3", lab.TallyString(got))
		}
		// A recreated service would count from 0 again, so it could not
		// reach the old count plus the three new connections.
		lab.WaitFor(t, 0, "the connection counter to go on from where it was", func() error {
			if after := lab.StatsConns(t, "TCP", svcAddr); after < connsBefore+3 {
				return fmt.Errorf("Conns %d, want at least %d + 3", after, connsBefore)
			}
			return nil
		})
		mustApply(t, d, &render.State{})
		mustHold(t, vd, &render.ServiceState{Name: "web"})
	})

	t.Run("foreign-service-survives", func(t *testing.T) {
		const v = "192.0.2.52"
		foreign := lab.IPVSHostPort(v, 80)
		lab.MustRun(t, lab.IPVSADMBin, "-A", "-t", foreign, "-s", "wlc")
		t.Cleanup(func() { _, _ = lab.Run(0, lab.IPVSADMBin, "-D", "-t", foreign) })
		lab.MustRun(t, lab.IPVSADMBin, "-a", "-t", foreign, "-r", lab.IPVSHostPort(be3.Addr, 80), "-m", "-w", "3")
		before, _ := lab.FindIPVSService(lab.MustIPVSList(t), "TCP", foreign)

		mine := rsvc("mine", spec.TCP, v, 81, spec.RoundRobin, nil, spec.NAT, be1.Addr)
		clash := rsvc("clash", spec.TCP, v, 80, spec.RoundRobin, nil, spec.NAT, be1.Addr)
		for i := range 3 {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			errs := d.Sync(ctx, render.Split(&render.State{IPVS: []render.L4Service{clash, mine}}))
			cancel()
			var fe *ipvs.ForeignServiceError
			if len(errs) != 1 || !errors.As(errs["clash"], &fe) {
				t.Fatalf("apply %d: errors %v, want clash refused as foreign", i, errs)
			}
			if i == 0 {
				t.Logf("clash: %v", errs["clash"])
			}
		}
		mustApply(t, d, &render.State{})
		after, ok := lab.FindIPVSService(lab.MustIPVSList(t), "TCP", foreign)
		if !ok || fmt.Sprint(after) != fmt.Sprint(before) {
			t.Errorf("foreign service changed:\nbefore %+v\nafter  %+v", before, after)
		}
	})

	t.Run("restart-writes-nothing", func(t *testing.T) {
		st := &render.State{IPVS: []render.L4Service{
			rsvc("a", spec.TCP, "192.0.2.53", 80, spec.MaglevHashing, []string{"mh-fallback", "mh-port"}, spec.Direct, be1.Addr, be2.Addr),
			rsvc("b", spec.UDP, "192.0.2.53", 53, spec.SourceHashing, []string{"sh-port"}, spec.NAT, be1.Addr, be2.Addr, be3.Addr),
			rsvc("c", spec.TCP, "2001:db8:100::53", 443, spec.RoundRobin, nil, spec.NAT, be1.Addr6),
		}}
		mustApply(t, d, st)
		before := lab.MustRun(t, lab.IPVSADMBin, "-Ln")
		fresh := newIPVSDriver(t, dir) // same ownership record, as after a restart
		mustApply(t, fresh, st)
		if fresh.Writes() != 0 {
			t.Errorf("restarted driver made %d writes with nothing changed, want 0", fresh.Writes())
		}
		if after := lab.MustRun(t, lab.IPVSADMBin, "-Ln"); after != before {
			t.Errorf("table changed across the restart:\nbefore\n%s\nafter\n%s", before, after)
		}
		mustApply(t, fresh, &render.State{})
		if _, err := os.Stat(dir + "/" + ipvs.StateFile); err != nil {
			t.Error(err)
		}
	})
}
