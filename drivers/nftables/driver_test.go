package nftables_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/drivers/nftables"
	"github.com/switchman-lb/switchman/drivers/nftables/nftfake"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

func state(s render.L4Service) *render.ServiceState {
	return &render.ServiceState{Name: s.Service, L4: &s}
}

func removed(name string) *render.ServiceState { return &render.ServiceState{Name: name} }

func newDriver(t *testing.T, k nftables.Kernel) *nftables.Driver {
	t.Helper()
	d, err := nftables.New(nftables.Config{Kernel: k})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func noErrors(t *testing.T, what string, errs map[string]error) {
	t.Helper()
	if len(errs) > 0 {
		t.Fatalf("%s: %v", what, errs)
	}
}

func TestDriverApply(t *testing.T) {
	k := nftfake.New()
	d := newDriver(t, k)
	web := l4("web", "192.0.2.10:80", spec.TCP, spec.MaglevHashing, dest("10.1.1.2:8080", 1), dest("10.1.1.3:8080", 1), dest("10.1.1.4:8080", 1))
	dns := l4("dns", "[2001:db8::53]:53", spec.UDP, spec.RoundRobin, dest("[2001:db8:1::2]:53", 1))
	noErrors(t, "Sync", d.Sync(t.Context(), nil))
	noErrors(t, "Apply", d.Apply(t.Context(), []*render.ServiceState{state(web), state(dns)}))
	if got, want := dump(k.State()), dump(expected(t, web, dns)); got != want {
		t.Fatalf("kernel holds\n%s\nwant\n%s", got, want)
	}

	// The same state again: nothing read, nothing written.
	k.ResetCounts()
	noErrors(t, "Apply again", d.Apply(t.Context(), []*render.ServiceState{state(web), state(dns)}))
	if c := k.Counts(); c.Reads != 0 || c.Commits != 0 {
		t.Errorf("an unchanged Apply read %d times and committed %d transactions", c.Reads, c.Commits)
	}

	// One weight: one transaction with the changed slots of that service.
	k.ResetCounts()
	web.Destinations[1].Weight = 0
	noErrors(t, "weight 0", d.Apply(t.Context(), []*render.ServiceState{state(web)}))
	c := k.Counts()
	if c.Reads != 0 || c.Commits != 1 {
		t.Errorf("a weight change read %d times and committed %d transactions, want 0 and 1", c.Reads, c.Commits)
	}
	for kind, n := range c.ByKind {
		if kind != nftables.AddElements && kind != nftables.DelElements && n > 0 {
			t.Errorf("a weight change made %d %s writes", n, kind)
		}
	}
	for _, tx := range k.Log() {
		for _, op := range tx {
			if op.Set.Name != "slots-web" {
				t.Errorf("a weight change wrote outside web's slots map: %s", op)
			}
		}
	}
	if got, want := dump(k.State()), dump(expected(t, web, dns)); got != want {
		t.Fatalf("after the weight change the kernel holds\n%s\nwant\n%s", got, want)
	}

	// A state of another driver, or none, removes the service.
	ipvs := web
	ipvs.Driver = spec.DriverIPVS
	noErrors(t, "to ipvs", d.Apply(t.Context(), []*render.ServiceState{state(ipvs)}))
	noErrors(t, "remove dns", d.Apply(t.Context(), []*render.ServiceState{removed("dns")}))
	if tables := k.State(); len(tables) != 0 {
		t.Fatalf("tables left after every service went:\n%s", dump(tables))
	}
	// Removing what is not there is fine.
	noErrors(t, "remove again", d.Apply(t.Context(), []*render.ServiceState{removed("dns")}))
}

// TestDriverRestart: a new driver over the same kernel (an agent restart)
// reads the tables once in its first Sync and writes nothing.
func TestDriverRestart(t *testing.T) {
	k := nftfake.New()
	web := l4("web", "192.0.2.10:80", spec.TCP, spec.WeightedRoundRobin, dest("10.1.1.2:8080", 3), dest("10.1.1.3:8080", 1))
	web.AllowCIDRs, web.Masquerade, web.Persistence = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, true, time.Minute
	all := []*render.ServiceState{state(web)}
	noErrors(t, "first run", newDriver(t, k).Apply(t.Context(), all))
	k.ResetCounts()
	d := newDriver(t, k)
	noErrors(t, "Sync after restart", d.Sync(t.Context(), all))
	if c := k.Counts(); c.Commits != 0 || c.Reads != 1 {
		t.Errorf("Sync after a restart read %d times and committed %d transactions, want 1 and 0", c.Reads, c.Commits)
	}
	// Apply before any Sync reads once too.
	k.ResetCounts()
	d = newDriver(t, k)
	noErrors(t, "Apply after restart", d.Apply(t.Context(), all))
	if c := k.Counts(); c.Commits != 0 || c.Reads != 1 {
		t.Errorf("Apply after a restart read %d times and committed %d transactions, want 1 and 0", c.Reads, c.Commits)
	}
}

// TestDriverSync checks that Sync repairs drift and removes services that
// are no longer wanted, and that Apply uses its record, not the kernel.
func TestDriverSync(t *testing.T) {
	k := nftfake.New()
	d := newDriver(t, k)
	web := l4("web", "192.0.2.10:80", spec.TCP, spec.RoundRobin, dest("10.1.1.2:8080", 1), dest("10.1.1.3:8080", 1))
	old := l4("old", "192.0.2.11:80", spec.TCP, spec.RoundRobin, dest("10.1.1.2:8080", 1))
	noErrors(t, "Apply", d.Apply(t.Context(), []*render.ServiceState{state(web), state(old)}))
	k.Edit(func(tables map[render.NFTFamily]*nftables.Table) {
		s := tables[render.NFTIPv4].Sets["slots-web"]
		s.Elements = s.Elements[:1]
	})
	noErrors(t, "Sync", d.Sync(t.Context(), []*render.ServiceState{state(web)}))
	if got, want := dump(k.State()), dump(expected(t, web)); got != want {
		t.Fatalf("after Sync the kernel holds\n%s\nwant\n%s", got, want)
	}
	// A service that cannot be rendered is left as it is by Sync.
	bad := old
	bad.Destinations = []render.L4Destination{{Address: netip.MustParseAddr("10.1.1.2"), Port: 80, Weight: 1, Forwarding: spec.Direct}}
	noErrors(t, "Apply old again", d.Apply(t.Context(), []*render.ServiceState{state(old)}))
	errs := d.Sync(t.Context(), []*render.ServiceState{state(web), state(bad)})
	if err := errs["old"]; err == nil || !strings.Contains(err.Error(), `forwarding: "dr"`) {
		t.Errorf("Sync error for old: %v", err)
	}
	if k.State()[render.NFTIPv4].Chains["svc-old"] == nil {
		t.Error("Sync removed a service it could not render")
	}
}

// TestDriverIsolatesFailures: a service the kernel refuses fails alone;
// the others in the same pass are programmed.
func TestDriverIsolatesFailures(t *testing.T) {
	k := nftfake.New()
	d := newDriver(t, k)
	a := l4("a", "192.0.2.10:80", spec.TCP, spec.RoundRobin, dest("10.1.1.2:8080", 1))
	noErrors(t, "Apply a", d.Apply(t.Context(), []*render.ServiceState{state(a)}))
	// Someone else made b's slots map behind the driver's back.
	k.Edit(func(tables map[render.NFTFamily]*nftables.Table) {
		tables[render.NFTIPv4].Sets["slots-b"] = &render.NFTSet{Name: "slots-b", Key: render.NFTKeyAddr}
	})
	b := l4("b", "192.0.2.10:81", spec.TCP, spec.RoundRobin, dest("10.1.1.3:8080", 1))
	c := l4("c", "192.0.2.10:82", spec.TCP, spec.RoundRobin, dest("10.1.1.4:8080", 1))
	errs := d.Apply(t.Context(), []*render.ServiceState{state(b), state(c)})
	if !errors.Is(errs["b"], syscall.EEXIST) {
		t.Errorf("b: %v, want EEXIST", errs["b"])
	}
	if errs["c"] != nil || k.State()[render.NFTIPv4].Chains["svc-c"] == nil {
		t.Errorf("c was not programmed: %v", errs["c"])
	}
	// The driver read the tables again and repairs b on the next pass.
	noErrors(t, "Sync", d.Sync(t.Context(), []*render.ServiceState{state(a), state(b), state(c)}))
	if got, want := dump(k.State()), dump(expected(t, a, b, c)); got != want {
		t.Fatalf("after Sync the kernel holds\n%s\nwant\n%s", got, want)
	}
}

// TestDriverBatches: many services are sent several to a transaction, never
// splitting one service, and a transaction too large for the socket is
// split.
func TestDriverBatches(t *testing.T) {
	k := nftfake.New()
	k.SetMaxBatch(60)
	d, err := nftables.New(nftables.Config{Kernel: k, MaxBatch: 200})
	if err != nil {
		t.Fatal(err)
	}
	var all []*render.ServiceState
	var svcs []render.L4Service
	for i := range 40 {
		s := l4(fmt.Sprintf("s%d", i), fmt.Sprintf("192.0.2.%d:80", i+1), spec.TCP, spec.RoundRobin, dest("10.1.1.2:8080", 1), dest("10.1.1.3:8080", 1))
		svcs = append(svcs, s)
		all = append(all, state(s))
	}
	noErrors(t, "Apply", d.Apply(t.Context(), all))
	if got, want := dump(k.State()), dump(expected(t, svcs...)); got != want {
		t.Fatal("the kernel does not hold the 40 services")
	}
	for _, tx := range k.Log() {
		if len(tx) > 60 {
			t.Errorf("a committed transaction has %d writes", len(tx))
		}
	}
	c := k.Counts()
	if len(k.Log()) >= 41 {
		t.Errorf("%d transactions for 40 services: no batching", len(k.Log()))
	}
	if c.Commits == len(k.Log()) {
		t.Error("no transaction was too large: the ENOBUFS path was not taken")
	}
}

func TestDriverUnavailable(t *testing.T) {
	k := nftfake.New()
	k.SetUnavailable(true)
	d := newDriver(t, k)
	web := l4("web", "192.0.2.10:80", spec.TCP, spec.RoundRobin, dest("10.1.1.2:8080", 1))
	for name, errs := range map[string]map[string]error{
		"Apply": d.Apply(t.Context(), []*render.ServiceState{state(web)}),
		"Sync":  d.Sync(t.Context(), []*render.ServiceState{state(web)}),
	} {
		err := errs["web"]
		if !errors.Is(err, nftables.ErrUnavailable) || !strings.Contains(err.Error(), "modprobe nf_tables") {
			t.Errorf("%s: %v, want an error saying nf_tables is missing and how to load it", name, err)
		}
	}
}

func TestDriverCanceled(t *testing.T) {
	d := newDriver(t, nftfake.New())
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	web := l4("web", "192.0.2.10:80", spec.TCP, spec.RoundRobin, dest("10.1.1.2:8080", 1))
	errs := d.Apply(ctx, []*render.ServiceState{state(web)})
	if !errors.Is(errs["web"], context.Canceled) {
		t.Errorf("Apply with a canceled context: %v", errs)
	}
}

func TestDriverConnections(t *testing.T) {
	k := nftfake.New()
	d := newDriver(t, k)
	web := l4("web", "192.0.2.10:80", spec.TCP, spec.RoundRobin, dest("10.1.1.2:8080", 1), dest("10.1.1.3:8080", 0), dest("10.1.1.4:8080", 0))
	dns := l4("dns", "192.0.2.11:53", spec.UDP, spec.RoundRobin, dest("10.1.1.2:53", 1))
	noErrors(t, "Apply", d.Apply(t.Context(), []*render.ServiceState{state(web), state(dns)}))
	b1, b2 := netip.MustParseAddrPort("10.1.1.2:8080"), netip.MustParseAddrPort("10.1.1.3:8080")
	k.SetConnections(nftables.ConnKey{Protocol: spec.TCP, VIP: web.Address, Port: 80}, map[netip.AddrPort]int{b1: 2, b2: 1})
	k.SetConnections(nftables.ConnKey{Protocol: spec.UDP, VIP: dns.Address, Port: 53}, map[netip.AddrPort]int{netip.MustParseAddrPort("10.1.1.2:53"): 5})
	got, err := d.Connections(t.Context(), map[string]bool{"web": true, "unknown": true})
	if err != nil {
		t.Fatal(err)
	}
	// A backend without connections is counted with 0: a drain of it can
	// end at once.
	b3 := netip.MustParseAddrPort("10.1.1.4:8080")
	want := map[render.BackendRef]int{{Service: "web", Addr: b1}: 2, {Service: "web", Addr: b2}: 1, {Service: "web", Addr: b3}: 0}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("Connections = %v, want %v", got, want)
	}
}

// TestDriverApplyKeepsOthers: an Apply looks only at the services it is
// given, yet never takes a table for empty while another service has
// objects in it, even one whose element in the services map is gone.
func TestDriverApplyKeepsOthers(t *testing.T) {
	k := nftfake.New()
	d := newDriver(t, k)
	web := l4("web", "192.0.2.10:80", spec.TCP, spec.RoundRobin, dest("10.1.1.2:8080", 1))
	api := l4("api", "192.0.2.11:80", spec.TCP, spec.RoundRobin, dest("10.1.1.3:8080", 1))
	noErrors(t, "Apply", d.Apply(t.Context(), []*render.ServiceState{state(web), state(api)}))
	// api's element goes behind the driver's back (its record still has
	// it, but only api's chains tell that api is there at all).
	if _, err := k.Commit(t.Context(), []nftables.Op{{Kind: nftables.DelElements, Family: render.NFTIPv4,
		Set: render.NFTSet{Name: render.NFTServicesMap, Key: render.NFTKeyAddrProtoPort, Verdicts: true}, Elements: []render.NFTElement{render.NFTServiceKey(api)}}}); err != nil {
		t.Fatal(err)
	}
	d = newDriver(t, k) // reads the tables as they are now
	noErrors(t, "remove web", d.Apply(t.Context(), []*render.ServiceState{removed("web")}))
	st := k.State()[render.NFTIPv4]
	if st == nil || st.Chains[render.NFTServiceChain("api")] == nil {
		t.Fatalf("removing web took api's table or chains:\n%s", dump(k.State()))
	}
	if st.Chains[render.NFTServiceChain("web")] != nil {
		t.Errorf("web's chain is still there")
	}
	// The next full pass repairs api; removing it then takes the table.
	noErrors(t, "Sync", d.Sync(t.Context(), []*render.ServiceState{state(api)}))
	if got, want := dump(k.State()), dump(expected(t, api)); got != want {
		t.Fatalf("after Sync the kernel holds\n%s\nwant\n%s", got, want)
	}
	noErrors(t, "remove api", d.Apply(t.Context(), []*render.ServiceState{removed("api")}))
	if len(k.State()) != 0 {
		t.Errorf("tables left after the last service went:\n%s", dump(k.State()))
	}
}

// TestDriverSyncReadsOnlyAfterOthersWrote: a Sync reads the tables only
// when nf_tables' generation moved past the driver's own transactions;
// a read that fails keeps the record, so Applies go on.
func TestDriverSyncReadsOnlyAfterOthersWrote(t *testing.T) {
	k := nftfake.New()
	d := newDriver(t, k)
	web := l4("web", "192.0.2.10:80", spec.TCP, spec.WeightedRoundRobin, dest("10.1.1.2:8080", 1), dest("10.1.1.3:8080", 1))
	all := []*render.ServiceState{state(web)}
	noErrors(t, "first Sync", d.Sync(t.Context(), all))
	web.Destinations[0].Weight = 2
	all = []*render.ServiceState{state(web)}
	noErrors(t, "Apply", d.Apply(t.Context(), all))

	k.ResetCounts()
	noErrors(t, "Sync, nobody else wrote", d.Sync(t.Context(), all))
	if c := k.Counts(); c.Reads != 0 || c.Commits != 0 {
		t.Errorf("a Sync after the driver's own writes only read %d times and committed %d, want 0 and 0", c.Reads, c.Commits)
	}

	// Someone else commits (in any table): the next Sync reads.
	if _, err := k.Commit(t.Context(), []nftables.Op{{Kind: nftables.AddTable, Family: render.NFTIPv6}}); err != nil {
		t.Fatal(err)
	}
	k.ResetCounts()
	noErrors(t, "Sync after another's write", d.Sync(t.Context(), all))
	if c := k.Counts(); c.Reads != 1 {
		t.Errorf("a Sync after another's write read %d times, want 1", c.Reads)
	}
	if _, ok := k.State()[render.NFTIPv6]; ok {
		t.Error("the table nobody needs was left")
	}

	// Drift: found and repaired, then known again.
	k.Edit(func(tables map[render.NFTFamily]*nftables.Table) {
		delete(tables[render.NFTIPv4].Sets, "slots-web")
	})
	noErrors(t, "Sync after drift", d.Sync(t.Context(), all))
	if got, want := dump(k.State()), dump(expected(t, web)); got != want {
		t.Fatalf("after the repair the kernel holds\n%s\nwant\n%s", got, want)
	}
	k.ResetCounts()
	noErrors(t, "Sync again", d.Sync(t.Context(), all))
	if c := k.Counts(); c.Reads != 0 {
		t.Errorf("a Sync right after a repair read %d times, want 0", c.Reads)
	}

	// A read that fails: the Sync fails, the record stays, Applies work.
	k.Edit(func(map[render.NFTFamily]*nftables.Table) {}) // the generation moves
	k.FailReads(fmt.Errorf("dump: %w", syscall.EINTR))
	if errs := d.Sync(t.Context(), all); !errors.Is(errs["web"], syscall.EINTR) {
		t.Errorf("Sync with failing reads: %v, want EINTR", errs)
	}
	web.Destinations[0].Weight = 3
	k.ResetCounts()
	noErrors(t, "Apply after a failed read", d.Apply(t.Context(), []*render.ServiceState{state(web)}))
	if c := k.Counts(); c.Reads != 0 || c.Commits != 1 {
		t.Errorf("an Apply after a failed read read %d times and committed %d, want 0 and 1", c.Reads, c.Commits)
	}
	k.FailReads(nil)
	k.ResetCounts()
	noErrors(t, "Sync once reads work", d.Sync(t.Context(), []*render.ServiceState{state(web)}))
	if c := k.Counts(); c.Reads != 1 {
		t.Errorf("a Sync after a failed read read %d times, want 1", c.Reads)
	}
	if got, want := dump(k.State()), dump(expected(t, web)); got != want {
		t.Fatalf("the kernel holds\n%s\nwant\n%s", got, want)
	}
}

// TestDriverApplySharedElements: an Apply sees only its services'
// elements of the shared maps and sets, and changes only those.
func TestDriverApplySharedElements(t *testing.T) {
	k := nftfake.New()
	d := newDriver(t, k)
	a := l4("a", "192.0.2.10:80", spec.TCP, spec.RoundRobin, dest("10.1.1.2:8080", 1))
	b := l4("b", "192.0.2.11:80", spec.TCP, spec.RoundRobin, dest("10.1.1.3:8080", 1))
	for _, s := range []*render.L4Service{&a, &b} {
		s.Masquerade = true
		s.AllowCIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	}
	noErrors(t, "Apply", d.Apply(t.Context(), []*render.ServiceState{state(a), state(b)}))
	a.Masquerade, a.AllowCIDRs = false, nil
	k.ResetCounts()
	noErrors(t, "Apply a", d.Apply(t.Context(), []*render.ServiceState{state(a)}))
	for _, tx := range k.Log() {
		for _, op := range tx {
			for _, e := range op.Elements {
				if e.Addr == b.Address || e.Goto != "" && !strings.HasSuffix(e.Goto, "-a") && !strings.Contains(e.Goto, "-a/") {
					t.Errorf("a change of a wrote b's element: %s", op)
				}
			}
		}
	}
	if got, want := dump(k.State()), dump(expected(t, a, b)); got != want {
		t.Fatalf("the kernel holds\n%s\nwant\n%s", got, want)
	}
	// Taking b away leaves a's elements alone.
	noErrors(t, "remove b", d.Apply(t.Context(), []*render.ServiceState{removed("b")}))
	if got, want := dump(k.State()), dump(expected(t, a)); got != want {
		t.Fatalf("after b went the kernel holds\n%s\nwant\n%s", got, want)
	}
}

// TestDriverQuickSync: with the tables unchanged since the driver's own
// writes, a Sync looks only at the services whose state it has not
// applied (by Generation) and at those all no longer names; a service
// that failed is tried again.
func TestDriverQuickSync(t *testing.T) {
	k := nftfake.New()
	d := newDriver(t, k)
	gen := func(s render.L4Service, g uint64) *render.ServiceState {
		st := state(s)
		st.Generation = g
		return st
	}
	a := l4("a", "192.0.2.10:80", spec.TCP, spec.WeightedRoundRobin, dest("10.1.1.2:8080", 1), dest("10.1.1.3:8080", 1))
	b := l4("b", "192.0.2.11:80", spec.TCP, spec.RoundRobin, dest("10.1.1.4:8080", 1))
	c := l4("c", "192.0.2.12:80", spec.TCP, spec.RoundRobin, dest("10.1.1.5:8080", 1))
	noErrors(t, "first Sync", d.Sync(t.Context(), []*render.ServiceState{gen(a, 1), gen(b, 1), gen(c, 1)}))

	// c's next state is refused by the kernel: not recorded as applied,
	// and the record is read again by the next Sync.
	c.Destinations[0].Weight = 0
	k.Fail(nftables.DelElements, fmt.Errorf("refused: %w", syscall.EPERM))
	if errs := d.Apply(t.Context(), []*render.ServiceState{gen(c, 2)}); !errors.Is(errs["c"], syscall.EPERM) {
		t.Fatalf("Apply c: %v, want EPERM", errs)
	}
	k.Fail(nftables.DelElements, nil)
	noErrors(t, "Sync after the failure (reads again)", d.Sync(t.Context(), []*render.ServiceState{gen(a, 1), gen(b, 1), gen(c, 2)}))

	// Unchanged: nothing read, nothing written.
	k.ResetCounts()
	noErrors(t, "Sync, nothing changed", d.Sync(t.Context(), []*render.ServiceState{gen(a, 1), gen(b, 1), gen(c, 2)}))
	if cs := k.Counts(); cs.Reads != 0 || cs.Commits != 0 {
		t.Errorf("an unchanged Sync read %d times and committed %d", cs.Reads, cs.Commits)
	}
	// A new state of a, and b no longer named: one service changed, one
	// removed, without reading.
	a.Destinations[1].Weight = 3
	k.ResetCounts()
	noErrors(t, "Sync", d.Sync(t.Context(), []*render.ServiceState{gen(a, 2), gen(c, 2)}))
	if cs := k.Counts(); cs.Reads != 0 {
		t.Errorf("a quick Sync read %d times", cs.Reads)
	}
	if got, want := dump(k.State()), dump(expected(t, a, c)); got != want {
		t.Fatalf("the kernel holds\n%s\nwant\n%s", got, want)
	}
	// And back.
	c.Destinations[0].Weight = 1
	noErrors(t, "Apply c", d.Apply(t.Context(), []*render.ServiceState{gen(c, 3)}))
	if got, want := dump(k.State()), dump(expected(t, a, c)); got != want {
		t.Fatalf("the kernel holds\n%s\nwant\n%s", got, want)
	}
}
