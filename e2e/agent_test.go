//go:build e2e

package e2e

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/e2e/internal/lab"
	"github.com/switchman-lb/switchman/status"
)

// TestAgentIPVS runs the switchman agent binary against the lab's kernel:
// definitions written to etcd become IPVS services that carry real traffic
// from the client namespace, changes are applied in place, and restarts,
// foreign services and an unreachable etcd leave the data plane alone.
func TestAgentIPVS(t *testing.T) {
	l := lab.NewAgentLab(t)
	all := lab.Backends

	t.Run("rr-nat-balances", func(t *testing.T) {
		const vip = "192.0.2.141"
		l.PutService(t, "rr", lab.SvcDef{"vip": vip, "port": 80, "scheduler": "rr",
			"backends": lab.BackendsDef(80, 1, all...), "health": lab.HTTPCheck()})
		addr := lab.IPVSHostPort(vip, 80)
		s := l.WaitUp(t, "rr", "TCP", addr, lab.WeightsOf(80, 1, all...))
		if s.Scheduler != "rr" {
			t.Errorf("scheduler %s, want rr", s.Scheduler)
		}
		for _, d := range s.Dests {
			if d.Forward != "Masq" {
				t.Errorf("%s forwards %s, want Masq", d.Address, d.Forward)
			}
		}
		l.WaitStatus(t, 0, "rr", "applied with 3 healthy backends", appliedHealthy(3))
		lab.WaitHTTP(t, "http://"+addr+"/")
		tally := lab.Tally(30, func() (string, error) { return lab.ClientGet("http://" + addr + "/") })
		t.Logf("30 requests: %s", lab.TallyString(tally))
		for _, be := range all {
			if tally[be.Name] == 0 {
				t.Errorf("%s answered none of 30 requests: %s", be.Name, lab.TallyString(tally))
			}
		}
		requireNoErrors(t, tally)
	})

	t.Run("sh-sticks", func(t *testing.T) {
		const vip = "192.0.2.142"
		l.PutService(t, "sh", lab.SvcDef{"vip": vip, "port": 80, "scheduler": "sh",
			"backends": lab.BackendsDef(80, 1, all...), "health": lab.HTTPCheck()})
		addr := lab.IPVSHostPort(vip, 80)
		if s := l.WaitUp(t, "sh", "TCP", addr, lab.WeightsOf(80, 1, all...)); s.Scheduler != "sh" {
			t.Errorf("scheduler %s, want sh", s.Scheduler)
		}
		lab.WaitHTTP(t, "http://"+addr+"/")
		tally := lab.Tally(15, func() (string, error) { return lab.ClientGet("http://" + addr + "/") })
		t.Logf("15 requests: %s", lab.TallyString(tally))
		requireNoErrors(t, tally)
		if len(tally) != 1 {
			t.Errorf("sh spread one client over %d backends: %s", len(tally), lab.TallyString(tally))
		}
	})

	t.Run("mh-flags", func(t *testing.T) {
		const vip = "192.0.2.143"
		l.PutService(t, "mh", lab.SvcDef{"vip": vip, "port": 80, "scheduler": "mh",
			"scheduler_flags": []string{"mh-fallback", "mh-port"},
			"backends":        lab.BackendsDef(80, 1, all...), "health": lab.HTTPCheck()})
		addr := lab.IPVSHostPort(vip, 80)
		s := l.WaitUp(t, "mh", "TCP", addr, lab.WeightsOf(80, 1, all...))
		if s.Scheduler != "mh" || !s.HasFlag("mh-fallback") || !s.HasFlag("mh-port") {
			t.Errorf("ipvsadm shows scheduler %s flags %v, want mh (mh-fallback,mh-port)", s.Scheduler, s.Flags)
		}
		lab.WaitHTTP(t, "http://"+addr+"/")
		tally := lab.Tally(12, func() (string, error) { return lab.ClientGet("http://" + addr + "/") })
		t.Logf("12 requests over mh with mh-port: %s", lab.TallyString(tally))
		requireNoErrors(t, tally)
	})

	t.Run("dr", func(t *testing.T) {
		const vip = "192.0.2.144"
		drBackends := all[1:]
		for _, be := range drBackends {
			lab.SetupDRBackend(t, vip, be.Name, "dr")
		}
		l.PutService(t, "dr", lab.SvcDef{"vip": vip, "port": 80, "forwarding": "dr",
			"backends": lab.BackendsDef(80, 1, drBackends...), "health": lab.HTTPCheck()})
		addr := lab.IPVSHostPort(vip, 80)
		s := l.WaitUp(t, "dr", "TCP", addr, lab.WeightsOf(80, 1, drBackends...))
		for _, d := range s.Dests {
			if d.Forward != "Route" {
				t.Errorf("%s forwards %s, want Route", d.Address, d.Forward)
			}
		}
		lab.WaitHTTP(t, "http://"+addr+"/")
		tally := lab.Tally(10, func() (string, error) { return lab.ClientGet("http://" + addr + "/") })
		t.Logf("10 requests over DR: %s", lab.TallyString(tally))
		requireNoErrors(t, tally)
		for _, be := range drBackends {
			if tally[be.Name] == 0 {
				t.Errorf("%s answered none of the DR requests: %s", be.Name, lab.TallyString(tally))
			}
		}
	})

	t.Run("udp", func(t *testing.T) {
		const vip = "192.0.2.145"
		l.PutService(t, "dns", lab.SvcDef{"vip": vip, "port": 53, "protocol": "udp",
			"backends": lab.BackendsDef(53, 1, all...),
			"health":   map[string]any{"protocol": "udp", "payload": "ping", "interval": "1s", "timeout": "500ms"}})
		addr := lab.IPVSHostPort(vip, 53)
		l.WaitUp(t, "dns", "UDP", addr, lab.WeightsOf(53, 1, all...))
		ask := func() (string, error) { return lab.UDPRequest(lab.ClientNS, addr, []byte("ping")) }
		lab.WaitFor(t, 0, "UDP "+addr+" answering", func() error { _, err := ask(); return err })
		tally := lab.Tally(15, ask)
		t.Logf("15 datagrams: %s", lab.TallyString(tally))
		requireNoErrors(t, tally)
		for _, be := range all {
			if tally[be.Name] == 0 {
				t.Errorf("%s answered none of 15 datagrams: %s", be.Name, lab.TallyString(tally))
			}
		}
	})

	t.Run("weight-in-place", func(t *testing.T) {
		const vip = "192.0.2.146"
		def := lab.SvcDef{"vip": vip, "port": 80, "scheduler": "wrr",
			"backends": lab.BackendsDef(80, 1, all...), "health": lab.HTTPCheck()}
		l.PutService(t, "weights", def)
		addr := lab.IPVSHostPort(vip, 80)
		l.WaitUp(t, "weights", "TCP", addr, lab.WeightsOf(80, 1, all...))
		lab.WaitHTTP(t, "http://"+addr+"/")
		requireNoErrors(t, lab.Tally(9, func() (string, error) { return lab.ClientGet("http://" + addr + "/") }))
		before := lab.WaitConns(t, "TCP", addr, 10)
		bes := lab.BackendsDef(80, 1, all...)
		bes[0]["weight"] = 5
		def["backends"] = bes
		l.PutService(t, "weights", def)
		want := lab.WeightsOf(80, 1, all...)
		want[lab.IPVSHostPort(all[0].Addr, 80)] = 5
		l.WaitUp(t, "weights", "TCP", addr, want)
		// Three more connections: a recreated service would count from 0
		// and never reach before+3.
		requireNoErrors(t, lab.Tally(3, func() (string, error) { return lab.ClientGet("http://" + addr + "/") }))
		after := lab.WaitConns(t, "TCP", addr, before+3)
		t.Logf("Conns before the weight change %d, after it and 3 more requests %d", before, after)
	})

	t.Run("drift-repaired", func(t *testing.T) {
		// Changes made behind the agent's back: the background read-back
		// (every --resync, 5s in this lab) finds them and the next Sync
		// repairs them.
		const vip = "192.0.2.152"
		l.PutService(t, "drift", lab.SvcDef{"vip": vip, "port": 80, "scheduler": "wrr",
			"backends": lab.BackendsDef(80, 1, all...), "health": lab.HTTPCheck()})
		addr := lab.IPVSHostPort(vip, 80)
		want := lab.WeightsOf(80, 1, all...)
		l.WaitUp(t, "drift", "TCP", addr, want)
		first, second := lab.IPVSHostPort(all[0].Addr, 80), lab.IPVSHostPort(all[1].Addr, 80)
		lab.MustRun(t, lab.IPVSADMBin, "-e", "-t", addr, "-r", first, "-m", "-w", "7")
		lab.MustRun(t, lab.IPVSADMBin, "-d", "-t", addr, "-r", second)
		drifted := time.Now()
		s, ok := lab.FindIPVSService(lab.MustIPVSList(t), "TCP", addr)
		if !ok || len(s.Dests) != len(all)-1 {
			t.Fatalf("after ipvsadm -e and -d: %+v (listed %v), want the drift in place", s, ok)
		}
		lab.WaitService(t, "TCP", addr, want)
		t.Logf("drift repaired %v after it was made", time.Since(drifted).Round(10*time.Millisecond))
	})

	t.Run("delete", func(t *testing.T) {
		const vip = "192.0.2.147"
		l.PutService(t, "gone", lab.SvcDef{"vip": vip, "port": 80,
			"backends": lab.BackendsDef(80, 1, all...), "health": lab.HTTPCheck()})
		addr := lab.IPVSHostPort(vip, 80)
		l.WaitUp(t, "gone", "TCP", addr, lab.WeightsOf(80, 1, all...))
		l.WaitStatus(t, 0, "gone", "applied", appliedHealthy(3))
		l.Del(t, lab.ServiceKey("gone"), false)
		lab.WaitIPVS(t, 0, addr+" deleted", func(svcs []lab.L4Service) error {
			if _, ok := lab.FindIPVSService(svcs, "TCP", addr); ok {
				return errors.New("still listed")
			}
			return nil
		})
		lab.WaitFor(t, 0, "the status key of gone deleted", func() error {
			_, ok, err := l.Status("gone")
			if err == nil && ok {
				err = errors.New("still present")
			}
			return err
		})
	})

	t.Run("foreign-service-survives", func(t *testing.T) {
		const foreign = "192.0.2.250:80"
		lab.MustRun(t, lab.IPVSADMBin, "-A", "-t", foreign, "-s", "rr")
		t.Cleanup(func() { _, _ = lab.Run(0, lab.IPVSADMBin, "-D", "-t", foreign) })
		lab.MustRun(t, lab.IPVSADMBin, "-a", "-t", foreign, "-r", lab.IPVSHostPort(all[0].Addr, 80), "-m", "-w", "3")
		checkForeign := func(when string) {
			t.Helper()
			s, ok := lab.FindIPVSService(lab.MustIPVSList(t), "TCP", foreign)
			if !ok {
				t.Fatalf("%s: the foreign service %s is gone", when, foreign)
			}
			d, ok := s.Dest(lab.IPVSHostPort(all[0].Addr, 80))
			if s.Scheduler != "rr" || len(s.Dests) != 1 || !ok || d.Weight != 3 || d.Forward != "Masq" {
				t.Fatalf("%s: the foreign service changed: %+v", when, s)
			}
		}

		const vip = "192.0.2.148"
		def := lab.SvcDef{"vip": vip, "port": 80, "backends": lab.BackendsDef(80, 1, all...), "health": lab.HTTPCheck()}
		l.PutService(t, "neighbour", def)
		addr := lab.IPVSHostPort(vip, 80)
		l.WaitUp(t, "neighbour", "TCP", addr, lab.WeightsOf(80, 1, all...))
		checkForeign("after the agent created a service")

		def["backends"] = lab.BackendsDef(80, 2, all...)
		l.PutService(t, "neighbour", def)
		l.WaitUp(t, "neighbour", "TCP", addr, lab.WeightsOf(80, 2, all...))
		checkForeign("after a reconcile that changed weights")

		l.RestartAgent(t)
		l.WaitReady(t, 1)
		checkForeign("after an agent restart")

		l.CleanupService(t, "neighbour")
		l.WaitReady(t, 0)
		checkForeign("after every switchman service was deleted")
	})

	t.Run("restart-writes-nothing", func(t *testing.T) {
		const vip = "192.0.2.149"
		l.PutService(t, "web", lab.SvcDef{"vip": vip, "port": 80, "scheduler": "wlc",
			"backends": lab.BackendsDef(80, 2, all...), "health": lab.HTTPCheck()})
		l.PutService(t, "dns2", lab.SvcDef{"vip": vip, "port": 53, "protocol": "udp",
			"backends": lab.BackendsDef(53, 1, all...),
			"health":   map[string]any{"protocol": "udp", "payload": "ping", "interval": "1s", "timeout": "500ms"}})
		tcp, udp := lab.IPVSHostPort(vip, 80), lab.IPVSHostPort(vip, 53)
		l.WaitUp(t, "web", "TCP", tcp, lab.WeightsOf(80, 2, all...))
		l.WaitUp(t, "dns2", "UDP", udp, lab.WeightsOf(53, 1, all...))
		l.WaitReady(t, 2)
		lab.WaitHTTP(t, "http://"+tcp+"/")
		requireNoErrors(t, lab.Tally(6, func() (string, error) { return lab.ClientGet("http://" + tcp + "/") }))
		requireNoErrors(t, lab.Tally(6, func() (string, error) { return lab.UDPRequest(lab.ClientNS, udp, []byte("ping")) }))
		tcpBefore, udpBefore := lab.WaitConns(t, "TCP", tcp, 7), lab.WaitConns(t, "UDP", udp, 6)
		tableBefore := lab.MustIPVSList(t)

		l.StopAgent(t)
		start := time.Now()
		l.StartAgent(t)
		l.WaitReady(t, 2)
		ready := time.Since(start)
		t.Logf("FIGURE agent restart-to-ready (process start to 2 services applied, unchanged kernel state): %s", ready.Round(time.Millisecond))

		m, err := l.Metrics()
		if err != nil {
			t.Fatal(err)
		}
		if w, ok := m[lab.MetricIPVSWrite]; !ok || w != 0 {
			t.Errorf("%s = %v (present %v) after a restart with nothing changed, want 0", lab.MetricIPVSWrite, w, ok)
		}
		// Traffic and health checks go on; still nothing is written.
		requireNoErrors(t, lab.Tally(6, func() (string, error) { return lab.ClientGet("http://" + tcp + "/") }))
		requireNoErrors(t, lab.Tally(6, func() (string, error) { return lab.UDPRequest(lab.ClientNS, udp, []byte("ping")) }))
		for _, name := range []string{"web", "dns2"} {
			l.WaitStatus(t, 0, name, "applied after the restart", appliedHealthy(3))
		}
		m, err = l.Metrics()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("FIGURE ipvs writes after the restart: %v", m[lab.MetricIPVSWrite])
		if w := m[lab.MetricIPVSWrite]; w != 0 {
			t.Errorf("%s = %v a while after the restart, want 0", lab.MetricIPVSWrite, w)
		}
		// counters that reset would never reach before+6
		tcpAfter, udpAfter := lab.WaitConns(t, "TCP", tcp, tcpBefore+6), lab.WaitConns(t, "UDP", udp, udpBefore+6)
		t.Logf("Conns across the restart: TCP %d -> %d, UDP %d -> %d", tcpBefore, tcpAfter, udpBefore, udpAfter)
		for _, k := range []string{"TCP " + tcp, "UDP " + udp} {
			proto, addr, _ := strings.Cut(k, " ")
			b, _ := lab.FindIPVSService(tableBefore, proto, addr)
			a, _ := lab.FindIPVSService(lab.MustIPVSList(t), proto, addr)
			if fmt.Sprint(sameShape(b)) != fmt.Sprint(sameShape(a)) {
				t.Errorf("%s changed across the restart:\nbefore %+v\nafter  %+v", k, b, a)
			}
		}
	})

	t.Run("etcd-down", func(t *testing.T) {
		const vip = "192.0.2.150"
		def := lab.SvcDef{"vip": vip, "port": 80, "backends": lab.BackendsDef(80, 1, all...), "health": lab.HTTPCheck()}
		l.PutService(t, "steady", def)
		addr := lab.IPVSHostPort(vip, 80)
		l.WaitUp(t, "steady", "TCP", addr, lab.WeightsOf(80, 1, all...))
		lab.WaitHTTP(t, "http://"+addr+"/")
		before, _ := lab.FindIPVSService(lab.MustIPVSList(t), "TCP", addr)

		l.StopEtcd()
		stopped := time.Now()
		tick := time.NewTicker(300 * time.Millisecond)
		var answered, failed int
		for i := 0; i < 20; i++ {
			<-tick.C
			if _, err := lab.ClientGet("http://" + addr + "/"); err != nil {
				failed++
				t.Logf("request %d with etcd down: %v", i, err)
			} else {
				answered++
			}
		}
		tick.Stop()
		t.Logf("with etcd down for %s: %d answered, %d failed", time.Since(stopped).Round(time.Millisecond), answered, failed)
		if failed > 0 {
			t.Errorf("%d of 20 requests failed while etcd was down", failed)
		}
		after, ok := lab.FindIPVSService(lab.MustIPVSList(t), "TCP", addr)
		if !ok || fmt.Sprint(sameShape(before)) != fmt.Sprint(sameShape(after)) {
			t.Errorf("the kernel changed while etcd was down:\nbefore %+v\nafter  %+v", before, after)
		}
		l.CheckAgentRunning(t)

		l.StartEtcd()
		t.Logf("etcd back after %s", time.Since(stopped).Round(time.Millisecond))
		bes := lab.BackendsDef(80, 1, all...)
		bes[1]["weight"] = 4
		def["backends"] = bes
		l.PutService(t, "steady", def)
		want := lab.WeightsOf(80, 1, all...)
		want[lab.IPVSHostPort(all[1].Addr, 80)] = 4
		l.WaitUp(t, "steady", "TCP", addr, want)
	})

	t.Run("rejected-keeps-last-good", func(t *testing.T) {
		const vip = "192.0.2.151"
		l.PutService(t, "strict", lab.SvcDef{"vip": vip, "port": 80, "backends": lab.BackendsDef(80, 1, all...), "health": lab.HTTPCheck()})
		addr := lab.IPVSHostPort(vip, 80)
		l.WaitUp(t, "strict", "TCP", addr, lab.WeightsOf(80, 1, all...))
		good := l.WaitStatus(t, 0, "strict", "applied", appliedHealthy(3))

		l.PutRaw(t, "strict", fmt.Sprintf(`{"vip": %q, "port": 70000, "backends": [{"address": %q, "port": 80}]}`, vip, all[0].Addr))
		st := l.WaitStatus(t, 0, "strict", "rejected naming port and 70000", func(st status.Status) error {
			if st.State != status.StateRejected {
				return fmt.Errorf("state %s", st.State)
			}
			if !strings.Contains(st.Error, "port") || !strings.Contains(st.Error, "70000") {
				return fmt.Errorf("error %q does not name the field and the value", st.Error)
			}
			return nil
		})
		t.Logf("rejected: %s", st.Error)
		if st.Revision != good.Revision {
			t.Errorf("status revision %d, want the last good one %d", st.Revision, good.Revision)
		}
		// the last good version is still what the kernel has, and serves
		s := lab.WaitService(t, "TCP", addr, lab.WeightsOf(80, 1, all...))
		if s.Scheduler != "rr" {
			t.Errorf("scheduler %s, want rr", s.Scheduler)
		}
		requireNoErrors(t, lab.Tally(3, func() (string, error) { return lab.ClientGet("http://" + addr + "/") }))
	})
}

// appliedHealthy accepts a status that is applied with n healthy backends.
func appliedHealthy(n int) func(status.Status) error {
	return func(st status.Status) error {
		if st.State != status.StateApplied {
			return fmt.Errorf("state %s: %s", st.State, st.Error)
		}
		healthy := 0
		for _, b := range st.Backends {
			if b.Healthy {
				healthy++
			}
		}
		if healthy != n || len(st.Backends) != n {
			return fmt.Errorf("%d of %d backends healthy, want %d of %d", healthy, len(st.Backends), n, n)
		}
		return nil
	}
}

// requireNoErrors fails the test when a Tally counted errors.
func requireNoErrors(t testing.TB, tally map[string]int) {
	t.Helper()
	for k, n := range tally {
		if strings.HasPrefix(k, "error: ") || k == "" {
			t.Fatalf("%d requests failed: %s", n, lab.TallyString(tally))
		}
	}
}

// sameShape drops the connection counters of a listed service, leaving
// what the agent programs.
func sameShape(s lab.L4Service) lab.L4Service {
	s.Dests = append([]lab.IPVSDest(nil), s.Dests...)
	for i := range s.Dests {
		s.Dests[i].ActiveConn, s.Dests[i].InActConn = 0, 0
	}
	return s
}
