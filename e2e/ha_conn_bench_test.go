//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/e2e/internal/lab"
)

// survivalConns is how many long-lived connections TestHAConnSurvival
// holds open through the failover, and survivalLine how often each sends
// a line.
const (
	survivalConns = 100
	survivalLine  = time.Second
	// survivalClients is how many client addresses the connections
	// come from, evenly.
	survivalClients = 10
)

// survivalCase is one data plane and scheduler TestHAConnSurvival
// measures.
type survivalCase struct {
	name  string
	sync  bool
	sched string
}

// TestHAConnSurvival counts, of survivalConns long-lived connections open
// at an unplanned failover (SIGKILL of the owner's agent and its host's
// links down), how many carry on through the new owner (docs/BENCHMARKS.md,
// "Connection survival"). Each connection has carried three lines before
// the cut; they come from survivalClients client addresses. In the QEMU
// lab: IPVS with rr, with the connection sync and without it; on this
// host's kernel: nf_tables with mh, sh and rr. A
// connection survives when a line written after the cut comes back from
// the backend it had; it is reset when the new owner (or a backend that
// never had it) answers with a reset; it stalls when neither happens
// within the bound. It logs the figures and fails only when the lab does.
func TestHAConnSurvival(t *testing.T) {
	lab.RequireNamed(t, "HAConnSurvival", "e2e/lab/run.sh -run HAConnSurvival, e2e/lab/host-ha.sh -run HAConnSurvival (make bench-ha)")
	cases := []survivalCase{{"ipvs rr, sync on", true, "rr"}, {"ipvs rr, sync off", false, "rr"}}
	if lab.Native() {
		cases = []survivalCase{{"nftables mh", false, "mh"}, {"nftables sh", false, "sh"}, {"nftables rr", false, "rr"}}
	}
	var figures []string
	for _, c := range cases {
		t.Run(strings.NewReplacer(" ", "-", ",", "").Replace(c.name), func(t *testing.T) {
			figures = append(figures, c.name+": "+survival(t, c))
		})
	}
	t.Logf("connection survival, %d connections open at an unplanned failover:\n  %s", survivalConns, strings.Join(figures, "\n  "))
}

// survival runs one case and returns its figure.
func survival(t *testing.T, c survivalCase) string {
	h, d := startConnLab(t, c.sync, c.sched)
	own := owner(t, h)
	standby := lab.Other(own)
	if !lab.Native() {
		// Both agents' daemons run before the first connection.
		for _, host := range lab.HAHosts {
			lab.WaitFor(t, 0, host.Name+"'s sync daemons as asked", func() error {
				n, ok, err := h.Node(host.Name)
				switch {
				case err != nil:
					return err
				case c.sync && (!ok || n.IPVSSync == nil || len(n.IPVSSync.Running) != 2):
					return fmt.Errorf("node key ipvs_sync: %+v", n.IPVSSync)
				case !c.sync && ok && n.IPVSSync != nil:
					return fmt.Errorf("node key ipvs_sync without sync: %+v", *n.IPVSSync)
				}
				return nil
			})
		}
	}
	addr := fmt.Sprintf("%s:%d", lab.HAVIP, lab.EchoPort)
	// Several clients, so the hash schedulers spread the connections.
	clients := lab.ClientExtraAddrs(t, survivalClients)
	conns := make([]*lab.LongConn, 0, survivalConns)
	for i := range survivalConns {
		l, err := lab.DialLongFrom(d, clients[i%len(clients)], addr, survivalLine)
		if err != nil {
			t.Fatalf("connection %d: %v", len(conns)+1, err)
		}
		t.Cleanup(l.Close)
		conns = append(conns, l)
	}
	for _, l := range conns {
		l.WaitEchoes(t, 3)
	}
	backends := map[string]int{}
	for _, l := range conns {
		backends[l.Backend()]++
	}
	known := "n/a (no IPVS)"
	if !lab.Native() {
		lines, err := lab.IPVSConns(standby)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, l := range lines {
			if f := strings.Fields(l); f[2] == "ESTABLISHED" && f[4] == addr {
				n++
			}
		}
		known = fmt.Sprint(n)
	}
	t.Logf("%d connections open through %s (backends %v); %s knows %s of them", len(conns), own, backends, standby, known)

	cut := h.Cut(t, own)
	h.WaitHolder(t, 0, standby)
	moved := time.Since(cut)
	var survived, reset, stalled int
	settled := func() (s, r, open int) {
		for _, l := range conns {
			ok, err := l.EchoedAfter(cut)
			switch {
			case err != nil:
				r++
			case ok:
				s++
			default:
				open++
			}
		}
		return s, r, open
	}
	// Bounded: a connection neither carried on nor reset by then stalled.
	deadline := time.Now().Add(2 * lab.WaitTimeout)
	for {
		var open int
		survived, reset, open = settled()
		if open == 0 || time.Now().After(deadline) {
			stalled = open
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, l := range conns {
		if _, err := l.EchoedAfter(cut); err != nil {
			t.Logf("broken: %s", l)
			break // one is enough to show how
		}
	}
	return fmt.Sprintf("%d of %d survived, %d reset, %d stalled (the standby knew %s before the cut; the group moved in %s; settled %s after the cut)",
		survived, len(conns), reset, stalled, known, lab.Ms(moved), lab.Ms(time.Since(cut)))
}
