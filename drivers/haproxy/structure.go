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
		if !d.running && len(proposed) == 0 {
			d.commit(proposed, batch) // nothing to start
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
		bad, err := d.tryLoad(ctx, proposed, batch)
		for n, err := range bad {
			drop(n, err)
		}
		if len(bad) > 0 {
			continue
		}
		if err == nil {
			d.commit(proposed, batch)
			pending = without(pending, inBatch(batch))
			need = false
			continue
		}
		last = err
		// Which change did HAProxy refuse? It may say, naming lines of
		// the file; a bind taken since it was probed shows by probing it
		// again.
		found := false
		for _, n := range blame(err, d.header, proposed) {
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
// first by name) keeps it.
func bindConflicts(proposed map[string]*service, batch []change) map[string]error {
	changed := map[string]bool{}
	for _, c := range batch {
		changed[c.name] = true
	}
	owner := map[netip.AddrPort]string{}
	for _, n := range slices.Sorted(maps.Keys(proposed)) {
		if !changed[n] {
			owner[proposed[n].svc.Bind] = n
		}
	}
	bad := map[string]error{}
	for _, n := range slices.Sorted(maps.Keys(proposed)) {
		if !changed[n] {
			continue
		}
		b := proposed[n].svc.Bind
		if o, taken := owner[b]; taken {
			bad[n] = fmt.Errorf("bind %s is held by HAProxy service %q", b, o)
			continue
		}
		owner[b] = n
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

// tryLoad writes the certificate files of proposed, renders it, checks it
// and loads it: a reload, or a start when HAProxy is not running. bad
// names the changes that failed on their own (a certificate file that
// cannot be written); err says why the whole did not load, and then the
// last good haproxy.cfg is put back.
func (d *Driver) tryLoad(ctx context.Context, proposed map[string]*service, batch []change) (bad map[string]error, err error) {
	bad = map[string]error{}
	for _, c := range batch {
		if e := c.next; e != nil && e.fromEtcd {
			if err := d.ensureFile(e.certPath, e.pem, false); err != nil {
				bad[c.name] = err
			}
		}
	}
	if len(bad) > 0 {
		return bad, nil
	}
	cfg := assemble(d.header, proposed)
	if err := d.check(ctx, cfg); err != nil {
		return nil, err
	}
	prev := d.onDisk
	if err := writeAtomic(d.cfgPath, cfg); err != nil {
		return nil, fmt.Errorf("write haproxy.cfg: %w", err)
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
		return nil, fmt.Errorf("load haproxy.cfg: %w", err)
	}
	return nil, nil
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

// commit records that HAProxy runs proposed: the new workers hold the
// pools of its sections and the certificates of its files.
func (d *Driver) commit(proposed map[string]*service, batch []change) {
	for _, c := range batch {
		if c.next == nil {
			d.log.Info("haproxy service removed", "service", c.name)
		} else {
			d.log.Info("haproxy service loaded", "service", c.name, "bind", c.next.svc.Bind)
		}
	}
	d.loaded = proposed
	clear(d.certs)
	for _, e := range proposed {
		e.poolKnown = true
		if e.certPath != "" && e.pem != nil {
			d.certs[e.certPath] = sha256.Sum256(e.pem)
		}
	}
	d.runHeader = d.header
	d.loads++
	d.running = len(proposed) > 0 || d.running
	d.recorded = true
	d.dirty = false
}

// blame names the services whose sections hold the lines HAProxy's refusal
// refers to ("[<file>:<line>]"), in set assembled after header.
func blame(err error, header []byte, set map[string]*service) []string {
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
	line := bytes.Count(header, []byte("\n")) // lines before the first section
	for _, n := range slices.Sorted(maps.Keys(set)) {
		last := line + bytes.Count(set[n].section, []byte("\n"))
		if slices.ContainsFunc(refs, func(r int) bool { return r > line && r <= last }) {
			out = append(out, n)
		}
		line = last
	}
	return out
}
