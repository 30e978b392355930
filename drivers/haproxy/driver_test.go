package haproxy

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/internal/atomicfile"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

func newFakeDriver(t *testing.T) (*Driver, *fakeRuntime, *fakeProcess) {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "certs"), 0o700); err != nil {
		t.Fatal(err)
	}
	rt := newFakeRuntime()
	proc := &fakeProcess{rt: rt, cfgPath: filepath.Join(dir, "haproxy.cfg")}
	return newFakeDriverOn(t, dir, rt, proc), rt, proc
}

// newFakeDriverOn is a driver on dir with the given fakes, as a restarted
// agent makes one.
func newFakeDriverOn(t *testing.T, dir string, rt *fakeRuntime, proc *fakeProcess) *Driver {
	t.Helper()
	d, err := newDriver(Options{Dir: dir, CommandTimeout: time.Second, Logger: discardLogger()}, rt, proc, filepath.Join(dir, "admin.sock"))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// st is the state of a HAProxy service; gone is the removal of one.
func st(s render.HAProxyService) *render.ServiceState {
	return &render.ServiceState{Name: s.Name, HAProxy: &s}
}
func gone(name string) *render.ServiceState { return &render.ServiceState{Name: name} }

func states(svcs ...render.HAProxyService) []*render.ServiceState {
	out := make([]*render.ServiceState, len(svcs))
	for i, s := range svcs {
		out[i] = st(s)
	}
	return out
}

func fsrv(addr string, port uint16, w int) render.HAProxyServer {
	a := netip.MustParseAddr(addr)
	return render.HAProxyServer{Name: render.ServerName(a, port), Address: a, Port: port, Weight: w}
}

type wantServer struct {
	addr   string
	weight int
	maint  bool
}

func assertServers(t *testing.T, rt *fakeRuntime, backend string, want map[string]wantServer) {
	t.Helper()
	rt.mu.Lock()
	defer rt.mu.Unlock()
	got := rt.backends[backend]
	if len(got) != len(want) {
		t.Errorf("%s has %d servers, want %d", backend, len(got), len(want))
	}
	for n, w := range want {
		s, ok := got[n]
		if !ok {
			t.Errorf("%s/%s missing", backend, n)
			continue
		}
		if s.addr.String() != w.addr || s.weight != w.weight || s.maint != w.maint {
			t.Errorf("%s/%s = %+v, want %+v", backend, n, *s, w)
		}
	}
}

func TestApplyPoolChangesUseRuntimeAPI(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	svc := render.HAProxyService{Name: "api", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Scheduler: spec.RoundRobin,
		Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1), fsrv("10.0.0.2", 80, 1)}}
	steps := []struct {
		name    string
		servers []render.HAProxyServer
		want    map[string]wantServer
	}{
		{"start", svc.Servers, map[string]wantServer{
			"s10.0.0.1_80": {"10.0.0.1:80", 1, false}, "s10.0.0.2_80": {"10.0.0.2:80", 1, false}}},
		{"add and reweight", []render.HAProxyServer{fsrv("10.0.0.1", 80, 5), fsrv("10.0.0.2", 80, 1), fsrv("10.0.0.3", 80, 70000)}, map[string]wantServer{
			"s10.0.0.1_80": {"10.0.0.1:80", 5, false}, "s10.0.0.2_80": {"10.0.0.2:80", 1, false}, "s10.0.0.3_80": {"10.0.0.3:80", 256, false}}},
		{"fail to weight 0", []render.HAProxyServer{fsrv("10.0.0.1", 80, 5), fsrv("10.0.0.2", 80, 0), fsrv("10.0.0.3", 80, 70000)}, map[string]wantServer{
			"s10.0.0.1_80": {"10.0.0.1:80", 5, false}, "s10.0.0.2_80": {"10.0.0.2:80", 0, false}, "s10.0.0.3_80": {"10.0.0.3:80", 256, false}}},
		{"remove", []render.HAProxyServer{fsrv("10.0.0.3", 80, 1)}, map[string]wantServer{
			"s10.0.0.3_80": {"10.0.0.3:80", 1, false}}},
	}
	for _, st := range steps {
		svc.Servers = st.servers
		if errs := d.Apply(ctx, states(svc)); len(errs) > 0 {
			t.Fatalf("%s: %v", st.name, errs)
		}
		assertServers(t, rt, "be_api", st.want)
	}
	if proc.starts != 1 || proc.reloads != 0 || d.Reloads() != 0 {
		t.Errorf("starts %d, reloads %d/%d; want 1 start and no reload", proc.starts, proc.reloads, d.Reloads())
	}
	// Before supervision starts HAProxy again, the on-disk config gets the
	// current pool.
	d.flush()
	cfg, _ := os.ReadFile(proc.cfgPath)
	if !strings.Contains(string(cfg), "server s10.0.0.3_80 10.0.0.3:80 weight 1") || strings.Contains(string(cfg), "10.0.0.1") {
		t.Errorf("haproxy.cfg not current:\n%s", cfg)
	}
}

// TestSyncRepairsDrift: Apply trusts its record of what HAProxy holds (it
// reads nothing); Sync reads every backend back and repairs what someone
// changed behind the driver's back.
func TestSyncRepairsDrift(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	svc := render.HAProxyService{Name: "api", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 2)}}
	if errs := d.Apply(ctx, states(svc)); len(errs) > 0 {
		t.Fatal(errs)
	}
	rt.mu.Lock()
	s := rt.backends["be_api"]["s10.0.0.1_80"]
	s.addr, s.weight, s.maint = netip.MustParseAddrPort("10.9.9.9:99"), 7, true
	rt.backends["be_api"]["stray"] = &fakeServer{addr: netip.MustParseAddrPort("10.0.0.66:80"), weight: 1}
	rt.mu.Unlock()
	rt.takeCalls()
	if errs := d.Apply(ctx, states(svc)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if calls := rt.takeCalls(); len(calls) > 0 {
		t.Errorf("Apply of an unchanged service made runtime calls: %q", calls)
	}
	if errs := d.Sync(ctx, states(svc)); len(errs) > 0 {
		t.Fatal(errs)
	}
	assertServers(t, rt, "be_api", map[string]wantServer{"s10.0.0.1_80": {"10.0.0.1:80", 2, false}})
	if proc.reloads != 0 {
		t.Errorf("%d reloads to repair a pool", proc.reloads)
	}
	// Nothing differs now: a second Sync reads and writes nothing.
	rt.takeCalls()
	if errs := d.Sync(ctx, states(svc)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if w := rt.writes(); len(w) > 0 {
		t.Errorf("Sync with nothing to repair wrote %q", w)
	}
}

// TestSyncRepairsStructure: a backend missing from HAProxy, or one it holds
// that is not desired, reloads the recorded structure; a service not in
// all is removed.
func TestSyncRepairsStructure(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	a := render.HAProxyService{Name: "a", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1)}}
	b := render.HAProxyService{Name: "b", Bind: netip.MustParseAddrPort("192.0.2.11:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.2", 80, 1)}}
	if errs := d.Apply(ctx, states(a, b)); len(errs) > 0 {
		t.Fatal(errs)
	}
	rt.mu.Lock()
	delete(rt.backends, "be_a")
	rt.backends["be_stray"] = map[string]*fakeServer{}
	rt.mu.Unlock()
	if errs := d.Sync(ctx, states(a, b)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if proc.reloads != 1 {
		t.Errorf("%d reloads, want 1", proc.reloads)
	}
	assertServers(t, rt, "be_a", map[string]wantServer{"s10.0.0.1_80": {"10.0.0.1:80", 1, false}})
	if _, ok := rt.backends["be_stray"]; ok {
		t.Error("the stray backend survived the repair")
	}
	if errs := d.Sync(ctx, states(a)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if _, ok := rt.backends["be_b"]; ok || proc.reloads != 2 {
		t.Errorf("b not removed by a Sync without it (reloads %d)", proc.reloads)
	}
}

// TestApplyPoolChangeTouchesOnlyItsBackend: with several services loaded,
// one service's pool change is runtime commands on its backend alone: no
// read, no other backend, no configuration check, no reload.
func TestApplyPoolChangeTouchesOnlyItsBackend(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	var svcs []render.HAProxyService
	for i := range 20 {
		svcs = append(svcs, render.HAProxyService{Name: fmt.Sprintf("s%02d", i), Bind: netip.AddrPortFrom(netip.MustParseAddr("192.0.2.10"), uint16(1000+i)),
			Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1), fsrv("10.0.0.2", 80, 1)}})
	}
	if errs := d.Apply(ctx, states(svcs...)); len(errs) > 0 {
		t.Fatal(errs)
	}
	validated := proc.validate
	files := statFiles(t, proc.cfgPath)
	rt.takeCalls()
	changed := svcs[7]
	changed.Servers = []render.HAProxyServer{fsrv("10.0.0.1", 80, 0), fsrv("10.0.0.3", 80, 2)} // a failed server, a new one, one removed
	if errs := d.Apply(ctx, states(changed)); len(errs) > 0 {
		t.Fatal(errs)
	}
	calls := rt.takeCalls()
	want := []string{
		"weight be_s07/s10.0.0.1_80 0",
		"add be_s07/s10.0.0.3_80 10.0.0.3:80 2", "state be_s07/s10.0.0.3_80 ready",
		"state be_s07/s10.0.0.2_80 maint", "del be_s07/s10.0.0.2_80",
	}
	if !slices.Equal(calls, want) {
		t.Errorf("runtime calls = %q, want %q", calls, want)
	}
	if proc.validate != validated || proc.reloads != 0 {
		t.Errorf("a pool change checked the configuration %d times and reloaded %d times", proc.validate-validated, proc.reloads)
	}
	// haproxy.cfg is brought up to date later (by a Sync, or before a
	// restart), not by each change.
	if now := statFiles(t, proc.cfgPath); !slices.Equal(now, files) {
		t.Error("a pool change rewrote haproxy.cfg")
	}
	d.flush()
	cfg, _ := os.ReadFile(proc.cfgPath)
	if !strings.Contains(string(cfg), "server s10.0.0.3_80 10.0.0.3:80 weight 2") {
		t.Errorf("haproxy.cfg does not hold the new pool:\n%s", cfg)
	}
	// The same state again: nothing at all.
	if errs := d.Apply(ctx, states(changed)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if calls := rt.takeCalls(); len(calls) > 0 {
		t.Errorf("a repeated state made runtime calls: %q", calls)
	}
}

// TestApplyRemovesAtOnce: a server that leaves the desired pool has been
// drained by the agent already; the driver puts it in maintenance, shuts
// down what is left and deletes it, without waiting. Connections reads
// only the backends of the services asked about.
func TestApplyRemovesAtOnce(t *testing.T) {
	d, rt, _ := newFakeDriver(t)
	ctx := context.Background()
	svc := render.HAProxyService{Name: "api", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1), fsrv("10.0.0.2", 80, 1)}}
	other := render.HAProxyService{Name: "other", Bind: netip.MustParseAddrPort("192.0.2.11:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1)}}
	if errs := d.Apply(ctx, states(svc, other)); len(errs) > 0 {
		t.Fatal(errs)
	}
	rt.mu.Lock()
	rt.backends["be_api"]["s10.0.0.2_80"].sessions = 3
	rt.mu.Unlock()
	rt.takeCalls()
	conns, err := d.Connections(ctx, map[string]bool{"api": true})
	if err != nil || len(conns) != 2 || conns[render.BackendRef{Service: "api", Addr: netip.MustParseAddrPort("10.0.0.2:80")}] != 3 {
		t.Errorf("Connections = %v, %v", conns, err)
	}
	if calls := rt.takeCalls(); !slices.Equal(calls, []string{"read sessions be_api"}) {
		t.Errorf("Connections made calls %q, want one read of be_api", calls)
	}
	svc.Servers = svc.Servers[:1]
	if errs := d.Apply(ctx, states(svc)); len(errs) > 0 {
		t.Fatal(errs)
	}
	assertServers(t, rt, "be_api", map[string]wantServer{"s10.0.0.1_80": {"10.0.0.1:80", 1, false}})
	want := []string{"state be_api/s10.0.0.2_80 maint", "del be_api/s10.0.0.2_80", "shutdown be_api/s10.0.0.2_80", "del be_api/s10.0.0.2_80"}
	if calls := rt.takeCalls(); !slices.Equal(calls, want) {
		t.Errorf("removal made calls %q, want %q", calls, want)
	}
}

func TestApplyStructuralChangeReloads(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	a := render.HAProxyService{Name: "a", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 3)}}
	b := render.HAProxyService{Name: "b", Bind: netip.MustParseAddrPort("192.0.2.11:443"), Scheduler: spec.SourceHashing, Servers: []render.HAProxyServer{fsrv("10.0.0.2", 80, 1)}}
	a2 := a
	a2.Scheduler = spec.LeastConnection
	a3 := a2
	a3.Persistence = time.Minute
	tests := []struct {
		name    string
		states  []*render.ServiceState
		reloads int
	}{
		{"start with a", states(a), 0},
		{"add b", states(b), 1},
		{"same again", states(a, b), 1},
		{"scheduler of a", states(a2), 2},
		{"persistence of a", states(a3), 3},
		{"remove b", []*render.ServiceState{gone("b")}, 4},
		{"remove what is not there", []*render.ServiceState{gone("c")}, 4},
	}
	for _, tt := range tests {
		if errs := d.Apply(ctx, tt.states); len(errs) > 0 {
			t.Fatalf("%s: %v", tt.name, errs)
		}
		if proc.reloads != tt.reloads || int(d.Reloads()) != tt.reloads {
			t.Errorf("%s: %d reloads (driver says %d), want %d", tt.name, proc.reloads, d.Reloads(), tt.reloads)
		}
	}
	assertServers(t, rt, "be_a", map[string]wantServer{"s10.0.0.1_80": {"10.0.0.1:80", 3, false}})
	if _, ok := rt.backends["be_b"]; ok {
		t.Error("be_b survived its removal")
	}
}

func TestApplyRejectedStructureKeepsLastGood(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	dir := t.TempDir()
	good := filepath.Join(dir, "good.pem")
	pemA, _ := makeCert(t, "a")
	if err := os.WriteFile(good, pemA, 0o600); err != nil {
		t.Fatal(err)
	}
	badDir := "/bad/" // fakeProcess.Validate rejects configs naming it
	a := render.HAProxyService{Name: "a", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Certificate: good, Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1)}}
	b := render.HAProxyService{Name: "b", Bind: netip.MustParseAddrPort("192.0.2.11:80"), Servers: []render.HAProxyServer{fsrv("10.0.0.2", 80, 1)}}
	if errs := d.Apply(ctx, states(a, b)); len(errs) > 0 {
		t.Fatal(errs)
	}
	// a's new certificate path cannot be read: prepare refuses it before
	// any check, a keeps its old structure and gets its new pool.
	a2 := a
	a2.Certificate = badDir + "x.pem"
	a2.Servers = []render.HAProxyServer{fsrv("10.0.0.9", 80, 4)}
	b2 := b
	b2.Servers = []render.HAProxyServer{fsrv("10.0.0.2", 80, 9)}
	errs := d.Apply(ctx, states(a2, b2))
	if errs["a"] == nil || errs["b"] != nil {
		t.Fatalf("errs = %v, want an error for a only", errs)
	}
	assertServers(t, rt, "be_a", map[string]wantServer{"s10.0.0.9_80": {"10.0.0.9:80", 4, false}})
	assertServers(t, rt, "be_b", map[string]wantServer{"s10.0.0.2_80": {"10.0.0.2:80", 9, false}})
	if proc.reloads != 0 {
		t.Errorf("%d reloads for a refused structure", proc.reloads)
	}
	// A new service that haproxy -c rejects (the fake rejects /bad/ paths
	// in the file; here through the etcd directory option) is left out.
	d.opts.Dir = "/bad/dir"
	c := render.HAProxyService{Name: "c", Bind: netip.MustParseAddrPort("192.0.2.12:443"), CertificateKey: "/k", CertificatePEM: pemA, Servers: []render.HAProxyServer{fsrv("10.0.0.3", 80, 1)}}
	errs = d.Apply(ctx, states(a, b2, c))
	if errs["c"] == nil || errs["a"] != nil || errs["b"] != nil {
		t.Fatalf("errs = %v, want an error for c only", errs)
	}
	if _, ok := rt.backends["be_c"]; ok {
		t.Error("the rejected service c was loaded")
	}
	cfg, _ := os.ReadFile(proc.cfgPath)
	if strings.Contains(string(cfg), "/bad/") {
		t.Errorf("rejected config left on disk:\n%s", cfg)
	}
}

func TestApplyCertificateHotSwap(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	pemA, _ := makeCert(t, "a")
	pemB, _ := makeCert(t, "b")
	svc := render.HAProxyService{Name: "api", Bind: netip.MustParseAddrPort("192.0.2.10:443"), CertificateKey: "/switchman/certs/api", CertificatePEM: pemA,
		Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1)}}
	if errs := d.Apply(ctx, states(svc)); len(errs) > 0 {
		t.Fatal(errs)
	}
	path := filepath.Join(d.opts.Dir, "certs", "api.pem")
	svc.CertificatePEM = append([]byte("junk before the PEM\n\n"), pemB...)
	if errs := d.Apply(ctx, states(svc)); len(errs) > 0 {
		t.Fatal(errs)
	}
	want, _ := canonicalPEM(pemB)
	if got := string(rt.certs[path]); got != string(want) {
		t.Errorf("HAProxy serves %q, want the new certificate", got)
	}
	if onDisk, _ := os.ReadFile(path); string(onDisk) != string(want) {
		t.Error("certificate file not updated")
	}
	if proc.reloads != 0 {
		t.Errorf("%d reloads for a certificate change", proc.reloads)
	}
	// An unusable PEM is refused; the old certificate stays.
	svc.CertificatePEM = []byte("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
	if errs := d.Apply(ctx, states(svc)); errs["api"] == nil {
		t.Error("a broken PEM was accepted")
	}
	if got := string(rt.certs[path]); got != string(want) {
		t.Error("the served certificate changed after a refused PEM")
	}
}

func TestApplyMissingBinary(t *testing.T) {
	d, _, proc := newFakeDriver(t)
	proc.missing = true
	errs := d.Apply(context.Background(), states(render.HAProxyService{Name: "a"}))
	if !errors.Is(errs["a"], ErrMissing) || proc.starts != 0 {
		t.Errorf("errs = %v, starts = %d", errs, proc.starts)
	}
}

func TestParseServersState(t *testing.T) {
	out := "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n" +
		"3 b1 1 s1 ::1 2 0 1 1 6 1 0 2 0 0 0 0 - 18081 - 0 0 - - 0\n" +
		"3 b1 2 s2 127.0.0.1 0 1 3 3 2 1 0 0 0 0 0 0 - 18082 - 0 0 - - 0\n" +
		"4 b2 1 s3 10.0.0.1 2 0 1 1 6 1 0 2 0 0 0 0 - 80 - 0 0 - - 0\n\n"
	all, err := parseServersState(out)
	if err != nil {
		t.Fatal(err)
	}
	want := []ServerState{
		{Name: "s1", Addr: netip.MustParseAddrPort("[::1]:18081"), Weight: 1},
		{Name: "s2", Addr: netip.MustParseAddrPort("127.0.0.1:18082"), Weight: 3, Maint: true},
	}
	if got := all["b1"]; !slices.Equal(got, want) {
		t.Errorf("b1: got %+v", got)
	}
	if got := all["b2"]; len(got) != 1 || got[0].Name != "s3" || len(all) != 2 {
		t.Errorf("got %+v", all)
	}
	if _, err := parseServersState("Can't find backend.\n"); !errors.Is(err, ErrNoBackend) {
		t.Errorf("missing backend: %v", err)
	}
}

// TestApplyCertificateFileUntrusted: tls.certificate names a file chosen by
// whoever writes definitions. One that is not a regular file of bounded
// size fails its service at once, naming the field and the path (reading
// /dev/zero used to grow without bound and a FIFO blocked Apply forever);
// the other services are loaded.
func TestApplyCertificateFileUntrusted(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.pem")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big.pem")
	pemA, _ := makeCert(t, "a")
	if err := os.WriteFile(big, append(pemA, make([]byte, 1<<20)...), 0o600); err != nil { // over the 1 MiB limit
		t.Fatal(err)
	}
	tests := []struct {
		name, path string
		is         error
	}{
		{"device", "/dev/zero", atomicfile.ErrNotRegular},
		{"fifo", fifo, atomicfile.ErrNotRegular},
		{"directory", dir, atomicfile.ErrNotRegular},
		{"too large", big, atomicfile.ErrTooLarge},
		{"missing", filepath.Join(dir, "missing.pem"), fs.ErrNotExist},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, _, _ := newFakeDriver(t)
			bad := render.HAProxyService{Name: "api", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Certificate: tc.path,
				Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1)}}
			good := render.HAProxyService{Name: "tcp", Bind: netip.MustParseAddrPort("192.0.2.11:80"),
				Servers: []render.HAProxyServer{fsrv("10.0.0.2", 80, 1)}}
			done := make(chan map[string]error, 1)
			go func() {
				done <- d.Apply(context.Background(), states(bad, good))
			}()
			var errs map[string]error
			select {
			case errs = <-done:
			case <-time.After(20 * time.Second):
				t.Fatalf("Apply with tls.certificate %s did not return within 20s", tc.path)
			}
			err := errs["api"]
			if !errors.Is(err, tc.is) || !strings.Contains(fmt.Sprint(err), "tls.certificate") || !strings.Contains(fmt.Sprint(err), tc.path) {
				t.Errorf("error of api = %v; want one naming tls.certificate and %s, wrapping %v", err, tc.path, tc.is)
			}
			if errs["tcp"] != nil {
				t.Errorf("the other service failed: %v", errs["tcp"])
			}
			if _, ok := d.loaded["tcp"]; !ok {
				t.Error("the other service was not loaded")
			}
		})
	}
}

// TestApplyWithoutWorkingDirectory: a --haproxy-dir that cannot be created
// does not fail New (the agent used to exit); each HAProxy service fails
// with the reason, and Apply works once the directory can be created.
func TestApplyWithoutWorkingDirectory(t *testing.T) {
	base := t.TempDir()
	blocker := filepath.Join(base, "file")
	if err := os.WriteFile(blocker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// /bin/false as haproxy: available, and refuses every configuration.
	d, err := New(Options{Dir: filepath.Join(blocker, "haproxy"), Bin: "/bin/false"})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if errs := d.Apply(context.Background(), nil); len(errs) > 0 {
		t.Errorf("Apply without HAProxy services: %v", errs)
	}
	svc := render.HAProxyService{Name: "api", Bind: netip.MustParseAddrPort("192.0.2.10:443"),
		Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1)}}
	errs := d.Apply(context.Background(), states(svc))
	if err := errs["api"]; !errors.Is(err, syscall.ENOTDIR) || !strings.Contains(err.Error(), "--haproxy-dir "+filepath.Join(blocker, "haproxy")) {
		t.Fatalf("error of api = %v; want ENOTDIR naming --haproxy-dir", err)
	}
	// Once the directory can be made, the next Apply makes it.
	if err := os.Remove(blocker); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(blocker, 0o700); err != nil {
		t.Fatal(err)
	}
	errs = d.Apply(context.Background(), states(svc))
	if err := errs["api"]; err == nil || errors.Is(err, syscall.ENOTDIR) {
		t.Errorf("error of api after the directory was fixed = %v; want the configuration check's", err)
	}
	if st, err := os.Stat(filepath.Join(blocker, "haproxy", "certs")); err != nil || !st.IsDir() {
		t.Fatalf("certs directory: %v", err)
	}
}

// TestSyncAfterRestartWritesNothing: an agent restarts while HAProxy keeps
// running; the new driver's first Sync, with nothing changed, adopts it:
// no runtime write, no reload, no start, haproxy.cfg and the certificate
// files untouched.
func TestSyncAfterRestartWritesNothing(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	pemA, _ := makeCert(t, "a")
	fileCert := filepath.Join(t.TempDir(), "b.pem")
	pemB, _ := makeCert(t, "b")
	if err := os.WriteFile(fileCert, pemB, 0o600); err != nil {
		t.Fatal(err)
	}
	all := []render.HAProxyService{
		{Name: "a", Bind: netip.MustParseAddrPort("192.0.2.10:443"), CertificateKey: "/k/a", CertificatePEM: pemA, Scheduler: spec.LeastConnection,
			Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 3), fsrv("10.0.0.2", 80, 0)}},
		{Name: "b", Bind: netip.MustParseAddrPort("[2001:db8::1]:443"), Certificate: fileCert, Persistence: time.Minute,
			Servers: []render.HAProxyServer{fsrv("2001:db8::2", 8443, 70000)}},
		{Name: "c", Bind: netip.MustParseAddrPort("192.0.2.10:80")},
	}
	if errs := d.Sync(ctx, states(all...)); len(errs) > 0 {
		t.Fatal(errs)
	}
	// A runtime pool change after the start, recorded in haproxy.cfg by
	// the periodic Sync.
	all[2].Servers = []render.HAProxyServer{fsrv("10.0.0.9", 80, 5)}
	if errs := d.Apply(ctx, states(all[2])); len(errs) > 0 {
		t.Fatal(errs)
	}
	if errs := d.Sync(ctx, states(all...)); len(errs) > 0 {
		t.Fatal(errs)
	}
	before := statFiles(t, proc.cfgPath, filepath.Join(d.opts.Dir, "certs", "a.pem"))
	rt.takeCalls()
	starts, reloads := proc.starts, proc.reloads

	d2 := newFakeDriverOn(t, d.opts.Dir, rt, proc) // the agent restarted; HAProxy did not
	if errs := d2.Sync(ctx, states(all...)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if w := rt.writes(); len(w) > 0 {
		t.Errorf("the first Sync after a restart wrote %q", w)
	}
	if proc.starts != starts || proc.reloads != reloads || proc.adopts != 1 {
		t.Errorf("starts %d -> %d, reloads %d -> %d, adopts %d; want no start, no reload, one adoption", starts, proc.starts, reloads, proc.reloads, proc.adopts)
	}
	if after := statFiles(t, proc.cfgPath, filepath.Join(d.opts.Dir, "certs", "a.pem")); !slices.Equal(before, after) {
		t.Errorf("files rewritten: %v -> %v", before, after)
	}
	// And the adopted record serves the next pool change without a read.
	rt.takeCalls()
	all[0].Servers = []render.HAProxyServer{fsrv("10.0.0.1", 80, 3), fsrv("10.0.0.2", 80, 1)}
	if errs := d2.Apply(ctx, states(all[0])); len(errs) > 0 {
		t.Fatal(errs)
	}
	if calls := rt.takeCalls(); !slices.Equal(calls, []string{"weight be_a/s10.0.0.2_80 1"}) {
		t.Errorf("pool change after the adoption made calls %q", calls)
	}
}

// statFiles identifies each file's content version: inode and mtime.
func statFiles(t *testing.T, paths ...string) []string {
	t.Helper()
	var out []string
	for _, p := range paths {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, fmt.Sprint(st.Sys().(*syscall.Stat_t).Ino, st.ModTime().UnixNano()))
	}
	return out
}

// TestApplyBindFailureFailsOnlyItsService (issue 10, defect 4): a service
// whose bind cannot be made (taken by another process, not local, a
// link-local address without a zone) fails alone with the cause, at once,
// before any reload; the others are loaded, and it is retried alone.
func TestApplyBindFailureFailsOnlyItsService(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	taken := netip.MustParseAddrPort("127.0.0.1:2379")
	proc.taken = map[netip.AddrPort]bool{taken: true}
	good := render.HAProxyService{Name: "good", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1)}}
	bad := render.HAProxyService{Name: "bad", Bind: taken, Servers: []render.HAProxyServer{fsrv("10.0.0.2", 80, 1)}}

	// At the start: HAProxy starts with good alone.
	errs := d.Apply(ctx, states(good, bad))
	var be *BindError
	if !errors.As(errs["bad"], &be) || !errors.Is(errs["bad"], syscall.EADDRINUSE) || !strings.Contains(errs["bad"].Error(), "cannot bind socket 127.0.0.1:2379") {
		t.Fatalf("error of bad = %v; want a BindError wrapping EADDRINUSE", errs["bad"])
	}
	if errs["good"] != nil || proc.starts != 1 {
		t.Fatalf("good: %v, starts %d", errs["good"], proc.starts)
	}
	assertServers(t, rt, "be_good", map[string]wantServer{"s10.0.0.1_80": {"10.0.0.1:80", 1, false}})

	// While running: the bad service is refused before any check or
	// reload, alongside a structural change of good that is loaded.
	validated := proc.validate
	good.Scheduler = spec.LeastConnection
	errs = d.Apply(ctx, states(good, bad))
	if !errors.Is(errs["bad"], syscall.EADDRINUSE) || errs["good"] != nil {
		t.Fatalf("errs = %v", errs)
	}
	if proc.reloads != 1 || proc.validate != validated+1 {
		t.Errorf("%d reloads, %d checks; want one of each, for good", proc.reloads, proc.validate-validated)
	}
	errs = d.Apply(ctx, states(bad))
	if !errors.Is(errs["bad"], syscall.EADDRINUSE) || proc.reloads != 1 || proc.validate != validated+1 {
		t.Errorf("retry of bad alone: %v, %d reloads, %d checks", errs, proc.reloads, proc.validate-validated)
	}
	if _, ok := rt.backends["be_bad"]; ok {
		t.Error("be_bad was loaded")
	}
	// The address is free again: the retry loads it.
	delete(proc.taken, taken)
	if errs := d.Apply(ctx, states(bad)); len(errs) > 0 {
		t.Fatal(errs)
	}
	assertServers(t, rt, "be_bad", map[string]wantServer{"s10.0.0.2_80": {"10.0.0.2:80", 1, false}})
	// A bind the running HAProxy holds is handed over, not probed.
	probes := len(proc.probes)
	bad.Scheduler = spec.LeastConnection
	if errs := d.Apply(ctx, states(bad)); len(errs) > 0 || len(proc.probes) != probes {
		t.Errorf("reload of a held bind: %v, %d probes", errs, len(proc.probes)-probes)
	}
}

// TestApplyBindTakenAfterProbe: a bind taken between the probe and the
// reload makes HAProxy refuse the reload; probing again names the service,
// and the others of the batch are loaded by a second reload.
func TestApplyBindTakenAfterProbe(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	a := render.HAProxyService{Name: "a", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1)}}
	if errs := d.Apply(ctx, states(a)); len(errs) > 0 {
		t.Fatal(errs)
	}
	late := netip.MustParseAddrPort("192.0.2.11:443")
	proc.taken = map[netip.AddrPort]bool{late: true}
	proc.hidden = map[netip.AddrPort]bool{late: true}
	b := render.HAProxyService{Name: "b", Bind: late, Servers: []render.HAProxyServer{fsrv("10.0.0.2", 80, 1)}}
	c := render.HAProxyService{Name: "c", Bind: netip.MustParseAddrPort("192.0.2.12:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.3", 80, 1)}}
	errs := d.Apply(ctx, states(b, c))
	if !errors.Is(errs["b"], syscall.EADDRINUSE) || errs["c"] != nil || len(errs) != 1 {
		t.Fatalf("errs = %v; want b failed with EADDRINUSE alone", errs)
	}
	if _, ok := rt.backends["be_c"]; !ok || proc.reloads != 1 {
		t.Errorf("c not loaded by one reload (reloads %d)", proc.reloads)
	}
	cfg, _ := os.ReadFile(proc.cfgPath)
	if strings.Contains(string(cfg), late.String()) {
		t.Errorf("the refused bind is in haproxy.cfg:\n%s", cfg)
	}
}

// TestApplyRefusedWithoutCause: HAProxy refuses a reload without a bind
// to blame; the changes are then loaded one at a time, so only the one
// refused fails and the others are served.
func TestApplyRefusedWithoutCause(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	a := render.HAProxyService{Name: "a", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1)}}
	if errs := d.Apply(ctx, states(a)); len(errs) > 0 {
		t.Fatal(errs)
	}
	proc.refuse = "frontend fe_c\n"
	var batch []render.HAProxyService
	for _, n := range []string{"b", "c", "d"} {
		batch = append(batch, render.HAProxyService{Name: n, Bind: netip.MustParseAddrPort("192.0.2." + map[string]string{"b": "11", "c": "12", "d": "13"}[n] + ":443"),
			Servers: []render.HAProxyServer{fsrv("10.0.0.2", 80, 1)}})
	}
	errs := d.Apply(ctx, states(batch...))
	if !errors.Is(errs["c"], ErrReloadFailed) || errs["b"] != nil || errs["d"] != nil {
		t.Fatalf("errs = %v; want c failed alone with ErrReloadFailed", errs)
	}
	for _, be := range []string{"be_a", "be_b", "be_d"} {
		if _, ok := rt.backends[be]; !ok {
			t.Errorf("%s not loaded", be)
		}
	}
	if _, ok := rt.backends["be_c"]; ok {
		t.Error("be_c loaded")
	}
}

// TestApplyAfterHAProxyDied: a HAProxy that died and was not started again
// yet is started by the next pass, with every recorded service; one that
// supervision started again is read back before its record is trusted.
func TestApplyAfterHAProxyDied(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	a := render.HAProxyService{Name: "a", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1)}}
	b := render.HAProxyService{Name: "b", Bind: netip.MustParseAddrPort("192.0.2.11:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.2", 80, 1)}}
	if errs := d.Apply(ctx, states(a, b)); len(errs) > 0 {
		t.Fatal(errs)
	}
	// Died: a pool change of b starts HAProxy again with a and b.
	proc.running, proc.alive = false, false
	rt.load(nil)
	b.Servers = []render.HAProxyServer{fsrv("10.0.0.2", 80, 4)}
	if errs := d.Apply(ctx, states(b)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if proc.starts != 2 {
		t.Errorf("%d starts, want 2", proc.starts)
	}
	assertServers(t, rt, "be_a", map[string]wantServer{"s10.0.0.1_80": {"10.0.0.1:80", 1, false}})
	assertServers(t, rt, "be_b", map[string]wantServer{"s10.0.0.2_80": {"10.0.0.2:80", 4, false}})
	// Restarted by supervision (from an older file, say): the next pass
	// reads the backend before changing it.
	proc.restarts++
	rt.mu.Lock()
	rt.backends["be_b"]["s10.0.0.2_80"].weight = 1
	rt.mu.Unlock()
	rt.takeCalls()
	b.Servers = []render.HAProxyServer{fsrv("10.0.0.2", 80, 4), fsrv("10.0.0.3", 80, 1)}
	if errs := d.Apply(ctx, states(b)); len(errs) > 0 {
		t.Fatal(errs)
	}
	assertServers(t, rt, "be_b", map[string]wantServer{"s10.0.0.2_80": {"10.0.0.2:80", 4, false}, "s10.0.0.3_80": {"10.0.0.3:80", 1, false}})
	if calls := rt.takeCalls(); len(calls) == 0 || calls[0] != "read servers be_b" {
		t.Errorf("calls after a restart %q; want a read of be_b first", calls)
	}
}

// TestParseConfig: the sections of a haproxy.cfg the driver wrote read
// back into the same services.
func TestParseConfig(t *testing.T) {
	d, _, _ := newFakeDriver(t)
	pemA, _ := makeCert(t, "a")
	var set = map[string]*service{}
	for _, s := range []render.HAProxyService{
		{Name: "a", Bind: netip.MustParseAddrPort("192.0.2.10:443"), CertificateKey: "/k", CertificatePEM: pemA, Scheduler: spec.MaglevHashing,
			Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1), fsrv("10.0.0.2", 81, 256)}},
		{Name: "b", Bind: netip.MustParseAddrPort("[2001:db8::1]:443"), Persistence: time.Second, Servers: []render.HAProxyServer{fsrv("2001:db8::2", 80, 0)}},
		{Name: "c", Bind: netip.MustParseAddrPort("192.0.2.10:80")},
		httpSvc("w1", "192.0.2.20:80", "www.example.com/", fsrv("10.0.0.5", 80, 3)),
		func() render.HAProxyService {
			s := httpSvc("w2", "[2001:db8::20]:80", "*/", fsrv("10.0.0.6", 80, 1))
			s.Persistence, s.Scheduler = 90*time.Second, spec.LeastConnection
			return s
		}(),
	} {
		p, err := d.prepare(s)
		if err != nil {
			t.Fatal(err)
		}
		set[s.Name] = p
	}
	layout, err := d.layoutOf(set)
	if err != nil {
		t.Fatal(err)
	}
	for n, e := range set {
		if e.http {
			e.slot = layout.Slot(n)
		}
	}
	cfg, _, err := d.assemble(d.header, set, layout)
	if err != nil {
		t.Fatal(err)
	}
	header, got, gotLayout := parseConfig(cfg, d.opts.Dir)
	if string(header) != string(d.header) || len(got) != len(set) {
		t.Fatalf("header %q, %d services", header, len(got))
	}
	if !reflect.DeepEqual(gotLayout, layout) {
		t.Errorf("layout read back %+v, want %+v", gotLayout, layout)
	}
	for n, want := range set {
		g := got[n]
		if g == nil || g.skeleton != want.skeleton || string(g.section) != string(want.section) || g.svc.Bind != want.svc.Bind ||
			g.certPath != want.certPath || g.fromEtcd != want.fromEtcd || !samePool(g.svc.Servers, want.svc.Servers) ||
			g.http != want.http || g.slot != want.slot {
			t.Errorf("%s: read back %+v, want %+v", n, g, want)
		}
	}
	again, _, err := d.assemble(header, got, gotLayout)
	if err != nil || string(again) != string(cfg) {
		t.Errorf("the sections read back do not assemble into the same file (%v)", err)
	}
}

// httpSvc is a mode http service with routes written host/path ("*" for
// any host).
func httpSvc(name, bind, routes string, servers ...render.HAProxyServer) render.HAProxyService {
	s := render.HAProxyService{Name: name, Bind: netip.MustParseAddrPort(bind), Mode: spec.ModeHTTP, Scheduler: spec.RoundRobin, Servers: servers}
	for _, r := range strings.Fields(routes) {
		host, path, _ := strings.Cut(r, "/")
		if host == "*" {
			host = ""
		}
		s.Routes = append(s.Routes, spec.Route{Host: host, PathPrefix: "/" + path})
	}
	return s
}

// TestSyncAdoptsToRemove: services deleted while the agent was down are
// removed by its first Sync, even when it has no HAProxy service left.
func TestSyncAdoptsToRemove(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	a := render.HAProxyService{Name: "a", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1)}}
	if errs := d.Sync(ctx, states(a)); len(errs) > 0 {
		t.Fatal(errs)
	}
	d2 := newFakeDriverOn(t, d.opts.Dir, rt, proc)
	if errs := d2.Sync(ctx, nil); len(errs) > 0 {
		t.Fatal(errs)
	}
	if _, ok := rt.backends["be_a"]; ok || proc.adopts != 1 || proc.reloads != 1 {
		t.Errorf("be_a still served (adopts %d, reloads %d)", proc.adopts, proc.reloads)
	}
}

// TestStartAgainLeavesOutWhatCannotBind: HAProxy died and a recorded
// service's port was taken meanwhile: HAProxy starts again with the others,
// and that service fails with the bind cause.
func TestStartAgainLeavesOutWhatCannotBind(t *testing.T) {
	d, rt, proc := newFakeDriver(t)
	ctx := context.Background()
	a := render.HAProxyService{Name: "a", Bind: netip.MustParseAddrPort("192.0.2.10:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.1", 80, 1)}}
	b := render.HAProxyService{Name: "b", Bind: netip.MustParseAddrPort("192.0.2.11:443"), Servers: []render.HAProxyServer{fsrv("10.0.0.2", 80, 1)}}
	if errs := d.Apply(ctx, states(a, b)); len(errs) > 0 {
		t.Fatal(errs)
	}
	proc.running, proc.alive = false, false
	proc.taken = map[netip.AddrPort]bool{a.Bind: true}
	errs := d.Sync(ctx, states(a, b))
	if !errors.Is(errs["a"], syscall.EADDRINUSE) || errs["b"] != nil {
		t.Fatalf("errs = %v; want a failed with EADDRINUSE alone", errs)
	}
	if _, ok := rt.backends["be_a"]; ok || proc.starts != 2 {
		t.Errorf("a loaded, or %d starts", proc.starts)
	}
	assertServers(t, rt, "be_b", map[string]wantServer{"s10.0.0.2_80": {"10.0.0.2:80", 1, false}})
	// Free again: the next pass loads it with a reload.
	delete(proc.taken, a.Bind)
	if errs := d.Apply(ctx, states(a)); len(errs) > 0 || proc.reloads != 1 {
		t.Errorf("errs %v, reloads %d", errs, proc.reloads)
	}
}
