package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/urfave/cli/v2"

	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/status"
)

// syncStartTimeout bounds the first check of the sync daemons at start.
const syncStartTimeout = 10 * time.Second

func ipvsSyncFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "ipvs-sync-interface", Usage: "run the kernel's IPVS connection sync (master and backup daemons) on this interface, so established connections survive an HA takeover and the failback (empty: none; removing it stops the daemons switchman started)", EnvVars: env("ipvs-sync-interface")},
		&cli.UintFlag{Name: "ipvs-sync-id", Usage: "sync id of this cluster's messages (0-255; 0: backups accept every master on the segment): give each cluster sharing a segment its own", EnvVars: env("ipvs-sync-id")},
		&cli.StringFlag{Name: "ipvs-sync-group", Usage: "multicast group of the sync messages, IPv4 or IPv6 (default: the kernel's 224.0.0.81)", EnvVars: env("ipvs-sync-group")},
		&cli.UintFlag{Name: "ipvs-sync-port", Usage: "UDP port of the sync messages (default: the kernel's 8848)", EnvVars: env("ipvs-sync-port")},
		&cli.UintFlag{Name: "ipvs-sync-ttl", Usage: "multicast TTL of the sync messages, 1-255 (default: the kernel's 1)", EnvVars: env("ipvs-sync-ttl")},
	}
}

// syncFromFlags reads the --ipvs-sync-* flags: nil when sync is not asked
// for.
func syncFromFlags(c *cli.Context) (*ipvs.SyncSettings, error) {
	iface := c.String("ipvs-sync-interface")
	if iface == "" {
		for _, f := range []string{"ipvs-sync-id", "ipvs-sync-group", "ipvs-sync-port", "ipvs-sync-ttl"} {
			if c.IsSet(f) {
				return nil, fmt.Errorf("--%s is set but --ipvs-sync-interface is not: the sync settings need the interface the daemons run on", f)
			}
		}
		return nil, nil
	}
	s := &ipvs.SyncSettings{Interface: iface}
	id, err := uintIn(c, "ipvs-sync-id", 0, 255)
	if err != nil {
		return nil, err
	}
	s.SyncID = uint8(id)
	if g := c.String("ipvs-sync-group"); g != "" {
		a, err := netip.ParseAddr(g)
		if err != nil || !a.IsMulticast() {
			return nil, fmt.Errorf("--ipvs-sync-group %q: want a multicast address such as 224.0.0.81 or ff02::81", g)
		}
		s.Group = a.Unmap()
	}
	port, err := uintIn(c, "ipvs-sync-port", 1, 65535)
	if err != nil {
		return nil, err
	}
	ttl, err := uintIn(c, "ipvs-sync-ttl", 1, 255)
	if err != nil {
		return nil, err
	}
	s.Port, s.TTL = uint16(port), uint8(ttl)
	if err := s.Check(); err != nil {
		return nil, err
	}
	return s, nil
}

// uintIn returns flag name, refusing a value set outside lo..hi (unset, it
// is 0: the kernel's default).
func uintIn(c *cli.Context, name string, lo, hi uint) (uint, error) {
	v := c.Uint(name)
	if c.IsSet(name) && (v < lo || v > hi) {
		return 0, fmt.Errorf("--%s %d: want %d to %d", name, v, lo, hi)
	}
	return v, nil
}

// newConnSync makes the connection-sync component beside the IPVS driver
// d, checks the daemons once (so they run before the first pass when
// asked for, and a removed flag stops them at once), and registers its
// metrics.
func newConnSync(ctx context.Context, settings *ipvs.SyncSettings, d *ipvs.Driver, dataDir string, log *slog.Logger, reg prometheus.Registerer) (*ipvs.ConnSync, func(), error) {
	kernel := ipvs.NewNetlink("")
	cs, err := ipvs.NewConnSync(ipvs.ConnSyncConfig{Kernel: kernel, Settings: settings, StateDir: dataDir, Services: d.Owned, Logger: log})
	if err != nil {
		kernel.Close()
		return nil, nil, err
	}
	sctx, cancel := context.WithTimeout(ctx, syncStartTimeout)
	err = cs.Ensure(sctx)
	cancel()
	switch {
	case err != nil:
		log.Error("IPVS connection sync: the daemons do not run as asked; retrying every interval (the node key says why)", "error", err)
	case settings != nil:
		log.Info("IPVS connection sync runs", "interface", settings.Interface, "sync_id", settings.SyncID)
	}
	for _, r := range []ipvs.Role{ipvs.Master, ipvs.Backup} {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "switchman_ipvs_sync_daemon",
			Help:        "1 while the IPVS connection-sync daemon of this role runs as --ipvs-sync-* asks, else 0.",
			ConstLabels: prometheus.Labels{"role": r.String()},
		}, func() float64 {
			if cs.Status().Runs(r) {
				return 1
			}
			return 0
		}))
	}
	for _, state := range []string{"active", "inactive"} {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "switchman_ipvs_connections",
			Help:        "Connections the kernel's IPVS holds for switchman's services (ActiveConn or InActConn summed over their real servers), whether this host scheduled them or learned them from a peer's sync daemon; read every 10 s.",
			ConstLabels: prometheus.Labels{"state": state},
		}, func() float64 {
			st := cs.Status()
			if state == "active" {
				return float64(st.Active)
			}
			return float64(st.Inactive)
		}))
	}
	return cs, kernel.Close, nil
}

// syncNode is the node key's view of the connection sync: nil when sync
// is off and nothing failed.
func syncNode(st ipvs.SyncStatus) *status.IPVSSync {
	if st.Settings == nil && st.Err == nil {
		return nil
	}
	n := &status.IPVSSync{Running: []string{}}
	if st.Settings != nil {
		n.Interface, n.SyncID = st.Settings.Interface, int(st.Settings.SyncID)
	}
	for _, r := range st.Running {
		n.Running = append(n.Running, r.String())
	}
	if st.Err != nil {
		n.Error = st.Err.Error()
	}
	return n
}

// publishSync tells publish the sync state now and at each change, until
// ctx ends.
func publishSync(ctx context.Context, cs *ipvs.ConnSync, publish func(*status.IPVSSync)) error {
	for {
		publish(syncNode(cs.Status()))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-cs.Changed():
		}
	}
}
