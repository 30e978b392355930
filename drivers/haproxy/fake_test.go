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
}

func newFakeRuntime() *fakeRuntime {
	return &fakeRuntime{backends: map[string]map[string]*fakeServer{}, certs: map[string][]byte{}}
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
	be := ""
	sc := bufio.NewScanner(bytes.NewReader(cfg))
	for sc.Scan() {
		w := strings.Fields(sc.Text())
		switch {
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
			f.certs[w[4]] = pem
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
