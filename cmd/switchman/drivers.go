package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/urfave/cli/v2"

	"github.com/switchman-lb/switchman/agent"
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

func driverFlags() []cli.Flag { return nil }

func buildDrivers(ctx context.Context, c *cli.Context, log *slog.Logger, reg prometheus.Registerer, dataDir string) (*driverSet, error) {
	set := &driverSet{runners: map[string]func(context.Context) error{}}
	for _, name := range c.StringSlice("drivers") {
		switch name {
		case "none":
		case "ipvs", "vip", "netfilter", "haproxy":
			log.Warn("driver not built yet", "driver", name)
		default:
			return nil, fmt.Errorf("--drivers: %q is not one of ipvs, vip, netfilter, haproxy, none", name)
		}
	}
	return set, nil
}
