//go:build e2e

package e2e

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/e2e/internal/lab"
)

// echoLine is how often a long-lived connection sends a line.
const echoLine = 300 * time.Millisecond

// startConnLab starts the HA lab with the echo service (scheduler sched)
// and both agents, and waits until both serve it. On nf_tables the hosts
// are set as README asks (conntrack's liberal window tracking, which the
// failback needs, and its pick-up of mid-stream flows left as it is).
func startConnLab(t *testing.T, sync bool, sched string) (*lab.HALab, *lab.NSDialer) {
	t.Helper()
	if lab.Native() {
		for _, host := range lab.HAHosts {
			setConntrack(t, host.Name, lab.ConntrackLiberal, true, false)
		}
	}
	h := lab.NewHALab(t)
	h.Sync = sync
	t.Cleanup(func() { h.LogHA(t) })
	h.PutEcho(t, sched)
	h.StartAll(t)
	for _, host := range lab.HAHosts {
		h.WaitApplied(t, host.Name, lab.EchoService)
	}
	d, err := lab.NewNSDialer(lab.ClientNS, 2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	return h, d
}

// setConntrack sets a conntrack sysctl of host ns for the test and
// back to after when it ends.
func setConntrack(t *testing.T, ns, name string, on, after bool) {
	t.Helper()
	if err := lab.SetConntrack(ns, name, on); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := lab.SetConntrack(ns, name, after); err != nil {
			t.Error(err)
		}
	})
}

// owner waits for the group's owner to hold its addresses and returns it.
func owner(t *testing.T, h *lab.HALab) string {
	t.Helper()
	var o string
	lab.WaitFor(t, 0, "an owner holding the group", func() error {
		k, ok, err := h.Owner()
		if err == nil && !ok {
			err = errors.New("no owner yet")
		}
		if err != nil {
			return err
		}
		o = k.Node
		_, err = h.CheckHolder(o)
		return err
	})
	return o
}

// openLong opens a long-lived connection through the echo service and
// waits until it has carried a few lines. The connection is closed when
// keep ends (a subtest's t would close it at the end of the subtest).
func openLong(t *testing.T, keep testing.TB, d *lab.NSDialer) *lab.LongConn {
	t.Helper()
	c, err := lab.DialLong(d, fmt.Sprintf("%s:%d", lab.HAVIP, lab.EchoPort), echoLine)
	if err != nil {
		t.Fatal(err)
	}
	keep.Cleanup(c.Close)
	c.WaitEchoes(t, 3)
	return c
}

// knows waits until host ns has the IPVS entry of the connection.
func knows(t *testing.T, ns string, c *lab.LongConn) {
	t.Helper()
	var entry string
	lab.WaitFor(t, 0, fmt.Sprintf("%s knowing the connection from port %d", ns, c.Port), func() error {
		e, ok, err := lab.IPVSConnOf(ns, c.Port)
		if err == nil && !ok {
			err = errors.New("no IPVS entry")
		}
		entry = e
		return err
	})
	t.Logf("%s knows it: %s", ns, entry)
}

// TestHAConnections: established TCP connections survive an unplanned
// failover and the failback. In the QEMU lab the agents run the IPVS
// connection sync (--ipvs-sync-interface on the control segment) and the
// echo service uses rr, whose choice is in no way repeatable: only sync
// can carry the connection. In the native world (host-ha.sh) the echo
// service is on nf_tables with mh, whose backend choice is the same on
// every host, and the new owner's conntrack picks the flow up mid-stream.
//
//   - each host runs both sync daemons (ipvsadm -L --daemon, node key,
//     metrics), and the standby knows the connection (its IPVS entry and
//     switchman_ipvs_connections);
//   - the owner's host dies (SIGKILL, links down): the connection carries
//     on through the new owner, with the same backend;
//   - a second connection is opened while the dead host is away; the host
//     comes back as a standby and learns it from the new owner's master
//     (sync_refresh_period);
//   - the new owner's host dies: both connections carry on through the
//     host that came back (the failback).
func TestHAConnections(t *testing.T) {
	sched := "rr"
	if lab.Native() {
		sched = "mh"
	}
	h, d := startConnLab(t, true, sched)
	top := t
	own := owner(t, h)
	standby := lab.Other(own)
	step := func(name string, f func(t *testing.T)) {
		if !t.Run(name, f) {
			t.FailNow()
		}
	}

	step("daemons-in-both-roles", func(t *testing.T) {
		if lab.Native() {
			t.Skip("no IPVS on this kernel: nf_tables needs no sync")
		}
		for _, host := range lab.HAHosts {
			out := lab.MustRunNS(t, host.Name, lab.IPVSADMBin, "-L", "--daemon")
			t.Logf("%s: ipvsadm -L --daemon:\n%s", host.Name, strings.TrimSpace(out))
			for _, role := range []string{"master", "backup"} {
				if !strings.Contains(out, fmt.Sprintf("%s sync daemon (mcast=%s, syncid=%d", role, lab.SyncInterface, lab.SyncID)) {
					t.Errorf("%s runs no %s daemon on %s with sync id %d", host.Name, role, lab.SyncInterface, lab.SyncID)
				}
			}
			lab.WaitFor(t, 0, host.Name+"'s node key and metrics saying both daemons run", func() error {
				n, ok, err := h.Node(host.Name)
				switch {
				case err != nil:
					return err
				case !ok || n.IPVSSync == nil:
					return errors.New("no ipvs_sync in the node key")
				case n.IPVSSync.Interface != lab.SyncInterface || !slices.Equal(n.IPVSSync.Running, []string{"master", "backup"}) || n.IPVSSync.Error != "":
					return fmt.Errorf("node key ipvs_sync %+v", *n.IPVSSync)
				}
				m, err := h.Agents[host.Name].Metrics()
				if err != nil {
					return err
				}
				for _, role := range []string{"master", "backup"} {
					if v := m[`switchman_ipvs_sync_daemon{role="`+role+`"}`]; v != 1 {
						return fmt.Errorf("switchman_ipvs_sync_daemon{role=%q} = %v", role, v)
					}
				}
				return nil
			})
		}
	})

	first := openLong(t, t, d)
	t.Logf("connection 1 through %s: %s", own, first)

	step("the-standby-knows-the-connection", func(t *testing.T) {
		if lab.Native() {
			t.Skip("nf_tables: the standby needs no record, the choice of backend is the same everywhere")
		}
		knows(t, standby, first)
		lab.WaitFor(t, 0, standby+" counting the connection", func() error {
			m, err := h.Agents[standby].Metrics()
			if err != nil {
				return err
			}
			if v := m[`switchman_ipvs_connections{state="active"}`]; v < 1 {
				return fmt.Errorf(`switchman_ipvs_connections{state="active"} = %v`, v)
			}
			return nil
		})
	})

	var second *lab.LongConn
	step("owner-host-dies", func(t *testing.T) {
		cut := h.Cut(t, own)
		h.WaitHolder(t, 0, standby)
		first.WaitCarriesOn(t, cut, "connection 1 carrying on through "+standby)
		t.Logf("%s died; connection 1 carries on through %s: %s", own, standby, first)
		// Opened while the dead host is away: only the new owner's sync
		// can tell the dead host about it.
		second = openLong(t, top, d)
		t.Logf("connection 2 through %s: %s", standby, second)
	})

	step("the-host-comes-back-and-learns", func(t *testing.T) {
		back := own
		h.StartAgent(t, back)
		lab.WaitFor(t, 0, back+" holding nothing before its links come back", func() error {
			held, err := lab.HostHolds(back, false)
			if err == nil && len(held) > 0 {
				err = fmt.Errorf("still %v", held)
			}
			return err
		})
		if err := lab.SetLinks(lab.HostNamed(back), true); err != nil {
			t.Fatal(err)
		}
		h.WaitStandby(t, back, 20*h.Round)
		if !lab.Native() {
			knows(t, back, second)
		}
	})

	step("failback", func(t *testing.T) {
		now := owner(t, h)
		back := lab.Other(now)
		cut := h.Cut(t, now)
		h.WaitHolder(t, 0, back)
		for i, c := range []*lab.LongConn{first, second} {
			c.WaitCarriesOn(t, cut, fmt.Sprintf("connection %d carrying on through %s", i+1, back))
		}
		t.Logf("%s died; both connections carry on through %s:\n  1: %s\n  2: %s", now, back, first, second)
	})
}

// TestHAConnectionsNoSync is TestHAConnections' first failover without
// --ipvs-sync-interface: the new owner does not know the connection, and
// the client's next packet is reset. It shows the test above can fail.
func TestHAConnectionsNoSync(t *testing.T) {
	if lab.Native() {
		t.Skip("IPVS only (TestHAConnectionsNoPickup is its nf_tables counterpart)")
	}
	h, d := startConnLab(t, false, "rr")
	for _, host := range lab.HAHosts {
		if out := lab.MustRunNS(t, host.Name, lab.IPVSADMBin, "-L", "--daemon"); strings.TrimSpace(out) != "" {
			t.Fatalf("%s runs a sync daemon without --ipvs-sync-interface:\n%s", host.Name, out)
		}
	}
	resetByFailover(t, h, d, "without sync")
}

// TestHAConnectionsNoPickup is TestHAConnections' first failover on
// nf_tables with mh, with the conntrack pick-up of established TCP flows
// (net.netfilter.nf_conntrack_tcp_loose, 1 by default) turned off on both
// hosts: the new owner's conntrack calls the client's mid-stream packet
// invalid, it is never translated to the backend, and the new owner's own
// stack resets the connection. It shows that the pick-up is what carries
// connections across a failover on nf_tables, and that the test above can
// fail.
func TestHAConnectionsNoPickup(t *testing.T) {
	if !lab.Native() {
		t.Skip("nf_tables only (TestHAConnectionsNoSync is its IPVS counterpart)")
	}
	for _, host := range lab.HAHosts {
		setConntrack(t, host.Name, lab.ConntrackLoose, false, true)
	}
	h, d := startConnLab(t, false, "mh")
	resetByFailover(t, h, d, "without the conntrack pick-up")
}

// resetByFailover opens a long-lived connection, kills the owner's host
// and waits for the new owner to reset the connection; it fails the test
// when the connection carries on or breaks otherwise.
func resetByFailover(t *testing.T, h *lab.HALab, d *lab.NSDialer, without string) {
	t.Helper()
	own := owner(t, h)
	c := openLong(t, t, d)
	cut := h.Cut(t, own)
	next := lab.Other(own)
	h.WaitHolder(t, 0, next)
	lab.WaitFor(t, 2*lab.WaitTimeout, "the connection reset by "+next, func() error {
		ok, err := c.EchoedAfter(cut)
		switch {
		case ok:
			t.Fatalf("the connection carried on %s: %s", without, c)
		case err == nil:
			return fmt.Errorf("still open, no echo since the cut (%s)", c)
		case !errors.Is(err, syscall.ECONNRESET):
			t.Fatalf("broken, but not by a reset: %s", c)
		}
		return nil
	})
	t.Logf("%s, %s reset the connection: %s", without, next, c)
}
