package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/urfave/cli/v2"

	"github.com/switchman-lb/switchman/agent"
	"github.com/switchman-lb/switchman/ha"
	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/status"
	"github.com/switchman-lb/switchman/watcher"
	"github.com/switchman-lb/switchman/watcher/embedded"
)

func agentCommand() *cli.Command {
	hostname, _ := os.Hostname()
	flags := append(etcdFlags("etcd client URLs; when none is given, the agent starts an embedded single-node etcd (--embedded-etcd-client-url)"),
		&cli.StringFlag{Name: "node", Value: hostname, DefaultText: "the hostname", Usage: "this host's name in status keys", EnvVars: env("node")},
		&cli.StringFlag{Name: "data-dir", Value: "/var/lib/switchman", Usage: "state files and the embedded etcd's data", EnvVars: env("data-dir")},
		&cli.StringFlag{Name: "embedded-etcd-client-url", Value: "http://127.0.0.1:2379", Usage: "client URL of the embedded etcd (used when no --etcd-endpoints)", EnvVars: env("embedded-etcd-client-url")},
		&cli.StringFlag{Name: "embedded-etcd-peer-url", Value: "http://127.0.0.1:2380", Usage: "peer URL of the embedded etcd", EnvVars: env("embedded-etcd-peer-url")},
		&cli.BoolFlag{Name: "embedded-etcd-allow-remote", Usage: "let the embedded etcd listen on addresses other than loopback; it has no TLS and no authentication, so whoever reaches it controls this load balancer", EnvVars: env("embedded-etcd-allow-remote")},
		&cli.StringFlag{Name: "metrics-addr", Value: "127.0.0.1:9469", Usage: "Prometheus /metrics listen address; empty disables", EnvVars: env("metrics-addr")},
		&cli.StringSliceFlag{Name: "vip-cidrs", Usage: "ranges VIPs must fall in (default: any, with a warning)", EnvVars: env("vip-cidrs")},
		&cli.StringSliceFlag{Name: "backend-cidrs", Usage: "ranges backend addresses must fall in (default: any, with a warning)", EnvVars: env("backend-cidrs")},
		&cli.StringSliceFlag{Name: "drivers", Value: cli.NewStringSlice("ipvs", "nftables", "vip", "netfilter", "haproxy"), Usage: "data-plane drivers to run", EnvVars: env("drivers")},
		&cli.StringFlag{Name: "l4-driver", Value: "auto", Usage: "data plane of definitions that name no driver: auto (ipvs where the kernel has it, nftables otherwise), ipvs or nftables", EnvVars: env("l4-driver")},
		&cli.DurationFlag{Name: "lease-ttl", Value: 15 * time.Second, Usage: "TTL of the lease under which status and node keys are written", EnvVars: env("lease-ttl")},
		&cli.DurationFlag{Name: "resync", Value: 30 * time.Second, Usage: "how often every driver reads its data plane back and repairs drift (IPVS destinations are read in the background, and repaired by the next pass)", EnvVars: env("resync")},
	)
	flags = append(flags, driverFlags()...)
	flags = append(flags, haFlags()...)
	return &cli.Command{
		Name:   "agent",
		Usage:  "run the agent: watch etcd, program IPVS/HAProxy, check health, write status",
		Flags:  flags,
		Before: noArgs,
		Action: runAgent,
	}
}

func runAgent(c *cli.Context) error {
	log, err := newLogger(c)
	if err != nil {
		return err
	}
	notify := newNotifier() // before any child (HAProxy) is started
	ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	// Before anything waits for etcd.
	if _, err := wantedDrivers(c.StringSlice("drivers")); err != nil {
		return err
	}
	vipCIDRs, err := parsePrefixes("--vip-cidrs", c.StringSlice("vip-cidrs"))
	if err != nil {
		return err
	}
	if len(vipCIDRs) == 0 {
		log.Warn("any VIP is accepted: anyone who can write to etcd can make this host answer for any address; restrict with --vip-cidrs (e.g. --vip-cidrs 192.0.2.0/24)")
	}
	backendCIDRs, err := parsePrefixes("--backend-cidrs", c.StringSlice("backend-cidrs"))
	if err != nil {
		return err
	}
	if r := c.Duration("resync"); r < time.Second {
		return fmt.Errorf("--resync %s: must be at least 1s", r)
	}
	if len(backendCIDRs) == 0 {
		log.Warn("any backend address is accepted, loopback and link-local included: anyone who can write to etcd can expose this host's own services (such as etcd on 127.0.0.1:2379) through a VIP; restrict with --backend-cidrs (e.g. --backend-cidrs 10.0.0.0/8)")
	}
	node := c.String("node")
	if node == "" {
		return errors.New("--node is empty and the hostname is unknown")
	}
	haCfg, err := haFromFlags(c, interfaceAddrs)
	if err != nil {
		return err
	}
	dataDir := c.String("data-dir")
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return fmt.Errorf("--data-dir: %w", err)
	}

	conn := connOptions(c)
	if len(conn.Endpoints) == 0 {
		srv, err := embedded.Start(ctx, log, embedded.Options{
			Dir:       filepath.Join(dataDir, "etcd"),
			ClientURL: c.String("embedded-etcd-client-url"),
			PeerURL:   c.String("embedded-etcd-peer-url"),
			Name:      node,
			// Refused off loopback unless asked for: no TLS, no auth.
			AllowRemote: c.Bool("embedded-etcd-allow-remote"),
		})
		if err != nil {
			return err
		}
		defer srv.Close()
		conn.Endpoints = []string{srv.Endpoint}
	}
	cli, err := watcher.Connect(conn, log)
	if err != nil {
		return err
	}
	defer cli.Close()
	prefix := strings.TrimSuffix(c.String("prefix"), "/")
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	if err := watcher.Check(cctx, cli, prefix); err != nil {
		log.Error("etcd check failed; the agent keeps retrying", "error", err)
	}
	cancel()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := agent.NewMetrics(reg)

	set, err := buildDrivers(ctx, c, log, reg, dataDir, haCfg)
	if err != nil {
		return err
	}
	defer set.close()

	w := watcher.New(cli, log, watcher.Options{Prefix: prefix, OnRestart: metrics.WatchRestarted})
	pub, err := status.NewPublisher(cli, log, prefix, node, status.Node{Version: version, Drivers: set.names(), Started: time.Now().UTC()}, c.Duration("lease-ttl"))
	if err != nil {
		return err
	}
	reg.MustRegister(w.Collector(), pub.Collector())
	l4, why, err := resolveL4(ctx, c.String("l4-driver"))
	if err != nil {
		return err
	}
	log.Info("layer-4 driver for definitions that name none", "driver", l4, "why", why)
	lastGood, restored, err := agent.OpenLastGood(filepath.Join(dataDir, "lastgood"), log)
	if err != nil {
		return err
	}
	opts := agent.Options{
		Policy:   agent.Policy{Prefix: prefix, VIPCIDRs: vipCIDRs, BackendCIDRs: backendCIDRs, Spec: spec.Options{L4Driver: l4}},
		LastGood: lastGood, Restored: restored, Resync: c.Duration("resync"),
		Ready: func() {
			log.Info("first pass applied")
			if err := notify.ready("first pass applied; switchman status shows each service"); err != nil {
				log.Warn("tell systemd the agent is ready", "error", err)
			}
		},
	}
	var elector *ha.Elector
	if haCfg.Interface != "" {
		if elector, err = newElector(haCfg, cli, node, prefix, set.vip, pub.SetGroups, log, reg); err != nil {
			return err
		}
		opts.Groups = elector
	}
	loop := agent.New(log, w, set.planes, pub, set.health, metrics, opts)

	// The components run until the signal has been handled: on SIGTERM
	// the HA groups are handed over first, while everything else still
	// runs.
	runCtx, cancelRun := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelRun()
	var wg sync.WaitGroup
	run := func(name string, f func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(runCtx); err != nil && !errors.Is(err, context.Canceled) {
				log.Error("component stopped", "component", name, "error", err)
				stop()
			}
		}()
	}
	_ = notify.status("waiting for the first pass (etcd list, first health checks, every driver's first sync)")
	if elector != nil {
		run("ha", elector.Run)
	}
	run("watcher", w.Run)
	run("status", pub.Run)
	run("lastgood", lastGood.Run)
	if set.sync != nil {
		run("ipvs-sync-status", func(ctx context.Context) error { return publishSync(ctx, set.sync, pub.SetIPVSSync) })
	}
	run("loop", loop.Run)
	for name, f := range set.runners {
		run(name, f)
	}
	if addr := c.String("metrics-addr"); addr != "" {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			cancelRun()
			wg.Wait()
			return fmt.Errorf("--metrics-addr %s: %w", addr, err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = hs.Serve(ln) }()
		defer hs.Close()
		log.Info("serving metrics", "addr", ln.Addr().String())
	}
	log.Info("agent running", "node", node, "prefix", prefix, "etcd", conn.Endpoints, "drivers", set.names(), "ha_interface", haCfg.Interface, "ipvs_sync_interface", c.String("ipvs-sync-interface"))
	<-ctx.Done()
	_ = notify.stopping("stopping; the data plane stays in place")
	if elector != nil {
		release(runCtx, elector, log)
	}
	log.Info("shutting down; the data plane keeps its state")
	cancelRun()
	wg.Wait()
	return nil
}

// wantedDrivers reads --drivers: the set of drivers to run.
func wantedDrivers(names []string) (map[string]bool, error) {
	want := map[string]bool{}
	for _, name := range names {
		switch name {
		case "none":
		case "ipvs", "nftables", "vip", "netfilter", "haproxy":
			want[name] = true
		default:
			return nil, fmt.Errorf("--drivers: %q is not one of ipvs, nftables, vip, netfilter, haproxy, none", name)
		}
	}
	return want, nil
}

func parsePrefixes(flag string, list []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range list {
		for _, part := range strings.Split(s, ",") {
			part = strings.TrimSpace(part)
			if part == "" {
				continue
			}
			p, err := netip.ParsePrefix(part)
			if err != nil {
				return nil, fmt.Errorf("%s: %q is not a CIDR: %w", flag, part, err)
			}
			out = append(out, p.Masked())
		}
	}
	return out, nil
}
