package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/urfave/cli/v2"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/switchman-lb/switchman/ha"
	"github.com/switchman-lb/switchman/spec"
)

// haReleaseTimeout bounds the hand-over on SIGTERM before the rest of the
// agent stops: the owner keys are deleted, the addresses dropped, the
// peers told, the lease revoked; with etcd unreachable it gives up and the
// peers take over when the lease runs out.
const haReleaseTimeout = 5 * time.Second

func haFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "ha-interface", Usage: "share the VIPs with other agents: hold the VIPs of the HA groups this agent owns on this interface (empty: this host holds every VIP itself)", EnvVars: env("ha-interface")},
		&cli.DurationFlag{Name: "ha-lease-ttl", Value: ha.DefaultLeaseTTL, Usage: "TTL of the HA lease: a dead owner is replaced within it (at least 2s, and 12 rounds)", EnvVars: env("ha-lease-ttl")},
		&cli.DurationFlag{Name: "ha-round", Value: ha.DefaultTiming().Round, Usage: "how often each agent reads its ownership from etcd and heartbeats its peers; the other HA timings scale with it (hold 4 rounds, silence 3, regain 20); raise it where etcd answers slower than a round", EnvVars: env("ha-round")},
		&cli.StringFlag{Name: "ha-listen", Usage: fmt.Sprintf("UDP address for the peers' heartbeats (default: the first address of --ha-interface, port %d)", ha.DefaultPort), EnvVars: env("ha-listen")},
		&cli.StringFlag{Name: "ha-advertise", Usage: "address:port the peers send heartbeats to (default: the listen address)", EnvVars: env("ha-advertise")},
		&cli.DurationFlag{Name: "ha-address-lifetime", Usage: "kernel lifetime of held addresses, renewed every third of it, so an agent killed on a living host loses them by itself; 0 keeps them until removed (default: the HA lease TTL)", EnvVars: env("ha-address-lifetime")},
	}
}

// haConfig is what the HA flags ask for; zero Interface means no HA.
type haConfig struct {
	Interface string
	LeaseTTL  time.Duration
	Round     time.Duration
	Listen    string
	Advertise string
	Lifetime  time.Duration
}

// haFromFlags reads and checks the HA flags. The listen address, when not
// given, is the first address of the HA interface that is not a host
// route (/32, /128: a VIP) nor link-local, on port ha.DefaultPort.
func haFromFlags(c *cli.Context, addrsOf func(iface string) ([]netip.Prefix, error)) (haConfig, error) {
	h := haConfig{Interface: c.String("ha-interface"), LeaseTTL: c.Duration("ha-lease-ttl"), Round: c.Duration("ha-round"), Listen: c.String("ha-listen"),
		Advertise: c.String("ha-advertise"), Lifetime: c.Duration("ha-lease-ttl")}
	if c.IsSet("ha-address-lifetime") {
		h.Lifetime = c.Duration("ha-address-lifetime")
	}
	if h.Interface == "" {
		for _, f := range []string{"ha-listen", "ha-advertise", "ha-address-lifetime", "ha-round"} {
			if c.IsSet(f) {
				return h, fmt.Errorf("--%s is set but --ha-interface is not: HA settings need the interface that holds the VIPs", f)
			}
		}
		return h, nil
	}
	if h.LeaseTTL < 2*time.Second {
		return h, fmt.Errorf("--ha-lease-ttl %v is below etcd's minimum of 2s", h.LeaseTTL)
	}
	if h.Round < 10*time.Millisecond {
		return h, fmt.Errorf("--ha-round %v is below 10ms", h.Round)
	}
	if minTTL := 12 * h.Round; h.LeaseTTL < minTTL {
		return h, fmt.Errorf("--ha-lease-ttl %v is too short for --ha-round %v: an owner must be able to drop its addresses well before its lease runs out, which takes at least 12 rounds (%v)", h.LeaseTTL, h.Round, minTTL)
	}
	if h.Lifetime != 0 && h.Lifetime < time.Second {
		return h, fmt.Errorf("--ha-address-lifetime %v must be 0 (none) or at least 1s", h.Lifetime)
	}
	if h.Listen != "" {
		if _, err := netip.ParseAddrPort(h.Listen); err != nil {
			return h, fmt.Errorf("--ha-listen %q is not an address:port: %w", h.Listen, err)
		}
		return h, nil
	}
	addrs, err := addrsOf(h.Interface)
	if err != nil {
		return h, fmt.Errorf("--ha-interface %s: %w", h.Interface, err)
	}
	for _, p := range addrs {
		a := p.Addr().Unmap()
		if p.Bits() != a.BitLen() && !a.IsLinkLocalUnicast() && !a.IsLoopback() {
			h.Listen = net.JoinHostPort(a.String(), strconv.Itoa(ha.DefaultPort))
			return h, nil
		}
	}
	return h, fmt.Errorf("--ha-interface %s has no address to receive the peers' heartbeats on (none but host routes or link-local ones); give one with --ha-listen", h.Interface)
}

// timing is ha's default timing scaled to round: every duration keeps its
// ratio to the round.
func (h haConfig) timing() ha.Timing {
	d := ha.DefaultTiming()
	if h.Round == d.Round {
		return d
	}
	scale := func(x time.Duration) time.Duration {
		return time.Duration(float64(x) * float64(h.Round) / float64(d.Round))
	}
	return ha.Timing{Round: h.Round, Hold: scale(d.Hold), Margin: scale(d.Margin), Heartbeat: scale(d.Heartbeat),
		Silence: scale(d.Silence), Stagger: scale(d.Stagger), PreemptDelay: scale(d.PreemptDelay), StartGrace: scale(d.StartGrace),
		Regain: scale(d.Regain), Tick: scale(d.Tick)}
}

// interfaceAddrs lists the addresses of a network interface.
func interfaceAddrs(iface string) ([]netip.Prefix, error) {
	ifi, err := net.InterfaceByName(iface)
	if err != nil {
		return nil, err
	}
	list, err := ifi.Addrs()
	if err != nil {
		return nil, err
	}
	var out []netip.Prefix
	for _, a := range list {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p)
		}
	}
	return out, nil
}

// heldGroups passes ownership changes to the address holder and keeps the
// set of groups this agent holds, telling publish (the node key) each
// time it changes.
type heldGroups struct {
	holder  ha.Holder
	publish func(groups []string)

	mu   sync.Mutex
	held map[string]bool
}

// Hold implements ha.Holder.
func (h *heldGroups) Hold(group string, held bool, floating []spec.GroupAddress) {
	h.holder.Hold(group, held, floating)
	h.mu.Lock()
	was := h.held[group]
	if held {
		h.held[group] = true
	} else {
		delete(h.held, group)
	}
	groups := slices.Sorted(maps.Keys(h.held))
	h.mu.Unlock()
	if was != held {
		h.publish(groups)
	}
}

// newElector builds the HA elector over cli, holding addresses with
// holder and telling publish which groups this agent holds.
func newElector(h haConfig, cli *clientv3.Client, node, prefix string, holder ha.Holder, publish func([]string), log *slog.Logger, reg prometheus.Registerer) (*ha.Elector, error) {
	return ha.New(ha.Options{
		Node: node, Prefix: prefix, LeaseTTL: h.LeaseTTL, Timing: h.timing(), Listen: h.Listen, Advertise: h.Advertise,
		Store: ha.NewEtcd(cli), Holder: &heldGroups{holder: holder, publish: publish, held: map[string]bool{}},
		Logger: log.With("component", "ha"), Registerer: reg,
	})
}

// release hands the owned groups over, bounded by haReleaseTimeout.
func release(ctx context.Context, el *ha.Elector, log *slog.Logger) {
	rctx, cancel := context.WithTimeout(ctx, haReleaseTimeout)
	defer cancel()
	start := time.Now()
	if err := el.Release(rctx); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			log.Warn("HA hand-over not finished in time; the peers take over when the lease runs out", "after", haReleaseTimeout, "error", err)
			return
		}
		log.Warn("HA hand-over", "error", err)
		return
	}
	log.Info("HA groups handed over", "took", time.Since(start).Round(time.Millisecond))
}
