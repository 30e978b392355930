// Package render turns valid service definitions and the health view into
// the desired state of each data plane. It is pure: no netlink, etcd or
// socket imports, and the same input always gives the same output.
package render

import (
	"cmp"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/switchman-lb/switchman/spec"
)

// BackendRef names one backend of one service.
type BackendRef struct {
	Service string
	Addr    netip.AddrPort
}

// Health is the health checker's word on one backend.
type Health struct {
	Healthy bool
	// Pending is true until the backend's first check has finished.
	Pending        bool
	LastError      string
	LastTransition time.Time
}

// Input is everything the desired state depends on.
type Input struct {
	// Services are valid, merged with their pool members, and free of
	// vip:port/protocol conflicts.
	Services []*spec.Service
	// Healthy holds the health checker's view. A backend that is absent is
	// taken as healthy, so a service without checks (or before the checker
	// runs) gets its configured weights.
	Healthy map[BackendRef]bool
	// Pending holds backends whose first check has not finished. They get
	// weight 0 (a new backend earns its weight with a success), and they
	// do not count as down when deciding whether a service fails open, so
	// a new service does not flip between fail-open and weight 0 while its
	// first checks come in one by one.
	Pending map[BackendRef]bool
	// Draining lists backends removed from a definition that are kept at
	// weight 0 until their connections end or the drain time is up.
	Draining map[string][]spec.Backend
	// Secrets holds the values of etcd keys that definitions refer to
	// (tls.certificate_key), by key.
	Secrets map[string][]byte
}

// State is the desired state of every data plane, assembled from the
// services' ServiceStates (for `switchman plan` and whole-state tests; the
// agent works service by service).
type State struct {
	IPVS []L4Service
	// NFTables are the services the nf_tables driver serves.
	NFTables []L4Service
	HAProxy  []HAProxyService
	// VIPs are the addresses this host must own, sorted; loopback VIPs
	// are left out, the kernel owns them already.
	VIPs    []netip.Addr
	Filters []Filter
	// Services reports per service what was rendered, for status.
	Services []ServiceReport
}

// ServiceState is the desired data-plane state of one service: what each
// driver must hold for it. A nil part means that driver holds nothing for
// the service (and removes what it held); a ServiceState with every part
// nil removes the service everywhere.
type ServiceState struct {
	Name string
	// Generation increases each time the agent hands a changed state of
	// this service to the drivers; drivers may use it to skip repeats.
	Generation uint64
	// L4 is the kernel virtual service, for the driver L4.Driver names
	// (ipvs or nftables).
	L4      *L4Service
	HAProxy *HAProxyService
	// Filter is the iptables treatment (allow_cidrs, masquerade) of an
	// IPVS or HAProxy service; nf_tables services carry theirs in L4.
	Filter *Filter
	// VIP is the address the host must own for the service; invalid for a
	// loopback VIP (the kernel owns those) and for a removal.
	VIP netip.Addr
	// Group is the service's HA group.
	Group string
	// Sysctls are the kernel settings (paths under /proc/sys, e.g.
	// net/ipv4/ip_forward) that must be 1 for the service to work.
	Sysctls []string
	// Report is what was rendered, for status.
	Report ServiceReport
}

// Parts of a ServiceState, each named after the driver that serves it.
const (
	PartIPVS      = "ipvs"
	PartNFTables  = "nftables"
	PartHAProxy   = "haproxy"
	PartNetfilter = "netfilter"
	PartVIP       = "vip"
)

// VIPPart is what the address holder serves for one service.
type VIPPart struct {
	VIP     netip.Addr
	Group   string
	Sysctls []string
}

// Part returns the part of s that the named driver serves, and false when
// that driver has nothing to hold for the service.
func (s *ServiceState) Part(name string) (any, bool) {
	switch name {
	case PartIPVS, PartNFTables:
		if s.L4 != nil && string(s.L4.Driver) == name {
			return *s.L4, true
		}
	case PartHAProxy:
		if s.HAProxy != nil {
			return *s.HAProxy, true
		}
	case PartNetfilter:
		if s.Filter != nil {
			return *s.Filter, true
		}
	case PartVIP:
		if s.VIP.IsValid() || len(s.Sysctls) > 0 {
			return VIPPart{VIP: s.VIP, Group: s.Group, Sysctls: s.Sysctls}, true
		}
	}
	return nil, false
}

// Required lists the parts without which the service does not work: its
// data plane and its access filter. (The VIP may be held by other means,
// such as an operator's own address management.)
func (s *ServiceState) Required() []string {
	var out []string
	if s.L4 != nil {
		out = append(out, string(s.L4.Driver))
	}
	if s.HAProxy != nil {
		out = append(out, PartHAProxy)
	}
	if s.Filter != nil {
		out = append(out, PartNetfilter)
	}
	return out
}

// Removed reports whether s asks every driver to drop the service.
func (s *ServiceState) Removed() bool {
	return s.L4 == nil && s.HAProxy == nil && s.Filter == nil && !s.VIP.IsValid() && len(s.Sysctls) == 0
}

// L4Service is one kernel virtual service with its destinations.
type L4Service struct {
	Service     string      // the owning service definition
	Driver      spec.Driver // ipvs or nftables
	Protocol    spec.Protocol
	Address     netip.Addr
	Port        uint16
	Scheduler   spec.Scheduler
	Flags       []string      // sorted scheduler flags, e.g. mh-fallback
	Persistence time.Duration // 0: off
	// Destinations are sorted by address and port.
	Destinations []L4Destination
	// AllowCIDRs and Masquerade are the access control of an nf_tables
	// service, which its driver installs in its own tables (IPVS services
	// get theirs from the netfilter driver, in Filter). AllowCIDRs is nil
	// when everyone may connect.
	AllowCIDRs []netip.Prefix
	Masquerade bool
}

// L4Destination is one real server of an IPVS service.
type L4Destination struct {
	Address    netip.Addr
	Port       uint16
	Weight     int
	Forwarding spec.Forwarding
}

// HAProxyService is one service of HAProxy: in mode tcp a frontend and a
// backend of its own in haproxy.cfg; in mode http a backend slot and its
// routes in the routing map of the frontend of its bind.
type HAProxyService struct {
	Name           string
	Bind           netip.AddrPort
	Certificate    string // PEM file path; empty for plain TCP
	CertificateKey string // etcd key holding the PEM
	// CertificatePEM is the PEM read from CertificateKey, for the driver to
	// write to a 0600 file; nil when the key is missing or not used.
	CertificatePEM []byte
	Scheduler      spec.Scheduler
	Persistence    time.Duration
	Servers        []HAProxyServer // sorted by address and port
	// Mode is spec.ModeHTTP for a service on a shared http frontend,
	// routed by Host and path; tcp (or "") for a frontend of its own.
	Mode spec.Mode
	// Routes are the routes of an http service, in definition order.
	Routes []spec.Route
}

// HAProxyServer is one server line of a HAProxy backend.
type HAProxyServer struct {
	Name    string // stable: derived from the address and port
	Address netip.Addr
	Port    uint16
	Weight  int
}

// Filter is the netfilter treatment of one service.
type Filter struct {
	Service  string
	Protocol spec.Protocol
	VIP      netip.Addr
	Port     uint16
	// AllowCIDRs is nil when everyone may connect.
	AllowCIDRs []netip.Prefix
	// Masquerade source-NATs traffic forwarded to the backends (IPVS NAT
	// with preserve_client_ip false).
	Masquerade bool
	// Backends are the destinations, for a masquerade rule per backend.
	Backends []netip.AddrPort
}

// ServiceReport is what was rendered for one service.
type ServiceReport struct {
	Name        string
	Driver      spec.Driver
	Key         spec.Key
	FailingOpen bool
	Backends    []BackendReport
}

// BackendReport is one backend's health and effective weight.
type BackendReport struct {
	Address  netip.Addr
	Port     uint16
	Healthy  bool
	Weight   int // effective weight programmed
	Draining bool
}

// Render computes the desired state of every service and assembles it.
// Services are sorted by name, so the output is deterministic.
func Render(in Input) *State {
	services := slices.Clone(in.Services)
	slices.SortFunc(services, func(a, b *spec.Service) int { return cmp.Compare(a.Name, b.Name) })
	states := make([]*ServiceState, 0, len(services))
	for _, s := range services {
		states = append(states, RenderService(s, in))
	}
	return Assemble(states)
}

// Assemble collects service states into one State, in the order given.
func Assemble(states []*ServiceState) *State {
	st := &State{}
	vips := map[netip.Addr]bool{}
	for _, s := range states {
		if s.Removed() {
			continue
		}
		st.Services = append(st.Services, s.Report)
		if s.VIP.IsValid() {
			vips[s.VIP] = true
		}
		if s.L4 != nil {
			if s.L4.Driver == spec.DriverNFTables {
				st.NFTables = append(st.NFTables, *s.L4)
			} else {
				st.IPVS = append(st.IPVS, *s.L4)
			}
		}
		if s.HAProxy != nil {
			st.HAProxy = append(st.HAProxy, *s.HAProxy)
		}
		if s.Filter != nil {
			st.Filters = append(st.Filters, *s.Filter)
		}
	}
	for a := range vips {
		st.VIPs = append(st.VIPs, a)
	}
	slices.SortFunc(st.VIPs, netip.Addr.Compare)
	return st
}

// RenderService computes one service's desired state from its definition
// and the parts of in that concern it.
func RenderService(s *spec.Service, in Input) *ServiceState {
	rep := weigh(s, in.Healthy, in.Pending, in.Draining[s.Name])
	st := &ServiceState{Name: s.Name, Report: rep, Group: s.Group}
	if !s.VIP.IsLoopback() { // loopback addresses are local already
		st.VIP = s.VIP
	}
	switch s.Driver {
	case spec.DriverIPVS, spec.DriverNFTables:
		l4 := l4Service(s, rep)
		st.L4 = &l4
	case spec.DriverHAProxy:
		h := haproxyService(s, rep)
		if h.CertificateKey != "" {
			h.CertificatePEM = in.Secrets[h.CertificateKey]
		}
		st.HAProxy = &h
	}
	if f, ok := filter(s, rep); ok {
		if st.L4 != nil && st.L4.Driver == spec.DriverNFTables {
			st.L4.AllowCIDRs, st.L4.Masquerade = f.AllowCIDRs, f.Masquerade
		} else {
			st.Filter = &f
		}
	}
	st.Sysctls = sysctls(s, st)
	return st
}

// sysctls lists the kernel settings a service needs: forwarding for NAT to
// backends (IPVS and nf_tables), for IPVS the settings that make a
// weight-0 or deleted destination's connections end and masquerade work,
// and for HAProxy binds to addresses that are not local.
func sysctls(s *spec.Service, st *ServiceState) []string {
	if st.HAProxy != nil {
		// HAProxy binds the VIP whether this host holds it yet or not (a
		// standby of an HA group holds none; the address driver and
		// HAProxy run apart), so binds to addresses not (yet) local must
		// succeed.
		if s.VIP.Is4() {
			return []string{"net/ipv4/ip_nonlocal_bind"}
		}
		return []string{"net/ipv6/ip_nonlocal_bind"}
	}
	if st.L4 == nil {
		return nil
	}
	var out []string
	if s.Forwarding == spec.NAT {
		if s.VIP.Is4() {
			out = append(out, "net/ipv4/ip_forward")
		} else {
			out = append(out, "net/ipv6/conf/all/forwarding")
		}
	}
	if st.L4.Driver == spec.DriverIPVS {
		out = append(out, "net/ipv4/vs/expire_nodest_conn")
		if st.Filter != nil && st.Filter.Masquerade {
			out = append(out, "net/ipv4/vs/conntrack")
		}
	}
	return out
}

// weigh decides every backend's effective weight: configured when healthy,
// 0 when not, all configured when every backend is down and the service
// fails open, and 0 while draining.
func weigh(s *spec.Service, healthy, pending map[BackendRef]bool, draining []spec.Backend) ServiceReport {
	rep := ServiceReport{Name: s.Name, Driver: s.Driver, Key: s.Key()}
	down := 0
	for _, b := range s.Backends {
		ref := BackendRef{Service: s.Name, Addr: b.AddrPort()}
		h, known := healthy[ref]
		ok := (!known || h) && !pending[ref]
		if !ok && !pending[ref] {
			down++
		}
		rep.Backends = append(rep.Backends, BackendReport{Address: b.Address, Port: b.Port, Healthy: ok, Weight: b.Weight})
	}
	// Fail open only when every backend is known to be down.
	rep.FailingOpen = down == len(s.Backends) && len(s.Backends) > 0 && s.FailOpen
	for i := range rep.Backends {
		if !rep.Backends[i].Healthy && !rep.FailingOpen {
			rep.Backends[i].Weight = 0
		}
	}
	present := map[netip.AddrPort]bool{}
	for _, b := range s.Backends {
		present[b.AddrPort()] = true
	}
	for _, b := range draining {
		if present[b.AddrPort()] {
			continue // it came back: restored, not drained
		}
		present[b.AddrPort()] = true
		h, known := healthy[BackendRef{Service: s.Name, Addr: b.AddrPort()}]
		rep.Backends = append(rep.Backends, BackendReport{Address: b.Address, Port: b.Port, Healthy: !known || h, Draining: true})
	}
	slices.SortFunc(rep.Backends, func(a, b BackendReport) int {
		return netip.AddrPortFrom(a.Address, a.Port).Compare(netip.AddrPortFrom(b.Address, b.Port))
	})
	return rep
}

func l4Service(s *spec.Service, rep ServiceReport) L4Service {
	v := L4Service{
		Service:     s.Name,
		Driver:      s.Driver,
		Protocol:    s.Protocol,
		Address:     s.VIP,
		Port:        s.Port,
		Scheduler:   s.Scheduler,
		Flags:       slices.Sorted(slices.Values(s.SchedulerFlags)),
		Persistence: s.Persistence,
	}
	for _, b := range rep.Backends {
		v.Destinations = append(v.Destinations, L4Destination{Address: b.Address, Port: b.Port, Weight: b.Weight, Forwarding: s.Forwarding})
	}
	return v
}

func haproxyService(s *spec.Service, rep ServiceReport) HAProxyService {
	h := HAProxyService{
		Name:        s.Name,
		Bind:        netip.AddrPortFrom(s.VIP, s.Port),
		Scheduler:   s.Scheduler,
		Persistence: s.Persistence,
		Mode:        s.Mode,
		Routes:      slices.Clone(s.Routes),
	}
	if s.TLS != nil {
		h.Certificate = s.TLS.Certificate
		h.CertificateKey = s.TLS.CertificateKey
	}
	for _, b := range rep.Backends {
		h.Servers = append(h.Servers, HAProxyServer{Name: ServerName(b.Address, b.Port), Address: b.Address, Port: b.Port, Weight: b.Weight})
	}
	return h
}

// ServerName is the stable HAProxy server name of a backend: "s" followed by
// the address and port with separators made safe, e.g. s10.1.1.2_8443 or
// s2001-db8--1_443.
func ServerName(a netip.Addr, port uint16) string {
	b := []byte("s")
	for _, c := range []byte(a.String()) {
		if c == ':' {
			c = '-'
		}
		b = append(b, c)
	}
	b = append(b, '_')
	return string(b) + strconv.Itoa(int(port))
}

// filter returns the netfilter treatment of a service, if it needs any.
func filter(s *spec.Service, rep ServiceReport) (Filter, bool) {
	f := Filter{Service: s.Name, Protocol: s.Protocol, VIP: s.VIP, Port: s.Port}
	for _, p := range s.AllowCIDRs {
		if p.Bits() == 0 {
			f.AllowCIDRs = nil // someone allows everyone: no filtering
			break
		}
		f.AllowCIDRs = append(f.AllowCIDRs, p)
	}
	f.Masquerade = (s.Driver == spec.DriverIPVS || s.Driver == spec.DriverNFTables) && s.Forwarding == spec.NAT && !s.PreserveClientIP
	if f.Masquerade {
		for _, b := range rep.Backends {
			f.Backends = append(f.Backends, netip.AddrPortFrom(b.Address, b.Port))
		}
	}
	return f, f.AllowCIDRs != nil || f.Masquerade
}

// Split is the inverse of Assemble: one ServiceState per service named in
// st (its L4 service, HAProxy service and filter), sorted by name. VIPs and
// reports are not split back; drivers that need only their own part (and
// tests that hold whole states) use it.
func Split(st *State) []*ServiceState {
	by := map[string]*ServiceState{}
	get := func(name string) *ServiceState {
		s := by[name]
		if s == nil {
			s = &ServiceState{Name: name}
			by[name] = s
		}
		return s
	}
	for i, list := range [][]L4Service{st.IPVS, st.NFTables} {
		for _, l := range list {
			l.Driver = []spec.Driver{spec.DriverIPVS, spec.DriverNFTables}[i]
			get(l.Service).L4 = &l
		}
	}
	for _, h := range st.HAProxy {
		get(h.Name).HAProxy = &h
	}
	for _, f := range st.Filters {
		get(f.Service).Filter = &f
	}
	out := make([]*ServiceState, 0, len(by))
	for _, s := range by {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b *ServiceState) int { return cmp.Compare(a.Name, b.Name) })
	return out
}
