package haproxy

import (
	"bytes"
	"fmt"
	"maps"
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
	// http says the service shares the http frontend of its bind: it has
	// no section of its own, and its backend is slot, a backend slot of
	// the layout.
	http bool
	slot string
}

// backend is the backend that holds the service's servers.
func (e *service) backend() string {
	if e.http {
		return e.slot
	}
	return render.HAProxyBackendName(e.svc.Name)
}

// adoptStructure takes the certificate and definition of p, whose
// structure is the same as e's, keeping e's pool.
func (e *service) adoptStructure(p *service) {
	servers := e.svc.Servers
	e.svc = p.svc
	e.svc.Servers = servers
	e.certPath, e.fromEtcd, e.pem = p.certPath, p.fromEtcd, p.pem
}

// prepare resolves a service's certificate and renders its section (an
// http service has none: it is checked), which checks every value and
// gives its skeleton.
func (d *Driver) prepare(s render.HAProxyService) (*service, error) {
	p := &service{svc: s, http: s.HTTP()}
	if err := render.CheckHAProxyName(s.Name); err != nil {
		return nil, err
	}
	if p.http {
		if err := render.CheckHTTPService(s); err != nil {
			return nil, err
		}
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

// render renders e's section from e.svc; an http service has none (its
// frontend and slot are rendered from the layout).
func (d *Driver) render(e *service) error {
	if e.http {
		return nil
	}
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

// assemble is haproxy.cfg: the header, the sections of the tcp services
// of set in name order, then the http part of layout (its frontends and
// slots with the servers of the http services of set). parts are the
// pieces after the header with the services each serves.
func (d *Driver) assemble(header []byte, set map[string]*service, layout render.HTTPLayout) ([]byte, []render.HAProxyPart, error) {
	var parts []render.HAProxyPart
	size := len(header)
	for _, n := range slices.Sorted(maps.Keys(set)) {
		if e := set[n]; !e.http {
			parts = append(parts, render.HAProxyPart{Services: []string{n}, Text: e.section})
			size += len(e.section)
		}
	}
	web, err := render.HAProxyHTTPSections(layout, httpServices(set), d.httpOptions(set))
	if err != nil {
		return nil, nil, err
	}
	parts = append(parts, web...)
	b := make([]byte, 0, size+len(web)*256)
	b = append(b, header...)
	for _, p := range parts {
		b = append(b, p.Text...)
	}
	return b, parts, nil
}

// httpServices lists the http services of set, sorted by name.
func httpServices(set map[string]*service) []render.HAProxyService {
	var out []render.HAProxyService
	for _, n := range slices.Sorted(maps.Keys(set)) {
		if e := set[n]; e.http {
			out = append(out, e.svc)
		}
	}
	return out
}

// httpOptions are the render options of the http part of set: the
// driver's directory, and the files certificates from etcd keys are
// written to.
func (d *Driver) httpOptions(set map[string]*service) render.HAProxyOptions {
	o := d.base
	o.Certificates = map[string]string{}
	for n, e := range set {
		if e.http && e.fromEtcd {
			o.Certificates[n] = e.certPath
		}
	}
	return o
}

// httpStart marks where the http part of haproxy.cfg begins: its first
// frontend.
var httpStart = []byte("\n\nfrontend fe_http_")

// sectionStart marks where a tcp service's section begins in haproxy.cfg:
// a blank line, then its frontend.
var sectionStart = []byte("\n\nfrontend fe_")

// parseConfig reads a haproxy.cfg this driver wrote back into its header,
// its services (what a HAProxy started on it runs) and its http layout:
// each tcp section's name, bind, certificate path and servers, and each
// http frontend and slot, with the service in it, its bind and servers. A
// section it cannot read is left out, so the service is loaded again.
// The routes of http services are in the map files, read by the caller.
func parseConfig(cfg []byte, dir string) ([]byte, map[string]*service, render.HTTPLayout) {
	out := map[string]*service{}
	var layout render.HTTPLayout
	if i := bytes.Index(cfg, httpStart); i >= 0 {
		layout = parseHTTP(cfg[i+1:], out)
		cfg = cfg[:i+1]
	}
	i := bytes.Index(cfg, sectionStart)
	if i < 0 {
		return cfg, out, layout
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
	return header, out, layout
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
		default:
			if srv, ok := parseServer(f); ok {
				e.svc.Servers = append(e.svc.Servers, srv)
			} else if len(f) > 0 && f[0] == "server" {
				return nil, false
			}
		}
	}
	if render.CheckHAProxyName(e.svc.Name) != nil || !e.svc.Bind.IsValid() {
		return nil, false
	}
	e.fromEtcd = e.certPath != "" && e.certPath == certPath(dir, e.svc.Name)
	return e, true
}

// parseServer reads a server line as the templates write it.
func parseServer(f []string) (render.HAProxyServer, bool) {
	if len(f) != 5 || f[0] != "server" || f[3] != "weight" {
		return render.HAProxyServer{}, false
	}
	ap, err1 := netip.ParseAddrPort(f[2])
	w, err2 := strconv.Atoi(f[4])
	if err1 != nil || err2 != nil {
		return render.HAProxyServer{}, false
	}
	return render.HAProxyServer{Name: f[1], Address: ap.Addr(), Port: ap.Port(), Weight: w}, true
}
