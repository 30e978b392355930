package main

import (
	"context"
	"log/slog"

	"github.com/urfave/cli/v2"

	"github.com/switchman-lb/switchman/agent"
	"github.com/switchman-lb/switchman/drivers/haproxy"
	"github.com/switchman-lb/switchman/render"
)

// haproxyPlan renders the haproxy.cfg the agent would write with the
// default --haproxy-dir and spare slots, and what its http frontends read
// (routing maps, crt-lists) and which backend slots are in use.
func haproxyPlan(services []render.HAProxyService) (cfg, http []byte, err error) {
	return haproxy.Plan(haproxy.DefaultDir, services, 0)
}

func haproxyFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "haproxy-bin", Value: "haproxy", Usage: "haproxy binary the agent starts and supervises", EnvVars: env("haproxy-bin")},
		&cli.StringFlag{Name: "haproxy-dir", Value: haproxy.DefaultDir, Usage: "haproxy.cfg, sockets, pidfile and certificates from etcd", EnvVars: env("haproxy-dir")},
		&cli.StringFlag{Name: "haproxy-socket", Usage: "attach to a HAProxy someone else runs: its admin socket (the agent then neither starts nor supervises it)", EnvVars: env("haproxy-socket")},
		&cli.StringFlag{Name: "haproxy-master-socket", Usage: "with --haproxy-socket: the master CLI socket used to reload it", EnvVars: env("haproxy-master-socket")},
		&cli.IntFlag{Name: "haproxy-http-spare-slots", Value: render.DefaultHTTPSpareSlots, Usage: "spare backend slots per pool of mode http services: how many new http services HAProxy takes without a reload (a pool that runs out grows by as many again, in one reload)", EnvVars: env("haproxy-http-spare-slots")},
	}
}

// newHAProxy makes the HAProxy driver; HAProxy itself starts with the
// first HAProxy service. The driver is not closed when the agent stops:
// HAProxy (in its own process group) keeps serving through an agent restart,
// and the next agent adopts it without a reload.
func newHAProxy(c *cli.Context, log *slog.Logger, _ string) (agent.Driver, func(context.Context) error, func(), error) {
	d, err := haproxy.New(haproxy.Options{
		Bin: c.String("haproxy-bin"), Dir: c.String("haproxy-dir"),
		AttachSocket: c.String("haproxy-socket"), AttachMasterSocket: c.String("haproxy-master-socket"),
		HTTPSpareSlots: c.Int("haproxy-http-spare-slots"),
		Logger:         log,
	})
	if err != nil {
		return nil, nil, nil, err
	}
	return d, nil, nil, nil
}
