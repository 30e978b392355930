package main

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/urfave/cli/v2"

	"github.com/switchman-lb/switchman/agent"
	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/drivers/netfilter"
	"github.com/switchman-lb/switchman/drivers/vip"
	"github.com/switchman-lb/switchman/health"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// driverSet is what buildDrivers made: the drivers in apply order, the
// health checker, and goroutines to run beside the loop.
type driverSet struct {
	drivers []agent.Driver
	health  agent.HealthSource
	runners map[string]func(context.Context) error
	closers []func()
}

func (s *driverSet) names() []string {
	out := make([]string, len(s.drivers))
	for i, d := range s.drivers {
		out[i] = d.Name()
	}
	return out
}

func (s *driverSet) close() {
	for _, f := range s.closers {
		f()
	}
}

func driverFlags() []cli.Flag {
	return append([]cli.Flag{
		&cli.StringFlag{Name: "vip-interface", Value: vip.DefaultInterface, Usage: "dummy interface that holds the VIPs", EnvVars: env("vip-interface")},
		&cli.IntFlag{Name: "health-concurrency", Value: health.DefaultMaxConcurrent, Usage: "health checks running at once at most", EnvVars: env("health-concurrency")},
	}, haproxyFlags()...)
}

// buildDrivers makes the drivers named by --drivers, in the order that
// works: VIPs first (HAProxy binds to them), then IPVS, netfilter, HAProxy.
func buildDrivers(ctx context.Context, c *cli.Context, log *slog.Logger, reg prometheus.Registerer, dataDir string) (*driverSet, error) {
	set := &driverSet{runners: map[string]func(context.Context) error{}}
	want := map[string]bool{}
	for _, name := range c.StringSlice("drivers") {
		switch name {
		case "none":
		case "ipvs", "vip", "netfilter", "haproxy":
			want[name] = true
		default:
			return nil, fmt.Errorf("--drivers: %q is not one of ipvs, vip, netfilter, haproxy, none", name)
		}
	}
	if want["vip"] {
		links := vip.NewNetlink("")
		set.closers = append(set.closers, links.Close)
		d, err := vip.New(vip.Config{Links: links, Interface: c.String("vip-interface"), Logger: log.With("driver", "vip")})
		if err != nil {
			return nil, err
		}
		set.drivers = append(set.drivers, d)
	}
	if want["ipvs"] {
		kernel := ipvs.NewNetlink("")
		set.closers = append(set.closers, kernel.Close)
		d, err := ipvs.New(ipvs.Config{Kernel: kernel, DataDir: dataDir, Logger: log.With("driver", "ipvs")})
		if err != nil {
			return nil, err
		}
		set.drivers = append(set.drivers, d)
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name:        "switchman_dataplane_writes_total",
			Help:        "Changes the driver made to its data plane since the agent started.",
			ConstLabels: prometheus.Labels{"driver": "ipvs"},
		}, func() float64 { return float64(d.Writes()) }))
	}
	if want["netfilter"] {
		set.drivers = append(set.drivers, netfilter.New(log.With("driver", "netfilter")))
	}
	if want["haproxy"] {
		d, run, closeFn, err := newHAProxy(c, log.With("driver", "haproxy"), dataDir)
		if err != nil {
			return nil, err
		}
		set.drivers = append(set.drivers, d)
		if run != nil {
			set.runners["haproxy"] = run
		}
		if closeFn != nil {
			set.closers = append(set.closers, closeFn)
		}
	}
	sched := health.New(health.Options{Logger: log.With("component", "health"), Registerer: reg, MaxConcurrent: c.Int("health-concurrency")})
	set.health = &healthView{s: sched}
	set.runners["health"] = sched.Run
	return set, nil
}

// healthView adapts the health scheduler to the loop: it turns services
// into check targets and the scheduler's states into the render view.
type healthView struct {
	s     *health.Scheduler
	mu    sync.Mutex
	names map[string]bool // the services last set
}

// SetServices sets the targets of every service given and removes those
// of services no longer given.
func (h *healthView) SetServices(services []*spec.Service) {
	h.mu.Lock()
	defer h.mu.Unlock()
	next := make(map[string]bool, len(services))
	for _, svc := range services {
		next[svc.Name] = true
		h.s.SetService(svc.Name, health.TargetsFor(svc))
	}
	for name := range h.names {
		if !next[name] {
			h.s.SetService(name, nil)
		}
	}
	h.names = next
}

// View reports every checked backend; one still pending counts as down
// unless it was healthy before its settings changed.
func (h *healthView) View() map[render.BackendRef]agent.BackendHealth {
	snap := h.s.Snapshot()
	out := make(map[render.BackendRef]agent.BackendHealth, len(snap))
	for k, st := range snap {
		out[render.BackendRef(k)] = agent.BackendHealth{
			Healthy: st.Healthy, LastError: st.LastError, LastTransition: st.LastTransition,
			// A target restarted by a settings change keeps its state while
			// its first new check runs; only one with no state is pending.
			Pending: st.Pending && !st.Healthy,
		}
	}
	return out
}

func (h *healthView) Changed() <-chan struct{}              { return h.s.Changed() }
func (h *healthView) WaitSettled(ctx context.Context) error { return h.s.WaitSettled(ctx) }
