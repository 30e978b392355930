package ipvs_test

import (
	"context"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/drivers/ipvs/ipvsfake"
	"github.com/switchman-lb/switchman/render"
)

// TestPassReadsOnlyChangedServices: between full resyncs a pass dumps the
// destinations of the services whose desired state changed, not of all;
// a full resync reads them all and repairs drift made behind its back.
func TestPassReadsOnlyChangedServices(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name       string
		fullResync time.Duration
		wantDumps  int // destination dumps in the pass after one weight change
		repaired   bool
	}{
		{"cached between resyncs", time.Hour, 1, false},
		{"every pass a full resync", time.Nanosecond, 3, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			k := ipvsfake.New()
			d, err := ipvs.New(ipvs.Config{Kernel: k, DataDir: t.TempDir(), CallTimeout: 2 * time.Second, FullResync: tc.fullResync})
			if err != nil {
				t.Fatal(err)
			}
			st := &render.State{IPVS: []render.L4Service{
				webService("a", vip4, 80, rdst(be1, 80, 1)),
				webService("b", vip4, 81, rdst(be1, 80, 1)),
				webService("c", vip4, 82, rdst(be1, 80, 1)),
			}}
			if errs := d.Sync(ctx, render.Split(st)); len(errs) != 0 {
				t.Fatal(errs)
			}
			// Someone changes b's weight behind the driver's back.
			bKey := key(ipvs.TCP, vip4, 81)
			obs := k.State()[bKey]
			drifted := obs.Destinations[0]
			drifted.Weight = 9
			if err := k.UpdateDestination(ctx, obs.Service, drifted); err != nil {
				t.Fatal(err)
			}
			k.ResetCounts()
			st.IPVS[0] = webService("a", vip4, 80, rdst(be1, 80, 5))
			if errs := d.Sync(ctx, render.Split(st)); len(errs) != 0 {
				t.Fatal(errs)
			}
			if got := k.Calls(ipvsfake.Destinations); got != tc.wantDumps {
				t.Errorf("destination dumps %d, want %d", got, tc.wantDumps)
			}
			if got := k.State()[key(ipvs.TCP, vip4, 80)].Destinations[0].Weight; got != 5 {
				t.Errorf("a's weight %d, want 5", got)
			}
			if got := k.State()[bKey].Destinations[0].Weight; (got == 1) != tc.repaired {
				t.Errorf("b's drifted weight is %d; repaired should be %v", got, tc.repaired)
			}
		})
	}
}
