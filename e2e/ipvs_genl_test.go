//go:build e2e

package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/e2e/internal/lab"
)

// unbatched hides ApplyBatch: the driver then writes one op per call.
type unbatched struct{ ipvs.Kernel }

// newNetlink returns the real kernel adapter of the root namespace.
func newNetlink(t testing.TB) *ipvs.Netlink {
	k := ipvs.NewNetlink("")
	t.Cleanup(k.Close)
	return k
}

func labCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func labService(addr string, port uint16, sched string) ipvs.Service {
	s := ipvs.Service{Protocol: ipvs.TCP, Address: netip.MustParseAddr(addr), Port: port, Scheduler: sched, Netmask: 0xffffffff}
	if s.Address.Is6() {
		s.Netmask = 128
	}
	return s
}

func labDest(addr string, port uint16, w int, f ipvs.Forwarding) ipvs.Destination {
	return ipvs.Destination{Address: netip.MustParseAddr(addr), Port: port, Weight: w, Forwarding: f}
}

// TestIPVSBatchAnswers sends one batch in which the kernel refuses some
// requests and checks that each answer lands on its own request.
func TestIPVSBatchAnswers(t *testing.T) {
	lab.RequireLab(t)
	ctx := labCtx(t)
	k := newNetlink(t)
	a := labService("192.0.2.60", 80, "rr")
	missing := labService("192.0.2.60", 81, "rr")
	nosuch := labService("192.0.2.60", 82, "nosuch")
	t.Cleanup(func() { _, _ = lab.Run(0, lab.IPVSADMBin, "-D", "-t", "192.0.2.60:80") })
	be1 := labDest(lab.Backends[0].Addr, 80, 1, ipvs.Masq)
	be2 := labDest(lab.Backends[1].Addr, 80, 2, ipvs.Masq)
	v6nat := labDest(lab.Backends[0].Addr6, 80, 1, ipvs.Masq) // another family, not tunnelled
	ops := []ipvs.Op{
		{Kind: ipvs.AddService, Service: a},
		{Kind: ipvs.AddDestination, Service: missing, Destination: be1},
		{Kind: ipvs.AddDestination, Service: a, Destination: be1},
		{Kind: ipvs.AddDestination, Service: a, Destination: be1},
		{Kind: ipvs.UpdateDestination, Service: a, Destination: be2},
		{Kind: ipvs.AddService, Service: a},
		{Kind: ipvs.AddService, Service: nosuch},
		{Kind: ipvs.AddDestination, Service: a, Destination: be2},
		{Kind: ipvs.AddDestination, Service: a, Destination: v6nat},
		{Kind: ipvs.DeleteDestination, Service: a, Destination: be1},
		{Kind: ipvs.UpdateService, Service: func() ipvs.Service { s := a; s.Scheduler = "wlc"; return s }()},
	}
	want := []error{nil, syscall.ESRCH, nil, syscall.EEXIST, syscall.ENOENT, syscall.EEXIST, syscall.ENOENT, nil, syscall.EINVAL, nil, nil}
	got := k.ApplyBatch(ctx, ops)
	if len(got) != len(ops) {
		t.Fatalf("%d answers for %d ops", len(got), len(ops))
	}
	for i, err := range got {
		if (want[i] == nil) != (err == nil) || (want[i] != nil && !errors.Is(err, want[i])) {
			t.Errorf("op %d (%s): %v, want %v", i, ops[i], err, want[i])
		} else if err != nil {
			t.Logf("op %d refused as expected: %v", i, err)
		}
	}
	svc, ok := lab.FindIPVSService(lab.MustIPVSList(t), "TCP", "192.0.2.60:80")
	if !ok || svc.Scheduler != "wlc" || len(svc.Dests) != 1 {
		t.Fatalf("ipvsadm -Ln: %+v, want 192.0.2.60:80 wlc with be2 only", svc)
	}
	if d, ok := svc.Dest(lab.IPVSHostPort(lab.Backends[1].Addr, 80)); !ok || d.Weight != 2 {
		t.Errorf("be2: %+v", d)
	}
	if errs := k.ApplyBatch(ctx, []ipvs.Op{{Kind: ipvs.DeleteService, Service: a}, {Kind: ipvs.DeleteService, Service: a}}); errs[0] != nil || !errors.Is(errs[1], syscall.ESRCH) {
		t.Errorf("delete twice: %v", errs)
	}
}

// TestIPVSBatchLarge sends 3,000 services with two destinations each
// through ApplyBatch in one call: every request must be answered, in as
// many sends as the socket buffers need.
func TestIPVSBatchLarge(t *testing.T) {
	lab.RequireLab(t)
	ctx := labCtx(t)
	k := newNetlink(t)
	const n = 3000
	var adds, dels []ipvs.Op
	for i := range n {
		s := labService(netip.AddrFrom4([4]byte{198, 19, byte(i / 250), byte(i%250 + 1)}).String(), 80, "rr")
		adds = append(adds, ipvs.Op{Kind: ipvs.AddService, Service: s},
			ipvs.Op{Kind: ipvs.AddDestination, Service: s, Destination: labDest(lab.Backends[0].Addr, 80, 1, ipvs.Masq)},
			ipvs.Op{Kind: ipvs.AddDestination, Service: s, Destination: labDest(lab.Backends[1].Addr, 80, 1, ipvs.Masq)})
		dels = append(dels, ipvs.Op{Kind: ipvs.DeleteService, Service: s})
	}
	t.Cleanup(func() { k.ApplyBatch(context.Background(), dels) })
	start := time.Now()
	errs := k.ApplyBatch(ctx, adds)
	el := time.Since(start)
	for i, err := range errs {
		if err != nil {
			t.Fatalf("op %d (%s): %v", i, adds[i], err)
		}
	}
	if c := countServices(t, "198.19."); c != n {
		t.Fatalf("%d services in the kernel, want %d", c, n)
	}
	st := k.BatchStats()
	t.Logf("%d writes in %v (%.0f µs/write): %+v", len(adds), el.Round(time.Millisecond), float64(el.Microseconds())/float64(len(adds)), st)
	for i, err := range k.ApplyBatch(ctx, dels) {
		if err != nil {
			t.Fatalf("delete %d: %v", i, err)
		}
	}
}

// countingDaemons counts the writes EnsureDaemons makes.
type countingDaemons struct {
	ipvs.DaemonKernel
	starts, stops int
}

func (c *countingDaemons) StartDaemon(ctx context.Context, d ipvs.SyncDaemon) error {
	c.starts++
	return c.DaemonKernel.StartDaemon(ctx, d)
}

func (c *countingDaemons) StopDaemon(ctx context.Context, r ipvs.Role) error {
	c.stops++
	return c.DaemonKernel.StopDaemon(ctx, r)
}

func daemonLines(t testing.TB) string {
	return strings.TrimSpace(lab.MustRun(t, lab.IPVSADMBin, "-L", "--daemon"))
}

// TestIPVSSyncDaemons starts both sync daemons on one interface, reads them
// back (with ipvsadm and Daemons), checks EnsureDaemons writes nothing
// when nothing changed, restarts one whose settings change, stops them,
// and finds out what the kernel answers for a service whose destinations
// are of another address family.
func TestIPVSSyncDaemons(t *testing.T) {
	lab.RequireLab(t)
	ctx := labCtx(t)
	k := newNetlink(t)
	// A veth pair of our own with an address: the master's socket binds
	// to the interface's IPv4 address, the backup joins the group on it.
	const ifn = "swmsync0"
	lab.MustRun(t, lab.IPBin, "link", "add", ifn, "type", "veth", "peer", "name", "swmsync1")
	t.Cleanup(func() { _, _ = lab.Run(0, lab.IPBin, "link", "del", ifn) })
	lab.MustRun(t, lab.IPBin, "addr", "add", "10.99.0.1/24", "dev", ifn)
	lab.MustRun(t, lab.IPBin, "link", "set", ifn, "up")
	lab.MustRun(t, lab.IPBin, "link", "set", "swmsync1", "up")
	t.Cleanup(func() {
		for _, r := range []ipvs.Role{ipvs.Master, ipvs.Backup} {
			_ = k.StopDaemon(context.Background(), r)
		}
	})

	master := ipvs.SyncDaemon{Role: ipvs.Master, Interface: ifn, SyncID: 7}
	backup := ipvs.SyncDaemon{Role: ipvs.Backup, Interface: ifn, SyncID: 7}
	c := &countingDaemons{DaemonKernel: k}
	if err := ipvs.EnsureDaemons(ctx, c, []ipvs.SyncDaemon{master, backup}); err != nil {
		t.Fatal(err)
	}
	if c.starts != 2 || c.stops != 0 {
		t.Errorf("first EnsureDaemons: %d starts, %d stops; want 2, 0", c.starts, c.stops)
	}
	out := daemonLines(t)
	t.Logf("ipvsadm -L --daemon:\n%s", out)
	for _, role := range []string{"master", "backup"} {
		if !strings.Contains(out, role+" sync daemon (mcast="+ifn+", syncid=7") {
			t.Errorf("ipvsadm does not show the %s daemon on %s with syncid 7", role, ifn)
		}
	}
	have, err := k.Daemons(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Daemons: %+v", have)
	if len(have) != 2 || have[0].Role != ipvs.Master || have[1].Role != ipvs.Backup {
		t.Fatalf("Daemons: %+v, want master and backup", have)
	}
	for _, h := range have {
		if h.Interface != ifn || h.SyncID != 7 || h.Port != 8848 || h.TTL != 1 || h.Group != netip.MustParseAddr("224.0.0.81") || h.MaxLen == 0 {
			t.Errorf("%s read back as %+v, want %s, syncid 7 and the kernel's defaults", h.Role, h, ifn)
		}
	}

	c.starts, c.stops = 0, 0
	if err := ipvs.EnsureDaemons(ctx, c, []ipvs.SyncDaemon{master, backup}); err != nil {
		t.Fatal(err)
	}
	if c.starts+c.stops != 0 {
		t.Errorf("second EnsureDaemons: %d starts, %d stops; want none", c.starts, c.stops)
	}
	if err := k.StartDaemon(ctx, master); !errors.Is(err, syscall.EEXIST) {
		t.Errorf("starting a running master: %v, want EEXIST", err)
	}

	// Every optional setting: the master is restarted, the backup left.
	tuned := ipvs.SyncDaemon{Role: ipvs.Master, Interface: ifn, SyncID: 8, MaxLen: 1400,
		Group: netip.MustParseAddr("239.1.1.1"), Port: 9000, TTL: 3}
	c.starts, c.stops = 0, 0
	if err := ipvs.EnsureDaemons(ctx, c, []ipvs.SyncDaemon{tuned, backup}); err != nil {
		t.Fatal(err)
	}
	if c.starts != 1 || c.stops != 1 {
		t.Errorf("changed master: %d starts, %d stops; want 1, 1", c.starts, c.stops)
	}
	if have, err = k.Daemons(ctx); err != nil || len(have) != 2 || have[0] != tuned {
		t.Errorf("after the change: %+v, %v; want master %+v", have, err, tuned)
	}
	t.Logf("ipvsadm -L --daemon after the change:\n%s", daemonLines(t))

	for _, r := range []ipvs.Role{ipvs.Master, ipvs.Backup} {
		if err := k.StopDaemon(ctx, r); err != nil {
			t.Error(err)
		}
	}
	if out := daemonLines(t); out != "" {
		t.Errorf("after StopDaemon, ipvsadm -L --daemon shows:\n%s", out)
	}
	if have, err := k.Daemons(ctx); err != nil || len(have) != 0 {
		t.Errorf("Daemons after stopping: %+v, %v", have, err)
	}
	if err := k.StopDaemon(ctx, ipvs.Master); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("stopping a stopped master: %v, want ESRCH", err)
	}
	if err := k.StartDaemon(ctx, ipvs.SyncDaemon{Role: ipvs.Backup, Interface: "swm-nosuch0"}); !errors.Is(err, syscall.ENODEV) {
		t.Errorf("a missing interface: %v, want ENODEV", err)
	}

	t.Run("mixed-families", func(t *testing.T) {
		// An IPv4 service with an IPv6 real server, which IPVS allows
		// only when tunnelled.
		s := labService("192.0.2.62", 80, "rr")
		tun6 := labDest(lab.Backends[0].Addr6, 80, 1, ipvs.Tunnel)
		t.Cleanup(func() { _, _ = lab.Run(0, lab.IPVSADMBin, "-D", "-t", "192.0.2.62:80") })
		for i, err := range k.ApplyBatch(ctx, []ipvs.Op{{Kind: ipvs.AddService, Service: s}, {Kind: ipvs.AddDestination, Service: s, Destination: tun6}}) {
			if err != nil {
				t.Fatalf("op %d: %v", i, err)
			}
		}
		err := k.StartDaemon(ctx, master)
		t.Logf("StartDaemon with a mixed-family service: %v", err)
		if !errors.Is(err, ipvs.ErrSyncMixedFamily) || !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), "192.0.2.62:80/tcp") {
			t.Errorf("want ErrSyncMixedFamily (EINVAL) naming the service")
		}
		if out := daemonLines(t); out != "" {
			t.Errorf("a daemon runs after the refusal:\n%s", out)
		}
		// The other way round: with sync running, such a destination is
		// refused.
		if errs := k.ApplyBatch(ctx, []ipvs.Op{{Kind: ipvs.DeleteDestination, Service: s, Destination: tun6}}); errs[0] != nil {
			t.Fatal(errs[0])
		}
		if err := k.StartDaemon(ctx, master); err != nil {
			t.Fatal(err)
		}
		errs := k.ApplyBatch(ctx, []ipvs.Op{{Kind: ipvs.AddDestination, Service: s, Destination: tun6}})
		t.Logf("a mixed-family destination while sync runs: %v", errs[0])
		if !errors.Is(errs[0], syscall.EINVAL) {
			t.Errorf("want EINVAL")
		}
		if err := k.StopDaemon(ctx, ipvs.Master); err != nil {
			t.Error(err)
		}
	})
}

// TestIPVSColdStartLarge is the cold-start figure with 10,000 services x 4
// destinations; it runs only when named (LAB_MEM=4096 e2e/lab/run.sh -run
// IPVSColdStartLarge).
func TestIPVSColdStartLarge(t *testing.T) {
	lab.RequireLab(t)
	onlyWhenNamed(t, "ColdStartLarge")
	coldStartFigures(t, 10000, 1)
}

// driverAndKernel returns the real driver on a kernel adapter of its own,
// batching or not.
func driverAndKernel(t testing.TB, dir string, batched bool) (*ipvs.Driver, *ipvs.Netlink) {
	t.Helper()
	k := newNetlink(t)
	var kernel ipvs.Kernel = k
	if !batched {
		kernel = unbatched{k}
	}
	d, err := ipvs.New(ipvs.Config{Kernel: kernel, DataDir: dir, CallTimeout: ipvsDriverTimeout, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return d, k
}

func fmtStats(s ipvs.BatchStats) string {
	if s.Batches == 0 {
		return "one request per call"
	}
	return fmt.Sprintf("%d batches, %d sends, largest %d requests, %d shrinks, %d overruns", s.Batches, s.Sends, s.Largest, s.Shrinks, s.Overruns)
}
