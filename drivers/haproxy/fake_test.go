package haproxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/switchman-lb/switchman/render"
)

// fakeServer is one server in fakeRuntime.
type fakeServer struct {
	addr     netip.AddrPort
	weight   int
	maint    bool
	sessions int
}

// fakeRuntime keeps HAProxy's runtime state and refuses misuse the way
// HAProxy does: adding a server that exists, deleting one that is not in
// maintenance or still has sessions, touching a missing backend or server,
// committing a certificate path that was never loaded.
type fakeRuntime struct {
	mu       sync.Mutex
	backends map[string]map[string]*fakeServer
	certs    map[string][]byte
	calls    []string
	// maps are the routing maps loaded from the config's map_beg files;
	// crtLists the crt-lists of bind lines; bound the certificates bind
	// lines load with crt (which del ssl cert refuses).
	maps     map[string][]render.HTTPMapEntry
	crtLists map[string][]string
	bound    map[string]bool
}

func newFakeRuntime() *fakeRuntime {
	return &fakeRuntime{backends: map[string]map[string]*fakeServer{}, certs: map[string][]byte{},
		maps: map[string][]render.HTTPMapEntry{}, crtLists: map[string][]string{}, bound: map[string]bool{}}
}

func (f *fakeRuntime) ReplaceMap(_ context.Context, path string, entries []render.HTTPMapEntry) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("map %s %d", path, len(entries))
	if _, ok := f.maps[path]; !ok {
		return fmt.Errorf("unknown map %s", path)
	}
	for _, e := range entries {
		if render.CheckHTTPMapKey(e.Key) != nil || render.CheckHTTPSlot(e.Backend) != nil {
			return fmt.Errorf("bad map entry %q", e)
		}
	}
	f.maps[path] = slices.Clone(entries)
	return nil
}

func (f *fakeRuntime) ShowMap(_ context.Context, path string) ([]render.HTTPMapEntry, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("read map %s", path)
	m, ok := f.maps[path]
	if !ok {
		return nil, fmt.Errorf("unknown map %s", path)
	}
	return slices.Clone(m), nil
}

// route looks a request up the way the frontend's rules do: host+path+/,
// then the one-label wildcard, then any host; longest prefix first.
func (f *fakeRuntime) route(mapPath, host, path string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	look := func(key string) string {
		best, be := -1, ""
		for _, e := range f.maps[mapPath] {
			if strings.HasPrefix(key, e.Key) && len(e.Key) > best {
				best, be = len(e.Key), e.Backend
			}
		}
		return be
	}
	if be := look(host + path + "/"); be != "" {
		return be
	}
	if _, dom, ok := strings.Cut(host, "."); ok {
		if be := look("*." + dom + path + "/"); be != "" {
			return be
		}
	}
	return look("*" + path + "/")
}

func (f *fakeRuntime) NewCertificate(_ context.Context, path string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("new cert %s", path)
	if _, ok := f.certs[path]; ok {
		return fmt.Errorf("%w: %s", ErrCertExists, path)
	}
	f.certs[path] = nil
	return nil
}

func (f *fakeRuntime) DelCertificate(_ context.Context, path string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("del cert %s", path)
	if _, ok := f.certs[path]; !ok {
		return fmt.Errorf("certificate %s is not loaded", path)
	}
	for _, l := range f.crtLists {
		if slices.Contains(l, path) {
			return fmt.Errorf("certificate %s is in use", path)
		}
	}
	if f.bound[path] {
		return fmt.Errorf("certificate %s is used by a bind line", path)
	}
	delete(f.certs, path)
	return nil
}

func (f *fakeRuntime) AddCrtListEntry(_ context.Context, list, cert string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("add crt-list %s %s", list, cert)
	l, ok := f.crtLists[list]
	if !ok {
		return fmt.Errorf("unknown crt-list %s", list)
	}
	if pem := f.certs[cert]; pem == nil {
		return fmt.Errorf("certificate %s is not in the store or empty", cert)
	}
	f.crtLists[list] = append(l, cert)
	return nil
}

func (f *fakeRuntime) DelCrtListEntry(_ context.Context, list, cert string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("del crt-list %s %s", list, cert)
	l := f.crtLists[list]
	i := slices.Index(l, cert)
	if i < 0 {
		return fmt.Errorf("%s is not in crt-list %s", cert, list)
	}
	f.crtLists[list] = slices.Delete(l, i, i+1)
	return nil
}

func (f *fakeRuntime) CrtList(_ context.Context, list string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("read crt-list %s", list)
	l, ok := f.crtLists[list]
	if !ok {
		return nil, fmt.Errorf("unknown crt-list %s", list)
	}
	return slices.Clone(l), nil
}

func (f *fakeRuntime) srv(backend, server string) (*fakeServer, error) {
	be, ok := f.backends[backend]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNoBackend, backend)
	}
	s, ok := be[server]
	if !ok {
		return nil, fmt.Errorf("no such server %s/%s", backend, server)
	}
	return s, nil
}

func (f *fakeRuntime) record(format string, a ...any) {
	f.calls = append(f.calls, fmt.Sprintf(format, a...))
}

func (f *fakeRuntime) ServersState(_ context.Context, backend string) ([]ServerState, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("read servers %s", backend)
	be, ok := f.backends[backend]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNoBackend, backend)
	}
	return f.states(be), nil
}

func (f *fakeRuntime) states(be map[string]*fakeServer) []ServerState {
	var out []ServerState
	for n, s := range be {
		out = append(out, ServerState{Name: n, Addr: s.addr, Weight: s.weight, Maint: s.maint})
	}
	return out
}

func (f *fakeRuntime) AllServersState(context.Context) (map[string][]ServerState, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("read servers")
	out := map[string][]ServerState{}
	for b, be := range f.backends {
		if len(be) > 0 {
			out[b] = f.states(be)
		}
	}
	return out, nil
}

func (f *fakeRuntime) Backends(context.Context) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("read backends")
	return slices.Sorted(maps.Keys(f.backends)), nil
}

func (f *fakeRuntime) CertificateFingerprint(_ context.Context, path string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("read cert %s", path)
	pem, ok := f.certs[path]
	if !ok {
		return "", fmt.Errorf("certificate %s is not loaded", path)
	}
	return leafFingerprint(pem)
}

// writes returns the calls that changed something.
func (f *fakeRuntime) writes() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, c := range f.calls {
		if !strings.HasPrefix(c, "read ") {
			out = append(out, c)
		}
	}
	return out
}

func (f *fakeRuntime) takeCalls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := f.calls
	f.calls = nil
	return out
}

func (f *fakeRuntime) AddServer(_ context.Context, backend, server string, addr netip.AddrPort, weight int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("add %s/%s %s %d", backend, server, addr, weight)
	be, ok := f.backends[backend]
	if !ok {
		return fmt.Errorf("%w: %s", ErrNoBackend, backend)
	}
	if _, dup := be[server]; dup {
		return fmt.Errorf("server %s/%s already exists", backend, server)
	}
	if weight < 0 || weight > 256 {
		return fmt.Errorf("weight %d out of range", weight)
	}
	be[server] = &fakeServer{addr: addr, weight: weight, maint: true}
	return nil
}

func (f *fakeRuntime) DelServer(_ context.Context, backend, server string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("del %s/%s", backend, server)
	s, err := f.srv(backend, server)
	if err != nil {
		return err
	}
	if !s.maint {
		return fmt.Errorf("server %s/%s is not in maintenance", backend, server)
	}
	if s.sessions > 0 {
		return fmt.Errorf("del server %s/%s: %w", backend, server, ErrServerBusy)
	}
	delete(f.backends[backend], server)
	return nil
}

func (f *fakeRuntime) SetWeight(_ context.Context, backend, server string, weight int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("weight %s/%s %d", backend, server, weight)
	s, err := f.srv(backend, server)
	if err != nil {
		return err
	}
	if weight < 0 || weight > 256 {
		return fmt.Errorf("weight %d out of range", weight)
	}
	s.weight = weight
	return nil
}

func (f *fakeRuntime) SetAddr(_ context.Context, backend, server string, addr netip.AddrPort) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("addr %s/%s %s", backend, server, addr)
	s, err := f.srv(backend, server)
	if err != nil {
		return err
	}
	s.addr = addr
	return nil
}

func (f *fakeRuntime) SetState(_ context.Context, backend, server string, state AdminState) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("state %s/%s %s", backend, server, state)
	s, err := f.srv(backend, server)
	if err != nil {
		return err
	}
	switch state {
	case StateReady:
		s.maint = false
	case StateMaint:
		s.maint = true
	default:
		return fmt.Errorf("state %q not used by the driver", state)
	}
	return nil
}

func (f *fakeRuntime) ShutdownSessions(_ context.Context, backend, server string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("shutdown %s/%s", backend, server)
	s, err := f.srv(backend, server)
	if err != nil {
		return err
	}
	s.sessions = 0
	return nil
}

func (f *fakeRuntime) SetCertificate(_ context.Context, path string, pem []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("cert %s", path)
	if _, ok := f.certs[path]; !ok {
		return fmt.Errorf("certificate %s is not loaded", path)
	}
	if _, err := canonicalPEM(pem); err != nil {
		return err
	}
	f.certs[path] = bytes.Clone(pem)
	return nil
}

func (f *fakeRuntime) Sessions(_ context.Context, backend string) (map[string]int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("read sessions %s", backend)
	be, ok := f.backends[backend]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNoBackend, backend)
	}
	out := map[string]int{}
	for n, s := range be {
		out[n] = s.sessions
	}
	return out, nil
}

// load replaces the state with what a config file declares, as a start
// or reload does (server weights from the file; certificates read from
// their files).
func (f *fakeRuntime) load(cfg []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.backends = map[string]map[string]*fakeServer{}
	f.certs = map[string][]byte{}
	f.maps, f.crtLists, f.bound = map[string][]render.HTTPMapEntry{}, map[string][]string{}, map[string]bool{}
	be := ""
	sc := bufio.NewScanner(bytes.NewReader(cfg))
	for sc.Scan() {
		w := strings.Fields(sc.Text())
		for _, tok := range w {
			if _, rest, ok := strings.Cut(tok, "map_beg("); ok {
				path := strings.TrimSuffix(rest, ")")
				if _, done := f.maps[path]; done {
					continue
				}
				content, err := os.ReadFile(path)
				if err != nil {
					return err
				}
				f.maps[path] = []render.HTTPMapEntry{}
				for _, l := range strings.Split(string(content), "\n") {
					if kv := strings.Fields(l); len(kv) == 2 {
						f.maps[path] = append(f.maps[path], render.HTTPMapEntry{Key: kv[0], Backend: kv[1]})
					}
				}
			}
		}
		switch {
		case len(w) >= 7 && w[0] == "bind" && w[2] == "ssl" && w[3] == "crt" && w[5] == "crt-list":
			for _, p := range []string{w[4]} {
				pem, err := os.ReadFile(p)
				if err != nil {
					return err
				}
				f.certs[p], f.bound[p] = pem, true
			}
			content, err := os.ReadFile(w[6])
			if err != nil {
				return err
			}
			f.crtLists[w[6]] = strings.Fields(string(content))
			for _, p := range f.crtLists[w[6]] {
				pem, err := os.ReadFile(p)
				if err != nil {
					return err
				}
				f.certs[p] = pem
			}
		case len(w) == 2 && w[0] == "backend":
			be = w[1]
			f.backends[be] = map[string]*fakeServer{}
		case len(w) == 5 && w[0] == "server":
			ap, err := netip.ParseAddrPort(w[2])
			if err != nil {
				return err
			}
			wt, err := strconv.Atoi(w[4])
			if err != nil {
				return err
			}
			f.backends[be][w[1]] = &fakeServer{addr: ap, weight: wt}
		case len(w) == 5 && w[0] == "bind" && w[2] == "ssl":
			pem, err := os.ReadFile(w[4])
			if err != nil {
				return err
			}
			f.certs[w[4]], f.bound[w[4]] = pem, true
		}
	}
	return sc.Err()
}

// fakeProcess stands in for the HAProxy process: Validate rejects a
// config naming a path under /bad/; Start and Reload load the config file
// into the fake runtime, and fail (leaving the running state alone) when
// the file binds an address in taken or holds refuse. ProbeBind fails for
// taken addresses, except those in hidden, which it lets through once (a
// bind taken between the probe and the reload).
type fakeProcess struct {
	rt       *fakeRuntime
	cfgPath  string
	missing  bool
	running  bool
	alive    bool
	starts   int
	reloads  int
	validate int
	adopts   int
	restarts uint64
	probes   []netip.AddrPort
	taken    map[netip.AddrPort]bool
	hidden   map[netip.AddrPort]bool
	refuse   string
}

func (p *fakeProcess) Available() error {
	if p.missing {
		return fmt.Errorf("%w: install it (apt-get install haproxy) or point --haproxy-bin at it", ErrMissing)
	}
	return nil
}

func (p *fakeProcess) Validate(_ context.Context, path string) error {
	p.validate++
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if bytes.Contains(b, []byte(" /bad/")) {
		return errors.New("haproxy -c: unable to load certificate under /bad/")
	}
	return nil
}

func (p *fakeProcess) ProbeBind(addr netip.AddrPort) error {
	p.probes = append(p.probes, addr)
	if p.hidden[addr] {
		delete(p.hidden, addr)
		return nil
	}
	if p.taken[addr] {
		return &BindError{Addr: addr, Err: syscall.EADDRINUSE}
	}
	return nil
}

func (p *fakeProcess) Running(context.Context) bool { return p.running }
func (p *fakeProcess) Alive() bool                  { return p.alive }
func (p *fakeProcess) Restarts() uint64             { return p.restarts }

func (p *fakeProcess) Adopt(context.Context) error {
	p.adopts++
	p.alive = true
	return nil
}

// loadFile loads the config file unless it binds a taken address or holds
// refuse.
func (p *fakeProcess) loadFile() error {
	b, err := os.ReadFile(p.cfgPath)
	if err != nil {
		return err
	}
	if p.refuse != "" && bytes.Contains(b, []byte(p.refuse)) {
		return fmt.Errorf("%w: the fake refuses %q", ErrReloadFailed, p.refuse)
	}
	for a := range p.taken {
		if bytes.Contains(b, []byte("bind "+a.String())) {
			return fmt.Errorf("%w: cannot bind socket %s", ErrReloadFailed, a)
		}
	}
	return p.rt.load(b)
}

func (p *fakeProcess) Start(context.Context) error {
	if p.running {
		return errors.New("started twice")
	}
	p.starts++
	if err := p.loadFile(); err != nil {
		return err
	}
	p.running, p.alive = true, true
	return nil
}

func (p *fakeProcess) Reload(context.Context) error {
	if !p.running {
		return errors.New("reload while not running")
	}
	if err := p.loadFile(); err != nil {
		return err
	}
	p.reloads++
	return nil
}

func (p *fakeProcess) Close() { p.running = false }

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
