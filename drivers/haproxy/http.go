package haproxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/switchman-lb/switchman/internal/atomicfile"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// Mode http services share one frontend per vip:port (render.LayoutHTTP).
// What HAProxy holds for them changes at run time, never by a reload:
//   - a new service takes a spare backend slot of its pool, filled with
//     `add server` before any route points at it;
//   - its routes reach the frontend's routing map as a new version of the
//     whole map (`prepare map`, `add map @ver`, `commit map @ver`), written
//     to the map file first so that a reload or a restart keeps them;
//   - its certificate joins the frontend's crt-list (`new ssl cert`, `set
//     ssl cert`, `commit ssl cert`, `add ssl crt-list`), the crt-list file
//     written too;
//   - a leaving service's routes leave the map first; then its slot's
//     servers are put in maintenance and deleted once their connections
//     have ended (the slot is not given out again until then).
//
// A reload happens only when the layout's skeleton changes: a vip:port
// appears or goes, a frontend gains or loses TLS, or a pool of slots runs
// out (it then grows generously, in the same reload).

// maxMapFile bounds a routing map or crt-list file read back at an
// adoption: 1,000 routes of a few hundred bytes per service fit many
// times.
const maxMapFile = 64 << 20

// layoutOf lays out the http services of set, keeping the slots they hold
// in the running layout and leaving busy slots alone.
func (d *Driver) layoutOf(set map[string]*service) (render.HTTPLayout, error) {
	return render.LayoutHTTP(httpServices(set), d.layout, d.spare, d.releasing)
}

// keepSlots reports whether the http changes in next keep every service in
// its slot and on its frontend: none comes or goes, changes its bind, its
// shape or whether it has a certificate. The layout is then the running one.
func (d *Driver) keepSlots(next map[string]*service) bool {
	for n, p := range next {
		e := d.loaded[n]
		if p == nil || e == nil || !e.http || e.svc.Bind != p.svc.Bind || (e.certPath == "") != (p.certPath == "") {
			return false
		}
		a, errA := render.HTTPShapeOf(e.svc)
		b, errB := render.HTTPShapeOf(p.svc)
		if errA != nil || errB != nil || a != b {
			return false
		}
	}
	return true
}

// withHTTP is the running structure with the http changes in next made
// (nil: the service leaves).
func (d *Driver) withHTTP(next map[string]*service) map[string]*service {
	out := maps.Clone(d.loaded)
	for n, p := range next {
		if p == nil {
			delete(out, n)
		} else {
			out[n] = p
		}
	}
	return out
}

// applyHTTP makes the http changes in next (nil: the service leaves) at
// run time, laid out in layout (the running structure with next made, of
// the running skeleton). pools holds the servers each service wants.
// verify (a Sync) reads back the maps and crt-lists it touches rather than
// trusting the record. Errors go to errs by service.
func (d *Driver) applyHTTP(ctx context.Context, next map[string]*service, layout render.HTTPLayout, pools map[string][]render.HAProxyServer, verify bool, errs map[string]error) {
	slots := layout.Slots()
	touched := map[netip.AddrPort][]string{} // frontends whose map or crt-list may change, with the services that changed
	touch := func(b netip.AddrPort, n string) { touched[b] = append(touched[b], n) }
	var leaving []string // slots to empty once no route points at them
	moved := false       // a service took, left or changed its slot: haproxy.cfg records it
	for _, n := range slices.Sorted(maps.Keys(next)) {
		p, e := next[n], d.loaded[n]
		if p == nil {
			touch(e.svc.Bind, n)
			leaving = append(leaving, e.slot)
			delete(d.loaded, n)
			moved = true
			d.log.Info("haproxy http service removed", "service", n, "slot", e.slot)
			continue
		}
		slot := slots[n]
		if e != nil && e.slot == slot {
			if e.svc.Bind != p.svc.Bind || !sameRoutes(e.svc.Routes, p.svc.Routes) || e.certPath != p.certPath || !bytes.Equal(e.pem, p.pem) {
				touch(e.svc.Bind, n)
				touch(p.svc.Bind, n)
			}
			e.adoptStructure(p)
			continue
		}
		// A slot of its own, filled before a route points at it; what a
		// spare slot holds is read first.
		p.slot, p.poolKnown = slot, false
		want := pools[n]
		p.svc.Servers = nil
		if err := d.syncPool(ctx, p, want, nil, false, false); err != nil {
			errs[n] = errors.Join(errs[n], fmt.Errorf("fill backend slot %s: %w", slot, err))
			d.releasing[slot] = true // partly filled: emptied before it is given out again
			continue
		}
		if e != nil {
			touch(e.svc.Bind, n)
			leaving = append(leaving, e.slot)
		}
		touch(p.svc.Bind, n)
		d.loaded[n] = p
		moved = true
		d.log.Info("haproxy http service loaded without reload", "service", n, "slot", slot, "bind", p.svc.Bind)
	}
	if moved {
		// The layout of what is now loaded: a service that could not be
		// placed leaves its slot spare.
		d.layout = occupy(layout, d.loaded)
	}
	for _, b := range slices.SortedFunc(maps.Keys(touched), netip.AddrPort.Compare) {
		f, ok := d.layout.Frontend(b)
		if !ok {
			continue
		}
		if err := d.syncFrontend(ctx, f, verify); err != nil {
			for _, n := range touched[b] {
				if next[n] != nil {
					errs[n] = errors.Join(errs[n], err)
				}
			}
		}
	}
	for _, slot := range leaving {
		d.release(ctx, slot, false)
	}
	if moved {
		// haproxy.cfg records who holds which slot, for an adoption; a
		// route change alone leaves it as it is (the maps are files).
		d.dirty = true
		d.persist(false)
	}
}

// occupy is layout with its slots held by the http services of set, each
// in the slot it records, and the others spare.
func occupy(layout render.HTTPLayout, set map[string]*service) render.HTTPLayout {
	by := map[string]string{}
	for n, e := range set {
		if e.http {
			by[e.slot] = n
		}
	}
	out := render.HTTPLayout{Frontends: layout.Frontends}
	for _, p := range layout.Pools {
		np := render.HTTPPool{Shape: p.Shape, Slots: make([]string, len(p.Slots))}
		for i := range np.Slots {
			np.Slots[i] = by[render.HTTPSlotName(p.Shape.Name(), i+1)]
		}
		out.Pools = append(out.Pools, np)
	}
	return out
}

// syncFrontend brings a frontend's crt-list (with TLS) and routing map to
// what the loaded services ask for: files first, then the runtime API.
// verify reads back what HAProxy and the files hold instead of trusting
// the record.
func (d *Driver) syncFrontend(ctx context.Context, f render.HTTPFrontend, verify bool) error {
	svcs := httpServices(d.loaded)
	o := d.httpOptions(d.loaded)
	var errs []error
	if f.TLS {
		errs = append(errs, d.syncCrtList(ctx, f, svcs, o, verify))
	}
	entries, err := render.HTTPMapEntries(d.layout, f, svcs)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	content := render.HTTPMapFile(entries)
	path := render.HTTPMapPath(o, f)
	cur, known := d.maps[path]
	if verify {
		// What the file and HAProxy hold replaces the record.
		disk, err := atomicfile.ReadBounded(path, maxMapFile)
		known = err == nil && bytes.Equal(disk, content)
		if known {
			held, err := d.rt.ShowMap(ctx, path)
			known = err == nil && sameEntries(held, entries)
		}
		cur = content
	}
	if known && bytes.Equal(cur, content) {
		return errors.Join(errs...)
	}
	if err := writeAtomic(path, content); err != nil {
		delete(d.maps, path)
		return errors.Join(append(errs, fmt.Errorf("write routing map: %w", err))...)
	}
	if err := d.rt.ReplaceMap(ctx, path, entries); err != nil {
		delete(d.maps, path)
		return errors.Join(append(errs, fmt.Errorf("routing map %s: %w", path, err))...)
	}
	d.maps[path] = content
	return errors.Join(errs...)
}

// sameRoutes compares two route lists as sets: an adopted service reads
// its routes back from a map, in the map's order.
func sameRoutes(a, b []spec.Route) bool {
	cmp := func(x, y spec.Route) int { return strings.Compare(x.String(), y.String()) }
	return slices.Equal(slices.SortedFunc(slices.Values(a), cmp), slices.SortedFunc(slices.Values(b), cmp))
}

func sameEntries(a, b []render.HTTPMapEntry) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	render.SortHTTPMap(a)
	render.SortHTTPMap(b)
	return slices.Equal(a, b)
}

// syncCrtList makes a TLS frontend's crt-list hold the certificates of its
// services (each loaded into HAProxy's store first), and its default
// certificate be the first of them.
func (d *Driver) syncCrtList(ctx context.Context, f render.HTTPFrontend, svcs []render.HAProxyService, o render.HAProxyOptions, verify bool) error {
	want, err := render.HTTPCertificates(f, svcs, o)
	if err != nil {
		return err
	}
	if len(want) == 0 {
		return fmt.Errorf("http frontend %s terminates TLS but none of its services has a certificate", f.Bind)
	}
	pemOf := map[string][]byte{}
	for _, e := range d.loaded {
		if e.http && e.svc.Bind == f.Bind && e.certPath != "" && e.pem != nil {
			pemOf[e.certPath] = e.pem
			if e.fromEtcd {
				if err := d.ensureFile(e.certPath, e.pem, verify); err != nil {
					return err
				}
			}
		}
	}
	list := render.HTTPCrtListPath(o, f)
	have, known := d.crtLists[list]
	if !known || verify {
		if have, err = d.rt.CrtList(ctx, list); err != nil {
			return fmt.Errorf("read crt-list %s: %w", list, err)
		}
	}
	var errs []error
	for _, c := range want {
		if slices.Contains(have, c) {
			continue
		}
		if err := d.loadCertificate(ctx, c, pemOf[c]); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := d.rt.AddCrtListEntry(ctx, list, c); err != nil {
			errs = append(errs, err)
			continue
		}
		have = append(have, c)
		d.log.Info("certificate added to a crt-list without reload", "crt-list", list, "certificate", c)
	}
	for _, c := range slices.Clone(have) {
		if slices.Contains(want, c) {
			continue
		}
		if err := d.rt.DelCrtListEntry(ctx, list, c); err != nil {
			errs = append(errs, err)
			continue
		}
		have = slices.DeleteFunc(have, func(h string) bool { return h == c })
		d.crtLists[list] = have
		if !d.certInUse(c) {
			// A certificate a tcp frontend loads with crt cannot be
			// deleted; certInUse already keeps those.
			if err := d.rt.DelCertificate(ctx, c); err != nil {
				d.log.Warn("certificate left in HAProxy's store", "certificate", c, "err", err)
			}
			delete(d.certs, c)
		}
	}
	d.crtLists[list] = have
	if err := errors.Join(errs...); err != nil {
		delete(d.crtLists, list)
		return err
	}
	if err := d.writeIfChanged(list, render.HTTPCrtListFile(want), verify); err != nil {
		return err
	}
	d.crtLists[list] = want
	return d.syncCertAt(ctx, render.HTTPDefaultCertPath(o, f), pemOf[want[0]], true, verify)
}

// loadCertificate makes HAProxy's store hold pem at path, a certificate a
// crt-list is about to name.
func (d *Driver) loadCertificate(ctx context.Context, path string, pem []byte) error {
	if pem == nil {
		return fmt.Errorf("certificate %s: content not known", path)
	}
	if served, ok := d.certs[path]; ok && served == sha256.Sum256(pem) {
		return nil
	}
	if err := d.rt.NewCertificate(ctx, path); err != nil && !errors.Is(err, ErrCertExists) {
		return err
	}
	if err := d.rt.SetCertificate(ctx, path, pem); err != nil {
		delete(d.certs, path)
		return fmt.Errorf("certificate %s: %w", path, err)
	}
	d.certs[path] = sha256.Sum256(pem)
	return nil
}

// certInUse reports whether a loaded service or a crt-list still uses the
// certificate file path.
func (d *Driver) certInUse(path string) bool {
	for _, e := range d.loaded {
		if e.certPath == path {
			return true
		}
	}
	for _, l := range d.crtLists {
		if slices.Contains(l, path) {
			return true
		}
	}
	return false
}

// writeIfChanged writes content to path unless the record (or, with
// verify, the file) says it holds it already.
func (d *Driver) writeIfChanged(path string, content []byte, verify bool) error {
	sum := sha256.Sum256(content)
	if d.files[path] == sum && !verify {
		return nil
	}
	return d.ensureFile(path, content, verify)
}

// release empties a slot a service left: its servers go to maintenance
// (no new request) and are deleted once they have no connection; with
// force (a Sync, a pass later) their connections are shut down first. A
// slot that still holds servers stays busy: it is not given out again.
func (d *Driver) release(ctx context.Context, slot string, force bool) {
	actual, err := d.rt.ServersState(ctx, slot)
	left := err != nil
	for _, a := range actual {
		busy, err := d.removeServer(ctx, slot, a, force)
		left = left || busy || err != nil
	}
	if left {
		d.releasing[slot] = true
		return
	}
	delete(d.releasing, slot)
}

// syncHTTP is a Sync's repair of the http part: servers found in a spare
// slot are removed, slots still emptying are emptied (connections shut
// down), and every frontend's crt-list and routing map is read back and
// repaired. actual holds every backend's servers, read by the Sync.
func (d *Driver) syncHTTP(ctx context.Context, actual map[string][]ServerState, errs map[string]error) {
	held := map[string]bool{}
	for _, e := range d.loaded {
		if e.http {
			held[e.slot] = true
		}
	}
	for _, be := range d.layout.Backends() {
		if be != render.HTTPNoRouteBackend && !held[be] && (len(actual[be]) > 0 || d.releasing[be]) {
			d.release(ctx, be, true)
		}
	}
	for _, f := range d.layout.Frontends {
		if err := d.syncFrontend(ctx, f, true); err != nil {
			for n, e := range d.loaded {
				if e.http && e.svc.Bind == f.Bind {
					errs[n] = errors.Join(errs[n], err)
				}
			}
		}
	}
}

// retryReleases tries again to empty the slots whose servers were still
// closing connections.
func (d *Driver) retryReleases(ctx context.Context) {
	for _, slot := range slices.Sorted(maps.Keys(d.releasing)) {
		d.release(ctx, slot, false)
	}
}

// writeHTTPFiles writes the files the http frontends of layout read for
// set: routing maps, crt-lists and default certificates (copies of the
// first certificate of each). It returns the content of each map and
// crt-list, for the record of what a HAProxy loading them holds.
func (d *Driver) writeHTTPFiles(set map[string]*service, layout render.HTTPLayout) (maps map[string][]byte, lists map[string][]string, err error) {
	files, err := render.HTTPFiles(layout, httpServices(set), d.httpOptions(set))
	if err != nil {
		return nil, nil, err
	}
	pemOf := map[string][]byte{}
	for _, e := range set {
		if e.http && e.certPath != "" && e.pem != nil {
			pemOf[e.certPath] = e.pem
		}
	}
	maps, lists = map[string][]byte{}, map[string][]string{}
	for _, f := range files {
		switch {
		case f.CopyOf != "":
			pem := pemOf[f.CopyOf]
			if pem == nil {
				return nil, nil, fmt.Errorf("default certificate of %s: the content of %s is not known", f.Frontend.Bind, f.CopyOf)
			}
			if err := d.ensureFile(f.Path, pem, false); err != nil {
				return nil, nil, err
			}
		case strings.HasSuffix(f.Path, ".crtlist"):
			if err := d.writeIfChanged(f.Path, f.Content, false); err != nil {
				return nil, nil, err
			}
			lists[f.Path] = strings.Fields(string(f.Content))
		default:
			if err := writeAtomic(f.Path, f.Content); err != nil {
				return nil, nil, fmt.Errorf("write routing map: %w", err)
			}
			maps[f.Path] = f.Content
		}
	}
	return maps, lists, nil
}

// parseHTTP reads the http part of a haproxy.cfg this driver wrote (from
// its first http frontend on) into its layout, and adds the service in
// each slot to out (name, bind, slot and servers).
func parseHTTP(cfg []byte, out map[string]*service) render.HTTPLayout {
	var layout render.HTTPLayout
	pools := map[string]*render.HTTPPool{}
	for _, sec := range strings.Split(string(cfg), "\n\n") {
		lines := strings.Split(strings.TrimSpace(sec), "\n")
		head := strings.Fields(lines[0])
		if len(head) != 2 {
			continue
		}
		switch {
		case head[0] == "frontend" && strings.HasPrefix(head[1], "fe_http_"):
			for _, l := range lines[1:] {
				if f := strings.Fields(l); len(f) >= 2 && f[0] == "bind" {
					if ap, err := netip.ParseAddrPort(f[1]); err == nil {
						layout.Frontends = append(layout.Frontends, render.HTTPFrontend{Bind: ap, TLS: slices.Contains(f, "ssl")})
					}
				}
			}
		case head[0] == "backend" && render.CheckHTTPSlot(head[1]) == nil:
			parseSlot(head[1], lines[1:], pools, out)
		}
	}
	slices.SortFunc(layout.Frontends, func(a, b render.HTTPFrontend) int { return a.Bind.Compare(b.Bind) })
	for _, n := range slices.Sorted(maps.Keys(pools)) {
		layout.Pools = append(layout.Pools, *pools[n])
	}
	return layout
}

// parseSlot reads one slot section into its pool, and its service.
func parseSlot(name string, lines []string, pools map[string]*render.HTTPPool, out map[string]*service) {
	rest := strings.TrimPrefix(name, "be_http_")
	i := strings.LastIndexByte(rest, '_')
	shapeName := rest[:i]
	idx, err := strconv.Atoi(rest[i+1:])
	if err != nil || idx < 1 {
		return
	}
	var sh render.HTTPShape
	var occ string
	var bind netip.AddrPort
	var servers []render.HAProxyServer
	for _, l := range lines {
		f := strings.Fields(l)
		switch {
		case len(f) == 2 && f[0] == "balance":
			sh.Balance = f[1]
		case len(f) == 2 && f[0] == "hash-type":
			sh.HashType = f[1]
		case len(f) == 7 && f[0] == "stick-table" && f[5] == "expire":
			d, err := time.ParseDuration(f[6])
			if err != nil {
				return
			}
			sh.StickType, sh.StickExpire = f[2], d
		case len(f) == 4 && f[0] == "#" && f[1] == "service":
			ap, err := netip.ParseAddrPort(f[3])
			if err != nil || render.CheckHAProxyName(f[2]) != nil {
				return
			}
			occ, bind = f[2], ap
		default:
			if srv, ok := parseServer(f); ok {
				servers = append(servers, srv)
			}
		}
	}
	if sh.Name() != shapeName {
		return
	}
	p := pools[shapeName]
	if p == nil {
		p = &render.HTTPPool{Shape: sh}
		pools[shapeName] = p
	}
	if len(p.Slots) < idx {
		p.Slots = append(p.Slots, make([]string, idx-len(p.Slots))...)
	}
	p.Slots[idx-1] = occ
	if occ != "" {
		out[occ] = &service{http: true, slot: name, svc: render.HAProxyService{Name: occ, Bind: bind, Mode: spec.ModeHTTP, Servers: servers}}
	}
}

// adoptHTTPFiles completes the record of an adopted HAProxy's http part
// from the files this driver wrote: each service's routes from the
// routing maps, each crt-list's certificates.
func (d *Driver) adoptHTTPFiles() {
	o := d.httpOptions(d.loaded)
	bySlot := map[string]*service{}
	for _, e := range d.loaded {
		if e.http {
			bySlot[e.slot] = e
		}
	}
	for _, f := range d.layout.Frontends {
		path := render.HTTPMapPath(o, f)
		content, err := atomicfile.ReadBounded(path, maxMapFile)
		if err != nil {
			d.log.Warn("routing map of an adopted haproxy cannot be read; it is written again", "map", path, "err", err)
			continue
		}
		d.maps[path] = content
		for _, l := range strings.Split(string(content), "\n") {
			f := strings.Fields(l)
			if len(f) != 2 {
				continue
			}
			r, err := render.HTTPRouteOfKey(f[0])
			if e := bySlot[f[1]]; err == nil && e != nil {
				e.svc.Routes = append(e.svc.Routes, r)
			}
		}
		if f.TLS {
			list := render.HTTPCrtListPath(o, f)
			if content, err := atomicfile.ReadBounded(list, maxMapFile); err == nil {
				d.crtLists[list] = strings.Fields(string(content))
			}
		}
	}
}
