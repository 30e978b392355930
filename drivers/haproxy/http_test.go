package haproxy

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// newHTTPDriver is a fake-backed driver whose pools keep spare spares.
func newHTTPDriver(t *testing.T, spare int) (*Driver, *fakeRuntime, *fakeProcess) {
	t.Helper()
	dir := t.TempDir()
	rt := newFakeRuntime()
	proc := &fakeProcess{rt: rt, cfgPath: filepath.Join(dir, "haproxy.cfg")}
	d, err := newDriver(Options{Dir: dir, CommandTimeout: time.Second, Logger: discardLogger(), HTTPSpareSlots: spare}, rt, proc, filepath.Join(dir, "admin.sock"))
	if err != nil {
		t.Fatal(err)
	}
	return d, rt, proc
}

const webBind = "192.0.2.80:80"

func webMap(d *Driver) string {
	return render.HTTPMapPath(d.base, render.HTTPFrontend{Bind: mustAddrPort(webBind)})
}

// routesTo checks where requests go: "host/path" -> the service whose slot
// answers ("" for no route).
func routesTo(t *testing.T, d *Driver, rt *fakeRuntime, want map[string]string) {
	t.Helper()
	for req, svc := range want {
		host, path, _ := strings.Cut(req, "/")
		got := rt.route(webMap(d), host, "/"+path)
		wantSlot := ""
		if svc != "" {
			wantSlot = d.layout.Slot(svc)
		}
		if got != wantSlot || (svc != "" && got == "") {
			t.Errorf("%s goes to %q, want %q (service %q)", req, got, wantSlot, svc)
		}
	}
	// The map file a reload would load holds what HAProxy holds.
	disk, err := os.ReadFile(webMap(d))
	rt.mu.Lock()
	held := render.HTTPMapFile(rt.maps[webMap(d)])
	rt.mu.Unlock()
	if err != nil || !bytes.Equal(disk, held) {
		t.Errorf("map file %q (%v), HAProxy holds %q", disk, err, held)
	}
}

// TestHTTPChangesWithoutReload: routes added, changed and removed, whole
// http services added and removed, pools changed on a shared vip:port: all
// through the runtime API, no reload.
func TestHTTPChangesWithoutReload(t *testing.T) {
	d, rt, proc := newHTTPDriver(t, 4)
	ctx := context.Background()
	www := httpSvc("www", webBind, "www.example.com/", fsrv("10.0.0.1", 80, 1))
	api := httpSvc("api", webBind, "www.example.com/api api.example.com/", fsrv("10.0.0.2", 80, 1), fsrv("10.0.0.3", 80, 2))
	if errs := d.Apply(ctx, states(www, api)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if proc.starts != 1 {
		t.Fatalf("%d starts", proc.starts)
	}
	routesTo(t, d, rt, map[string]string{"www.example.com/": "www", "www.example.com/api/v1": "api", "www.example.com/apix": "www",
		"api.example.com/x": "api", "other.example.com/": ""})
	assertServers(t, rt, d.layout.Slot("api"), map[string]wantServer{"s10.0.0.2_80": {"10.0.0.2:80", 1, false}, "s10.0.0.3_80": {"10.0.0.3:80", 2, false}})
	rt.takeCalls()

	steps := []struct {
		name  string
		apply []*render.ServiceState
		want  map[string]string
		calls []string // the write calls, in order (prefixes)
	}{
		{"a route added", states(httpSvc("api", webBind, "www.example.com/api api.example.com/ *.example.com/", api.Servers...)),
			map[string]string{"x.example.com/": "api", "www.example.com/": "www"}, []string{"map "}},
		{"a route changed", states(httpSvc("api", webBind, "www.example.com/v2 api.example.com/ *.example.com/", api.Servers...)),
			map[string]string{"www.example.com/api": "www", "www.example.com/v2/x": "api"}, []string{"map "}},
		{"a route removed", states(httpSvc("api", webBind, "www.example.com/v2 api.example.com/", api.Servers...)),
			map[string]string{"x.example.com/": ""}, []string{"map "}},
		{"a pool change", states(httpSvc("api", webBind, "www.example.com/v2 api.example.com/", fsrv("10.0.0.2", 80, 5))),
			map[string]string{"api.example.com/": "api"}, []string{"weight ", "state ", "del "}},
		{"a new service", states(httpSvc("new", webBind, "new.example.com/ www.example.com/new", fsrv("10.0.0.7", 80, 1))),
			map[string]string{"new.example.com/": "new", "www.example.com/new/a": "new"}, []string{"add ", "state ", "map "}},
		{"a route moves between services", states(
			httpSvc("new", webBind, "new.example.com/", fsrv("10.0.0.7", 80, 1)),
			httpSvc("www", webBind, "www.example.com/ www.example.com/new", fsrv("10.0.0.1", 80, 1))),
			map[string]string{"www.example.com/new/a": "www", "new.example.com/": "new"}, []string{"map "}},
		{"a service removed", []*render.ServiceState{gone("new")},
			map[string]string{"new.example.com/": ""}, []string{"map ", "state ", "del "}},
	}
	for _, st := range steps {
		if errs := d.Apply(ctx, st.apply); len(errs) > 0 {
			t.Fatalf("%s: %v", st.name, errs)
		}
		routesTo(t, d, rt, st.want)
		calls := rt.writes()
		rt.takeCalls()
		if len(calls) != len(st.calls) {
			t.Errorf("%s: calls %q, want %q", st.name, calls, st.calls)
			continue
		}
		for i := range calls {
			if !strings.HasPrefix(calls[i], st.calls[i]) {
				t.Errorf("%s: calls %q, want %q", st.name, calls, st.calls)
			}
		}
	}
	if proc.reloads != 0 || d.Reloads() != 0 {
		t.Errorf("%d reloads", proc.reloads)
	}
	// The slot "new" left is empty and spare again; haproxy.cfg records
	// who holds which slot, with their servers.
	cfg, _ := os.ReadFile(proc.cfgPath)
	if !strings.Contains(string(cfg), "# service www "+webBind+"\n    server s10.0.0.1_80 10.0.0.1:80 weight 1") || strings.Contains(string(cfg), "# service new") {
		t.Errorf("haproxy.cfg does not record the slots:\n%s", cfg)
	}
	if len(d.releasing) != 0 {
		t.Errorf("slots still releasing: %v", d.releasing)
	}
	// Connections reads the slot of an http service.
	conns, err := d.Connections(ctx, map[string]bool{"api": true})
	if err != nil || len(conns) != 1 {
		t.Errorf("connections %v, %v", conns, err)
	}
}

// TestHTTPRemovedServerFinishesRequests: in mode http a server taken out
// of a pool while it still has connections is put in maintenance and left
// to finish its requests (no shutdown); an Apply meanwhile deletes it once
// it is idle or leaves it; a Sync shuts down what it still has and
// deletes it. In mode tcp the shutdown is at once (TestApplyRemovesAtOnce).
func TestHTTPRemovedServerFinishesRequests(t *testing.T) {
	d, rt, _ := newHTTPDriver(t, 4)
	www := httpSvc("www", webBind, "www.example.com/", fsrv("10.0.0.1", 80, 1))
	if errs := apply(t, d, www, httpSvc("api", webBind, "www.example.com/api", fsrv("10.0.0.2", 80, 1), fsrv("10.0.0.3", 80, 1))); len(errs) > 0 {
		t.Fatal(errs)
	}
	slot := d.layout.Slot("api")
	ctx := context.Background()
	rt.mu.Lock()
	rt.backends[slot]["s10.0.0.3_80"].sessions = 2
	rt.mu.Unlock()
	rt.takeCalls()

	for _, tt := range []struct {
		what  string
		pass  func() map[string]error
		calls []string
		left  map[string]wantServer
	}{
		{"the removing Apply", func() map[string]error {
			return d.Apply(ctx, states(httpSvc("api", webBind, "www.example.com/api", fsrv("10.0.0.2", 80, 1))))
		}, []string{"state " + slot + "/s10.0.0.3_80 maint", "del " + slot + "/s10.0.0.3_80"},
			map[string]wantServer{"s10.0.0.2_80": {"10.0.0.2:80", 1, false}, "s10.0.0.3_80": {"10.0.0.3:80", 1, true}}},
		{"an Apply of a weight meanwhile", func() map[string]error {
			return d.Apply(ctx, states(httpSvc("api", webBind, "www.example.com/api", fsrv("10.0.0.2", 80, 2))))
		}, []string{"weight " + slot + "/s10.0.0.2_80 2", "del " + slot + "/s10.0.0.3_80"},
			map[string]wantServer{"s10.0.0.2_80": {"10.0.0.2:80", 2, false}, "s10.0.0.3_80": {"10.0.0.3:80", 1, true}}},
		{"a Sync", func() map[string]error {
			return d.Sync(ctx, states(www, httpSvc("api", webBind, "www.example.com/api", fsrv("10.0.0.2", 80, 2))))
		}, []string{"del " + slot + "/s10.0.0.3_80", "shutdown " + slot + "/s10.0.0.3_80", "del " + slot + "/s10.0.0.3_80"},
			map[string]wantServer{"s10.0.0.2_80": {"10.0.0.2:80", 2, false}}},
	} {
		if errs := tt.pass(); len(errs) > 0 {
			t.Fatalf("%s: %v", tt.what, errs)
		}
		if calls := rt.writes(); !slices.Equal(calls, tt.calls) {
			t.Errorf("%s: calls %q, want %q", tt.what, calls, tt.calls)
		}
		rt.takeCalls()
		assertServers(t, rt, slot, tt.left)
	}
}

// TestHTTPStructuralChanges: a new vip:port, a pool that runs out, a new
// shape: one reload each, and the pool grows generously.
func TestHTTPStructuralChanges(t *testing.T) {
	d, rt, proc := newHTTPDriver(t, 2)
	ctx := context.Background()
	a := httpSvc("a", webBind, "a.example.com/", fsrv("10.0.0.1", 80, 1))
	if errs := d.Apply(ctx, states(a)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if got := d.layout.Skeleton(); got != "frontend "+webBind+" tls=false\npool rr 3\n" {
		t.Errorf("skeleton %q", got)
	}
	// Two new services fit the spares: no reload.
	b, c := httpSvc("b", webBind, "b.example.com/", fsrv("10.0.0.2", 80, 1)), httpSvc("c", webBind, "c.example.com/", fsrv("10.0.0.3", 80, 1))
	if errs := d.Apply(ctx, states(b, c)); len(errs) > 0 || proc.reloads != 0 {
		t.Fatalf("%v, %d reloads", errs, proc.reloads)
	}
	// Three more do not: one reload, the pool grows to 6 + max(2, 6).
	var more []render.HAProxyService
	for _, n := range []string{"d", "e", "f"} {
		more = append(more, httpSvc(n, webBind, n+".example.com/", fsrv("10.0.0.4", 80, 1)))
	}
	if errs := d.Apply(ctx, states(more...)); len(errs) > 0 || proc.reloads != 1 {
		t.Fatalf("%v, %d reloads", errs, proc.reloads)
	}
	if got := d.layout.Skeleton(); got != "frontend "+webBind+" tls=false\npool rr 12\n" {
		t.Errorf("skeleton after growth %q", got)
	}
	routesTo(t, d, rt, map[string]string{"a.example.com/": "a", "c.example.com/": "c", "f.example.com/": "f"})
	// A new vip:port: one reload. A new shape: one reload.
	other := httpSvc("other", "192.0.2.81:80", "*/", fsrv("10.0.0.5", 80, 1))
	if errs := d.Apply(ctx, states(other)); len(errs) > 0 || proc.reloads != 2 {
		t.Fatalf("%v, %d reloads", errs, proc.reloads)
	}
	lc := httpSvc("lc", webBind, "lc.example.com/", fsrv("10.0.0.6", 80, 1))
	lc.Scheduler = spec.LeastConnection
	if errs := d.Apply(ctx, states(lc)); len(errs) > 0 || proc.reloads != 3 {
		t.Fatalf("%v, %d reloads", errs, proc.reloads)
	}
	routesTo(t, d, rt, map[string]string{"lc.example.com/": "lc", "a.example.com/": "a"})
	// tcp and http never share a bind.
	tcp := render.HAProxyService{Name: "tcp", Bind: mustAddrPort(webBind), Servers: []render.HAProxyServer{fsrv("10.0.0.9", 80, 1)}}
	if errs := d.Apply(ctx, states(tcp)); errs["tcp"] == nil || !strings.Contains(errs["tcp"].Error(), "is held by") {
		t.Errorf("a tcp service on an http bind: %v", errs)
	}
	// The last service of a vip:port leaves: its frontend goes, one reload.
	if errs := d.Apply(ctx, []*render.ServiceState{gone("other")}); len(errs) > 0 || proc.reloads != 4 {
		t.Fatalf("%v, %d reloads", errs, proc.reloads)
	}
	if _, ok := d.layout.Frontend(mustAddrPort("192.0.2.81:80")); ok {
		t.Error("the frontend of a vip:port without services is still there")
	}
}

// TestHTTPCertificatesWithoutReload: services of one TLS vip:port bring
// their own certificates, added to and removed from its crt-list at run
// time; the default certificate follows the first service by name.
func TestHTTPCertificatesWithoutReload(t *testing.T) {
	d, rt, proc := newHTTPDriver(t, 4)
	ctx := context.Background()
	bind := "192.0.2.80:443"
	pemB, _ := makeCert(t, "b.example.com")
	pemC, _ := makeCert(t, "c.example.com")
	fileC := filepath.Join(t.TempDir(), "c.pem")
	if err := os.WriteFile(fileC, pemC, 0o600); err != nil {
		t.Fatal(err)
	}
	b := httpSvc("b", bind, "b.example.com/", fsrv("10.0.0.2", 80, 1))
	b.CertificateKey, b.CertificatePEM = "/switchman/certs/b", pemB
	if errs := d.Apply(ctx, states(b)); len(errs) > 0 {
		t.Fatal(errs)
	}
	f := render.HTTPFrontend{Bind: mustAddrPort(bind), TLS: true}
	list, def := render.HTTPCrtListPath(d.base, f), render.HTTPDefaultCertPath(d.base, f)
	certB := certPath(d.opts.Dir, "b")
	checkList := func(what string, want ...string) {
		t.Helper()
		rt.mu.Lock()
		held := slices.Clone(rt.crtLists[list])
		rt.mu.Unlock()
		disk, _ := os.ReadFile(list)
		// HAProxy appends at run time; the file is in name order. Order
		// does not matter: the default certificate is a file of its own.
		if !slices.Equal(slices.Sorted(slices.Values(held)), slices.Sorted(slices.Values(want))) || string(disk) != string(render.HTTPCrtListFile(want)) {
			t.Errorf("%s: crt-list holds %q, file %q; want %q", what, held, disk, want)
		}
	}
	checkList("start", certB)
	c := httpSvc("c", bind, "c.example.com/", fsrv("10.0.0.3", 80, 1))
	c.Certificate = fileC
	a := httpSvc("a", bind, "a.example.com/", fsrv("10.0.0.1", 80, 1))
	a.Certificate = fileC // shares c's certificate, and is first by name
	if errs := d.Apply(ctx, states(c, a)); len(errs) > 0 {
		t.Fatal(errs)
	}
	checkList("two added", fileC, certB)
	rt.mu.Lock()
	defPEM := rt.certs[def]
	rt.mu.Unlock()
	if !bytes.Equal(defPEM, pemC) {
		t.Error("the default certificate is not the first service's")
	}
	// a and c leave: their certificate leaves the crt-list and the store,
	// the default becomes b's.
	if errs := d.Apply(ctx, []*render.ServiceState{gone("a"), gone("c")}); len(errs) > 0 {
		t.Fatal(errs)
	}
	checkList("two removed", certB)
	rt.mu.Lock()
	_, stillC := rt.certs[fileC]
	defPEM = rt.certs[def]
	rt.mu.Unlock()
	if stillC || !bytes.Equal(defPEM, pemB) {
		t.Errorf("certificate of the leavers in the store: %v; default is b's: %v", stillC, bytes.Equal(defPEM, pemB))
	}
	// b's certificate changes: swapped in place.
	pemB2, _ := makeCert(t, "b.example.com")
	b.CertificatePEM = pemB2
	if errs := d.Apply(ctx, states(b)); len(errs) > 0 {
		t.Fatal(errs)
	}
	rt.mu.Lock()
	gotB, gotDef := rt.certs[certB], rt.certs[def]
	rt.mu.Unlock()
	if !bytes.Equal(gotB, pemB2) || !bytes.Equal(gotDef, pemB2) {
		t.Error("a certificate change did not reach the store and the default")
	}
	if proc.reloads != 0 {
		t.Errorf("%d reloads", proc.reloads)
	}
	// A plain http service cannot join a TLS frontend unnoticed: the
	// evaluator refuses it; here the frontend keeps TLS.
	if fe, _ := d.layout.Frontend(mustAddrPort(bind)); !fe.TLS {
		t.Error("frontend lost TLS")
	}
}

// TestHTTPAdoptAndSync: a restarted agent adopts the http part without a
// write; a Sync repairs a map and a spare slot changed behind its back;
// a leaving service whose connections stay is emptied by the next Sync.
func TestHTTPAdoptAndSync(t *testing.T) {
	d, rt, proc := newHTTPDriver(t, 4)
	ctx := context.Background()
	pem, _ := makeCert(t, "t.example.com")
	tls := httpSvc("tls", "192.0.2.80:443", "t.example.com/", fsrv("10.0.0.9", 80, 1))
	tls.CertificateKey, tls.CertificatePEM = "/switchman/certs/tls", pem
	all := []render.HAProxyService{
		httpSvc("www", webBind, "www.example.com/ *.example.com/", fsrv("10.0.0.1", 80, 1)),
		httpSvc("api", webBind, "www.example.com/api", fsrv("10.0.0.2", 80, 3)),
		tls,
	}
	if errs := d.Sync(ctx, states(all...)); len(errs) > 0 {
		t.Fatal(errs)
	}
	late := httpSvc("late", webBind, "late.example.com/", fsrv("10.0.0.3", 80, 1))
	if errs := d.Apply(ctx, states(late)); len(errs) > 0 {
		t.Fatal(errs)
	}
	all = append(all, late)
	if errs := d.Sync(ctx, states(all...)); len(errs) > 0 {
		t.Fatal(errs)
	}
	before := statFiles(t, proc.cfgPath, webMap(d))
	rt.takeCalls()

	d2 := newFakeDriverOn(t, d.opts.Dir, rt, proc)
	if errs := d2.Sync(ctx, states(all...)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if w := rt.writes(); len(w) > 0 {
		t.Errorf("the first Sync after a restart wrote %q", w)
	}
	if after := statFiles(t, proc.cfgPath, webMap(d)); !slices.Equal(before, after) || proc.reloads != 0 {
		t.Errorf("files rewritten (%v -> %v) or reloaded (%d)", before, after, proc.reloads)
	}
	if d2.layout.Slot("late") != d.layout.Slot("late") {
		t.Errorf("adopted slot of late %q, was %q", d2.layout.Slot("late"), d.layout.Slot("late"))
	}

	// Drift: the map cleared, a server added to a spare slot.
	if err := rt.ReplaceMap(ctx, webMap(d2), nil); err != nil {
		t.Fatal(err)
	}
	spareSlot := render.HTTPSlotName("rr", 6)
	if err := rt.AddServer(ctx, spareSlot, "stray", mustAddrPort("10.9.9.9:80"), 1); err != nil {
		t.Fatal(err)
	}
	if errs := d2.Sync(ctx, states(all...)); len(errs) > 0 {
		t.Fatal(errs)
	}
	routesTo(t, d2, rt, map[string]string{"www.example.com/api": "api", "x.example.com/": "www"})
	assertServers(t, rt, spareSlot, map[string]wantServer{})

	// api leaves while its server still has a connection: its routes go
	// at once, its slot waits (and is not given out), the next Sync
	// shuts the connection down and frees it.
	rt.mu.Lock()
	rt.backends[d2.layout.Slot("api")]["s10.0.0.2_80"].sessions = 1
	rt.mu.Unlock()
	apiSlot := d2.layout.Slot("api")
	if errs := d2.Apply(ctx, []*render.ServiceState{gone("api")}); len(errs) > 0 {
		t.Fatal(errs)
	}
	routesTo(t, d2, rt, map[string]string{"www.example.com/api": "www"})
	if !d2.releasing[apiSlot] {
		t.Fatalf("slot %s not kept while its server has a connection", apiSlot)
	}
	next := httpSvc("next", webBind, "next.example.com/", fsrv("10.0.0.4", 80, 1))
	if errs := d2.Apply(ctx, states(next)); len(errs) > 0 || d2.layout.Slot("next") == apiSlot {
		t.Fatalf("%v; next got slot %s", errs, d2.layout.Slot("next"))
	}
	if errs := d2.Sync(ctx, states(append(all[:0:0], all[0], all[2], all[3], next)...)); len(errs) > 0 {
		t.Fatal(errs)
	}
	if d2.releasing[apiSlot] {
		t.Error("the Sync did not empty the slot")
	}
	assertServers(t, rt, apiSlot, map[string]wantServer{})
	if proc.reloads != 0 {
		t.Errorf("%d reloads", proc.reloads)
	}
}
