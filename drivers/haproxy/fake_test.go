package haproxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
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
	be, ok := f.backends[backend]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNoBackend, backend)
	}
	var out []ServerState
	for n, s := range be {
		out = append(out, ServerState{Name: n, Addr: s.addr, Weight: s.weight, Maint: s.maint})
	}
	return out, nil
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

func (f *fakeRuntime) Sessions(context.Context) (map[string]map[string]int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]map[string]int{}
	for b, be := range f.backends {
		out[b] = map[string]int{}
		for n, s := range be {
			out[b][n] = s.sessions
		}
	}
	return out, nil
}

func (f *fakeRuntime) DumpServersState(context.Context) ([]byte, error) {
	return []byte("1\n# be_id be_name srv_id srv_name\n"), nil
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
// config naming a path under /bad/, Start and Reload load the config file
// into the fake runtime.
type fakeProcess struct {
	rt       *fakeRuntime
	cfgPath  string
	missing  bool
	running  bool
	starts   int
	reloads  int
	validate int
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

func (p *fakeProcess) Running(context.Context) bool { return p.running }

func (p *fakeProcess) loadFile() error {
	b, err := os.ReadFile(p.cfgPath)
	if err != nil {
		return err
	}
	return p.rt.load(b)
}

func (p *fakeProcess) Start(context.Context) error {
	if p.running {
		return errors.New("started twice")
	}
	p.starts++
	p.running = true
	return p.loadFile()
}

func (p *fakeProcess) Reload(context.Context) error {
	if !p.running {
		return errors.New("reload while not running")
	}
	p.reloads++
	return p.loadFile()
}

func (p *fakeProcess) Close() { p.running = false }

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
