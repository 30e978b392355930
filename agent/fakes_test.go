package agent

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/status"
	"github.com/switchman-lb/switchman/watcher"
)

// fakeSource is an in-memory etcd copy with keyed changes.
type fakeSource struct {
	mu       sync.Mutex
	rev      int64
	services map[string]watcher.KV
	members  map[string]map[string]watcher.KV
	other    map[string]watcher.KV
	dirty    watcher.Changes
	changed  chan struct{}
}

func newFakeSource() *fakeSource {
	return &fakeSource{services: map[string]watcher.KV{}, members: map[string]map[string]watcher.KV{}, other: map[string]watcher.KV{},
		dirty: watcher.Changes{Services: map[string]bool{}, Other: map[string]bool{}}, changed: make(chan struct{}, 1)}
}

func (f *fakeSource) Synced() bool             { return true }
func (f *fakeSource) Changed() <-chan struct{} { return f.changed }

func (f *fakeSource) TakeChanges() watcher.Changes {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.dirty
	f.dirty = watcher.Changes{Services: map[string]bool{}, Other: map[string]bool{}}
	return c
}

func (f *fakeSource) ServiceNames() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Collect(maps.Keys(f.services))
}

func (f *fakeSource) Service(name string) (watcher.KV, map[string]watcher.KV, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	kv, ok := f.services[name]
	return kv, maps.Clone(f.members[name]), ok
}

func (f *fakeSource) Value(key string) (watcher.KV, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	kv, ok := f.other[key]
	return kv, ok
}

func (f *fakeSource) notify() {
	select {
	case f.changed <- struct{}{}:
	default:
	}
}

// put sets a definition; the first put of a name is its creation.
func (f *fakeSource) put(name, value string) {
	f.mu.Lock()
	f.rev++
	kv := watcher.KV{Value: []byte(value), ModRevision: f.rev, CreateRevision: f.rev}
	if old, ok := f.services[name]; ok {
		kv.CreateRevision = old.CreateRevision
	}
	f.services[name] = kv
	f.dirty.Services[name] = true
	f.mu.Unlock()
	f.notify()
}

func (f *fakeSource) del(name string) {
	f.mu.Lock()
	f.rev++
	delete(f.services, name)
	f.dirty.Services[name] = true
	f.mu.Unlock()
	f.notify()
}

// fakeDriver is a data plane that keeps the part of each service it
// serves, counts what it is handed, can be told to fail or to block a
// service, and logs every call to a shared journal.
type fakeDriver struct {
	name    string
	part    string
	journal *journal

	mu      sync.Mutex
	held    map[string]any
	fail    map[string]error
	block   map[string]chan struct{}
	applied map[string]int // services handed to Apply, by name
	applies int
	syncs   int
	writes  int // changes made to held
	conns   map[render.BackendRef]int
}

func newFakeDriver(name, part string, j *journal) *fakeDriver {
	return &fakeDriver{name: name, part: part, journal: j, held: map[string]any{}, fail: map[string]error{}, block: map[string]chan struct{}{}, applied: map[string]int{}, conns: map[render.BackendRef]int{}}
}

func (d *fakeDriver) Name() string { return d.name }

func (d *fakeDriver) Apply(ctx context.Context, changed []*render.ServiceState) map[string]error {
	d.wait(ctx, changed)
	d.mu.Lock()
	defer d.mu.Unlock()
	d.applies++
	for _, s := range changed {
		d.applied[s.Name]++
	}
	return d.set(changed, "apply")
}

func (d *fakeDriver) Sync(ctx context.Context, all []*render.ServiceState) map[string]error {
	d.wait(ctx, all)
	d.mu.Lock()
	defer d.mu.Unlock()
	d.syncs++
	want := map[string]bool{}
	for _, s := range all {
		want[s.Name] = true
	}
	list := slices.Clone(all)
	for name := range d.held {
		if !want[name] {
			list = append(list, &render.ServiceState{Name: name})
		}
	}
	return d.set(list, "sync")
}

// wait blocks while any of the states' services is blocked.
func (d *fakeDriver) wait(ctx context.Context, states []*render.ServiceState) {
	for _, s := range states {
		d.mu.Lock()
		ch := d.block[s.Name]
		d.mu.Unlock()
		if ch != nil {
			select {
			case <-ch:
			case <-ctx.Done():
			}
		}
	}
}

// set holds or drops each state's part. d.mu is held.
func (d *fakeDriver) set(states []*render.ServiceState, kind string) map[string]error {
	errs := map[string]error{}
	for _, s := range states {
		part, ok := s.Part(d.part)
		if err := d.fail[s.Name]; err != nil {
			errs[s.Name] = err
			continue
		}
		old, had := d.held[s.Name]
		switch {
		case ok && (!had || fmt.Sprint(old) != fmt.Sprint(part)):
			d.held[s.Name] = part
			d.writes++
			d.journal.add(d.name, kind, s.Name, "set")
		case !ok && had:
			delete(d.held, s.Name)
			d.writes++
			d.journal.add(d.name, kind, s.Name, "drop")
		}
	}
	return errs
}

func (d *fakeDriver) Connections(context.Context, map[string]bool) (map[render.BackendRef]int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return maps.Clone(d.conns), nil
}

func (d *fakeDriver) holds(name string) (any, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.held[name]
	return p, ok
}

func (d *fakeDriver) setFail(name string, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err == nil {
		delete(d.fail, name)
	} else {
		d.fail[name] = err
	}
}

func (d *fakeDriver) setBlock(name string, ch chan struct{}) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.block[name] = ch
}

func (d *fakeDriver) counts() (applies, syncs, writes int, applied map[string]int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.applies, d.syncs, d.writes, maps.Clone(d.applied)
}

func (d *fakeDriver) reset() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.applies, d.syncs, d.writes = 0, 0, 0
	clear(d.applied)
}

// journal is the order in which drivers changed things.
type journal struct {
	mu      sync.Mutex
	entries []string
}

func (j *journal) add(driver, kind, service, what string) {
	if j == nil {
		return
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	j.entries = append(j.entries, driver+" "+what+" "+service)
}

func (j *journal) list() []string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return slices.Clone(j.entries)
}

// fakeStatus records the statuses the loop publishes.
type fakeStatus struct {
	mu   sync.Mutex
	sets int
	all  map[string]status.Status
}

func newFakeStatus() *fakeStatus { return &fakeStatus{all: map[string]status.Status{}} }

func (s *fakeStatus) Set(name string, st status.Status) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sets++
	s.all[name] = st
}

func (s *fakeStatus) Delete(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.all, name)
}

func (s *fakeStatus) get(name string) (status.Status, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, ok := s.all[name]
	return st, ok
}

// fakeHealth is a health checker whose answers the test sets.
type fakeHealth struct {
	// firstRound makes new backends pending until WaitSettled, which
	// reports them healthy: a checker's first round.
	firstRound bool

	mu      sync.Mutex
	state   map[render.BackendRef]render.Health
	set     map[string]int // SetService calls by service
	dirty   map[render.BackendRef]bool
	changed chan struct{}
}

func newFakeHealth() *fakeHealth {
	return &fakeHealth{state: map[render.BackendRef]render.Health{}, set: map[string]int{}, dirty: map[render.BackendRef]bool{}, changed: make(chan struct{}, 1)}
}

func (h *fakeHealth) SetService(name string, svc *spec.Service) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.set[name]++
	if svc == nil {
		return
	}
	for _, b := range svc.Backends {
		ref := render.BackendRef{Service: name, Addr: b.AddrPort()}
		if _, ok := h.state[ref]; !ok {
			h.state[ref] = render.Health{Healthy: !h.firstRound, Pending: h.firstRound}
		}
	}
}

func (h *fakeHealth) Changed() <-chan struct{} { return h.changed }

func (h *fakeHealth) TakeChanged() []render.BackendRef {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := slices.Collect(maps.Keys(h.dirty))
	clear(h.dirty)
	return out
}

func (h *fakeHealth) Backend(ref render.BackendRef) (render.Health, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	st, ok := h.state[ref]
	return st, ok
}

func (h *fakeHealth) WaitSettled(context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	for ref, st := range h.state {
		if st.Pending {
			h.state[ref] = render.Health{Healthy: true}
			h.dirty[ref] = true
		}
	}
	return nil
}

func (h *fakeHealth) flip(ref render.BackendRef, healthy bool) {
	h.mu.Lock()
	h.state[ref] = render.Health{Healthy: healthy}
	h.dirty[ref] = true
	h.mu.Unlock()
	select {
	case h.changed <- struct{}{}:
	default:
	}
}

// loop is an agent under test with its fakes.
type loop struct {
	t      *testing.T
	a      *Agent
	src    *fakeSource
	status *fakeStatus
	health *fakeHealth
	cancel context.CancelFunc
	done   chan struct{}
}

func testOptions() Options {
	return Options{Policy: Policy{Prefix: "/switchman"}, Debounce: time.Millisecond, MaxDelay: 10 * time.Millisecond, RetryMin: 20 * time.Millisecond, RetryMax: 200 * time.Millisecond, Resync: time.Hour}
}

// startLoop runs an agent over src with the given planes.
func startLoop(t testing.TB, src *fakeSource, planes []Plane, opts Options) *loop {
	return startLoopWith(t, src, planes, opts, newFakeHealth())
}

func startLoopWith(t testing.TB, src *fakeSource, planes []Plane, opts Options, h *fakeHealth) *loop {
	l := &loop{src: src, status: newFakeStatus(), health: h, done: make(chan struct{})}
	if tt, ok := t.(*testing.T); ok {
		l.t = tt
	}
	l.a = New(slog.New(slog.DiscardHandler), src, planes, l.status, l.health, nil, opts)
	ctx, cancel := context.WithCancel(context.Background())
	l.cancel = cancel
	go func() { _ = l.a.Run(ctx); close(l.done) }()
	t.Cleanup(l.stop)
	return l
}

func (l *loop) stop() {
	l.cancel()
	select {
	case <-l.done:
	case <-time.After(30 * time.Second):
		panic("agent did not stop within 30s")
	}
}

// eventually polls cond with a generous bound; cond returns what is still
// wrong, or "" when satisfied.
func eventually(t testing.TB, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	last := ""
	for time.Now().Before(deadline) {
		if last = cond(); last == "" {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatalf("%s: still not true after 60s: %s", what, last)
}

func (l *loop) wantState(name, state, errPart string) func() string {
	return func() string {
		st, ok := l.status.get(name)
		if !ok {
			return "no status for " + name
		}
		if st.State != state || !strings.Contains(st.Error, errPart) {
			return fmt.Sprintf("status of %s is %s %q, want %s containing %q", name, st.State, st.Error, state, errPart)
		}
		return ""
	}
}

func holds(d *fakeDriver, name string, want bool) func() string {
	return func() string {
		if _, ok := d.holds(name); ok != want {
			return fmt.Sprintf("%s holds %s: %v, want %v", d.name, name, ok, want)
		}
		return ""
	}
}

// def is a definition for VIP number n (10.<n/256>.<n%256>.1:80) with
// the given backends and extra fields.
func def(n int, extra string, backends ...string) string {
	var bs []string
	for _, b := range backends {
		bs = append(bs, fmt.Sprintf(`{"address":%q}`, b))
	}
	return fmt.Sprintf(`{"vip":"10.%d.%d.1","port":80,"drain":"0s",%s"backends":[%s]}`, n/256, n%256, extra, strings.Join(bs, ","))
}
