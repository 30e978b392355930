package health

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/spec"
)

// serveTCP accepts and closes connections on l until it is closed.
func serveTCP(l net.Listener) {
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}

// TestSchedulerEndToEnd runs the real scheduler with real TCP checks
// against a loopback listener that goes away and comes back.
func TestSchedulerEndToEnd(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveTCP(l)
	addr := addrOf(t, l.Addr())
	svc := &spec.Service{
		Name: "web",
		Backends: []spec.Backend{
			{Address: addr.Addr(), Port: addr.Port(), Weight: 1},
			{Address: netip.MustParseAddr("127.0.0.1"), Port: closedPort(t, "tcp").Port(), Weight: 1},
		},
		Health: spec.Health{Protocol: spec.HealthTCP, Interval: 100 * time.Millisecond, Timeout: 50 * time.Millisecond, Rise: 2, Fall: 2},
	}
	targets := TargetsFor([]*spec.Service{svc})
	if len(targets) != 2 {
		t.Fatalf("TargetsFor gave %d targets, want 2", len(targets))
	}
	up, down := targets[0].Key(), targets[1].Key()

	s := New(Options{})
	s.Update(targets)
	startRun(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.WaitSettled(ctx); err != nil {
		t.Fatalf("WaitSettled: %v", err)
	}
	snap := s.Snapshot()
	if !snap[up].Healthy || snap[down].Healthy {
		t.Fatalf("after the first round: up %+v, down %+v; want healthy and unhealthy", snap[up], snap[down])
	}

	// The listener goes away: unhealthy after fall (2) failed checks.
	l.Close()
	waitFor(t, "the closed listener's backend to turn unhealthy", func() bool {
		select {
		case <-s.Changed():
		case <-time.After(100 * time.Millisecond):
		}
		return !s.Snapshot()[up].Healthy
	})
	if st := s.Snapshot()[up]; st.Failures < 2 || st.LastError == "" {
		t.Errorf("unhealthy with %d failures (error %q), want at least fall=2 and an error", st.Failures, st.LastError)
	}

	// It comes back on the same port: healthy after rise (2) successes.
	l2, err := net.Listen("tcp", addr.String())
	if err != nil {
		t.Fatalf("reopening %s: %v", addr, err)
	}
	defer l2.Close()
	serveTCP(l2)
	waitFor(t, "the reopened listener's backend to turn healthy", func() bool {
		select {
		case <-s.Changed():
		case <-time.After(100 * time.Millisecond):
		}
		return s.Snapshot()[up].Healthy
	})
	if st := s.Snapshot()[up]; st.Successes < 2 || st.LastError != "" {
		t.Errorf("healthy with %d successes (error %q), want at least rise=2", st.Successes, st.LastError)
	}
	if s.Snapshot()[down].Healthy {
		t.Error("the backend on a closed port turned healthy")
	}
}
