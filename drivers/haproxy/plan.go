package haproxy

import (
	"path/filepath"

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
	}
}

// certPath is where the driver writes the certificate of a service whose
// PEM comes from an etcd key.
func certPath(dir, service string) string { return filepath.Join(dir, "certs", service+".pem") }

// Plan renders the haproxy.cfg a driver working in dir would write for
// services, touching nothing: `switchman plan` shows it.
func Plan(dir string, services []render.HAProxyService) ([]byte, error) {
	if dir == "" {
		dir = DefaultDir
	}
	o := baseOptions(dir, filepath.Join(dir, "admin.sock"))
	o.Certificates = map[string]string{}
	for _, s := range services {
		if s.CertificateKey != "" {
			o.Certificates[s.Name] = certPath(dir, s.Name)
		}
	}
	return render.HAProxyConfig(services, o)
}
