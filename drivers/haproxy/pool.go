package haproxy

import (
	"bytes"
	"context"
	"crypto/sha1" //nolint:gosec // HAProxy names certificates by their SHA-1 fingerprint
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/switchman-lb/switchman/internal/atomicfile"
	"github.com/switchman-lb/switchman/render"
)

// syncPool brings the servers of e's backend to want with runtime API
// commands on that backend alone. What HAProxy holds is actual when
// readBack (a Sync read it), else the record when it is known, else one
// `show servers state` of the backend. Nothing is sent when nothing
// differs.
//
// A removed server's connections are shut down at once in mode tcp (the
// agent's drain has kept it at weight 0 first). In mode http the requests
// in flight on it are let finish: it stays in maintenance, and a Sync
// shuts down what it still has (long-lived streams) and deletes it, as a
// slot a service left is emptied. Idle connections HAProxy keeps to it for
// reuse also keep it until HAProxy purges them (pool-purge-delay).
func (d *Driver) syncPool(ctx context.Context, e *service, want []render.HAProxyServer, actual []ServerState, readBack, seen bool) error {
	be := e.backend()
	switch {
	case readBack && seen:
	case e.poolKnown:
		if samePool(e.svc.Servers, want) {
			return nil
		}
		actual = recordedPool(e.svc.Servers)
	default:
		var err error
		if actual, err = d.rt.ServersState(ctx, be); err != nil {
			return fmt.Errorf("read backend %s: %w", be, err)
		}
	}
	closing, err := d.setServers(ctx, be, want, actual, !e.http || readBack)
	if !samePool(e.svc.Servers, want) {
		e.svc.Servers = slices.Clone(want)
		if rerr := d.render(e); rerr != nil {
			err = errors.Join(err, rerr)
		}
		d.dirty = true
	}
	// A server still closing its connections is deleted by a later pass,
	// which reads the backend again; so does one after an error.
	e.poolKnown = err == nil && !closing
	return err
}

// samePool reports whether two pools are the same for HAProxy: names,
// addresses and weights as HAProxy holds them.
func samePool(a, b []render.HAProxyServer) bool {
	return slices.EqualFunc(a, b, func(x, y render.HAProxyServer) bool {
		return x.Name == y.Name && x.Address == y.Address && x.Port == y.Port && render.HAProxyWeight(x.Weight) == render.HAProxyWeight(y.Weight)
	})
}

func recordedPool(servers []render.HAProxyServer) []ServerState {
	out := make([]ServerState, len(servers))
	for i, s := range servers {
		out[i] = ServerState{Name: s.Name, Addr: netip.AddrPortFrom(s.Address, s.Port), Weight: render.HAProxyWeight(s.Weight)}
	}
	return out
}

// setServers makes a backend's servers go from actual to want: missing
// servers are added (they start in maintenance, so they are enabled),
// addresses, weights and maintenance are corrected, and servers not in
// want are removed (removeServer, with force). Additions come first so
// capacity never dips. closing reports a removed server that still has
// connections, left in maintenance.
func (d *Driver) setServers(ctx context.Context, be string, want []render.HAProxyServer, actual []ServerState, force bool) (closing bool, err error) {
	have := make(map[string]ServerState, len(actual))
	for _, a := range actual {
		have[a.Name] = a
	}
	var errs []error
	wanted := make(map[string]bool, len(want))
	for _, s := range want {
		wanted[s.Name] = true
		ap := netip.AddrPortFrom(s.Address, s.Port)
		w := render.HAProxyWeight(s.Weight)
		a, ok := have[s.Name]
		if !ok {
			if err := d.rt.AddServer(ctx, be, s.Name, ap, w); err != nil {
				errs = append(errs, err)
				continue
			}
			errs = append(errs, d.rt.SetState(ctx, be, s.Name, StateReady))
			continue
		}
		if a.Addr != ap {
			errs = append(errs, d.rt.SetAddr(ctx, be, s.Name, ap))
		}
		if a.Weight != w {
			errs = append(errs, d.rt.SetWeight(ctx, be, s.Name, w))
		}
		if a.Maint {
			errs = append(errs, d.rt.SetState(ctx, be, s.Name, StateReady))
		}
	}
	for _, a := range actual {
		if wanted[a.Name] {
			continue
		}
		left, err := d.removeServer(ctx, be, a, force)
		errs = append(errs, err)
		closing = closing || left
	}
	return closing, errors.Join(errs...)
}

// removeServer puts a server in maintenance (no new connections or
// requests) and deletes it, without waiting. A server that still has
// connections stays in maintenance (left true) for a later pass to
// delete; with force they are shut down first, and it stays only while
// they are still closing.
func (d *Driver) removeServer(ctx context.Context, be string, a ServerState, force bool) (left bool, err error) {
	if !a.Maint {
		if err := d.rt.SetState(ctx, be, a.Name, StateMaint); err != nil {
			return false, err
		}
	}
	err = d.rt.DelServer(ctx, be, a.Name)
	if !errors.Is(err, ErrServerBusy) {
		return false, err
	}
	if !force {
		return true, nil
	}
	if err := d.rt.ShutdownSessions(ctx, be, a.Name); err != nil {
		return false, err
	}
	err = d.rt.DelServer(ctx, be, a.Name)
	if errors.Is(err, ErrServerBusy) {
		d.log.Info("removed server still closing its connections; it stays in maintenance until a later pass deletes it", "backend", be, "server", a.Name)
		return true, nil
	}
	return false, err
}

// syncCert makes HAProxy serve e's certificate (syncCertAt).
func (d *Driver) syncCert(ctx context.Context, e *service, verify bool) error {
	return d.syncCertAt(ctx, e.certPath, e.pem, e.fromEtcd, verify)
}

// syncCertAt makes HAProxy serve pem from the certificate file path:
// written first when the driver owns the file (a certificate from an etcd
// key, a default certificate), so a restart loads it too, then swapped in
// memory with `set ssl cert` + `commit ssl cert`, without a reload. What
// HAProxy serves is read back (its leaf's fingerprint) when the record
// does not know it, and always with verify (a Sync).
func (d *Driver) syncCertAt(ctx context.Context, path string, pem []byte, write, verify bool) error {
	if pem == nil {
		return nil
	}
	sum := sha256.Sum256(pem)
	if write {
		if err := d.ensureFile(path, pem, verify); err != nil {
			return err
		}
	}
	served, known := d.certs[path]
	if known && served == sum && !verify {
		return nil
	}
	if !known || verify {
		fp, err := d.rt.CertificateFingerprint(ctx, path)
		if want, ferr := leafFingerprint(pem); err == nil && ferr == nil && fp == want {
			d.certs[path] = sum
			return nil
		}
	}
	if err := d.rt.SetCertificate(ctx, path, pem); err != nil {
		delete(d.certs, path)
		return fmt.Errorf("certificate %s: %w", path, err)
	}
	d.certs[path] = sum
	d.log.Info("certificate replaced without reload", "path", path)
	return nil
}

// leafFingerprint is the SHA-1 fingerprint of the first certificate of a
// PEM bundle, as `show ssl cert` prints it.
func leafFingerprint(bundle []byte) (string, error) {
	for rest := bundle; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return "", errors.New("no certificate in the PEM")
		}
		if b.Type == "CERTIFICATE" {
			sum := sha1.Sum(b.Bytes) //nolint:gosec // a fingerprint, not a signature
			return strings.ToUpper(hex.EncodeToString(sum[:])), nil
		}
	}
}

// ensureFile makes the certificate file written from an etcd key hold
// content; it reads the file first when the record does not know it (or
// verify), and writes only when it differs.
func (d *Driver) ensureFile(path string, content []byte, verify bool) error {
	sum := sha256.Sum256(content)
	if d.files[path] == sum && !verify {
		return nil
	}
	if cur, err := atomicfile.ReadBounded(path, maxCertificateFile); err == nil && bytes.Equal(cur, content) {
		d.files[path] = sum
		return nil
	}
	if err := writeAtomic(path, content); err != nil {
		delete(d.files, path)
		return fmt.Errorf("write certificate: %w", err)
	}
	d.files[path] = sum
	return nil
}

// persist makes haproxy.cfg equal to what runs, servers included, so a
// restart of HAProxy brings the current pools back. Only server lines
// differ from the file that was checked, so no new check is needed. A
// Sync (full) compares with the file on disk, not the record of it.
func (d *Driver) persist(full bool) {
	if !d.running || (!d.dirty && !full) {
		return
	}
	cfg, _, err := d.assemble(d.runHeader, d.loaded, d.layout)
	if err != nil {
		d.log.Warn("haproxy.cfg not updated with the current pool", "err", err)
		return
	}
	cur := d.onDisk
	if full {
		cur, _ = os.ReadFile(d.cfgPath)
	}
	if !bytes.Equal(cfg, cur) {
		if err := writeAtomic(d.cfgPath, cfg); err != nil {
			d.log.Warn("haproxy.cfg not updated with the current pool", "err", err)
			return
		}
	}
	d.onDisk, d.dirty = cfg, false
}
