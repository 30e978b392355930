package haproxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/switchman-lb/switchman/render"
)

// maxLoadAttempts bounds the reloads one pass makes to find which of
// several structural changes HAProxy refuses when it does not say.
const maxLoadAttempts = 8

// restructure loads a new structure: the running one with changes made
// (forceAll: load the running one again even without changes). Every bind
// the running HAProxy does not hold yet is probed first, so a bind HAProxy
// could not make fails only its service, at once. The rest is written,
// checked with haproxy -c and loaded with one reload (or a start). When
// HAProxy still refuses it, binds are probed again (one may have been
// taken meanwhile) and, failing that, the changes are loaded one at a time
// to find the one refused. A service whose change fails keeps its last
// good structure (or stays out, when new) and gets the error in errs; the
// others are loaded. It returns an error only when HAProxy could not be
// brought to run at all.
func (d *Driver) restructure(ctx context.Context, changes []change, forceAll bool, errs map[string]error) error {
	held := map[netip.AddrPort]bool{} // handed over to new workers on a reload
	if d.running {
		for _, e := range d.loaded {
			held[e.svc.Bind] = true
		}
	} else {
		// A fresh start binds every listener anew: the recorded services
		// are started again like new ones.
		changing := map[string]bool{}
		for _, c := range changes {
			changing[c.name] = true
		}
		for _, n := range slices.Sorted(maps.Keys(d.loaded)) {
			if !changing[n] {
				changes = append(changes, change{name: n, next: d.loaded[n]})
			}
		}
	}
	var pending []change
	// drop fails a change: the service keeps its last good structure, or,
	// when HAProxy is to be started, is left out of it.
	drop := func(name string, err error) {
		errs[name] = err
		removal := slices.ContainsFunc(pending, func(c change) bool { return c.name == name && c.next == nil })
		pending = without(pending, func(c change) bool { return c.name == name })
		if !d.running && d.loaded[name] != nil && !removal {
			pending = append(pending, change{name: name})
		}
	}
	pending = changes
	for _, c := range changes {
		if c.next != nil && !held[c.next.svc.Bind] {
			if err := d.proc.ProbeBind(c.next.svc.Bind); err != nil {
				d.log.Warn("haproxy service not loaded: its bind fails", "service", c.name, "err", err)
				drop(c.name, err)
			}
		}
	}

	need := forceAll || !d.running
	alone := false
	var last error
	for attempts := 0; len(pending) > 0 || need; {
		batch := pending
		if alone {
			batch = pending[:1]
		}
		proposed := d.propose(batch)
		if bad := bindConflicts(proposed, batch); len(bad) > 0 {
			for n, err := range bad {
				drop(n, err)
			}
			continue
		}
		layout, err := d.layoutOf(proposed)
		if err != nil {
			for _, c := range batch {
				if c.next != nil && c.next.http {
					drop(c.name, err)
				}
			}
			continue
		}
		if !d.running && len(proposed) == 0 {
			d.commit(proposed, layout, batch, nil, nil) // nothing to start
			pending = without(pending, inBatch(batch))
			need = false
			continue
		}
		if attempts == maxLoadAttempts {
			err := fmt.Errorf("not loaded: %d attempts to load the structure failed, the last with: %w", attempts, last)
			for _, c := range pending {
				errs[c.name] = err
			}
			return err
		}
		attempts++
		loaded, err := d.tryLoad(ctx, proposed, layout, batch)
		for n, err := range loaded.bad {
			drop(n, err)
		}
		if len(loaded.bad) > 0 {
			continue
		}
		if err == nil {
			d.commit(proposed, layout, batch, loaded.maps, loaded.lists)
			pending = without(pending, inBatch(batch))
			need = false
			continue
		}
		last = err
		// Which change did HAProxy refuse? It may say, naming lines of
		// the file; a bind taken since it was probed shows by probing it
		// again.
		found := false
		for _, n := range blame(err, d.header, loaded.parts) {
			if slices.ContainsFunc(batch, func(c change) bool { return c.name == n }) {
				drop(n, err)
				found = true
			}
		}
		for _, c := range batch {
			if found || c.next == nil || held[c.next.svc.Bind] {
				continue
			}
			if perr := d.proc.ProbeBind(c.next.svc.Bind); perr != nil {
				drop(c.name, perr)
				found = true
			}
		}
		switch {
		case found:
		case len(batch) == 0:
			return err // the running structure itself cannot be loaded
		case len(batch) == 1:
			drop(batch[0].name, err)
		default:
			d.log.Warn("haproxy refused the new structure without saying which service; loading the changes one at a time", "changes", len(batch), "err", err)
			alone = true
		}
	}
	if !d.running {
		if last == nil {
			last = errors.New("haproxy is not running")
		}
		return last
	}
	return nil
}

// propose is the running structure with batch made.
func (d *Driver) propose(batch []change) map[string]*service {
	out := maps.Clone(d.loaded)
	for _, c := range batch {
		if c.next == nil {
			delete(out, c.name)
		} else {
			out[c.name] = c.next
		}
	}
	return out
}

// bindConflicts finds the changes in batch whose bind another service of
// proposed holds: the one already loaded (or, between two new ones, the
// first by name) keeps it. http services share the bind of their frontend
// with each other, never with a tcp service.
func bindConflicts(proposed map[string]*service, batch []change) map[string]error {
	changed := map[string]bool{}
	for _, c := range batch {
		changed[c.name] = true
	}
	owner := map[netip.AddrPort]string{}
	for _, n := range slices.Sorted(maps.Keys(proposed)) {
		if b := proposed[n].svc.Bind; !changed[n] && (owner[b] == "" || !proposed[n].http) {
			owner[b] = n
		}
	}
	bad := map[string]error{}
	for _, n := range slices.Sorted(maps.Keys(proposed)) {
		if !changed[n] {
			continue
		}
		b := proposed[n].svc.Bind
		if o, taken := owner[b]; taken && !(proposed[o].http && proposed[n].http) {
			bad[n] = fmt.Errorf("bind %s is held by HAProxy service %q", b, o)
			continue
		}
		if owner[b] == "" {
			owner[b] = n
		}
	}
	return bad
}

func inBatch(batch []change) func(change) bool {
	return func(c change) bool {
		return slices.ContainsFunc(batch, func(b change) bool { return b.name == c.name })
	}
}

func without(cs []change, drop func(change) bool) []change {
	return slices.DeleteFunc(slices.Clone(cs), drop)
}

// loadResult is what tryLoad wrote: the parts of haproxy.cfg (for
// blame), the routing maps and crt-lists a HAProxy loading it holds, and
// the changes that failed on their own.
type loadResult struct {
	parts []render.HAProxyPart
	maps  map[string][]byte
	lists map[string][]string
	bad   map[string]error
}

// tryLoad writes the certificate files of proposed, the files of its http
// frontends, renders it, checks it and loads it: a reload, or a start when
// HAProxy is not running. res.bad names the changes that failed on their
// own (a certificate file that cannot be written); err says why the whole
// did not load, and then the last good haproxy.cfg and http files are put
// back.
func (d *Driver) tryLoad(ctx context.Context, proposed map[string]*service, layout render.HTTPLayout, batch []change) (res loadResult, err error) {
	res.bad = map[string]error{}
	for _, c := range batch {
		if e := c.next; e != nil && e.fromEtcd {
			if err := d.ensureFile(e.certPath, e.pem, false); err != nil {
				res.bad[c.name] = err
			}
		}
	}
	if len(res.bad) > 0 {
		return res, nil
	}
	cfg, parts, err := d.assemble(d.header, proposed, layout)
	if err != nil {
		return res, err
	}
	res.parts = parts
	if res.maps, res.lists, err = d.writeHTTPFiles(proposed, layout); err != nil {
		d.restoreHTTPFiles()
		return res, err
	}
	if err := d.check(ctx, cfg); err != nil {
		d.restoreHTTPFiles()
		return res, err
	}
	prev := d.onDisk
	if err := writeAtomic(d.cfgPath, cfg); err != nil {
		d.restoreHTTPFiles()
		return res, fmt.Errorf("write haproxy.cfg: %w", err)
	}
	d.onDisk = cfg
	if d.running {
		err = d.proc.Reload(ctx)
		if err == nil {
			d.reloads.Add(1)
		}
	} else {
		err = d.proc.Start(ctx)
	}
	if err != nil {
		// Put the last good file back for the next start or reload.
		if prev != nil && writeAtomic(d.cfgPath, prev) == nil {
			d.onDisk = prev
		}
		d.restoreHTTPFiles()
		return res, fmt.Errorf("load haproxy.cfg: %w", err)
	}
	return res, nil
}

// restoreHTTPFiles writes back the files of the running structure's http
// frontends after a structure that did not load.
func (d *Driver) restoreHTTPFiles() {
	if _, _, err := d.writeHTTPFiles(d.loaded, d.layout); err != nil {
		d.log.Warn("the http files of the running structure could not be written back", "err", err)
	}
}

// check validates cfg with haproxy -c before it replaces the running file.
func (d *Driver) check(ctx context.Context, cfg []byte) error {
	next := d.cfgPath + ".next"
	if err := writeAtomic(next, cfg); err != nil {
		return fmt.Errorf("write %s: %w", next, err)
	}
	defer os.Remove(next)
	return d.proc.Validate(ctx, next)
}

// commit records that HAProxy runs proposed with layout: the new workers
// hold the pools of its sections and slots, the certificates of its files,
// and the routing maps and crt-lists written for it.
func (d *Driver) commit(proposed map[string]*service, layout render.HTTPLayout, batch []change, written map[string][]byte, lists map[string][]string) {
	for _, c := range batch {
		if c.next == nil {
			d.log.Info("haproxy service removed", "service", c.name)
		} else {
			d.log.Info("haproxy service loaded", "service", c.name, "bind", c.next.svc.Bind)
		}
	}
	d.loaded = proposed
	clear(d.certs)
	for n, e := range proposed {
		e.poolKnown = true
		if e.certPath != "" && e.pem != nil {
			d.certs[e.certPath] = sha256.Sum256(e.pem)
		}
		if e.http {
			e.slot = layout.Slot(n)
		}
	}
	// Slots start empty (or with their service's servers) in new workers.
	d.layout = layout
	clear(d.releasing)
	d.maps, d.crtLists = written, lists
	if d.maps == nil {
		d.maps = map[string][]byte{}
	}
	if d.crtLists == nil {
		d.crtLists = map[string][]string{}
	}
	for _, f := range layout.Frontends {
		if f.TLS {
			// The default certificate is a copy of the crt-list's first.
			def := render.HTTPDefaultCertPath(d.base, f)
			if l := d.crtLists[render.HTTPCrtListPath(d.base, f)]; len(l) > 0 {
				if sum, ok := d.certs[l[0]]; ok {
					d.certs[def] = sum
				}
			}
		}
	}
	d.runHeader = d.header
	d.loads++
	d.running = len(proposed) > 0 || d.running
	d.recorded = true
	d.dirty = false
}

// blame names the services whose parts of haproxy.cfg (after header)
// hold the lines HAProxy's refusal refers to ("[<file>:<line>]").
func blame(err error, header []byte, parts []render.HAProxyPart) []string {
	var ce *ConfigError
	if !errors.As(err, &ce) || ce.File == "" {
		return nil
	}
	var refs []int
	tag := "[" + ce.File + ":"
	for _, l := range ce.Said {
		for {
			i := strings.Index(l, tag)
			if i < 0 {
				break
			}
			l = l[i+len(tag):]
			end := strings.IndexByte(l, ']')
			if end < 0 {
				break
			}
			if n, err := strconv.Atoi(l[:end]); err == nil {
				refs = append(refs, n)
			}
		}
	}
	if len(refs) == 0 {
		return nil
	}
	var out []string
	line := bytes.Count(header, []byte("\n")) // lines before the first part
	for _, p := range parts {
		last := line + bytes.Count(p.Text, []byte("\n"))
		if slices.ContainsFunc(refs, func(r int) bool { return r > line && r <= last }) {
			for _, n := range p.Services {
				if !slices.Contains(out, n) {
					out = append(out, n)
				}
			}
		}
		line = last
	}
	return out
}
