// Package agent runs switchman's reconcile loop: it keeps the last good
// version of every service, resolves conflicts, renders the desired state,
// hands it to each driver and records the outcome per service.
package agent

import (
	"context"

	"github.com/switchman-lb/switchman/render"
)

// Driver programs one data plane (IPVS, HAProxy, netfilter, VIPs).
type Driver interface {
	// Name names the driver in logs and status, e.g. "ipvs".
	Name() string
	// Apply makes the system match desired, changing only what differs,
	// and returns the services it could not program with the reason. A
	// driver whose system is missing returns an error for each service it
	// serves that says what is missing and how to fix it.
	Apply(ctx context.Context, desired *render.State) map[string]error
}
