package ipvs

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"
)

// TestNetlinkOnThisKernel talks to this machine's kernel: without IPVS (the
// build hosts) every call must say so with ErrUnavailable, repeatedly, with
// no crash; with IPVS (the lab VM) listing must work.
func TestNetlinkOnThisKernel(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to open a generic netlink IPVS handle")
	}
	n := NewNetlink("")
	defer n.Close()
	for range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := n.Services(ctx)
		cancel()
		if errors.Is(err, ErrUnavailable) {
			t.Logf("no IPVS here, as reported: %v", err)
			continue
		}
		if err != nil {
			t.Fatalf("list services: %v", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := n.AddService(ctx, Service{Protocol: TCP, Scheduler: "rr"})
	if err == nil {
		t.Error("adding a service without an address succeeded")
	}
}
