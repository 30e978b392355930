package render

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/switchman-lb/switchman/spec"
)

// Mode http on the HAProxy path: one frontend per vip:port shared by every
// http service on it, routing each request by Host and path through a map
// file to a backend "slot". Slots are backends declared in haproxy.cfg
// ahead of need, in pools of one shape each (balance algorithm and
// persistence, which HAProxy cannot change at run time); a new service takes
// a spare slot and fills it with `add server`, and a route change is a new
// version of the map, so neither reloads HAProxy. Only a new vip:port, a
// pool that runs out, or a frontend that gains or loses TLS changes the
// structure.
//
// The map key of a route is its host, its path prefix and a '/':
// www.example.com/api/ for an exact host, *.example.com/api/ for a
// wildcard, */api/ for any host. A request looks up, in this order and
// with the longest matching prefix (HAProxy's map_beg uses a prefix tree),
// its Host (port stripped, lower-cased) + path + '/', then "*." + its Host
// without the first label + path + '/', then "*" + path + '/'. The '/'
// appended to both sides makes a prefix match whole segments: /api matches
// /api and /api/v1, not /apix.

// DefaultHTTPSpareSlots is how many spare backend slots a pool keeps
// beyond the services in it when it is created or grown.
const DefaultHTTPSpareSlots = 128

// HTTPNoRouteBackend answers the requests no route matches with 404.
const HTTPNoRouteBackend = "be_http_no_route"

var (
	// httpKeyRE is a routing map key as HTTPMapKey makes it: nothing a map
	// file, haproxy.cfg or the runtime API could read as syntax.
	httpKeyRE = regexp.MustCompile(`^(\*|(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?)(/[A-Za-z0-9._~%-]+)*/$`)
	// httpSlotRE is a slot backend's name.
	httpSlotRE = regexp.MustCompile(`^be_http_[a-z0-9]+_[0-9]+$`)
)

// HTTP reports whether s is a mode http service.
func (s HAProxyService) HTTP() bool { return s.Mode == spec.ModeHTTP }

// HTTPMapKey is the key of route r in its frontend's routing map.
func HTTPMapKey(r spec.Route) string {
	h := r.Host
	if h == "" {
		h = "*"
	}
	return h + strings.TrimSuffix(r.PathPrefix, "/") + "/"
}

// HTTPRouteOfKey is the inverse of HTTPMapKey.
func HTTPRouteOfKey(key string) (spec.Route, error) {
	if err := CheckHTTPMapKey(key); err != nil {
		return spec.Route{}, err
	}
	host, path, _ := strings.Cut(key, "/")
	if host == "*" {
		host = ""
	}
	path = "/" + strings.TrimSuffix(path, "/")
	return spec.Route{Host: host, PathPrefix: path}, nil
}

// CheckHTTPMapKey checks a routing map key before it reaches a map file or
// the runtime API: it must match httpKeyRE (checked here byte by byte, as
// it runs for every route of every map).
func CheckHTTPMapKey(key string) error {
	if len(key) > 1300 || !httpKey(key) {
		return fmt.Errorf("route key %q does not match %s", key, httpKeyRE)
	}
	return nil
}

// httpKey reports whether key matches httpKeyRE.
func httpKey(key string) bool {
	host, path, ok := strings.Cut(key, "/")
	if !ok || host == "" || !strings.HasSuffix(key, "/") {
		return false
	}
	if host != "*" {
		host = strings.TrimPrefix(host, "*.")
		if host == "" || host[0] == '.' || host[0] == '-' || host[len(host)-1] == '.' || host[len(host)-1] == '-' {
			return false
		}
		for i := 0; i < len(host); i++ {
			if c := host[i]; !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '.' || c == '-') {
				return false
			}
		}
	}
	if path == "" {
		return true
	}
	// Segments of [A-Za-z0-9._~%-]+, each followed by '/'.
	prev := byte('/')
	for i := 0; i < len(path); i++ {
		c := path[i]
		switch {
		case c == '/':
			if prev == '/' {
				return false
			}
		case 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("._~%-", c) >= 0:
		default:
			return false
		}
		prev = c
	}
	return true
}

// CheckHTTPSlot checks a slot backend's name.
func CheckHTTPSlot(name string) error {
	if !httpSlotRE.MatchString(name) {
		return fmt.Errorf("slot %q does not match %s", name, httpSlotRE)
	}
	return nil
}

// HTTPShape is what a backend slot is declared with and HAProxy cannot
// change at run time: the balance algorithm and the stickiness.
type HTTPShape struct {
	Balance, HashType string
	// StickType is "ip" or "ipv6" with persistence, "" without.
	StickType   string
	StickExpire time.Duration
}

// HTTPShapeOf is the shape of the slot an http service needs.
func HTTPShapeOf(s HAProxyService) (HTTPShape, error) {
	var sh HTTPShape
	var err error
	if sh.Balance, sh.HashType, err = HAProxyBalance(s.Scheduler); err != nil {
		return sh, err
	}
	switch {
	case s.Persistence < 0:
		return sh, fmt.Errorf("persistence: negative %s", s.Persistence)
	case s.Persistence > 0:
		sh.StickType, sh.StickExpire = stickType(s.Bind.Addr()), s.Persistence
	}
	return sh, nil
}

func stickType(a netip.Addr) string {
	if a.Is6() && !a.Is4In6() {
		return "ipv6"
	}
	return "ip"
}

// Name names the shape in slot names: rr, lc or sh, and with persistence
// the stick type and expiry (rr_ip300s written rrip300s).
func (sh HTTPShape) Name() string {
	n := map[string]string{"roundrobin": "rr", "leastconn": "lc", "source": "sh"}[sh.Balance]
	if n == "" {
		n = "x"
	}
	if sh.StickType != "" {
		n += sh.StickType + haproxyDuration(sh.StickExpire)
	}
	return n
}

// HTTPSlotName is the backend of slot i (from 1) of the pool of a shape.
func HTTPSlotName(shape string, i int) string {
	return "be_http_" + shape + "_" + strconv.Itoa(i)
}

// HTTPFrontend is the frontend of one vip:port of http services.
type HTTPFrontend struct {
	Bind netip.AddrPort
	// TLS: the services on it terminate TLS (all of them do, or none).
	TLS bool
}

// Name is the frontend's section name: fe_http_ADDR_PORT, with the
// address's ':' written '-'.
func (f HTTPFrontend) Name() string {
	return "fe_http_" + strings.TrimPrefix(ServerName(f.Bind.Addr(), f.Bind.Port()), "s")
}

// HTTPPool is the backend slots of one shape.
type HTTPPool struct {
	Shape HTTPShape
	// Slots holds the service in each slot, "" for a spare; slot i is the
	// backend HTTPSlotName(Shape.Name(), i+1).
	Slots []string
}

// HTTPLayout is the http part of haproxy.cfg: which frontends exist, which
// pools of slots, and which service holds which slot.
type HTTPLayout struct {
	Frontends []HTTPFrontend // sorted by bind
	Pools     []HTTPPool     // sorted by shape name
}

// Skeleton is what of the layout needs a reload to change: the frontends
// (bind and TLS) and the size of each pool. Which service holds a slot
// does not.
func (l HTTPLayout) Skeleton() string {
	var b strings.Builder
	for _, f := range l.Frontends {
		fmt.Fprintf(&b, "frontend %s tls=%t\n", f.Bind, f.TLS)
	}
	for _, p := range l.Pools {
		fmt.Fprintf(&b, "pool %s %d\n", p.Shape.Name(), len(p.Slots))
	}
	return b.String()
}

// Slots maps each service that holds a slot to its backend slot.
func (l HTTPLayout) Slots() map[string]string {
	out := map[string]string{}
	for _, p := range l.Pools {
		for i, occ := range p.Slots {
			if occ != "" {
				out[occ] = HTTPSlotName(p.Shape.Name(), i+1)
			}
		}
	}
	return out
}

// Slot returns the backend slot service holds, or "".
func (l HTTPLayout) Slot(service string) string {
	for _, p := range l.Pools {
		if i := slices.Index(p.Slots, service); i >= 0 && service != "" {
			return HTTPSlotName(p.Shape.Name(), i+1)
		}
	}
	return ""
}

// Backends lists every backend of the layout: the no-route backend (when
// there is a frontend) and every slot.
func (l HTTPLayout) Backends() []string {
	var out []string
	if len(l.Frontends) > 0 {
		out = append(out, HTTPNoRouteBackend)
	}
	for _, p := range l.Pools {
		for i := range p.Slots {
			out = append(out, HTTPSlotName(p.Shape.Name(), i+1))
		}
	}
	return out
}

// Frontend returns the frontend of bind.
func (l HTTPLayout) Frontend(bind netip.AddrPort) (HTTPFrontend, bool) {
	i := slices.IndexFunc(l.Frontends, func(f HTTPFrontend) bool { return f.Bind == bind })
	if i < 0 {
		return HTTPFrontend{}, false
	}
	return l.Frontends[i], true
}

// LayoutHTTP lays out the http services (the others are ignored): one
// frontend per bind, and one slot per service in the pool of its shape;
// with no http service the layout is empty. It is pure and deterministic. Every service keeps the slot it holds in prev
// when its shape is the same; the others take the lowest spare slot of
// their pool, in name order. A slot in busy (a leaving service's servers
// still closing their connections) is not given out. A pool without a
// spare for every service that needs one grows, in one step, to hold them
// and spare more (at least spare, and at least as many as it holds); a
// pool is never shrunk, and a pool nobody uses any more stays (removing it
// would need a reload).
func LayoutHTTP(services []HAProxyService, prev HTTPLayout, spare int, busy map[string]bool) (HTTPLayout, error) {
	var out HTTPLayout
	tls := map[netip.AddrPort]bool{}
	shapes := map[string]HTTPShape{}
	want := map[string]string{} // service -> shape name
	var errs []error
	for _, s := range services {
		if !s.HTTP() {
			continue
		}
		sh, err := HTTPShapeOf(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("haproxy service %q: %w", s.Name, err))
			continue
		}
		tls[s.Bind] = tls[s.Bind] || s.Certificate != "" || s.CertificateKey != ""
		shapes[sh.Name()] = sh
		want[s.Name] = sh.Name()
	}
	if err := errors.Join(errs...); err != nil {
		return HTTPLayout{}, err
	}
	if len(want) == 0 {
		return HTTPLayout{}, nil
	}
	for _, b := range slices.SortedFunc(maps.Keys(tls), netip.AddrPort.Compare) {
		out.Frontends = append(out.Frontends, HTTPFrontend{Bind: b, TLS: tls[b]})
	}
	pools := map[string]*HTTPPool{}
	for _, p := range prev.Pools {
		np := &HTTPPool{Shape: p.Shape, Slots: make([]string, len(p.Slots))}
		for i, occ := range p.Slots {
			if occ != "" && want[occ] == p.Shape.Name() {
				np.Slots[i] = occ
				delete(want, occ) // placed
			}
		}
		pools[p.Shape.Name()] = np
	}
	for _, n := range slices.Sorted(maps.Keys(want)) {
		name := want[n]
		p := pools[name]
		if p == nil {
			p = &HTTPPool{Shape: shapes[name]}
			pools[name] = p
		}
		free := func() int {
			return slices.IndexFunc(indexes(len(p.Slots)), func(i int) bool {
				return p.Slots[i] == "" && !busy[HTTPSlotName(name, i+1)]
			})
		}
		i := free()
		if i < 0 {
			// Grow once for every service of this shape still to place.
			held := 0
			for j, occ := range p.Slots {
				if occ != "" || busy[HTTPSlotName(name, j+1)] {
					held++
				}
			}
			needed := 0
			for _, sh := range want {
				if sh == name {
					needed++
				}
			}
			size := held + needed
			size += max(spare, size, 1)
			p.Slots = append(p.Slots, make([]string, size-len(p.Slots))...)
			i = free()
		}
		p.Slots[i] = n
		delete(want, n)
	}
	for _, name := range slices.Sorted(maps.Keys(pools)) {
		out.Pools = append(out.Pools, *pools[name])
	}
	return out, nil
}

// CheckHTTPService checks what of an http service reaches haproxy.cfg, a
// map or the runtime API: its name, bind, routes and servers.
func CheckHTTPService(s HAProxyService) error {
	if err := CheckHAProxyName(s.Name); err != nil {
		return err
	}
	if err := CheckHAProxyAddr("bind", s.Bind.Addr()); err != nil || s.Bind.Port() == 0 {
		return fmt.Errorf("bind %s is not an address and port", s.Bind)
	}
	for _, r := range s.Routes {
		if err := CheckHTTPMapKey(HTTPMapKey(r)); err != nil {
			return err
		}
	}
	_, err := serverViews(s.Servers)
	return err
}

func indexes(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

// HTTPMapPath is the routing map file of a frontend.
func HTTPMapPath(opts HAProxyOptions, f HTTPFrontend) string {
	return opts.StateDir + "/maps/" + f.Name() + ".map"
}

// HTTPCrtListPath is the crt-list file of a TLS frontend.
func HTTPCrtListPath(opts HAProxyOptions, f HTTPFrontend) string {
	return opts.StateDir + "/certs/" + f.Name() + ".crtlist"
}

// HTTPDefaultCertPath is the certificate a TLS frontend serves to clients
// that send no server name, or one no certificate of its crt-list has: a
// copy of the certificate of the first service on it by name.
func HTTPDefaultCertPath(opts HAProxyOptions, f HTTPFrontend) string {
	return opts.StateDir + "/certs/" + f.Name() + ".default.pem"
}

// HTTPMapEntry is one line of a routing map.
type HTTPMapEntry struct {
	Key, Backend string
}

// HTTPMapEntries is the routing map of frontend f: every route of the
// services on it that hold a slot, longest key first. A key claimed twice
// (which the evaluator never lets through) goes to the service first by
// name.
func HTTPMapEntries(l HTTPLayout, f HTTPFrontend, services []HAProxyService) ([]HTTPMapEntry, error) {
	seen := map[string]bool{}
	var out []HTTPMapEntry
	slots := l.Slots()
	for _, s := range sortedByName(services) {
		if !s.HTTP() || s.Bind != f.Bind {
			continue
		}
		slot := slots[s.Name]
		if slot == "" {
			continue
		}
		for _, r := range s.Routes {
			k := HTTPMapKey(r)
			if err := CheckHTTPMapKey(k); err != nil {
				return nil, fmt.Errorf("haproxy service %q: %w", s.Name, err)
			}
			if !seen[k] {
				seen[k] = true
				out = append(out, HTTPMapEntry{Key: k, Backend: slot})
			}
		}
	}
	SortHTTPMap(out)
	return out, nil
}

// SortHTTPMap orders map entries longest key first, then by key.
func SortHTTPMap(m []HTTPMapEntry) {
	slices.SortFunc(m, func(a, b HTTPMapEntry) int {
		if c := cmp.Compare(len(b.Key), len(a.Key)); c != 0 {
			return c
		}
		return cmp.Compare(a.Key, b.Key)
	})
}

// HTTPMapFile is the content of a routing map file.
func HTTPMapFile(m []HTTPMapEntry) []byte {
	var b bytes.Buffer
	for _, e := range m {
		b.WriteString(e.Key + " " + e.Backend + "\n")
	}
	return b.Bytes()
}

// HTTPCertificates lists the certificate files of the services on TLS
// frontend f, by service name, each once: its crt-list. The first is the
// frontend's default certificate.
func HTTPCertificates(f HTTPFrontend, services []HAProxyService, opts HAProxyOptions) ([]string, error) {
	var out []string
	for _, s := range sortedByName(services) {
		if !s.HTTP() || s.Bind != f.Bind {
			continue
		}
		p, err := HAProxyCertificatePath(s, opts)
		if err != nil {
			return nil, err
		}
		if p == "" {
			continue
		}
		if err := CheckHAProxyPath("certificate", p); err != nil {
			return nil, fmt.Errorf("haproxy service %q: %w", s.Name, err)
		}
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out, nil
}

// HTTPCrtListFile is the content of a crt-list file.
func HTTPCrtListFile(certs []string) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		b.WriteString(c + "\n")
	}
	return b.Bytes()
}

func sortedByName(services []HAProxyService) []HAProxyService {
	return slices.SortedFunc(slices.Values(services), func(a, b HAProxyService) int { return cmp.Compare(a.Name, b.Name) })
}

// HAProxyPart is one part of haproxy.cfg and the services it serves, so
// that a line HAProxy refuses can be traced to them.
type HAProxyPart struct {
	Services []string
	Text     []byte
}

type httpFrontendView struct {
	Name, Bind                string
	TLS                       bool
	DefaultCert, CrtList, Map string
}

type httpSlotView struct {
	Name, Balance, HashType string
	StickType, StickExpire  string
	Service, Bind           string
	Servers                 []haproxyServerView
}

// HAProxyHTTPSections renders the http part of haproxy.cfg for layout l
// with the servers of services: each frontend, the no-route backend, then
// every slot (a comment names the service in it and its bind; the slot
// carries that service's servers). Every value is checked as HAProxyConfig
// says.
func HAProxyHTTPSections(l HTTPLayout, services []HAProxyService, opts HAProxyOptions) ([]HAProxyPart, error) {
	if len(l.Frontends) == 0 && len(l.Pools) == 0 {
		return nil, nil
	}
	if err := CheckHAProxyPath("state directory", opts.StateDir); err != nil {
		return nil, err
	}
	by := map[string]HAProxyService{}
	onBind := map[netip.AddrPort][]string{}
	for _, s := range sortedByName(services) {
		if s.HTTP() {
			by[s.Name] = s
			onBind[s.Bind] = append(onBind[s.Bind], s.Name)
		}
	}
	var out []HAProxyPart
	exec := func(tmpl string, v any, owners []string) error {
		var b bytes.Buffer
		if err := haproxyTemplate.ExecuteTemplate(&b, tmpl, v); err != nil {
			return fmt.Errorf("haproxy.cfg template: %w", err)
		}
		out = append(out, HAProxyPart{Services: owners, Text: b.Bytes()})
		return nil
	}
	for _, f := range l.Frontends {
		if err := CheckHAProxyAddr("bind", f.Bind.Addr()); err != nil || f.Bind.Port() == 0 {
			return nil, fmt.Errorf("http frontend %s: invalid bind", f.Bind)
		}
		v := httpFrontendView{Name: f.Name(), Bind: f.Bind.String(), TLS: f.TLS, Map: HTTPMapPath(opts, f),
			DefaultCert: HTTPDefaultCertPath(opts, f), CrtList: HTTPCrtListPath(opts, f)}
		if err := exec("http-frontend", v, onBind[f.Bind]); err != nil {
			return nil, err
		}
	}
	if len(l.Frontends) > 0 {
		if err := exec("http-no-route", nil, nil); err != nil {
			return nil, err
		}
	}
	for _, p := range l.Pools {
		for i, occ := range p.Slots {
			v := httpSlotView{Name: HTTPSlotName(p.Shape.Name(), i+1), Balance: p.Shape.Balance, HashType: p.Shape.HashType}
			if err := CheckHTTPSlot(v.Name); err != nil {
				return nil, err
			}
			if p.Shape.StickType != "" {
				v.StickType, v.StickExpire = p.Shape.StickType, haproxyDuration(p.Shape.StickExpire)
			}
			var owners []string
			if occ != "" {
				s, ok := by[occ]
				if !ok {
					return nil, fmt.Errorf("slot %s: service %q is not an http service given", v.Name, occ)
				}
				if err := CheckHAProxyName(occ); err != nil {
					return nil, err
				}
				servers, err := serverViews(s.Servers)
				if err != nil {
					return nil, fmt.Errorf("haproxy service %q: %w", occ, err)
				}
				v.Service, v.Bind, v.Servers, owners = occ, s.Bind.String(), servers, []string{occ}
			}
			if err := exec("http-slot", v, owners); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

// HTTPFile is a file an http frontend reads: its routing map, and with
// TLS its crt-list and its default certificate, a copy of another file.
type HTTPFile struct {
	Frontend HTTPFrontend
	Path     string
	// Content is the file's content; for a default certificate it is nil
	// and CopyOf names the certificate file to copy.
	Content []byte
	CopyOf  string
}

// HTTPFiles lists the files of every frontend of layout l for services,
// in frontend order: the routing map, then for TLS the crt-list and the
// default certificate.
func HTTPFiles(l HTTPLayout, services []HAProxyService, opts HAProxyOptions) ([]HTTPFile, error) {
	var out []HTTPFile
	for _, f := range l.Frontends {
		entries, err := HTTPMapEntries(l, f, services)
		if err != nil {
			return nil, err
		}
		out = append(out, HTTPFile{Frontend: f, Path: HTTPMapPath(opts, f), Content: HTTPMapFile(entries)})
		if !f.TLS {
			continue
		}
		certs, err := HTTPCertificates(f, services, opts)
		if err != nil {
			return nil, err
		}
		if len(certs) == 0 {
			return nil, fmt.Errorf("http frontend %s terminates TLS but none of its services has a certificate", f.Bind)
		}
		out = append(out,
			HTTPFile{Frontend: f, Path: HTTPCrtListPath(opts, f), Content: HTTPCrtListFile(certs)},
			HTTPFile{Frontend: f, Path: HTTPDefaultCertPath(opts, f), CopyOf: certs[0]})
	}
	return out, nil
}
