package ipvs_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/drivers/ipvs/ipvsfake"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

func newDriver(t *testing.T, k ipvs.Kernel, dir string) *ipvs.Driver {
	t.Helper()
	d, err := ipvs.New(ipvs.Config{Kernel: k, DataDir: dir, CallTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func webService(name string, vip netip.Addr, port uint16, dsts ...render.L4Destination) render.L4Service {
	return render.L4Service{Service: name, Protocol: spec.TCP, Address: vip, Port: port, Scheduler: spec.RoundRobin, Destinations: dsts}
}

func rdst(a netip.Addr, port uint16, w int) render.L4Destination {
	return render.L4Destination{Address: a, Port: port, Weight: w, Forwarding: spec.NAT}
}

func key(p ipvs.Protocol, a netip.Addr, port uint16) ipvs.Key {
	return ipvs.Key{Protocol: p, Address: a, Port: port}
}

// checkState compares the fake kernel's services with desired, converted.
func checkState(t *testing.T, k *ipvsfake.Kernel, desired []render.L4Service, foreign ...ipvs.Key) {
	t.Helper()
	want, bad := ipvs.DesiredFrom(desired)
	if len(bad) != 0 {
		t.Fatal(bad)
	}
	state := k.State()
	if len(state) != len(want)+len(foreign) {
		t.Errorf("kernel has %d services, want %d desired + %d foreign", len(state), len(want), len(foreign))
	}
	for _, w := range want {
		got, ok := state[w.Service.Key()]
		if !ok {
			t.Errorf("%s missing", w.Service.Key())
			continue
		}
		if got.Service.Settings() != w.Service {
			t.Errorf("%s: kernel has %+v, want %+v", w.Service.Key(), got.Service.Settings(), w.Service)
		}
		gd := map[netip.AddrPort]ipvs.Destination{}
		for _, d := range got.Destinations {
			gd[d.AddrPort()] = d
		}
		if len(gd) != len(w.Destinations) {
			t.Errorf("%s: %d destinations, want %d", w.Service.Key(), len(gd), len(w.Destinations))
		}
		for _, d := range w.Destinations {
			if g := gd[d.AddrPort()]; g.Weight != d.Weight || g.Forwarding != d.Forwarding || !g.Address.IsValid() {
				t.Errorf("%s: destination %s is %+v, want %+v", w.Service.Key(), d.AddrPort(), g, d)
			}
		}
	}
}

func TestApplyProgramsEveryKind(t *testing.T) {
	v6be := netip.MustParseAddr("2001:db8::1")
	tests := []struct {
		name string
		svc  render.L4Service
	}{
		{"rr", webService("s", vip4, 80, rdst(be1, 80, 1), rdst(be2, 80, 2))},
		{"wrr", func() render.L4Service {
			s := webService("s", vip4, 80, rdst(be1, 80, 1))
			s.Scheduler = spec.WeightedRoundRobin
			return s
		}()},
		{"lc", func() render.L4Service {
			s := webService("s", vip4, 80, rdst(be1, 80, 1))
			s.Scheduler = spec.LeastConnection
			return s
		}()},
		{"wlc", func() render.L4Service {
			s := webService("s", vip4, 80, rdst(be1, 80, 1))
			s.Scheduler = spec.WeightedLeastConnection
			return s
		}()},
		{"sh sh-fallback sh-port", func() render.L4Service {
			s := webService("s", vip4, 80, rdst(be1, 80, 1))
			s.Scheduler, s.Flags = spec.SourceHashing, []string{"sh-fallback", "sh-port"}
			return s
		}()},
		{"mh mh-fallback mh-port", func() render.L4Service {
			s := webService("s", vip4, 80, rdst(be1, 80, 1))
			s.Scheduler, s.Flags = spec.MaglevHashing, []string{"mh-fallback", "mh-port"}
			return s
		}()},
		{"dr", func() render.L4Service {
			s := webService("s", vip4, 80, rdst(be1, 80, 1))
			s.Destinations[0].Forwarding = spec.Direct
			return s
		}()},
		{"tun", func() render.L4Service {
			s := webService("s", vip4, 80, rdst(be1, 80, 1))
			s.Destinations[0].Forwarding = spec.Tunnel
			return s
		}()},
		{"udp", func() render.L4Service {
			s := webService("s", vip4, 53, rdst(be1, 53, 1))
			s.Protocol = spec.UDP
			return s
		}()},
		{"ipv6", webService("s", vip6, 443, rdst(v6be, 8443, 1))},
		{"persistence", func() render.L4Service {
			s := webService("s", vip4, 80, rdst(be1, 80, 1))
			s.Persistence = time.Hour
			return s
		}()},
		{"no destinations", webService("s", vip4, 80)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := ipvsfake.New()
			d := newDriver(t, k, t.TempDir())
			st := &render.State{IPVS: []render.L4Service{tt.svc}}
			if errs := d.Sync(context.Background(), render.Split(st)); len(errs) != 0 {
				t.Fatal(errs)
			}
			checkState(t, k, st.IPVS)
			if got, want := uint64(k.Writes()), uint64(1+len(tt.svc.Destinations)); got != want || d.Writes() != want {
				t.Errorf("cold start made %d writes (driver counted %d), want %d", got, d.Writes(), want)
			}
			k.ResetCounts()
			if errs := d.Sync(context.Background(), render.Split(st)); len(errs) != 0 {
				t.Fatal(errs)
			}
			if k.Writes() != 0 {
				t.Errorf("second apply made %d writes, want 0", k.Writes())
			}
		})
	}
}

func TestApplyChangesInPlace(t *testing.T) {
	base := func() render.L4Service { return webService("web", vip4, 80, rdst(be1, 80, 1), rdst(be2, 80, 1)) }
	tests := []struct {
		name   string
		change func(*render.L4Service)
		want   map[ipvsfake.Method]int
	}{
		{"weight change", func(s *render.L4Service) { s.Destinations[0].Weight = 7 }, map[ipvsfake.Method]int{ipvsfake.UpdateDestination: 1}},
		{"weight to zero", func(s *render.L4Service) { s.Destinations[1].Weight = 0 }, map[ipvsfake.Method]int{ipvsfake.UpdateDestination: 1}},
		{"forwarding change", func(s *render.L4Service) {
			s.Destinations[0].Forwarding, s.Destinations[1].Forwarding = spec.Direct, spec.Direct
		}, map[ipvsfake.Method]int{ipvsfake.UpdateDestination: 2}},
		{"scheduler change", func(s *render.L4Service) { s.Scheduler = spec.WeightedLeastConnection }, map[ipvsfake.Method]int{ipvsfake.UpdateService: 1}},
		{"flags change", func(s *render.L4Service) {
			s.Scheduler, s.Flags = spec.MaglevHashing, []string{"mh-port"}
		}, map[ipvsfake.Method]int{ipvsfake.UpdateService: 1}},
		{"persistence on", func(s *render.L4Service) { s.Persistence = time.Minute }, map[ipvsfake.Method]int{ipvsfake.UpdateService: 1}},
		{"backend added", func(s *render.L4Service) { s.Destinations = append(s.Destinations, rdst(be3, 80, 1)) }, map[ipvsfake.Method]int{ipvsfake.AddDestination: 1}},
		{"backend removed", func(s *render.L4Service) { s.Destinations = s.Destinations[:1] }, map[ipvsfake.Method]int{ipvsfake.DeleteDestination: 1}},
	}
	writes := []ipvsfake.Method{ipvsfake.AddService, ipvsfake.UpdateService, ipvsfake.DeleteService, ipvsfake.AddDestination, ipvsfake.UpdateDestination, ipvsfake.DeleteDestination}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := ipvsfake.New()
			d := newDriver(t, k, t.TempDir())
			s := base()
			if errs := d.Sync(context.Background(), render.Split(&render.State{IPVS: []render.L4Service{s}})); len(errs) != 0 {
				t.Fatal(errs)
			}
			if err := k.SetConnections(key(ipvs.TCP, vip4, 80), netip.AddrPortFrom(be1, 80), 3, 4); err != nil {
				t.Fatal(err)
			}
			k.ResetCounts()
			tt.change(&s)
			st := &render.State{IPVS: []render.L4Service{s}}
			if errs := d.Sync(context.Background(), render.Split(st)); len(errs) != 0 {
				t.Fatal(errs)
			}
			for _, m := range writes {
				if got := k.Calls(m); got != tt.want[m] {
					t.Errorf("%s called %d times, want %d", m, got, tt.want[m])
				}
			}
			checkState(t, k, st.IPVS)
			// The kernel's counters survive: the service was never recreated.
			for _, dd := range k.State()[key(ipvs.TCP, vip4, 80)].Destinations {
				if dd.Address == be1 && dd.ActiveConn != 3 {
					t.Errorf("connection counters of %s reset: %+v", dd.AddrPort(), dd)
				}
			}
		})
	}
}

func TestForeignServicesUntouched(t *testing.T) {
	ctx := context.Background()
	k := ipvsfake.New()
	foreign := svc(vip4, 80, "wlc")
	if err := k.AddService(ctx, foreign); err != nil {
		t.Fatal(err)
	}
	if err := k.AddDestination(ctx, foreign, dst(be3, 80, 9, ipvs.Route)); err != nil {
		t.Fatal(err)
	}
	other := svc(vip4, 8080, "rr")
	if err := k.AddService(ctx, other); err != nil {
		t.Fatal(err)
	}
	before := k.State()
	k.ResetCounts()
	d := newDriver(t, k, t.TempDir())

	// A desired service at the foreign key is refused; another is applied.
	st := &render.State{IPVS: []render.L4Service{
		webService("api", vip4, 443, rdst(be1, 443, 1)),
		webService("web", vip4, 80, rdst(be1, 80, 1)),
	}}
	for range 3 {
		errs := d.Sync(ctx, render.Split(st))
		var fe *ipvs.ForeignServiceError
		if len(errs) != 1 || !errors.As(errs["web"], &fe) {
			t.Fatalf("errors %v, want only web refused as foreign", errs)
		}
		if want := "192.0.2.10:80/tcp exists in the kernel and was not created by switchman; remove it or pick another vip:port"; errs["web"].Error() != want {
			t.Errorf("error %q, want %q", errs["web"], want)
		}
	}
	// Then nothing desired: api (ours) goes, foreign services stay.
	if errs := d.Sync(ctx, render.Split(&render.State{})); len(errs) != 0 {
		t.Fatal(errs)
	}
	after := k.State()
	if len(after) != 2 {
		t.Errorf("kernel has %d services, want the 2 foreign ones", len(after))
	}
	for key, b := range before {
		a := after[key]
		if a.Service != b.Service || len(a.Destinations) != len(b.Destinations) || (len(b.Destinations) > 0 && a.Destinations[0] != b.Destinations[0]) {
			t.Errorf("foreign %s changed: %+v -> %+v", key, b, a)
		}
	}
	if n := k.Calls(ipvsfake.DeleteService); n != 1 {
		t.Errorf("%d service deletions, want 1 (api)", n)
	}
	if _, owned := d.Owned()[key(ipvs.TCP, vip4, 443)]; owned {
		t.Error("api still recorded as owned after deletion")
	}
}

func TestRestartWithNothingChangedWritesNothing(t *testing.T) {
	ctx := context.Background()
	k := ipvsfake.New()
	dir := t.TempDir()
	st := &render.State{IPVS: []render.L4Service{
		webService("a", vip4, 80, rdst(be1, 80, 1), rdst(be2, 80, 3)),
		webService("b", vip6, 80, rdst(netip.MustParseAddr("2001:db8::5"), 80, 1)),
	}}
	if errs := newDriver(t, k, dir).Sync(ctx, render.Split(st)); len(errs) != 0 {
		t.Fatal(errs)
	}
	info, err := os.Stat(filepath.Join(dir, ipvs.StateFile))
	if err != nil {
		t.Fatal(err)
	}
	if info.Mode().Perm() != 0o600 {
		t.Errorf("state file mode %v, want 0600", info.Mode().Perm())
	}
	raw, _ := os.ReadFile(filepath.Join(dir, ipvs.StateFile))
	var rec struct {
		Version  int
		Services []struct{ Name string }
	}
	if err := json.Unmarshal(raw, &rec); err != nil || rec.Version != 1 || len(rec.Services) != 2 {
		t.Errorf("state file %s: %v", raw, err)
	}
	leftovers, _ := filepath.Glob(filepath.Join(dir, ".*"))
	if len(leftovers) != 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}

	k.ResetCounts()
	d2 := newDriver(t, k, dir)
	if errs := d2.Sync(ctx, render.Split(st)); len(errs) != 0 {
		t.Fatal(errs)
	}
	if k.Writes() != 0 || d2.Writes() != 0 {
		t.Errorf("restart made %d writes (driver counted %d), want 0", k.Writes(), d2.Writes())
	}
	// And a restart after a change writes just the change.
	st.IPVS[0].Destinations[1].Weight = 0
	d3 := newDriver(t, k, dir)
	if errs := d3.Sync(ctx, render.Split(st)); len(errs) != 0 {
		t.Fatal(errs)
	}
	if k.Writes() != 1 || k.Calls(ipvsfake.UpdateDestination) != 1 {
		t.Errorf("restart after a weight change made %d writes, want 1 update", k.Writes())
	}
}

func TestLostStateFileRefusesRatherThanAdopts(t *testing.T) {
	ctx := context.Background()
	k := ipvsfake.New()
	st := &render.State{IPVS: []render.L4Service{webService("a", vip4, 80, rdst(be1, 80, 1))}}
	if errs := newDriver(t, k, t.TempDir()).Sync(ctx, render.Split(st)); len(errs) != 0 {
		t.Fatal(errs)
	}
	k.ResetCounts()
	errs := newDriver(t, k, t.TempDir()).Sync(ctx, render.Split(st))
	var fe *ipvs.ForeignServiceError
	if !errors.As(errs["a"], &fe) || k.Writes() != 0 {
		t.Errorf("errors %v, %d writes; want a refused with no writes", errs, k.Writes())
	}
}

func TestOneServiceFailingDoesNotFailOthers(t *testing.T) {
	k := ipvsfake.New()
	d := newDriver(t, k, t.TempDir())
	bad := webService("bad", vip4, 81, rdst(be1, 80, 1))
	bad.Scheduler = "nosuch" // the kernel has no ip_vs_nosuch module: ENOENT
	st := &render.State{IPVS: []render.L4Service{
		webService("a", vip4, 80, rdst(be1, 80, 1)),
		bad,
		webService("c", vip4, 82, rdst(be1, 80, 1)),
	}}
	errs := d.Sync(context.Background(), render.Split(st))
	if len(errs) != 1 || !errors.Is(errs["bad"], syscall.ENOENT) {
		t.Fatalf("errors %v, want only bad failing with ENOENT", errs)
	}
	checkState(t, k, []render.L4Service{st.IPVS[0], st.IPVS[2]})
	if k.Calls(ipvsfake.AddDestination) != 2 {
		t.Errorf("%d destination adds, want 2 (none for the failed service)", k.Calls(ipvsfake.AddDestination))
	}
	if _, owned := d.Owned()[key(ipvs.TCP, vip4, 81)]; owned {
		t.Error("a service whose creation failed is recorded as owned")
	}
}

// TestHungCallTimesOut: when a call (or a batch) times out, the write
// fails its service with the deadline, nothing more is sent in that pass,
// and a service whose creation went unanswered stays recorded (it may
// exist).
func TestHungCallTimesOut(t *testing.T) {
	for _, hang := range []ipvsfake.Method{ipvsfake.AddDestination, ipvsfake.AddService} {
		t.Run(string(hang), func(t *testing.T) {
			bothWays(t, func(t *testing.T, k *ipvsfake.Kernel, kernel ipvs.Kernel, _ bool) {
				d, err := ipvs.New(ipvs.Config{Kernel: kernel, DataDir: t.TempDir(), CallTimeout: 50 * time.Millisecond})
				if err != nil {
					t.Fatal(err)
				}
				st := &render.State{IPVS: []render.L4Service{
					webService("a", vip4, 80, rdst(be1, 80, 1)),
					webService("b", vip4, 81, rdst(be1, 80, 1)),
				}}
				k.Hang(hang, true)
				start := time.Now()
				errs := d.Sync(context.Background(), render.Split(st))
				if el := time.Since(start); el > 5*time.Second {
					t.Errorf("apply with a hung call took %v", el)
				}
				if !errors.Is(errs["a"], context.DeadlineExceeded) {
					t.Errorf("a: %v, want a deadline error", errs["a"])
				}
				if errs["b"] == nil || !strings.Contains(errs["b"].Error(), "timed out") {
					t.Errorf("b: %v, want not applied because of the time-out", errs["b"])
				}
				if k.Calls(hang) != 1 {
					t.Errorf("%d %s calls after the hang, want 1 (the rest given up)", k.Calls(hang), hang)
				}
				if hang == ipvsfake.AddService && k.Calls(ipvsfake.AddDestination) != 0 {
					t.Errorf("%d destination adds after the service add hung", k.Calls(ipvsfake.AddDestination))
				}
				if _, ok := d.Owned()[key(ipvs.TCP, vip4, 80)]; !ok {
					t.Error("a's record dropped after a time-out (it may exist)")
				}
				k.Hang(hang, false)
				if errs := d.Sync(context.Background(), render.Split(st)); len(errs) != 0 {
					t.Fatalf("after the hang cleared: %v", errs)
				}
				checkState(t, k, st.IPVS)
			})
		})
	}
}

func TestMissingIPVS(t *testing.T) {
	k := ipvsfake.New()
	k.SetUnavailable(true)
	d := newDriver(t, k, t.TempDir())
	st := &render.State{IPVS: []render.L4Service{
		webService("a", vip4, 80, rdst(be1, 80, 1)),
		webService("b", vip4, 81, rdst(be1, 80, 1)),
	}}
	errs := d.Sync(context.Background(), render.Split(st))
	for _, name := range []string{"a", "b"} {
		if !errors.Is(errs[name], ipvs.ErrUnavailable) || !strings.Contains(errs[name].Error(), "modprobe ip_vs") || !strings.Contains(errs[name].Error(), "CONFIG_IP_VS") {
			t.Errorf("%s: %v, want IPVS missing with how to fix it", name, errs[name])
		}
	}
	if _, err := d.Connections(context.Background(), map[string]bool{"a": true}); err != nil {
		t.Errorf("connections with nothing owned: %v", err)
	}
	// No IPVS services wanted: the kernel is not even asked.
	if errs := d.Sync(context.Background(), render.Split(&render.State{})); len(errs) != 0 {
		t.Errorf("nothing desired: %v", errs)
	}
	k.SetUnavailable(false) // modprobe ip_vs
	if errs := d.Sync(context.Background(), render.Split(st)); len(errs) != 0 {
		t.Fatalf("after IPVS appeared: %v", errs)
	}
	checkState(t, k, st.IPVS)
}

func TestConnections(t *testing.T) {
	ctx := context.Background()
	k := ipvsfake.New()
	foreign := svc(vip4, 9000, "rr")
	if err := k.AddService(ctx, foreign); err != nil {
		t.Fatal(err)
	}
	if err := k.AddDestination(ctx, foreign, dst(be1, 80, 1, ipvs.Masq)); err != nil {
		t.Fatal(err)
	}
	if err := k.SetConnections(foreign.Key(), netip.AddrPortFrom(be1, 80), 50, 50); err != nil {
		t.Fatal(err)
	}
	d := newDriver(t, k, t.TempDir())
	st := &render.State{IPVS: []render.L4Service{webService("web", vip4, 80, rdst(be1, 80, 1), rdst(be2, 80, 0))}}
	if errs := d.Sync(ctx, render.Split(st)); len(errs) != 0 {
		t.Fatal(errs)
	}
	if err := k.SetConnections(key(ipvs.TCP, vip4, 80), netip.AddrPortFrom(be2, 80), 2, 5); err != nil {
		t.Fatal(err)
	}
	got, err := d.Connections(ctx, map[string]bool{"web": true})
	if err != nil {
		t.Fatal(err)
	}
	// TCP counts ActiveConn only: InActConn is mostly TIME_WAIT.
	want := map[render.BackendRef]int{
		{Service: "web", Addr: netip.AddrPortFrom(be1, 80)}: 0,
		{Service: "web", Addr: netip.AddrPortFrom(be2, 80)}: 2,
	}
	if len(got) != len(want) {
		t.Errorf("got %v, want %v", got, want)
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%v: %d (present %v), want %d", k, g, ok, v)
		}
	}
	if got, err := d.Connections(ctx, map[string]bool{"other": true}); err != nil || len(got) != 0 {
		t.Errorf("a service not asked about was read: %v %v", got, err)
	}
	k.SetUnavailable(true)
	if _, err := d.Connections(ctx, map[string]bool{"web": true}); !errors.Is(err, ipvs.ErrUnavailable) {
		t.Errorf("connections without IPVS: %v", err)
	}
}

func TestAddRaceWithSomeoneElse(t *testing.T) {
	ctx := context.Background()
	k := ipvsfake.New()
	d := newDriver(t, k, t.TempDir())
	// Someone creates the service between the listing and our add: the
	// fake's AddService fails with EEXIST as the kernel would.
	k.Fail(ipvsfake.AddService, syscall.EEXIST)
	errs := d.Sync(ctx, render.Split(&render.State{IPVS: []render.L4Service{webService("web", vip4, 80, rdst(be1, 80, 1))}}))
	var fe *ipvs.ForeignServiceError
	if !errors.As(errs["web"], &fe) {
		t.Errorf("error %v, want foreign", errs["web"])
	}
	if len(d.Owned()) != 0 {
		t.Errorf("owned %v after losing the race", d.Owned())
	}
}

func TestCorruptStateFile(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, ipvs.StateFile), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ipvs.New(ipvs.Config{Kernel: ipvsfake.New(), DataDir: dir}); err == nil || !strings.Contains(err.Error(), ipvs.StateFile) {
		t.Errorf("corrupt state file: %v", err)
	}
}
