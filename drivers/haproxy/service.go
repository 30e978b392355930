package haproxy

import (
	"bytes"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/switchman-lb/switchman/internal/atomicfile"
	"github.com/switchman-lb/switchman/render"
)

// service is one service's section of haproxy.cfg: its structure, its
// pool, and the certificate its frontend loads. The driver keeps one per
// service in the running structure, and prepares one per desired service.
type service struct {
	svc      render.HAProxyService // the structure, and the pool of the section
	certPath string                // file the frontend loads; "" for plain TCP
	fromEtcd bool                  // certPath is written by the driver
	pem      []byte                // canonical certificate content; nil when not known
	section  []byte                // the rendered section, servers included
	skeleton string                // the section without its server lines: what needs a reload
	// poolKnown says svc.Servers is what HAProxy holds, so a pool change
	// is the difference, without reading the backend first.
	poolKnown bool
}

// adoptStructure takes the certificate and definition of p, whose
// structure is the same as e's, keeping e's pool.
func (e *service) adoptStructure(p *service) {
	servers := e.svc.Servers
	e.svc = p.svc
	e.svc.Servers = servers
	e.certPath, e.fromEtcd, e.pem = p.certPath, p.fromEtcd, p.pem
}

// prepare resolves a service's certificate and renders its section, which
// checks every value and gives its skeleton.
func (d *Driver) prepare(s render.HAProxyService) (*service, error) {
	p := &service{svc: s}
	if err := render.CheckHAProxyName(s.Name); err != nil {
		return nil, err
	}
	switch {
	case s.CertificateKey != "":
		if len(s.CertificatePEM) == 0 {
			return nil, fmt.Errorf("tls.certificate_key %q is missing or empty in etcd", s.CertificateKey)
		}
		pem, err := canonicalPEM(s.CertificatePEM)
		if err != nil {
			return nil, fmt.Errorf("tls.certificate_key %q: %w", s.CertificateKey, err)
		}
		p.certPath, p.fromEtcd, p.pem = certPath(d.opts.Dir, s.Name), true, pem
	case s.Certificate != "":
		if err := render.CheckHAProxyPath("tls.certificate", s.Certificate); err != nil {
			return nil, err
		}
		// A regular file of bounded size, opened without blocking: the
		// definition's writer chooses the path (/dev/zero, a FIFO).
		raw, err := atomicfile.ReadBounded(s.Certificate, maxCertificateFile)
		if err != nil {
			return nil, fmt.Errorf("tls.certificate %q cannot be used: %w", s.Certificate, err)
		}
		pem, err := canonicalPEM(raw)
		if err != nil {
			return nil, fmt.Errorf("tls.certificate %q: %w", s.Certificate, err)
		}
		p.certPath, p.pem = s.Certificate, pem
	}
	if err := d.render(p); err != nil {
		return nil, err
	}
	return p, nil
}

// render renders e's section from e.svc.
func (d *Driver) render(e *service) error {
	o := d.base
	if e.fromEtcd {
		o.Certificates = map[string]string{e.svc.Name: e.certPath}
	}
	sec, err := render.HAProxySection(e.svc, o)
	if err != nil {
		return err
	}
	e.section, e.skeleton = sec, skeletonOf(sec)
	return nil
}

// skeletonOf is a section without its server lines: what needs a reload.
func skeletonOf(sec []byte) string {
	var b strings.Builder
	for _, l := range strings.SplitAfter(string(sec), "\n") {
		if !strings.HasPrefix(l, "    server ") {
			b.WriteString(l)
		}
	}
	return b.String()
}

// assemble is haproxy.cfg: the header, then the sections in name order.
func assemble(header []byte, set map[string]*service) []byte {
	names := make([]string, 0, len(set))
	size := len(header)
	for n, e := range set {
		names = append(names, n)
		size += len(e.section)
	}
	slices.Sort(names)
	b := make([]byte, 0, size)
	b = append(b, header...)
	for _, n := range names {
		b = append(b, set[n].section...)
	}
	return b
}

// sectionStart marks where a service's section begins in haproxy.cfg: a
// blank line, then its frontend.
var sectionStart = []byte("\n\nfrontend fe_")

// parseConfig reads a haproxy.cfg this driver wrote back into its header
// and its services (what a HAProxy started on it runs): each section's
// name, bind, certificate path and servers. A section it cannot read is
// left out, so the service is loaded again.
func parseConfig(cfg []byte, dir string) ([]byte, map[string]*service) {
	out := map[string]*service{}
	i := bytes.Index(cfg, sectionStart)
	if i < 0 {
		return cfg, out
	}
	header := cfg[:i+1]
	rest := cfg[i+1:]
	for len(rest) > 0 {
		j := bytes.Index(rest[1:], sectionStart)
		sec := rest
		if j >= 0 {
			sec, rest = rest[:j+2], rest[j+2:]
		} else {
			rest = nil
		}
		if e, ok := parseSection(sec, dir); ok {
			out[e.svc.Name] = e
		}
	}
	return header, out
}

func parseSection(sec []byte, dir string) (*service, bool) {
	e := &service{section: bytes.Clone(sec), skeleton: skeletonOf(sec)}
	for _, l := range strings.Split(string(sec), "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) == 2 && f[0] == "frontend":
			e.svc.Name = strings.TrimPrefix(f[1], "fe_")
		case len(f) >= 2 && f[0] == "bind":
			ap, err := netip.ParseAddrPort(f[1])
			if err != nil {
				return nil, false
			}
			e.svc.Bind = ap
			if len(f) == 5 && f[2] == "ssl" && f[3] == "crt" {
				e.certPath = f[4]
			}
		case len(f) == 5 && f[0] == "server" && f[3] == "weight":
			ap, err1 := netip.ParseAddrPort(f[2])
			w, err2 := strconv.Atoi(f[4])
			if err1 != nil || err2 != nil {
				return nil, false
			}
			e.svc.Servers = append(e.svc.Servers, render.HAProxyServer{Name: f[1], Address: ap.Addr(), Port: ap.Port(), Weight: w})
		}
	}
	if render.CheckHAProxyName(e.svc.Name) != nil || !e.svc.Bind.IsValid() {
		return nil, false
	}
	e.fromEtcd = e.certPath != "" && e.certPath == certPath(dir, e.svc.Name)
	return e, true
}
