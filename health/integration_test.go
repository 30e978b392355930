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
	targets := TargetsFor(svc)
	if len(targets) != 2 {
		t.Fatalf("TargetsFor gave %d targets, want 2", len(targets))
	}
	up, down := targets[0].Key(), targets[1].Key()

	s := New(Options{})
	s.SetService(svc.Name, targets)
	startRun(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.WaitSettled(ctx); err != nil {
		t.Fatalf("WaitSettled: %v", err)
	}
	if u, d := status(t, s, up), status(t, s, down); !u.Healthy || d.Healthy {
		t.Fatalf("after the first round: up %+v, down %+v; want healthy and unhealthy", u, d)
	}

	// The listener goes away: unhealthy after fall (2) failed checks.
	l.Close()
	waitFor(t, "the closed listener's backend to turn unhealthy", func() bool {
		select {
		case <-s.Changed():
		case <-time.After(100 * time.Millisecond):
		}
		return !status(t, s, up).Healthy
	})
	if st := status(t, s, up); st.Failures < 2 || st.LastError == "" {
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
		return status(t, s, up).Healthy
	})
	if st := status(t, s, up); st.Successes < 2 || st.LastError != "" {
		t.Errorf("healthy with %d successes (error %q), want at least rise=2", st.Successes, st.LastError)
	}
	if status(t, s, down).Healthy {
		t.Error("the backend on a closed port turned healthy")
	}
}

// TestSchedulerCancelsPolledChecks: a tcp check waiting for an answer ends
// at once when its target is removed, and Run closes every socket when it
// returns.
func TestSchedulerCancelsPolledChecks(t *testing.T) {
	silent, ok := unanswered(t)
	if !ok {
		t.Skip("no SYN-dropping listener on this system")
	}
	inFlight := func(s *Scheduler) int {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.inFlight
	}
	h := spec.Health{Protocol: spec.HealthTCP, Interval: time.Hour, Timeout: 50 * time.Minute, Rise: 1, Fall: 1}
	s := New(Options{StartSpread: time.Millisecond})
	s.SetService("a", []Target{{Service: "a", Addr: silent, Health: h}})
	s.SetService("b", []Target{{Service: "b", Addr: silent, Health: h}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	waitFor(t, "both checks in flight", func() bool { return inFlight(s) == 2 })

	s.SetService("a", nil)
	waitFor(t, "the removed target's check to end", func() bool { return inFlight(s) == 1 })
	if st := status(t, s, Key{Service: "b", Addr: silent}); !st.Pending {
		t.Errorf("the other service's target: %+v, want still pending", st)
	}

	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return with a check in flight")
	}
	s.mu.Lock()
	p := s.poller
	s.mu.Unlock()
	if p != nil {
		t.Error("the poller is still set after Run returned")
	}
}

// TestSchedulerPolledChecksAtTheLimit: with more tcp targets due than the
// concurrency limit, the loop goes on checking all of them (checks on the
// poller end within the turn that started them, so no result comes later
// to wake the loop).
func TestSchedulerPolledChecksAtTheLimit(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	addr := addrOf(t, l.Addr())
	h := spec.Health{Protocol: spec.HealthTCP, Interval: 50 * time.Millisecond, Timeout: 40 * time.Millisecond, Rise: 1, Fall: 1}
	s := New(Options{MaxConcurrent: 2, StartSpread: time.Millisecond})
	var targets []Target
	for i := range 10 {
		// Distinct keys, one listener: health.port sends every check there.
		hp := h
		hp.Port = addr.Port()
		targets = append(targets, Target{Service: "web", Addr: netip.AddrPortFrom(addr.Addr(), uint16(20000+i)), Health: hp})
	}
	s.SetService("web", targets)
	startRun(t, s)
	waitFor(t, "every target checked 5 times", func() bool {
		for _, tg := range targets {
			if st := status(t, s, tg.Key()); st.Successes < 5 {
				return false
			}
		}
		return true
	})
}
