package haproxy

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/switchman-lb/switchman/render"
)

// DefaultDir is the driver's working directory when Options.Dir is empty.
const DefaultDir = "/run/switchman/haproxy"

// baseOptions are the render options of a driver working in dir with the
// given admin socket.
func baseOptions(dir, adminSock string) render.HAProxyOptions {
	return render.HAProxyOptions{
		AdminSocket: adminSock,
		PIDFile:     filepath.Join(dir, "haproxy.pid"),
		StateDir:    dir,
	}
}

// certPath is where the driver writes the certificate of a service whose
// PEM comes from an etcd key.
func certPath(dir, service string) string { return filepath.Join(dir, "certs", service+".pem") }

// Plan renders what a driver working in dir (with spare spare slots per
// pool, 0 for the default) would hold for services, touching nothing:
// `switchman plan` shows it. config is haproxy.cfg, except that each run
// of spare http backend slots is summed up in one comment; http tells,
// per http frontend, its routing map, crt-list and default certificate,
// then how many slots of each pool are in use and by whom.
func Plan(dir string, services []render.HAProxyService, spare int) (config, http []byte, err error) {
	if dir == "" {
		dir = DefaultDir
	}
	o := baseOptions(dir, filepath.Join(dir, "admin.sock"))
	o.HTTPSpareSlots = spare
	o.Certificates = map[string]string{}
	for _, s := range services {
		if s.CertificateKey != "" {
			o.Certificates[s.Name] = certPath(dir, s.Name)
		}
	}
	head, parts, layout, err := render.HAProxyConfigParts(services, o)
	if err != nil {
		return nil, nil, err
	}
	var cfg bytes.Buffer
	cfg.Write(head)
	shown := map[string]bool{} // pools whose first spare slot is shown whole
	var run []string           // spare slots summed up in one comment
	flush := func() {
		if len(run) > 0 {
			fmt.Fprintf(&cfg, "\n# %d more spare slot(s), %s to %s, each like the empty one above: a new http service takes one without a reload\n", len(run), run[0], run[len(run)-1])
			run = nil
		}
	}
	for _, p := range parts {
		name, _, _ := strings.Cut(strings.TrimPrefix(string(p.Text), "\nbackend "), "\n")
		if len(p.Services) > 0 || render.CheckHTTPSlot(name) != nil {
			flush()
			cfg.Write(p.Text)
			continue
		}
		pool := strings.TrimRight(name, "0123456789")
		if len(run) > 0 && strings.TrimRight(run[0], "0123456789") != pool {
			flush()
		}
		if !shown[pool] {
			shown[pool] = true
			flush()
			cfg.Write(p.Text)
			continue
		}
		run = append(run, name)
	}
	flush()
	files, err := render.HTTPFiles(layout, services, o)
	if err != nil {
		return nil, nil, err
	}
	var b bytes.Buffer
	for _, f := range files {
		switch {
		case f.CopyOf != "":
			fmt.Fprintf(&b, "# default certificate of %s (clients without SNI): %s, a copy of %s\n", f.Frontend.Name(), f.Path, f.CopyOf)
		case strings.HasSuffix(f.Path, ".crtlist"):
			fmt.Fprintf(&b, "# crt-list of %s (certificates chosen by SNI): %s\n%s", f.Frontend.Name(), f.Path, f.Content)
		default:
			fmt.Fprintf(&b, "# routing map of %s (host+path prefix -> backend slot; longest prefix first): %s\n%s", f.Frontend.Name(), f.Path, f.Content)
		}
	}
	for _, p := range layout.Pools {
		var used []string
		for i, occ := range p.Slots {
			if occ != "" {
				used = append(used, occ+"="+render.HTTPSlotName(p.Shape.Name(), i+1))
			}
		}
		fmt.Fprintf(&b, "# backend slots %s (balance %s): %d of %d in use: %s\n", p.Shape.Name(), p.Shape.Balance, len(used), len(p.Slots), strings.Join(used, " "))
	}
	return cfg.Bytes(), b.Bytes(), nil
}
