package main

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/urfave/cli/v2"

	"github.com/switchman-lb/switchman/agent"
	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/drivers/netfilter"
	"github.com/switchman-lb/switchman/drivers/nftables"
	"github.com/switchman-lb/switchman/drivers/vip"
	"github.com/switchman-lb/switchman/health"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// driverSet is what buildDrivers made: the planes the loop runs, the
// health checker, and goroutines to run beside the loop.
type driverSet struct {
	planes []agent.Plane
	// vip is the address holder (the HA elector's Holder), nil when the
	// vip driver does not run.
	vip *vip.Driver
	// sync is the IPVS connection sync, nil when the ipvs driver does
	// not run.
	sync    *ipvs.ConnSync
	health  agent.HealthSource
	runners map[string]func(context.Context) error
	closers []func()
}

func (s *driverSet) names() []string {
	out := make([]string, len(s.planes))
	for i, p := range s.planes {
		out[i] = p.Driver.Name()
	}
	return out
}

func (s *driverSet) close() {
	for _, f := range s.closers {
		f()
	}
}

// resolveL4 turns --l4-driver into the driver of definitions that name
// none: auto is ipvs when the kernel answers IPVS's netlink family (the
// ip_vs module is loaded on demand), nftables otherwise.
func resolveL4(ctx context.Context, flag string) (spec.Driver, string, error) {
	switch flag {
	case "ipvs":
		return spec.DriverIPVS, "--l4-driver ipvs", nil
	case "nftables":
		return spec.DriverNFTables, "--l4-driver nftables", nil
	case "auto", "":
		k := ipvs.NewNetlink("")
		defer k.Close()
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if _, err := k.Services(pctx); err != nil {
			return spec.DriverNFTables, fmt.Sprintf("--l4-driver auto: nftables, since IPVS is not usable here (%v)", err), nil
		}
		return spec.DriverIPVS, "--l4-driver auto: ipvs, the kernel has IPVS", nil
	}
	return "", "", fmt.Errorf("--l4-driver: %q is not auto, ipvs or nftables", flag)
}

func driverFlags() []cli.Flag {
	return append([]cli.Flag{
		&cli.StringFlag{Name: "vip-interface", Value: vip.DefaultInterface, Usage: "dummy interface that holds the VIPs without --ha-interface (lo when the kernel cannot create dummy interfaces)", EnvVars: env("vip-interface")},
		&cli.IntFlag{Name: "health-concurrency", Value: health.DefaultMaxConcurrent, Usage: "health checks running at once at most", EnvVars: env("health-concurrency")},
	}, append(haproxyFlags(), ipvsSyncFlags()...)...)
}

// buildDrivers makes the drivers named by --drivers, each a plane of the
// loop serving one part of every service's state; netfilter is the guard
// (a service's filter is in force before the others expose it).
func buildDrivers(ctx context.Context, c *cli.Context, log *slog.Logger, reg prometheus.Registerer, dataDir string, h haConfig) (*driverSet, error) {
	set := &driverSet{runners: map[string]func(context.Context) error{}}
	want, err := wantedDrivers(c.StringSlice("drivers"))
	if err != nil {
		return nil, err
	}
	syncSettings, err := syncFromFlags(c)
	if err != nil {
		return nil, err
	}
	if syncSettings != nil && !want["ipvs"] {
		return nil, fmt.Errorf("--ipvs-sync-interface %s needs the ipvs driver (add ipvs to --drivers)", syncSettings.Interface)
	}
	if h.Interface != "" && !want["vip"] {
		return nil, fmt.Errorf("--ha-interface %s needs the vip driver, which holds the addresses of the groups this agent owns (add vip to --drivers)", h.Interface)
	}
	if want["vip"] {
		links := vip.NewNetlink("")
		d, err := vip.New(vip.Config{Links: links, Interface: c.String("vip-interface"), HAInterface: h.Interface,
			Lifetime: h.Lifetime, StateDir: dataDir, Logger: log.With("driver", "vip")})
		if err != nil {
			links.Close()
			return nil, err
		}
		set.closers = append(set.closers, d.Close, links.Close)
		set.planes = append(set.planes, agent.Plane{Driver: d, Part: render.PartVIP})
		set.runners["vip"] = d.Run
		set.vip = d
	}
	if want["ipvs"] {
		kernel := ipvs.NewNetlink("")
		set.closers = append(set.closers, kernel.Close)
		d, err := ipvs.New(ipvs.Config{Kernel: kernel, DataDir: dataDir, Logger: log.With("driver", "ipvs"), FullResync: c.Duration("resync"), ConnSync: syncSettings != nil})
		if err != nil {
			return nil, err
		}
		cs, closeSync, err := newConnSync(ctx, syncSettings, d, dataDir, log.With("component", "ipvs-sync"), reg)
		if err != nil {
			return nil, err
		}
		set.closers = append(set.closers, closeSync)
		set.sync = cs
		set.runners["ipvs-sync"] = cs.Run
		set.planes = append(set.planes, agent.Plane{Driver: d, Part: render.PartIPVS})
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name:        "switchman_dataplane_writes_total",
			Help:        "Changes the driver made to its data plane since the agent started.",
			ConstLabels: prometheus.Labels{"driver": "ipvs"},
		}, func() float64 { return float64(d.Writes()) }))
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "switchman_ipvs_readbacks_total",
			Help: "Background read-backs of the IPVS services' destinations completed (one every --resync).",
		}, func() float64 { done, _ := d.ReadBacks(); return float64(done) }))
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "switchman_ipvs_readback_seconds",
			Help: "How long the last background read-back of the IPVS services' destinations took.",
		}, func() float64 { _, last := d.ReadBacks(); return last.Seconds() }))
	}
	if want["nftables"] {
		kernel := nftables.NewNetlink(-1)
		d, err := nftables.New(nftables.Config{Kernel: kernel, Logger: log.With("driver", "nftables")})
		if err != nil {
			return nil, err
		}
		set.planes = append(set.planes, agent.Plane{Driver: d, Part: render.PartNFTables})
		if h.Interface != "" {
			warnHAConntrack(log.With("driver", "nftables"), "/proc/sys")
		}
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name:        "switchman_dataplane_writes_total",
			Help:        "Changes the driver made to its data plane since the agent started.",
			ConstLabels: prometheus.Labels{"driver": "nftables"},
		}, func() float64 { return float64(d.Writes()) }))
	}
	if want["netfilter"] {
		set.planes = append(set.planes, agent.Plane{Driver: netfilter.New(log.With("driver", "netfilter")), Part: render.PartNetfilter, Guard: true})
	}
	if want["haproxy"] {
		d, run, closeFn, err := newHAProxy(c, log.With("driver", "haproxy"), dataDir)
		if err != nil {
			return nil, err
		}
		set.planes = append(set.planes, agent.Plane{Driver: d, Part: render.PartHAProxy})
		if run != nil {
			set.runners["haproxy"] = run
		}
		if closeFn != nil {
			set.closers = append(set.closers, closeFn)
		}
	}
	sched := health.New(health.Options{Logger: log.With("component", "health"), Registerer: reg, MaxConcurrent: c.Int("health-concurrency")})
	set.health = health.NewView(sched)
	set.runners["health"] = sched.Run
	return set, nil
}
