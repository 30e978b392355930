package agent

import (
	"testing"

	"github.com/switchman-lb/switchman/render"
)

// TestRestartKeepsGuardedServices: after a restart, a service with a
// filter (allow_cidrs) that the exposing driver still holds from the
// previous run is never dropped by that driver's first Sync. (The guard's
// report handed it to the exposing driver as an Apply, and the first Sync
// of that driver then went out without it: HAProxy reloaded without the
// frontend, IPVS would delete the virtual service; a package upgrade
// dropped connections.)
func TestRestartKeepsGuardedServices(t *testing.T) {
	src := newFakeSource()
	src.put("guarded", def(1, `"allow_cidrs":["10.0.0.0/8"],`, "10.200.0.1"))
	src.put("open", def(2, "", "10.200.0.1"))
	j := &journal{}
	ipvs := newFakeDriver("ipvs", render.PartIPVS, j)
	nf := newFakeDriver("netfilter", render.PartNetfilter, j)

	// What the previous agent left: both services in the kernel.
	first := startLoop(t, src, []Plane{ipvsPlane(ipvs), {Driver: nf, Part: render.PartNetfilter, Guard: true}}, testOptions())
	eventually(t, "guarded applied", first.wantState("guarded", "applied", ""))
	eventually(t, "open applied", first.wantState("open", "applied", ""))
	first.stop()
	before := len(j.list())

	var r readyCounter
	again := startLoop(t, src, []Plane{ipvsPlane(ipvs), {Driver: nf, Part: render.PartNetfilter, Guard: true}}, r.options())
	eventually(t, "restarted agent ready", r.is(1))
	eventually(t, "guarded applied again", again.wantState("guarded", "applied", ""))
	if after := j.list()[before:]; len(after) != 0 {
		t.Fatalf("a restart with nothing changed made changes: %v", after)
	}
}
