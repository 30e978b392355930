// Package spec defines switchman's service definitions (schema v1): the types,
// parsing of JSON and YAML values with unknown fields rejected, defaults, and
// validation whose every error names the field path and the offending value.
package spec

import (
	"net/netip"
	"time"
)

// Protocol is a transport protocol of a virtual service.
type Protocol string

// Protocols a service may use.
const (
	TCP Protocol = "tcp"
	UDP Protocol = "udp"
)

// Scheduler is an IPVS scheduling algorithm.
type Scheduler string

// Schedulers switchman supports.
const (
	RoundRobin              Scheduler = "rr"
	WeightedRoundRobin      Scheduler = "wrr"
	LeastConnection         Scheduler = "lc"
	WeightedLeastConnection Scheduler = "wlc"
	SourceHashing           Scheduler = "sh"
	MaglevHashing           Scheduler = "mh"
)

// Forwarding is the IPVS packet-forwarding method towards real servers.
type Forwarding string

// Forwarding methods.
const (
	NAT    Forwarding = "nat"
	Direct Forwarding = "dr"
	Tunnel Forwarding = "tun"
)

// Driver names the data plane that serves a service.
type Driver string

// Drivers.
const (
	DriverIPVS     Driver = "ipvs"
	DriverNFTables Driver = "nftables"
	DriverHAProxy  Driver = "haproxy"
)

// L4 reports whether the driver is a kernel layer-4 data plane (ipvs or
// nftables), as opposed to the HAProxy proxy.
func (d Driver) L4() bool { return d == DriverIPVS || d == DriverNFTables }

// Mode is how a service treats its connections: as a byte stream (tcp) or
// as HTTP requests routed by Host and path (http, HAProxy only).
type Mode string

// Modes.
const (
	ModeTCP  Mode = "tcp"
	ModeHTTP Mode = "http"
)

// Route is one route of a mode http service: the requests it answers on a
// shared vip:port. Host is lower-case: an exact name (www.example.com), a
// wildcard of exactly one leading label (*.example.com matches
// a.example.com, not example.com nor a.b.example.com), or "" for any host.
// PathPrefix starts with '/' and has no trailing '/' (except "/" itself); it
// matches whole path segments: /api matches /api and /api/v1, not /apix.
type Route struct {
	Host       string
	PathPrefix string
}

// String formats the route as host + path prefix, "*" standing for any
// host: www.example.com/api, *.example.com/, */.
func (r Route) String() string {
	h := r.Host
	if h == "" {
		h = "*"
	}
	return h + r.PathPrefix
}

// DefaultGroup is the HA group of a service that names none.
const DefaultGroup = "default"

// HealthProtocol is the kind of health check run against each backend.
type HealthProtocol string

// Health check kinds.
const (
	HealthTCP   HealthProtocol = "tcp"
	HealthHTTP  HealthProtocol = "http"
	HealthHTTPS HealthProtocol = "https"
	HealthUDP   HealthProtocol = "udp"
	HealthNone  HealthProtocol = "none"
)

// Scheduler flags understood by IPVS's sh and mh schedulers.
const (
	FlagSHFallback = "sh-fallback"
	FlagSHPort     = "sh-port"
	FlagMHFallback = "mh-fallback"
	FlagMHPort     = "mh-port"
)

// Service is a validated service definition with every default applied.
// Values of this type are only made by Parse and Merge, so the drivers may
// trust every field.
type Service struct {
	Name             string
	VIP              netip.Addr
	Port             uint16
	Protocol         Protocol
	Scheduler        Scheduler
	SchedulerFlags   []string
	Forwarding       Forwarding
	Persistence      time.Duration
	Backends         []Backend
	Health           Health
	FailOpen         bool
	Drain            time.Duration
	TLS              *TLS
	AllowCIDRs       []netip.Prefix
	PreserveClientIP bool
	Driver           Driver
	// Group is the HA group (ha_group), DefaultGroup when not given.
	Group string
	// Mode is tcp (the default) or http.
	Mode Mode
	// Routes are the routes of a mode http service, in definition order
	// (at least one: a definition without routes answers every host and
	// path); nil in mode tcp.
	Routes []Route
}

// Backend is one real server of a service.
type Backend struct {
	Address netip.Addr
	Port    uint16
	Weight  int
	// Source says where the backend came from: "backends[1]" for a static
	// member, or "pool/<member>" for a member under backends/<name>/.
	Source string
}

// AddrPort returns the backend's address and target port.
func (b Backend) AddrPort() netip.AddrPort { return netip.AddrPortFrom(b.Address, b.Port) }

// Health is a service's health-check settings.
type Health struct {
	Protocol HealthProtocol
	Port     uint16 // 0: the backend's port
	Path     string
	SNI      string
	Verify   bool // https: verify the backend's certificate
	Payload  string
	Interval time.Duration
	Timeout  time.Duration
	Rise     int
	Fall     int
}

// TLS is the TLS-termination block of a HAProxy service. Exactly one of
// Certificate (a PEM file path) and CertificateKey (an etcd key holding the
// PEM) is set.
type TLS struct {
	Certificate    string
	CertificateKey string
}

// Key identifies the vip:port/protocol a service claims.
type Key struct {
	VIP      netip.Addr
	Port     uint16
	Protocol Protocol
}

// String formats the key as vip:port/proto.
func (k Key) String() string {
	return netip.AddrPortFrom(k.VIP, k.Port).String() + "/" + string(k.Protocol)
}

// Key returns the vip:port/protocol the service claims.
func (s *Service) Key() Key { return Key{VIP: s.VIP, Port: s.Port, Protocol: s.Protocol} }
