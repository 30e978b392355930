package render

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"text/template"
	"time"

	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/templates"
)

// HAProxyMaxWeight is the largest server weight HAProxy accepts.
const HAProxyMaxWeight = 256

// Defaults of the HAProxy timeouts when HAProxyOptions leaves them zero.
const (
	DefaultHAProxyTimeoutConnect = 5 * time.Second
	DefaultHAProxyTimeoutClient  = 5 * time.Minute
	DefaultHAProxyTimeoutServer  = 5 * time.Minute
)

// HAProxyOptions are the host-specific parts of haproxy.cfg, chosen by the
// driver, so that rendering stays pure.
type HAProxyOptions struct {
	// AdminSocket is the runtime API socket (level admin, expose-fd
	// listeners, so a reload hands the listening sockets over).
	AdminSocket string
	// PIDFile is where HAProxy writes the master's pid.
	PIDFile string
	// Certificates maps the name of a service whose certificate comes from
	// an etcd key (CertificateKey) to the file the driver wrote it to.
	Certificates map[string]string
	// Timeouts; zero means the Default* value.
	TimeoutConnect, TimeoutClient, TimeoutServer time.Duration
	// HardStopAfter bounds how long a worker replaced by a reload keeps
	// serving its old connections; zero leaves it unbounded.
	HardStopAfter time.Duration
	// StateDir holds the files of http frontends: routing maps under
	// maps/, crt-lists and default certificates under certs/.
	StateDir string
	// HTTPSpareSlots is how many spare backend slots HAProxyConfig lays
	// out per pool (0: DefaultHTTPSpareSlots).
	HTTPSpareSlots int
}

var (
	// The allowlists below are stricter than the spec needs, as defence
	// in depth: whatever reaches haproxy.cfg or the runtime API must be one
	// token of these characters.
	haproxyNameRE   = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	haproxyServerRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	haproxyPathRE   = regexp.MustCompile(`^/[A-Za-z0-9._/-]+$`)
)

// HAProxyFrontendName is the frontend section name of a service.
func HAProxyFrontendName(service string) string { return "fe_" + service }

// HAProxyBackendName is the backend section name of a service, as used in
// runtime API commands (`add server be_api/s10.0.0.1_80 ...`).
func HAProxyBackendName(service string) string { return "be_" + service }

// HAProxyWeight maps an IPVS-style weight (0-65535) to HAProxy's 0-256 by
// clamping: 0 stays 0 (no new connections), 1-256 are kept exactly, and
// anything larger becomes 256. Clamping rather than scaling keeps the
// common small weights (1, 2, 10, 100) and their ratios exact; only
// weights above 256 lose their ratio to each other.
func HAProxyWeight(w int) int {
	return min(max(w, 0), HAProxyMaxWeight)
}

// HAProxyBalance maps a spec scheduler to HAProxy's balance algorithm and
// hash type. Every result supports dynamic servers (`add server`), which
// HAProxy 2.6 refuses for map-based hashing; that is why sh uses a
// consistent hash too, like mh.
func HAProxyBalance(s spec.Scheduler) (balance, hashType string, err error) {
	switch s {
	case spec.RoundRobin, spec.WeightedRoundRobin, "":
		return "roundrobin", "", nil
	case spec.LeastConnection, spec.WeightedLeastConnection:
		return "leastconn", "", nil
	case spec.SourceHashing, spec.MaglevHashing:
		return "source", "consistent", nil
	}
	return "", "", fmt.Errorf("scheduler %q has no HAProxy equivalent", s)
}

// HAProxyCertificatePath is the certificate file a service's frontend
// loads: its tls.certificate, or the file the driver wrote its etcd key to.
// It is empty for plain TCP.
func HAProxyCertificatePath(s HAProxyService, opts HAProxyOptions) (string, error) {
	switch {
	case s.Certificate != "" && s.CertificateKey != "":
		return "", fmt.Errorf("service %q: both certificate and certificate_key are set", s.Name)
	case s.Certificate != "":
		return s.Certificate, nil
	case s.CertificateKey != "":
		p, ok := opts.Certificates[s.Name]
		if !ok {
			return "", fmt.Errorf("service %q: no file was written for certificate_key %q", s.Name, s.CertificateKey)
		}
		return p, nil
	}
	return "", nil
}

// CheckHAProxyToken returns an error unless v is safe to place in
// haproxy.cfg or a runtime API command as a single token: not empty, and
// no whitespace, control character, '#', ';', quote or backslash.
func CheckHAProxyToken(field, v string) error {
	if v == "" {
		return fmt.Errorf("%s: empty value", field)
	}
	for _, r := range v {
		if r <= ' ' || r == 0x7f || r > 0x7e || strings.ContainsRune("#;'\"`\\", r) {
			return fmt.Errorf("%s: %q contains %q, which HAProxy would read as syntax", field, v, r)
		}
	}
	return nil
}

func checkRE(field, v string, re *regexp.Regexp) error {
	if err := CheckHAProxyToken(field, v); err != nil {
		return err
	}
	if !re.MatchString(v) {
		return fmt.Errorf("%s: %q does not match %s", field, v, re)
	}
	return nil
}

// CheckHAProxyName checks a service name before it becomes a section name.
func CheckHAProxyName(v string) error { return checkRE("name", v, haproxyNameRE) }

// CheckHAProxyServerName checks a server name before it reaches the config
// or the runtime API.
func CheckHAProxyServerName(v string) error { return checkRE("server name", v, haproxyServerRE) }

// CheckHAProxyPath checks a file path before it reaches the config or the
// runtime API.
func CheckHAProxyPath(field, v string) error { return checkRE(field, v, haproxyPathRE) }

// CheckHAProxyAddr checks an address: valid and without an IPv6 zone (a
// zone is free text).
func CheckHAProxyAddr(field string, a netip.Addr) error {
	if !a.IsValid() {
		return fmt.Errorf("%s: invalid address", field)
	}
	if a.Zone() != "" {
		return fmt.Errorf("%s: %q has a zone, which is not supported", field, a)
	}
	return nil
}

// haproxyDuration formats d in HAProxy's time syntax: whole seconds as
// "30s", anything else in milliseconds rounded up.
func haproxyDuration(d time.Duration) string {
	if d%time.Second == 0 {
		return strconv.FormatInt(int64(d/time.Second), 10) + "s"
	}
	return strconv.FormatInt(int64((d+time.Millisecond-1)/time.Millisecond), 10) + "ms"
}

type haproxyHeaderView struct {
	AdminSocket, PIDFile                         string
	TimeoutConnect, TimeoutClient, TimeoutServer string
	HardStopAfter                                string
}

type haproxyServiceView struct {
	Name, Bind, Certificate string
	Balance, HashType       string
	StickType, StickExpire  string
	Servers                 []haproxyServerView
}

type haproxyServerView struct {
	Name, Addr string
	Weight     int
}

var haproxyTemplate = template.Must(template.New("haproxy.cfg.tmpl").ParseFS(templates.FS, "haproxy.cfg.tmpl"))

// HAProxyConfig renders haproxy.cfg for services: the header, then a
// section (a frontend and a backend) per tcp service, in the order given,
// with the servers and weights given, then the http part for the http
// services (HAProxyHTTPSections, laid out afresh by LayoutHTTP with
// opts.HTTPSpareSlots spares). It is pure. Every value is checked before
// it is written; anything that could break out of its token (whitespace,
// newline, '#', ';', quotes) is refused with an error, even though spec
// validation already rules it out. The result is HAProxyHeader followed by
// each tcp service's HAProxySection and the http sections.
func HAProxyConfig(services []HAProxyService, opts HAProxyOptions) ([]byte, error) {
	head, parts, _, err := HAProxyConfigParts(services, opts)
	if err != nil {
		return nil, err
	}
	b := bytes.NewBuffer(head)
	for _, p := range parts {
		b.Write(p.Text)
	}
	return b.Bytes(), nil
}

// HAProxyConfigParts is HAProxyConfig in pieces: the header, the parts
// after it (each tcp service's section, then the http sections), and the
// http layout they follow.
func HAProxyConfigParts(services []HAProxyService, opts HAProxyOptions) ([]byte, []HAProxyPart, HTTPLayout, error) {
	head, err := HAProxyHeader(opts)
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	var parts []HAProxyPart
	names := map[string]bool{}
	binds := map[netip.AddrPort]string{} // bind -> "tcp" or "http"
	var web []HAProxyService
	for _, s := range services {
		mode := "tcp"
		if s.HTTP() {
			mode = "http"
		}
		if names[s.Name] {
			errs = append(errs, fmt.Errorf("service %q appears twice", s.Name))
			continue
		}
		if m, taken := binds[s.Bind]; taken && (m == "tcp" || mode == "tcp") {
			errs = append(errs, fmt.Errorf("service %q: bind %s is claimed twice", s.Name, s.Bind))
			continue
		}
		names[s.Name], binds[s.Bind] = true, mode
		if s.HTTP() {
			if err := CheckHTTPService(s); err != nil {
				errs = append(errs, fmt.Errorf("haproxy service %q: %w", s.Name, err))
				continue
			}
			web = append(web, s)
			continue
		}
		sec, err := HAProxySection(s, opts)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		parts = append(parts, HAProxyPart{Services: []string{s.Name}, Text: sec})
	}
	var layout HTTPLayout
	if len(web) > 0 {
		if layout, err = LayoutHTTP(web, HTTPLayout{}, cmp.Or(opts.HTTPSpareSlots, DefaultHTTPSpareSlots), nil); err != nil {
			errs = append(errs, err)
		}
		webParts, err := HAProxyHTTPSections(layout, web, opts)
		if err != nil {
			errs = append(errs, err)
		}
		parts = append(parts, webParts...)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, nil, HTTPLayout{}, err
	}
	return head, parts, layout, nil
}

// HAProxyHeader renders the part of haproxy.cfg that does not depend on
// the services: the global and defaults sections, ending with a newline.
func HAProxyHeader(opts HAProxyOptions) ([]byte, error) {
	v := haproxyHeaderView{
		AdminSocket:    opts.AdminSocket,
		PIDFile:        opts.PIDFile,
		TimeoutConnect: haproxyDuration(cmp0(opts.TimeoutConnect, DefaultHAProxyTimeoutConnect)),
		TimeoutClient:  haproxyDuration(cmp0(opts.TimeoutClient, DefaultHAProxyTimeoutClient)),
		TimeoutServer:  haproxyDuration(cmp0(opts.TimeoutServer, DefaultHAProxyTimeoutServer)),
	}
	errs := []error{CheckHAProxyPath("admin socket", opts.AdminSocket), CheckHAProxyPath("pidfile", opts.PIDFile)}
	if opts.TimeoutConnect < 0 || opts.TimeoutClient < 0 || opts.TimeoutServer < 0 || opts.HardStopAfter < 0 {
		errs = append(errs, errors.New("negative timeout"))
	}
	if opts.HardStopAfter > 0 {
		v.HardStopAfter = haproxyDuration(opts.HardStopAfter)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	var b bytes.Buffer
	if err := haproxyTemplate.ExecuteTemplate(&b, "header", v); err != nil {
		return nil, fmt.Errorf("haproxy.cfg template: %w", err)
	}
	return b.Bytes(), nil
}

// HAProxySection renders one tcp service's section of haproxy.cfg: a blank
// line, its frontend and its backend with the servers given, ending with a
// newline. Every value is checked as HAProxyConfig says.
func HAProxySection(s HAProxyService, opts HAProxyOptions) ([]byte, error) {
	sv, err := haproxyServiceViewOf(s, opts)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	if err := haproxyTemplate.ExecuteTemplate(&b, "service", sv); err != nil {
		return nil, fmt.Errorf("haproxy.cfg template: %w", err)
	}
	return b.Bytes(), nil
}

func cmp0(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

func haproxyServiceViewOf(s HAProxyService, opts HAProxyOptions) (haproxyServiceView, error) {
	fail := func(err error) (haproxyServiceView, error) {
		return haproxyServiceView{}, fmt.Errorf("haproxy service %q: %w", s.Name, err)
	}
	if err := CheckHAProxyName(s.Name); err != nil {
		return fail(err)
	}
	if err := CheckHAProxyAddr("bind", s.Bind.Addr()); err != nil {
		return fail(err)
	}
	if s.Bind.Port() == 0 {
		return fail(errors.New("bind: port 0"))
	}
	cert, err := HAProxyCertificatePath(s, opts)
	if err != nil {
		return fail(err)
	}
	if cert != "" {
		if err := CheckHAProxyPath("certificate", cert); err != nil {
			return fail(err)
		}
	}
	sv := haproxyServiceView{Name: s.Name, Bind: s.Bind.String(), Certificate: cert}
	if sv.Balance, sv.HashType, err = HAProxyBalance(s.Scheduler); err != nil {
		return fail(err)
	}
	switch {
	case s.Persistence < 0:
		return fail(fmt.Errorf("persistence: negative %s", s.Persistence))
	case s.Persistence > 0:
		sv.StickType = stickType(s.Bind.Addr())
		sv.StickExpire = haproxyDuration(s.Persistence)
	}
	if sv.Servers, err = serverViews(s.Servers); err != nil {
		return fail(err)
	}
	return sv, nil
}

// serverViews checks the servers of a backend and writes them for the
// template.
func serverViews(servers []HAProxyServer) ([]haproxyServerView, error) {
	seen := map[string]bool{}
	var out []haproxyServerView
	for _, srv := range servers {
		if err := CheckHAProxyServerName(srv.Name); err != nil {
			return nil, err
		}
		if seen[srv.Name] {
			return nil, fmt.Errorf("server %q appears twice", srv.Name)
		}
		seen[srv.Name] = true
		if err := CheckHAProxyAddr("server "+srv.Name, srv.Address); err != nil {
			return nil, err
		}
		if srv.Port == 0 {
			return nil, fmt.Errorf("server %s: port 0", srv.Name)
		}
		out = append(out, haproxyServerView{
			Name:   srv.Name,
			Addr:   netip.AddrPortFrom(srv.Address, srv.Port).String(),
			Weight: HAProxyWeight(srv.Weight),
		})
	}
	return out, nil
}
