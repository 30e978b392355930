package ipvs_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"syscall"
	"testing"

	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/drivers/ipvs/ipvsfake"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// oneByOne hides the fake's ApplyBatch: the driver then writes one op per
// call, as with a kernel that cannot batch.
type oneByOne struct{ ipvs.Kernel }

// bothWays runs f with the driver writing one op at a time and in batches.
func bothWays(t *testing.T, f func(t *testing.T, k *ipvsfake.Kernel, kernel ipvs.Kernel, batched bool)) {
	for _, batched := range []bool{false, true} {
		name := "one by one"
		if batched {
			name = "batched"
		}
		t.Run(name, func(t *testing.T) {
			k := ipvsfake.New()
			var kernel ipvs.Kernel = oneByOne{k}
			if batched {
				kernel = k
			}
			f(t, k, kernel, batched)
			if got := k.Calls(ipvsfake.ApplyBatch); (got > 0) != batched {
				t.Errorf("%d batches, batched=%v", got, batched)
			}
		})
	}
}

func TestBatchedPassesMatchOneByOne(t *testing.T) {
	be4 := netip.MustParseAddr("192.0.2.204")
	steps := [][]render.L4Service{
		{ // cold start
			webService("a", vip4, 80, rdst(be1, 80, 1), rdst(be2, 80, 2)),
			webService("b", vip4, 81, rdst(be1, 80, 1)),
			webService("c", vip6, 443, rdst(netip.MustParseAddr("2001:db8::7"), 8443, 1)),
		},
		{ // a weight, a backend in and one out, a scheduler, a removal, a new one
			webService("a", vip4, 80, rdst(be1, 80, 5), rdst(be3, 80, 1)),
			func() render.L4Service {
				s := webService("b", vip4, 81, rdst(be1, 80, 1), rdst(be4, 80, 1))
				s.Scheduler = spec.WeightedLeastConnection
				return s
			}(),
			webService("d", vip4, 82, rdst(be2, 80, 1)),
		},
		{}, // everything goes
	}
	wantWrites := []int{1 + 2 + 1 + 1 + 1 + 1, 3 + 2 + 1 + 2, 3}
	bothWays(t, func(t *testing.T, k *ipvsfake.Kernel, kernel ipvs.Kernel, _ bool) {
		d := newDriver(t, kernel, t.TempDir())
		for i, st := range steps {
			k.ResetCounts()
			if errs := d.Sync(context.Background(), render.Split(&render.State{IPVS: st})); len(errs) != 0 {
				t.Fatalf("step %d: %v", i, errs)
			}
			checkState(t, k, st)
			if k.Writes() != wantWrites[i] {
				t.Errorf("step %d: %d writes, want %d", i, k.Writes(), wantWrites[i])
			}
		}
	})
}

// TestRefusalInABatchFailsOnlyItsService: writes the kernel refuses in the
// middle of a batch fail exactly the services they belong to. A service
// whose creation is refused gets no destination writes at all.
func TestRefusalInABatchFailsOnlyItsService(t *testing.T) {
	bothWays(t, func(t *testing.T, k *ipvsfake.Kernel, kernel ipvs.Kernel, batched bool) {
		badWeight := webService("badweight", vip4, 81, rdst(be1, 80, 1), rdst(be2, 80, 70000), rdst(be3, 80, 1))
		badSched := webService("badsched", vip4, 83, rdst(be1, 80, 1), rdst(be2, 80, 1))
		badSched.Scheduler = "nosuch" // no ip_vs_nosuch module: ENOENT
		good := []render.L4Service{
			webService("a", vip4, 80, rdst(be1, 80, 1), rdst(be2, 80, 1)),
			webService("c", vip4, 82, rdst(be1, 80, 1)),
			webService("e", vip4, 84, rdst(be3, 80, 1)),
		}
		st := &render.State{IPVS: []render.L4Service{good[0], badWeight, good[1], badSched, good[2]}}
		d := newDriver(t, kernel, t.TempDir())
		errs := d.Sync(context.Background(), render.Split(st))
		if len(errs) != 2 || !errors.Is(errs["badweight"], syscall.ERANGE) || !errors.Is(errs["badsched"], syscall.ENOENT) {
			t.Fatalf("errors %v, want only badweight (ERANGE) and badsched (ENOENT)", errs)
		}
		state := k.State()
		for _, w := range good {
			if _, ok := state[key(ipvs.TCP, w.Address, w.Port)]; !ok {
				t.Errorf("%s missing", w.Service)
			}
		}
		checkState(t, k, good, key(ipvs.TCP, vip4, 81)) // badweight's service was created
		if _, ok := state[key(ipvs.TCP, vip4, 83)]; ok {
			t.Error("badsched exists")
		}
		// 4 destinations of the good services, 3 of badweight at most
		// (one by one, the one after the refused one is skipped), none of
		// badsched.
		adds := k.Calls(ipvsfake.AddDestination)
		if want := map[bool]int{false: 4 + 2, true: 4 + 3}[batched]; adds != want {
			t.Errorf("%d destination adds, want %d", adds, want)
		}
		if batched && k.Calls(ipvsfake.ApplyBatch) != 2 {
			t.Errorf("%d batches, want 2 (services, then destinations)", k.Calls(ipvsfake.ApplyBatch))
		}
		if _, owned := d.Owned()[key(ipvs.TCP, vip4, 83)]; owned {
			t.Error("badsched recorded as owned")
		}
		// The next pass repairs what can be repaired and fails the rest
		// the same way.
		k.ResetCounts()
		errs = d.Sync(context.Background(), render.Split(st))
		if len(errs) != 2 {
			t.Errorf("second pass: %v", errs)
		}
	})
}

// TestBatchesAreBounded: a pass larger than BatchSize goes in several
// batches per phase, each with its own call time-out.
func TestBatchesAreBounded(t *testing.T) {
	k := ipvsfake.New()
	d := newDriver(t, k, t.TempDir())
	n := ipvs.BatchSize + 10
	st := &render.State{}
	for i := range n {
		v := netip.AddrFrom4([4]byte{198, 18, byte(i / 250), byte(i%250 + 1)})
		st.IPVS = append(st.IPVS, webService(fmt.Sprintf("s%d", i), v, 80, rdst(be1, 80, 1)))
	}
	if errs := d.Sync(context.Background(), render.Split(st)); len(errs) != 0 {
		t.Fatalf("%d errors", len(errs))
	}
	if got := k.Calls(ipvsfake.ApplyBatch); got != 4 {
		t.Errorf("%d batches, want 4 (two per phase)", got)
	}
	if len(k.State()) != n || d.Writes() != uint64(2*n) {
		t.Errorf("%d services, %d writes; want %d, %d", len(k.State()), d.Writes(), n, 2*n)
	}
}

// lostAcks is a Batcher whose acknowledgements of service creations are
// lost (ENOBUFS): the writes took effect but the driver cannot know.
type lostAcks struct{ *ipvsfake.Kernel }

func (l lostAcks) ApplyBatch(ctx context.Context, ops []ipvs.Op) []error {
	out := l.Kernel.ApplyBatch(ctx, ops)
	for i, op := range ops {
		if op.Kind == ipvs.AddService {
			out[i] = fmt.Errorf("add service: %w", syscall.ENOBUFS)
		}
	}
	return out
}

func TestLostAcknowledgementKeepsTheRecord(t *testing.T) {
	k := ipvsfake.New()
	dir := t.TempDir()
	d := newDriver(t, lostAcks{k}, dir)
	st := &render.State{IPVS: []render.L4Service{webService("a", vip4, 80, rdst(be1, 80, 1))}}
	if errs := d.Sync(context.Background(), render.Split(st)); !errors.Is(errs["a"], syscall.ENOBUFS) {
		t.Fatalf("errors %v, want a failed with ENOBUFS", errs)
	}
	if _, ok := d.Owned()[key(ipvs.TCP, vip4, 80)]; !ok {
		t.Fatal("record dropped for a service whose creation may have worked")
	}
	// The next pass (acknowledgements fine again) adopts it as its own.
	if errs := newDriver(t, k, dir).Sync(context.Background(), render.Split(st)); len(errs) != 0 {
		t.Fatal(errs)
	}
	checkState(t, k, st.IPVS)
}
