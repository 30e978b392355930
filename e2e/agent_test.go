//go:build e2e

package e2e

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/status"
)

// TestAgentIPVS runs the switchman agent binary against the lab's kernel:
// definitions written to etcd become IPVS services that carry real traffic
// from the client namespace, changes are applied in place, and restarts,
// foreign services and an unreachable etcd leave the data plane alone.
func TestAgentIPVS(t *testing.T) {
	l := newAgentLab(t)
	all := Backends

	t.Run("rr-nat-balances", func(t *testing.T) {
		const vip = "192.0.2.141"
		l.putService(t, "rr", svcDef{"vip": vip, "port": 80, "scheduler": "rr",
			"backends": backendsDef(80, 1, all...), "health": httpCheck()})
		addr := IPVSHostPort(vip, 80)
		s := l.waitUp(t, "rr", "TCP", addr, weightsOf(80, 1, all...))
		if s.Scheduler != "rr" {
			t.Errorf("scheduler %s, want rr", s.Scheduler)
		}
		for _, d := range s.Dests {
			if d.Forward != "Masq" {
				t.Errorf("%s forwards %s, want Masq", d.Address, d.Forward)
			}
		}
		l.waitStatus(t, 0, "rr", "applied with 3 healthy backends", appliedHealthy(3))
		waitHTTP(t, "http://"+addr+"/")
		tally := Tally(30, func() (string, error) { return ClientGet("http://" + addr + "/") })
		t.Logf("30 requests: %s", TallyString(tally))
		for _, be := range all {
			if tally[be.Name] == 0 {
				t.Errorf("%s answered none of 30 requests: %s", be.Name, TallyString(tally))
			}
		}
		requireNoErrors(t, tally)
	})

	t.Run("sh-sticks", func(t *testing.T) {
		const vip = "192.0.2.142"
		l.putService(t, "sh", svcDef{"vip": vip, "port": 80, "scheduler": "sh",
			"backends": backendsDef(80, 1, all...), "health": httpCheck()})
		addr := IPVSHostPort(vip, 80)
		if s := l.waitUp(t, "sh", "TCP", addr, weightsOf(80, 1, all...)); s.Scheduler != "sh" {
			t.Errorf("scheduler %s, want sh", s.Scheduler)
		}
		waitHTTP(t, "http://"+addr+"/")
		tally := Tally(15, func() (string, error) { return ClientGet("http://" + addr + "/") })
		t.Logf("15 requests: %s", TallyString(tally))
		requireNoErrors(t, tally)
		if len(tally) != 1 {
			t.Errorf("sh spread one client over %d backends: %s", len(tally), TallyString(tally))
		}
	})

	t.Run("mh-flags", func(t *testing.T) {
		const vip = "192.0.2.143"
		l.putService(t, "mh", svcDef{"vip": vip, "port": 80, "scheduler": "mh",
			"scheduler_flags": []string{"mh-fallback", "mh-port"},
			"backends":        backendsDef(80, 1, all...), "health": httpCheck()})
		addr := IPVSHostPort(vip, 80)
		s := l.waitUp(t, "mh", "TCP", addr, weightsOf(80, 1, all...))
		if s.Scheduler != "mh" || !s.HasFlag("mh-fallback") || !s.HasFlag("mh-port") {
			t.Errorf("ipvsadm shows scheduler %s flags %v, want mh (mh-fallback,mh-port)", s.Scheduler, s.Flags)
		}
		waitHTTP(t, "http://"+addr+"/")
		tally := Tally(12, func() (string, error) { return ClientGet("http://" + addr + "/") })
		t.Logf("12 requests over mh with mh-port: %s", TallyString(tally))
		requireNoErrors(t, tally)
	})

	t.Run("dr", func(t *testing.T) {
		const vip = "192.0.2.144"
		drBackends := all[1:]
		for _, be := range drBackends {
			SetupDRBackend(t, vip, be.Name, "dr")
		}
		l.putService(t, "dr", svcDef{"vip": vip, "port": 80, "forwarding": "dr",
			"backends": backendsDef(80, 1, drBackends...), "health": httpCheck()})
		addr := IPVSHostPort(vip, 80)
		s := l.waitUp(t, "dr", "TCP", addr, weightsOf(80, 1, drBackends...))
		for _, d := range s.Dests {
			if d.Forward != "Route" {
				t.Errorf("%s forwards %s, want Route", d.Address, d.Forward)
			}
		}
		waitHTTP(t, "http://"+addr+"/")
		tally := Tally(10, func() (string, error) { return ClientGet("http://" + addr + "/") })
		t.Logf("10 requests over DR: %s", TallyString(tally))
		requireNoErrors(t, tally)
		for _, be := range drBackends {
			if tally[be.Name] == 0 {
				t.Errorf("%s answered none of the DR requests: %s", be.Name, TallyString(tally))
			}
		}
	})

	t.Run("udp", func(t *testing.T) {
		const vip = "192.0.2.145"
		l.putService(t, "dns", svcDef{"vip": vip, "port": 53, "protocol": "udp",
			"backends": backendsDef(53, 1, all...),
			"health":   map[string]any{"protocol": "udp", "payload": "ping", "interval": "1s", "timeout": "500ms"}})
		addr := IPVSHostPort(vip, 53)
		l.waitUp(t, "dns", "UDP", addr, weightsOf(53, 1, all...))
		ask := func() (string, error) { return UDPRequest(ClientNS, addr, []byte("ping")) }
		WaitFor(t, 0, "UDP "+addr+" answering", func() error { _, err := ask(); return err })
		tally := Tally(15, ask)
		t.Logf("15 datagrams: %s", TallyString(tally))
		requireNoErrors(t, tally)
		for _, be := range all {
			if tally[be.Name] == 0 {
				t.Errorf("%s answered none of 15 datagrams: %s", be.Name, TallyString(tally))
			}
		}
	})

	t.Run("weight-in-place", func(t *testing.T) {
		const vip = "192.0.2.146"
		def := svcDef{"vip": vip, "port": 80, "scheduler": "wrr",
			"backends": backendsDef(80, 1, all...), "health": httpCheck()}
		l.putService(t, "weights", def)
		addr := IPVSHostPort(vip, 80)
		l.waitUp(t, "weights", "TCP", addr, weightsOf(80, 1, all...))
		waitHTTP(t, "http://"+addr+"/")
		requireNoErrors(t, Tally(9, func() (string, error) { return ClientGet("http://" + addr + "/") }))
		before := waitConns(t, "TCP", addr, 10)
		bes := backendsDef(80, 1, all...)
		bes[0]["weight"] = 5
		def["backends"] = bes
		l.putService(t, "weights", def)
		want := weightsOf(80, 1, all...)
		want[IPVSHostPort(all[0].Addr, 80)] = 5
		l.waitUp(t, "weights", "TCP", addr, want)
		// Three more connections: a recreated service would count from 0
		// and never reach before+3.
		requireNoErrors(t, Tally(3, func() (string, error) { return ClientGet("http://" + addr + "/") }))
		after := waitConns(t, "TCP", addr, before+3)
		t.Logf("Conns before the weight change %d, after it and 3 more requests %d", before, after)
	})

	t.Run("delete", func(t *testing.T) {
		const vip = "192.0.2.147"
		l.putService(t, "gone", svcDef{"vip": vip, "port": 80,
			"backends": backendsDef(80, 1, all...), "health": httpCheck()})
		addr := IPVSHostPort(vip, 80)
		l.waitUp(t, "gone", "TCP", addr, weightsOf(80, 1, all...))
		l.waitStatus(t, 0, "gone", "applied", appliedHealthy(3))
		l.del(t, serviceKey("gone"), false)
		WaitIPVS(t, 0, addr+" deleted", func(svcs []L4Service) error {
			if _, ok := FindIPVSService(svcs, "TCP", addr); ok {
				return errors.New("still listed")
			}
			return nil
		})
		WaitFor(t, 0, "the status key of gone deleted", func() error {
			_, ok, err := l.status("gone")
			if err == nil && ok {
				err = errors.New("still present")
			}
			return err
		})
	})

	t.Run("foreign-service-survives", func(t *testing.T) {
		const foreign = "192.0.2.250:80"
		MustRun(t, IPVSADMBin, "-A", "-t", foreign, "-s", "rr")
		t.Cleanup(func() { _, _ = Run(0, IPVSADMBin, "-D", "-t", foreign) })
		MustRun(t, IPVSADMBin, "-a", "-t", foreign, "-r", IPVSHostPort(all[0].Addr, 80), "-m", "-w", "3")
		checkForeign := func(when string) {
			t.Helper()
			s, ok := FindIPVSService(MustIPVSList(t), "TCP", foreign)
			if !ok {
				t.Fatalf("%s: the foreign service %s is gone", when, foreign)
			}
			d, ok := s.Dest(IPVSHostPort(all[0].Addr, 80))
			if s.Scheduler != "rr" || len(s.Dests) != 1 || !ok || d.Weight != 3 || d.Forward != "Masq" {
				t.Fatalf("%s: the foreign service changed: %+v", when, s)
			}
		}

		const vip = "192.0.2.148"
		def := svcDef{"vip": vip, "port": 80, "backends": backendsDef(80, 1, all...), "health": httpCheck()}
		l.putService(t, "neighbour", def)
		addr := IPVSHostPort(vip, 80)
		l.waitUp(t, "neighbour", "TCP", addr, weightsOf(80, 1, all...))
		checkForeign("after the agent created a service")

		def["backends"] = backendsDef(80, 2, all...)
		l.putService(t, "neighbour", def)
		l.waitUp(t, "neighbour", "TCP", addr, weightsOf(80, 2, all...))
		checkForeign("after a reconcile that changed weights")

		l.restartAgent(t)
		l.waitReady(t, 1)
		checkForeign("after an agent restart")

		l.cleanupService(t, "neighbour")
		l.waitReady(t, 0)
		checkForeign("after every switchman service was deleted")
	})

	t.Run("restart-writes-nothing", func(t *testing.T) {
		const vip = "192.0.2.149"
		l.putService(t, "web", svcDef{"vip": vip, "port": 80, "scheduler": "wlc",
			"backends": backendsDef(80, 2, all...), "health": httpCheck()})
		l.putService(t, "dns2", svcDef{"vip": vip, "port": 53, "protocol": "udp",
			"backends": backendsDef(53, 1, all...),
			"health":   map[string]any{"protocol": "udp", "payload": "ping", "interval": "1s", "timeout": "500ms"}})
		tcp, udp := IPVSHostPort(vip, 80), IPVSHostPort(vip, 53)
		l.waitUp(t, "web", "TCP", tcp, weightsOf(80, 2, all...))
		l.waitUp(t, "dns2", "UDP", udp, weightsOf(53, 1, all...))
		l.waitReady(t, 2)
		waitHTTP(t, "http://"+tcp+"/")
		requireNoErrors(t, Tally(6, func() (string, error) { return ClientGet("http://" + tcp + "/") }))
		requireNoErrors(t, Tally(6, func() (string, error) { return UDPRequest(ClientNS, udp, []byte("ping")) }))
		tcpBefore, udpBefore := waitConns(t, "TCP", tcp, 7), waitConns(t, "UDP", udp, 6)
		tableBefore := MustIPVSList(t)

		l.stopAgent(t)
		start := time.Now()
		l.startAgent(t)
		l.waitReady(t, 2)
		ready := time.Since(start)
		t.Logf("FIGURE agent restart-to-ready (process start to 2 services applied, unchanged kernel state): %s", ready.Round(time.Millisecond))

		m, err := l.metrics()
		if err != nil {
			t.Fatal(err)
		}
		if w, ok := m[metricIPVSWrite]; !ok || w != 0 {
			t.Errorf("%s = %v (present %v) after a restart with nothing changed, want 0", metricIPVSWrite, w, ok)
		}
		// Traffic and health checks go on; still nothing is written.
		requireNoErrors(t, Tally(6, func() (string, error) { return ClientGet("http://" + tcp + "/") }))
		requireNoErrors(t, Tally(6, func() (string, error) { return UDPRequest(ClientNS, udp, []byte("ping")) }))
		for _, name := range []string{"web", "dns2"} {
			l.waitStatus(t, 0, name, "applied after the restart", appliedHealthy(3))
		}
		m, err = l.metrics()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("FIGURE ipvs writes after the restart: %v", m[metricIPVSWrite])
		if w := m[metricIPVSWrite]; w != 0 {
			t.Errorf("%s = %v a while after the restart, want 0", metricIPVSWrite, w)
		}
		// counters that reset would never reach before+6
		tcpAfter, udpAfter := waitConns(t, "TCP", tcp, tcpBefore+6), waitConns(t, "UDP", udp, udpBefore+6)
		t.Logf("Conns across the restart: TCP %d -> %d, UDP %d -> %d", tcpBefore, tcpAfter, udpBefore, udpAfter)
		for _, k := range []string{"TCP " + tcp, "UDP " + udp} {
			proto, addr, _ := strings.Cut(k, " ")
			b, _ := FindIPVSService(tableBefore, proto, addr)
			a, _ := FindIPVSService(MustIPVSList(t), proto, addr)
			if fmt.Sprint(sameShape(b)) != fmt.Sprint(sameShape(a)) {
				t.Errorf("%s changed across the restart:\nbefore %+v\nafter  %+v", k, b, a)
			}
		}
	})

	t.Run("etcd-down", func(t *testing.T) {
		const vip = "192.0.2.150"
		def := svcDef{"vip": vip, "port": 80, "backends": backendsDef(80, 1, all...), "health": httpCheck()}
		l.putService(t, "steady", def)
		addr := IPVSHostPort(vip, 80)
		l.waitUp(t, "steady", "TCP", addr, weightsOf(80, 1, all...))
		waitHTTP(t, "http://"+addr+"/")
		before, _ := FindIPVSService(MustIPVSList(t), "TCP", addr)

		l.stopEtcd()
		stopped := time.Now()
		tick := time.NewTicker(300 * time.Millisecond)
		var answered, failed int
		for i := 0; i < 20; i++ {
			<-tick.C
			if _, err := ClientGet("http://" + addr + "/"); err != nil {
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
		after, ok := FindIPVSService(MustIPVSList(t), "TCP", addr)
		if !ok || fmt.Sprint(sameShape(before)) != fmt.Sprint(sameShape(after)) {
			t.Errorf("the kernel changed while etcd was down:\nbefore %+v\nafter  %+v", before, after)
		}
		l.checkAgentRunning(t)

		l.startEtcd()
		t.Logf("etcd back after %s", time.Since(stopped).Round(time.Millisecond))
		bes := backendsDef(80, 1, all...)
		bes[1]["weight"] = 4
		def["backends"] = bes
		l.putService(t, "steady", def)
		want := weightsOf(80, 1, all...)
		want[IPVSHostPort(all[1].Addr, 80)] = 4
		l.waitUp(t, "steady", "TCP", addr, want)
	})

	t.Run("rejected-keeps-last-good", func(t *testing.T) {
		const vip = "192.0.2.151"
		l.putService(t, "strict", svcDef{"vip": vip, "port": 80, "backends": backendsDef(80, 1, all...), "health": httpCheck()})
		addr := IPVSHostPort(vip, 80)
		l.waitUp(t, "strict", "TCP", addr, weightsOf(80, 1, all...))
		good := l.waitStatus(t, 0, "strict", "applied", appliedHealthy(3))

		l.putRaw(t, "strict", fmt.Sprintf(`{"vip": %q, "port": 70000, "backends": [{"address": %q, "port": 80}]}`, vip, all[0].Addr))
		st := l.waitStatus(t, 0, "strict", "rejected naming port and 70000", func(st status.Status) error {
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
		s := waitService(t, "TCP", addr, weightsOf(80, 1, all...))
		if s.Scheduler != "rr" {
			t.Errorf("scheduler %s, want rr", s.Scheduler)
		}
		requireNoErrors(t, Tally(3, func() (string, error) { return ClientGet("http://" + addr + "/") }))
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
			t.Fatalf("%d requests failed: %s", n, TallyString(tally))
		}
	}
}

// sameShape drops the connection counters of a listed service, leaving
// what the agent programs.
func sameShape(s L4Service) L4Service {
	s.Dests = append([]IPVSDest(nil), s.Dests...)
	for i := range s.Dests {
		s.Dests[i].ActiveConn, s.Dests[i].InActConn = 0, 0
	}
	return s
}
