package agent

import (
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/render"
)

// readyCounter counts calls of Options.Ready.
type readyCounter struct{ n atomic.Int32 }

func (r *readyCounter) options() Options {
	o := testOptions()
	o.Ready = func() { r.n.Add(1) }
	o.Resync = 20 * time.Millisecond // periodic Syncs must not call it again
	return o
}

func (r *readyCounter) is(want int32) func() string {
	return func() string {
		if n := r.n.Load(); n != want {
			return fmt.Sprintf("Ready called %d times, want %d", n, want)
		}
		return ""
	}
}

func TestReadyOnceEveryDriverSynced(t *testing.T) {
	tests := []struct {
		name string
		// fail makes the exposing driver refuse the service: the first
		// pass is still done (the service is failed and retried).
		fail bool
	}{
		{name: "applied"},
		{name: "a driver refused the service", fail: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := newFakeSource()
			src.put("s1", def(1, "", "10.200.0.1"))
			ipvs := newFakeDriver("ipvs", render.PartIPVS, nil)
			nf := newFakeDriver("netfilter", render.PartNetfilter, nil)
			if tc.fail {
				ipvs.setFail("s1", syscall.EEXIST)
			}
			release := make(chan struct{})
			ipvs.setBlock("s1", release)
			var r readyCounter
			l := startLoop(t, src, []Plane{ipvsPlane(ipvs), {Driver: nf, Part: render.PartNetfilter, Guard: true}}, r.options())

			// The guard reported, the exposing driver is still in its
			// first Sync: not ready.
			eventually(t, "netfilter synced", func() string {
				if _, syncs, _, _ := nf.counts(); syncs != 1 {
					return "netfilter has not synced"
				}
				return ""
			})
			deadline := time.Now().Add(100 * time.Millisecond)
			for time.Now().Before(deadline) {
				if r.n.Load() != 0 {
					t.Fatal("Ready called while the ipvs driver's first Sync had not reported")
				}
				time.Sleep(time.Millisecond)
			}
			close(release)
			eventually(t, "ready", r.is(1))
			want := "applied"
			if tc.fail {
				want = "failed"
			}
			eventually(t, "status", l.wantState("s1", want, ""))

			// Later passes (a change, retries of a failed service, the
			// periodic Syncs) do not call it again.
			src.put("s1", def(1, "", "10.200.0.2"))
			eventually(t, "later passes", func() string {
				if _, syncs, _, _ := ipvs.counts(); syncs < 4 {
					return fmt.Sprintf("%d Syncs of ipvs so far", syncs)
				}
				return ""
			})
			if n := r.n.Load(); n != 1 {
				t.Fatalf("Ready called %d times, want once", n)
			}
		})
	}
}

func TestReadyWithoutDrivers(t *testing.T) {
	src := newFakeSource()
	src.put("s1", def(1, "", "10.200.0.1"))
	var r readyCounter
	startLoop(t, src, nil, r.options())
	eventually(t, "ready", r.is(1))
}
