package ipvs_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/drivers/ipvs/ipvsfake"
	"github.com/switchman-lb/switchman/render"
)

// threeServices is a, b and c on vip4 ports 80-82, each with be1:80 at
// weight 1.
func threeServices() *render.State {
	return &render.State{IPVS: []render.L4Service{
		webService("a", vip4, 80, rdst(be1, 80, 1)),
		webService("b", vip4, 81, rdst(be1, 80, 1)),
		webService("c", vip4, 82, rdst(be1, 80, 1)),
	}}
}

// setWeight changes the weight of the first destination of the service
// on vip4:port behind the driver's back.
func setWeight(t *testing.T, k *ipvsfake.Kernel, port uint16, w int) {
	t.Helper()
	obs := k.State()[key(ipvs.TCP, vip4, port)]
	dst := obs.Destinations[0]
	dst.Weight = w
	if err := k.UpdateDestination(context.Background(), obs.Service, dst); err != nil {
		t.Fatal(err)
	}
}

func weightOf(k *ipvsfake.Kernel, port uint16) int {
	return k.State()[key(ipvs.TCP, vip4, port)].Destinations[0].Weight
}

func readBacks(d *ipvs.Driver) uint64 {
	done, _ := d.ReadBacks()
	return done
}

// waitReadBacks waits until the driver has completed n read-backs.
func waitReadBacks(t *testing.T, d *ipvs.Driver, n uint64) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		done := readBacks(d)
		if done >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d read-backs completed, want %d", done, n)
		}
	}
}

// TestPassReadsOnlyChangedServices: a pass dumps the destinations of the
// services whose desired state changed, not of all, and trusts the rest
// (no read-back is due within FullResync).
func TestPassReadsOnlyChangedServices(t *testing.T) {
	ctx := context.Background()
	k := ipvsfake.New()
	d, err := ipvs.New(ipvs.Config{Kernel: k, DataDir: t.TempDir(), CallTimeout: 2 * time.Second, FullResync: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	st := threeServices()
	if errs := d.Sync(ctx, render.Split(st)); len(errs) != 0 {
		t.Fatal(errs)
	}
	setWeight(t, k, 81, 9) // behind the driver's back
	k.ResetCounts()
	st.IPVS[0] = webService("a", vip4, 80, rdst(be1, 80, 5))
	if errs := d.Sync(ctx, render.Split(st)); len(errs) != 0 {
		t.Fatal(errs)
	}
	if got := k.Calls(ipvsfake.Destinations); got != 1 {
		t.Errorf("destination dumps %d, want 1 (a's)", got)
	}
	if got := weightOf(k, 80); got != 5 {
		t.Errorf("a's weight %d, want 5", got)
	}
	if got, done := weightOf(k, 81), readBacks(d); got != 9 || done != 0 {
		t.Errorf("b's drifted weight %d and %d read-backs; want 9 and none before FullResync", got, done)
	}
}

// TestReadBackRepairsDrift: every FullResync a Sync starts a read-back of
// the services it trusted; the Sync after it re-reads, and repairs, only
// the services the read-back found different.
func TestReadBackRepairsDrift(t *testing.T) {
	ctx := passCtx(context.Background())
	k := ipvsfake.New()
	w := &watchedKernel{Kernel: k}
	d, err := ipvs.New(ipvs.Config{Kernel: w, DataDir: t.TempDir(), CallTimeout: 2 * time.Second, FullResync: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	all := render.Split(threeServices())
	for i, tt := range []struct {
		what      string
		before    func()
		readBacks uint64 // completed before before and the Sync
		dumps     int    // destination dumps by the Sync itself
		bWeight   int    // after the Sync
	}{
		{"the first Sync creates, trusts nothing yet", func() {}, 0, 0, 1},
		{"a Sync trusting all starts a read-back", func() {}, 0, 0, 1},
		{"drift after the read-back: not seen yet", func() { setWeight(t, k, 81, 9) }, 1, 0, 9},
		{"the next read-back saw it: b read and repaired", func() {}, 2, 1, 1},
	} {
		waitReadBacks(t, d, tt.readBacks)
		tt.before()
		w.passDumps()
		if errs := d.Sync(ctx, all); len(errs) != 0 {
			t.Fatalf("%s: %v", tt.what, errs)
		}
		if dumps := w.passDumps(); dumps != tt.dumps {
			t.Errorf("step %d, %s: the Sync made %d destination dumps, want %d", i, tt.what, dumps, tt.dumps)
		}
		if w := weightOf(k, 81); w != tt.bWeight {
			t.Errorf("step %d, %s: b's weight %d, want %d", i, tt.what, w, tt.bWeight)
		}
	}
}

// passKey marks the context of a pass the test makes, so that the
// destination dumps of the pass are told from those of a read-back
// running beside it (which has a context of its own).
type passKey struct{}

func passCtx(ctx context.Context) context.Context { return context.WithValue(ctx, passKey{}, true) }

// watchedKernel counts the destination dumps made under a pass's context
// and, with tokens, lets one Destinations call through per token (all
// once tokens is closed).
type watchedKernel struct {
	*ipvsfake.Kernel
	tokens chan struct{} // nil: no gate
	mu     sync.Mutex
	dumps  int
}

func (w *watchedKernel) Destinations(ctx context.Context, s ipvs.Service) ([]ipvs.Destination, error) {
	if ctx.Value(passKey{}) != nil {
		w.mu.Lock()
		w.dumps++
		w.mu.Unlock()
	}
	if w.tokens != nil {
		select {
		case <-w.tokens:
		case <-ctx.Done():
			return nil, fmt.Errorf("gated: %w", ctx.Err())
		}
	}
	return w.Kernel.Destinations(ctx, s)
}

// passDumps returns the dumps passes made since the last call.
func (w *watchedKernel) passDumps() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := w.dumps
	w.dumps = 0
	return n
}

// TestReadBackDoesNotHoldPasses: while a read-back waits on the kernel,
// an Apply and a Sync go through; a service the Apply changed after the
// read-back read it looks different to the next Sync, which reads it
// again and writes nothing.
func TestReadBackDoesNotHoldPasses(t *testing.T) {
	fake := ipvsfake.New()
	g := &watchedKernel{Kernel: fake, tokens: make(chan struct{}, 1)}
	d, err := ipvs.New(ipvs.Config{Kernel: g, DataDir: t.TempDir(), CallTimeout: 20 * time.Second, FullResync: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	pass := func(what string, f func(context.Context) map[string]error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(passCtx(context.Background()), 5*time.Second)
		defer cancel()
		if errs := f(ctx); len(errs) != 0 {
			t.Fatalf("%s: %v", what, errs)
		}
	}
	st := threeServices()
	syncAll := func(ctx context.Context) map[string]error { return d.Sync(ctx, render.Split(st)) }
	pass("create", syncAll)
	g.tokens <- struct{}{} // the read-back reads a, then waits at b
	pass("the Sync starting the read-back", syncAll)
	for deadline := time.Now().Add(10 * time.Second); len(g.tokens) > 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the read-back did not read a")
		}
	}
	st.IPVS[0] = webService("a", vip4, 80, rdst(be1, 80, 5))
	pass("an Apply during the read-back", func(ctx context.Context) map[string]error {
		return d.Apply(ctx, render.Split(&render.State{IPVS: st.IPVS[:1]}))
	})
	pass("a Sync during the read-back", syncAll)
	if done := readBacks(d); done != 0 || weightOf(fake, 80) != 5 {
		t.Fatalf("%d read-backs done, a's weight %d: want the read-back still waiting and a at 5", done, weightOf(fake, 80))
	}
	close(g.tokens)
	waitReadBacks(t, d, 1)
	fake.ResetCounts()
	g.passDumps()
	pass("the Sync after the read-back", syncAll)
	if dumps, writes := g.passDumps(), fake.Writes(); dumps != 1 || writes != 0 || weightOf(fake, 80) != 5 {
		t.Errorf("after the read-back: %d dumps, %d writes, a's weight %d; want a read again (1 dump), nothing written, weight 5", dumps, writes, weightOf(fake, 80))
	}
}

// TestFailingServiceKeepsOthersTrusted: a service refused on every pass (a
// foreign service holds its address) is read again each time, the others
// are not: one bad definition must not make every Sync read them all.
func TestFailingServiceKeepsOthersTrusted(t *testing.T) {
	ctx := context.Background()
	k := ipvsfake.New()
	if err := k.AddService(ctx, svc(vip4, 83, "rr")); err != nil {
		t.Fatal(err)
	}
	d, err := ipvs.New(ipvs.Config{Kernel: k, DataDir: t.TempDir(), CallTimeout: 2 * time.Second, FullResync: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	st := threeServices()
	st.IPVS = append(st.IPVS, webService("taken", vip4, 83, rdst(be1, 80, 1)))
	for i := range 3 {
		k.ResetCounts()
		errs := d.Sync(ctx, render.Split(st))
		var foreign *ipvs.ForeignServiceError
		if len(errs) != 1 || !errors.As(errs["taken"], &foreign) {
			t.Fatalf("Sync %d: %v, want taken refused as foreign", i, errs)
		}
		if dumps := k.Calls(ipvsfake.Destinations); i > 0 && dumps != 0 {
			t.Errorf("Sync %d made %d destination dumps, want none: a, b and c are trusted", i, dumps)
		}
	}
}
