package spec

import (
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"time"
)

// Defaults of schema v1.
const (
	DefaultInterval = 2 * time.Second
	DefaultTimeout  = 1 * time.Second
	DefaultRise     = 2
	DefaultFall     = 3
	DefaultDrain    = 30 * time.Second
	DefaultWeight   = 1
	MaxWeight       = 65535
	// MaxPersistence bounds persistence so every data plane can hold it:
	// HAProxy timers are 31-bit milliseconds (about 24.8 days) and IPVS
	// keeps the timeout as 32-bit jiffies.
	MaxPersistence = 24 * 24 * time.Hour
)

var (
	nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	// pathRE is what a file path or etcd key may look like before it reaches
	// haproxy.cfg or the runtime API: absolute, and no space, quote, newline,
	// semicolon or other character HAProxy would read as syntax.
	pathRE = regexp.MustCompile(`^/[A-Za-z0-9._/-]+$`)
	// hostRE is a DNS name for SNI: labels of letters, digits and hyphens.
	hostRE = regexp.MustCompile(`^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$`)
	// httpPathRE is an absolute HTTP request path with an optional query,
	// made of the characters RFC 3986 allows, so it cannot split a request.
	httpPathRE = regexp.MustCompile(`^/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*$`)
	// routeHostRE is a route's host once lower-cased: a DNS name of
	// letters, digits and hyphens, with an optional leading "*." wildcard.
	routeHostRE = regexp.MustCompile(`^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	// routeSegmentRE is one segment of a route's path prefix: unreserved
	// URL characters and percent-escapes only, nothing HAProxy's map files
	// or runtime API could read as syntax (no space, '#', ';', quote or
	// backslash).
	routeSegmentRE = regexp.MustCompile(`^[A-Za-z0-9._~%-]+$`)
)

// MaxRoutes bounds the routes of one service.
const MaxRoutes = 1000

// rawService mirrors the definition document; pointers tell "absent" from a
// zero value so defaults can be applied.
type rawService struct {
	VIP              *string      `json:"vip"`
	Port             *int64       `json:"port"`
	Protocol         *string      `json:"protocol"`
	Scheduler        *string      `json:"scheduler"`
	SchedulerFlags   []string     `json:"scheduler_flags"`
	Forwarding       *string      `json:"forwarding"`
	Persistence      *string      `json:"persistence"`
	Backends         []rawBackend `json:"backends"`
	Health           *rawHealth   `json:"health"`
	FailOpen         *bool        `json:"fail_open"`
	Drain            *string      `json:"drain"`
	TLS              *rawTLS      `json:"tls"`
	AllowCIDRs       []string     `json:"allow_cidrs"`
	PreserveClientIP *bool        `json:"preserve_client_ip"`
	Driver           *string      `json:"driver"`
	HAGroup          *string      `json:"ha_group"`
	Mode             *string      `json:"mode"`
	Routes           []rawRoute   `json:"routes"`
}

type rawRoute struct {
	Host       *string `json:"host"`
	PathPrefix *string `json:"path_prefix"`
}

type rawBackend struct {
	Address *string `json:"address"`
	Port    *int64  `json:"port"`
	Weight  *int64  `json:"weight"`
}

type rawHealth struct {
	Protocol *string `json:"protocol"`
	Port     *int64  `json:"port"`
	Path     *string `json:"path"`
	SNI      *string `json:"sni"`
	Verify   *bool   `json:"verify"`
	Payload  *string `json:"payload"`
	Interval *string `json:"interval"`
	Timeout  *string `json:"timeout"`
	Rise     *int64  `json:"rise"`
	Fall     *int64  `json:"fall"`
}

type rawTLS struct {
	Certificate    *string `json:"certificate"`
	CertificateKey *string `json:"certificate_key"`
}

// ValidateName checks that name is a DNS label, as service names and pool
// member names must be.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fieldErr("name", "%q is not a DNS label (lower-case letters, digits and '-', 1-63 characters, starting and ending with a letter or digit)", name)
	}
	return nil
}

// Options are the agent's settings that change how a definition is read.
// The zero value is what `switchman validate` assumes by default.
type Options struct {
	// L4Driver serves definitions that name no driver and need no HAProxy:
	// DriverIPVS (the default when empty) or DriverNFTables.
	L4Driver Driver
}

// Parse reads one service definition (JSON or YAML) named name with the
// default Options; see ParseWith.
func Parse(name string, data []byte) (*Service, error) { return ParseWith(name, data, Options{}) }

// ParseWith reads one service definition (JSON or YAML) named name, applies
// the defaults and validates every field. A definition may have no static
// backends here (a pool may supply them); Merge checks the merged list.
// The error, if any, is of type Errors and lists every problem found.
func ParseWith(name string, data []byte, opts Options) (*Service, error) {
	var errs Errors
	if err := ValidateName(name); err != nil {
		errs = append(errs, err.(*FieldError))
	}
	var raw rawService
	errs = append(errs, decodeStrict(data, &raw)...)
	if len(errs) > 0 {
		return nil, errs
	}
	s := &Service{Name: name}
	v := validator{l4: opts.L4Driver}
	if v.l4 == "" {
		v.l4 = DriverIPVS
	}
	v.service(&raw, s)
	if err := v.errs.Err(); err != nil {
		return nil, err
	}
	return s, nil
}

// Member is one pool member read from backends/<service>/<member>.
type Member struct {
	Name    string
	Address netip.Addr
	Port    uint16 // 0: the service port
	Weight  int
}

// ParseMember reads a pool member value, {"address":..,"port":..,"weight":..}.
func ParseMember(name string, data []byte) (Member, error) {
	var errs Errors
	if err := ValidateName(name); err != nil {
		errs = append(errs, err.(*FieldError))
	}
	var raw rawBackend
	errs = append(errs, decodeStrict(data, &raw)...)
	if len(errs) > 0 {
		return Member{}, errs
	}
	v := validator{}
	b := v.backend("", &raw, 0)
	if err := v.errs.Err(); err != nil {
		return Member{}, err
	}
	return Member{Name: name, Address: b.Address, Port: b.Port, Weight: b.Weight}, nil
}

// Merge returns the service with the pool members added to its static
// backends, and checks the merged list: not empty, no duplicates, address
// families that fit the VIP and ports that fit the forwarding method.
func Merge(def *Service, members []Member) (*Service, error) {
	s := *def
	s.Backends = append([]Backend(nil), def.Backends...)
	for _, m := range members {
		port := m.Port
		if port == 0 {
			port = def.Port
		}
		s.Backends = append(s.Backends, Backend{Address: m.Address, Port: port, Weight: m.Weight, Source: "pool/" + m.Name})
	}
	var errs Errors
	if len(s.Backends) == 0 {
		errs.add("backends", "the list is empty and the pool backends/%s/ has no members", s.Name)
	}
	seen := make(map[netip.AddrPort]string, len(s.Backends))
	for _, b := range s.Backends {
		if first, dup := seen[b.AddrPort()]; dup {
			errs.add(b.Source, "%s is already a backend (%s)", b.AddrPort(), first)
			continue
		}
		seen[b.AddrPort()] = b.Source
		if s.Driver.L4() && b.Address.Is4() != s.VIP.Is4() && s.Forwarding != Tunnel {
			errs.add(b.Source+".address", "%s is %s but vip %s is %s; IPVS mixes families only with forwarding tun", b.Address, family(b.Address), s.VIP, family(s.VIP))
		}
		if s.Driver.L4() && s.Forwarding != NAT && b.Port != s.Port {
			errs.add(b.Source+".port", "%d differs from the service port %d, which forwarding %s cannot translate", b.Port, s.Port, s.Forwarding)
		}
	}
	if err := errs.Err(); err != nil {
		return nil, err
	}
	return &s, nil
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}

// validator accumulates field errors while converting a raw definition.
type validator struct {
	errs Errors
	l4   Driver // the driver of definitions that name none and need no HAProxy
}

func (v *validator) service(r *rawService, s *Service) {
	s.VIP = v.addr("vip", r.VIP, true)
	s.Port = v.port("port", r.Port, 0, true)
	s.Protocol = Protocol(v.enum("protocol", r.Protocol, string(TCP), "tcp", "udp"))
	s.Scheduler = Scheduler(v.enum("scheduler", r.Scheduler, string(RoundRobin), "rr", "wrr", "lc", "wlc", "sh", "mh"))
	s.Forwarding = Forwarding(v.enum("forwarding", r.Forwarding, string(NAT), "nat", "dr", "tun"))
	s.Persistence = v.duration("persistence", r.Persistence, 0)
	if s.Persistence%time.Second != 0 {
		v.errs.add("persistence", "%q is not a whole number of seconds", *r.Persistence)
	}
	if s.Persistence > MaxPersistence {
		v.errs.add("persistence", "%q is more than the limit of %s", *r.Persistence, MaxPersistence)
		s.Persistence = 0
	}
	s.Drain = v.duration("drain", r.Drain, DefaultDrain)
	s.FailOpen = boolOr(r.FailOpen, true)
	s.PreserveClientIP = boolOr(r.PreserveClientIP, true)

	if r.TLS != nil {
		s.TLS = v.tls(r.TLS)
	}
	s.Mode = Mode(v.enum("mode", r.Mode, string(ModeTCP), "tcp", "http"))
	defaultDriver := string(v.l4)
	if s.TLS != nil || s.Mode == ModeHTTP {
		defaultDriver = string(DriverHAProxy)
	}
	s.Driver = Driver(v.enum("driver", r.Driver, defaultDriver, "ipvs", "nftables", "haproxy"))
	s.Group = DefaultGroup
	if r.HAGroup != nil {
		if !nameRE.MatchString(*r.HAGroup) {
			v.errs.add("ha_group", "%q is not a DNS label (lower-case letters, digits and '-', 1-63 characters)", *r.HAGroup)
		} else {
			s.Group = *r.HAGroup
		}
	}

	v.schedulerFlags(r.SchedulerFlags, s)
	for i := range r.Backends {
		s.Backends = append(s.Backends, v.backend(fmt.Sprintf("backends[%d]", i), &r.Backends[i], s.Port))
	}
	s.Health = v.health(r.Health)
	s.AllowCIDRs = v.cidrs(r.AllowCIDRs, s.VIP)
	s.Routes = v.routes(r.Routes, s.Mode)

	// Rules across fields.
	if s.TLS != nil && s.Protocol == UDP {
		v.errs.add("tls", "set, but protocol is \"udp\"; TLS termination needs tcp")
	}
	if s.TLS != nil && s.Driver.L4() {
		v.errs.add("driver", "%q cannot terminate TLS; use driver haproxy or remove the tls block", s.Driver)
	}
	if s.Driver == DriverNFTables {
		// What nf_tables cannot do faithfully is refused, never approximated.
		switch s.Scheduler {
		case LeastConnection, WeightedLeastConnection:
			v.errs.add("scheduler", "%q is not supported by driver nftables (nf_tables keeps no per-backend connection counts to choose by); use rr, wrr, sh or mh, or driver ipvs", s.Scheduler)
		}
		switch s.Forwarding {
		case Tunnel:
			v.errs.add("forwarding", "\"tun\" is not supported by driver nftables (it cannot encapsulate packets to a backend); use nat, or driver ipvs")
		case Direct:
			v.errs.add("forwarding", "\"dr\" is not supported by driver nftables (its ingress hook, which could forward unchanged packets to a backend's MAC, runs before connection tracking, so the packets of one connection would not stay on one backend); use nat, or driver ipvs")
		}
	}
	if s.Mode == ModeHTTP {
		if s.Driver.L4() {
			v.errs.add("driver", "%q cannot route HTTP requests; mode http needs driver haproxy (the default for mode http)", s.Driver)
		}
	}
	if s.Driver == DriverHAProxy {
		if s.Protocol == UDP {
			v.errs.add("protocol", "\"udp\" is not supported by driver haproxy")
		}
		if s.Forwarding != NAT {
			v.errs.add("forwarding", "%q is IPVS only; driver haproxy proxies connections", s.Forwarding)
		}
	}
}

// routes checks the routes of a service and normalizes them: hosts
// lower-cased, path prefixes without a trailing '/'. A mode http service
// without routes answers every host and path.
func (v *validator) routes(raw []rawRoute, mode Mode) []Route {
	if mode != ModeHTTP {
		if raw != nil {
			v.errs.add("routes", "set, but mode is %q; routes need mode http", mode)
		}
		return nil
	}
	if raw == nil {
		return []Route{{PathPrefix: "/"}}
	}
	if len(raw) == 0 {
		v.errs.add("routes", "the list is empty, which would answer nothing; leave it out to answer every host and path")
		return nil
	}
	if len(raw) > MaxRoutes {
		v.errs.add("routes", "has %d routes, more than the limit of %d", len(raw), MaxRoutes)
		return nil
	}
	out := make([]Route, 0, len(raw))
	seen := map[Route]int{}
	for i, r := range raw {
		path := fmt.Sprintf("routes[%d]", i)
		rt := Route{PathPrefix: "/"}
		ok := true
		if r.Host != nil {
			h, err := routeHost(*r.Host)
			if err != "" {
				v.errs.add(path+".host", "%q %s", *r.Host, err)
				ok = false
			}
			rt.Host = h
		}
		if r.PathPrefix != nil {
			p, err := routePath(*r.PathPrefix)
			if err != "" {
				v.errs.add(path+".path_prefix", "%q %s", *r.PathPrefix, err)
				ok = false
			}
			rt.PathPrefix = p
		}
		if !ok {
			continue
		}
		if j, dup := seen[rt]; dup {
			v.errs.add(path, "%s is the same route as routes[%d]", rt, j)
			continue
		}
		seen[rt] = i
		out = append(out, rt)
	}
	return out
}

// routeHost lower-cases a route's host and checks it, returning why it is
// not one ("" when it is).
func routeHost(h string) (string, string) {
	l := strings.ToLower(h)
	switch {
	case h == "":
		return "", "is empty; leave host out to answer every host"
	case h == "*":
		return "", "is not a host name; leave host out to answer every host"
	case len(h) > 253:
		return "", "is longer than 253 characters"
	case strings.Contains(h, ":"):
		return "", "has a port or is an IPv6 address; give the host name alone (the port is the service's)"
	case strings.Contains(l, "*") && !strings.HasPrefix(l, "*.") || strings.Count(l, "*") > 1:
		return "", "has a '*' that is not a whole leading label; a wildcard is written *.example.com"
	case !routeHostRE.MatchString(l):
		return "", "is not a host name (letters, digits, '-' and '.', labels of 1-63 characters, an optional leading *.; internationalized names in their xn-- form)"
	}
	return l, ""
}

// routePath checks a route's path prefix and returns it without a
// trailing '/', or why it is not one.
func routePath(p string) (string, string) {
	switch {
	case !strings.HasPrefix(p, "/"):
		return "", "is not an absolute path (it must start with '/')"
	case len(p) > 1024:
		return "", "is longer than 1024 characters"
	case p == "/":
		return p, ""
	}
	trimmed := strings.TrimSuffix(p, "/")
	for _, seg := range strings.Split(trimmed[1:], "/") {
		switch {
		case seg == "":
			return "", "has an empty segment ('//')"
		case seg == "." || seg == "..":
			return "", "has a '.' or '..' segment"
		case !routeSegmentRE.MatchString(seg):
			return "", "has a character other than letters, digits, '.', '_', '~', '-', '/' and percent-escapes"
		case badEscape(seg) != "":
			return "", fmt.Sprintf("has %q, which is not percent-encoding ('%%' must be followed by two hex digits)", badEscape(seg))
		}
	}
	return trimmed, ""
}

func (v *validator) tls(r *rawTLS) *TLS {
	t := &TLS{}
	if r.Certificate != nil {
		t.Certificate = v.path("tls.certificate", *r.Certificate)
	}
	if r.CertificateKey != nil {
		t.CertificateKey = v.path("tls.certificate_key", *r.CertificateKey)
	}
	switch {
	case r.Certificate == nil && r.CertificateKey == nil:
		v.errs.add("tls", "set, but neither certificate (a PEM file) nor certificate_key (an etcd key) is given")
	case r.Certificate != nil && r.CertificateKey != nil:
		v.errs.add("tls", "certificate %q and certificate_key %q are both set; give one", *r.Certificate, *r.CertificateKey)
	}
	return t
}

func (v *validator) schedulerFlags(flags []string, s *Service) {
	seen := map[string]bool{}
	for i, f := range flags {
		path := fmt.Sprintf("scheduler_flags[%d]", i)
		var want Scheduler
		switch f {
		case FlagSHFallback, FlagSHPort:
			want = SourceHashing
		case FlagMHFallback, FlagMHPort:
			want = MaglevHashing
		default:
			v.errs.add(path, "%q is not a scheduler flag (sh-fallback, sh-port, mh-fallback, mh-port)", f)
			continue
		}
		if s.Scheduler != want {
			v.errs.add(path, "%q applies to scheduler %s, not %s", f, want, s.Scheduler)
			continue
		}
		if s.Driver != DriverIPVS {
			v.errs.add(path, "%q is IPVS only (driver is %s)", f, s.Driver)
			continue
		}
		if !seen[f] {
			seen[f] = true
			s.SchedulerFlags = append(s.SchedulerFlags, f)
		}
	}
}

func (v *validator) backend(path string, r *rawBackend, servicePort uint16) Backend {
	b := Backend{Source: path}
	b.Address = v.addr(join(path, "address"), r.Address, false)
	b.Port = v.port(join(path, "port"), r.Port, servicePort, false)
	b.Weight = DefaultWeight
	if r.Weight != nil {
		if *r.Weight < 0 || *r.Weight > MaxWeight {
			v.errs.add(join(path, "weight"), "%d is out of range 0-%d", *r.Weight, MaxWeight)
		} else {
			b.Weight = int(*r.Weight)
		}
	}
	return b
}

func (v *validator) health(r *rawHealth) Health {
	if r == nil {
		r = &rawHealth{}
	}
	h := Health{
		Protocol: HealthProtocol(v.enum("health.protocol", r.Protocol, string(HealthTCP), "tcp", "http", "https", "udp", "none")),
		Interval: v.duration("health.interval", r.Interval, DefaultInterval),
		Timeout:  v.duration("health.timeout", r.Timeout, DefaultTimeout),
		Rise:     v.count("health.rise", r.Rise, DefaultRise),
		Fall:     v.count("health.fall", r.Fall, DefaultFall),
		Verify:   boolOr(r.Verify, false),
	}
	if r.Port != nil {
		h.Port = v.port("health.port", r.Port, 0, true)
	}
	web := h.Protocol == HealthHTTP || h.Protocol == HealthHTTPS
	if r.Path != nil {
		switch {
		case !web:
			v.errs.add("health.path", "%q is set, but health.protocol is %q (path is for http and https)", *r.Path, h.Protocol)
		case len(*r.Path) > 1024 || !httpPathRE.MatchString(*r.Path):
			v.errs.add("health.path", "%q is not an absolute request path (it must start with '/' and use URL characters only)", *r.Path)
		case badEscape(*r.Path) != "":
			v.errs.add("health.path", "%q has %q, which is not percent-encoding ('%%' must be followed by two hex digits; write %%25 for a '%%')", *r.Path, badEscape(*r.Path))
		default:
			h.Path = *r.Path
		}
	} else if web {
		h.Path = "/"
	}
	if r.SNI != nil {
		switch {
		case h.Protocol != HealthHTTPS:
			v.errs.add("health.sni", "%q is set, but health.protocol is %q (sni is for https)", *r.SNI, h.Protocol)
		case len(*r.SNI) > 253 || !hostRE.MatchString(*r.SNI):
			v.errs.add("health.sni", "%q is not a DNS name", *r.SNI)
		default:
			h.SNI = *r.SNI
		}
	}
	if r.Verify != nil && h.Protocol != HealthHTTPS {
		v.errs.add("health.verify", "set, but health.protocol is %q (verify is for https)", h.Protocol)
	}
	if r.Payload != nil {
		if h.Protocol != HealthUDP {
			v.errs.add("health.payload", "%q is set, but health.protocol is %q (payload is for udp)", *r.Payload, h.Protocol)
		} else if len(*r.Payload) > 512 {
			v.errs.add("health.payload", "is %d bytes, more than the limit of 512", len(*r.Payload))
		} else {
			h.Payload = *r.Payload
		}
	}
	if h.Interval <= 0 && r.Interval != nil {
		v.errs.add("health.interval", "%q must be more than 0", *r.Interval)
	}
	if h.Timeout <= 0 && r.Timeout != nil {
		v.errs.add("health.timeout", "%q must be more than 0", *r.Timeout)
	}
	if h.Interval > 0 && h.Timeout >= h.Interval {
		v.errs.add("health.timeout", "%s must be less than health.interval %s", h.Timeout, h.Interval)
	}
	return h
}

func (v *validator) cidrs(raw []string, vip netip.Addr) []netip.Prefix {
	if raw == nil {
		if vip.Is6() {
			return []netip.Prefix{netip.MustParsePrefix("::/0")}
		}
		return []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}
	}
	if len(raw) == 0 {
		v.errs.add("allow_cidrs", "the list is empty, which would let nobody in; leave it out to allow everyone")
		return nil
	}
	out := make([]netip.Prefix, 0, len(raw))
	for i, c := range raw {
		path := fmt.Sprintf("allow_cidrs[%d]", i)
		p, err := netip.ParsePrefix(strings.TrimSpace(c))
		if err != nil {
			// A bare address means that one host.
			a, aerr := netip.ParseAddr(strings.TrimSpace(c))
			if aerr != nil || a.Zone() != "" {
				v.errs.add(path, "%q is not a CIDR such as 198.51.100.0/24", c)
				continue
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if vip.IsValid() && p.Addr().Is4() != vip.Is4() {
			v.errs.add(path, "%q is %s but vip %s is %s", c, family(p.Addr()), vip, family(vip))
			continue
		}
		out = append(out, p.Masked())
	}
	return out
}

// addr parses an IP address that can be a VIP or a backend: a unicast
// address that names one host beyond one link (see notUnicast).
func (v *validator) addr(path string, s *string, required bool) netip.Addr {
	if s == nil {
		if required {
			v.errs.add(path, "missing (an IPv4 or IPv6 address)")
		} else {
			v.errs.add(path, "missing (the backend's IPv4 or IPv6 address)")
		}
		return netip.Addr{}
	}
	a, err := netip.ParseAddr(*s)
	switch {
	case err != nil:
		v.errs.add(path, "%q is not an IPv4 or IPv6 address", *s)
	case a.Zone() != "":
		v.errs.add(path, "%q has a zone; link-local addresses with a zone are not supported", *s)
	default:
		a = a.Unmap() // ::ffff:0.0.0.0 is 0.0.0.0
		if why := notUnicast(a); why != "" {
			v.errs.add(path, "%q is not a unicast address (%s)", *s, why)
			return netip.Addr{}
		}
		return a
	}
	return netip.Addr{}
}

// limitedBroadcast and thisNetwork are IPv4 ranges that no packet to one
// host is sent to.
var (
	limitedBroadcast = netip.MustParseAddr("255.255.255.255")
	thisNetwork      = netip.MustParsePrefix("0.0.0.0/8")
)

// notUnicast says why a (unmapped) address cannot be a VIP or a backend, or
// "" when it can:
//   - unspecified (0.0.0.0, ::) means any address, and 0.0.0.0/8 is "this
//     network" (RFC 1122), a source only, never a destination;
//   - multicast and the limited broadcast 255.255.255.255 reach many hosts;
//   - link-local (169.254.0.0/16, fe80::/10) is valid on one link only, and
//     a definition cannot name the link (zones are refused): an IPv6 one
//     cannot be bound or routed without it, and 169.254.169.254 is the cloud
//     metadata service, which a VIP there would hijack on this host and a
//     backend there would expose through the VIP.
//
// Loopback stays allowed: tests and single-host setups serve 127.0.0.0/8.
func notUnicast(a netip.Addr) string {
	switch {
	case a.IsUnspecified():
		return "the unspecified address"
	case a.Is4() && thisNetwork.Contains(a):
		return "0.0.0.0/8 is \"this network\", never a destination"
	case a.IsMulticast():
		return "a multicast address"
	case a == limitedBroadcast:
		return "the limited broadcast address"
	case a.IsLinkLocalUnicast():
		return "link-local: valid on one link only, which a definition cannot name"
	}
	return ""
}

// port checks a port number; absent means def, or an error when required.
func (v *validator) port(path string, n *int64, def uint16, required bool) uint16 {
	if n == nil {
		if required {
			v.errs.add(path, "missing (a port number 1-65535)")
		}
		return def
	}
	if *n < 1 || *n > 65535 {
		v.errs.add(path, "%d is out of range 1-65535", *n)
		return def
	}
	return uint16(*n)
}

func (v *validator) enum(path string, s *string, def string, allowed ...string) string {
	if s == nil {
		return def
	}
	for _, a := range allowed {
		if *s == a {
			return a
		}
	}
	v.errs.add(path, "%q is not one of %s", *s, strings.Join(allowed, ", "))
	return def
}

func (v *validator) duration(path string, s *string, def time.Duration) time.Duration {
	if s == nil {
		return def
	}
	d, err := time.ParseDuration(*s)
	if err != nil {
		v.errs.add(path, "%q is not a duration (write it like 2s, 500ms or 1m)", *s)
		return def
	}
	if d < 0 {
		v.errs.add(path, "%q is negative", *s)
		return def
	}
	return d
}

func (v *validator) count(path string, n *int64, def int) int {
	if n == nil {
		return def
	}
	if *n < 1 || *n > 1000 {
		v.errs.add(path, "%d is out of range 1-1000", *n)
		return def
	}
	return int(*n)
}

func (v *validator) path(field, s string) string {
	if len(s) > 4096 || !pathRE.MatchString(s) || strings.Contains(s, "/../") || strings.HasSuffix(s, "/..") {
		v.errs.add(field, "%q is not an absolute path of letters, digits and . _ / - (no spaces, quotes or '..')", s)
		return ""
	}
	return s
}

// badEscape returns the first '%' sequence of s that is not a '%' followed
// by two hex digits (at most three characters), or "" when there is none.
func badEscape(s string) string {
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			continue
		}
		if i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]) {
			i += 2
			continue
		}
		return s[i:min(i+3, len(s))]
	}
	return ""
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func boolOr(b *bool, def bool) bool {
	if b == nil {
		return def
	}
	return *b
}
