//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"

	"github.com/switchman-lb/switchman/e2e/internal/lab"
)

// TestLabSmoke proves the lab itself, without the agent: IPVS is in the
// kernel, the topology exists, and a hand-made NAT service balances HTTP and
// UDP from the client namespace across two backends.
func TestLabSmoke(t *testing.T) {
	lab.RequireLab(t)

	t.Run("ipvs", func(t *testing.T) {
		out := lab.MustRun(t, lab.IPVSADMBin, "-Ln")
		if !strings.Contains(out, "IP Virtual Server version") {
			t.Fatalf("ipvsadm -Ln does not look like IPVS:\n%s", out)
		}
		if _, err := lab.ParseIPVSList(out); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("namespaces", func(t *testing.T) {
		out := lab.MustRun(t, lab.IPBin, "netns", "list")
		for _, ns := range []string{"be1", "be2", "be3", lab.ClientNS} {
			if !strings.Contains(" "+strings.Join(strings.Fields(out), " ")+" ", " "+ns+" ") {
				t.Errorf("namespace %s missing from ip netns list:\n%s", ns, out)
			}
		}
		// every backend answers directly (routing through the LB) with its name
		for _, be := range lab.Backends {
			lab.WaitFor(t, 0, be.Name+" answering the client directly", func() error {
				got, err := lab.ClientGet("http://" + be.Addr + "/")
				if err != nil {
					return err
				}
				if got != be.Name {
					return fmt.Errorf("got %q, want %q", got, be.Name)
				}
				return nil
			})
		}
	})

	t.Run("nat-rr", func(t *testing.T) {
		const vip = "192.0.2.100"
		lab.AddDummyAddr(t, "smoke0", vip+"/32")
		tcp := lab.IPVSHostPort(vip, 80)
		udp := lab.IPVSHostPort(vip, 53)
		lab.MustRun(t, lab.IPVSADMBin, "-A", "-t", tcp, "-s", "rr")
		t.Cleanup(func() { _, _ = lab.Run(0, lab.IPVSADMBin, "-D", "-t", tcp) })
		lab.MustRun(t, lab.IPVSADMBin, "-A", "-u", udp, "-s", "rr")
		t.Cleanup(func() { _, _ = lab.Run(0, lab.IPVSADMBin, "-D", "-u", udp) })
		for _, be := range lab.Backends[:2] {
			lab.MustRun(t, lab.IPVSADMBin, "-a", "-t", tcp, "-r", lab.IPVSHostPort(be.Addr, 80), "-m", "-w", "1")
			lab.MustRun(t, lab.IPVSADMBin, "-a", "-u", udp, "-r", lab.IPVSHostPort(be.Addr, 53), "-m", "-w", "1")
		}

		svcs := lab.MustIPVSList(t)
		s, ok := lab.FindIPVSService(svcs, "TCP", tcp)
		if !ok {
			t.Fatalf("TCP %s not in ipvsadm -Ln: %+v", tcp, svcs)
		}
		if s.Scheduler != "rr" || len(s.Dests) != 2 {
			t.Fatalf("TCP %s: scheduler %q with %d real servers, want rr with 2: %+v", tcp, s.Scheduler, len(s.Dests), s)
		}
		for _, d := range s.Dests {
			if lab.ForwardingName(d.Forward) != "nat" || d.Weight != 1 {
				t.Errorf("real server %s: forward %s weight %d, want Masq weight 1", d.Address, d.Forward, d.Weight)
			}
		}

		// The first request may race the client's neighbour discovery;
		// wait until the VIP answers at all, then count.
		lab.WaitFor(t, 0, "the VIP answering HTTP", func() error {
			_, err := lab.ClientGet("http://" + tcp + "/")
			return err
		})
		var got []string
		for i := 0; i < 6; i++ {
			body, err := lab.ClientGet("http://" + tcp + "/")
			if err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
			got = append(got, body)
		}
		t.Logf("HTTP answers in order: %v", got)
		for i := 1; i < len(got); i++ {
			if got[i] == got[i-1] {
				t.Errorf("rr sent requests %d and %d both to %s: %v", i-1, i, got[i], got)
			}
		}
		counts := map[string]int{}
		for _, g := range got {
			counts[g]++
		}
		if counts["be1"] != 3 || counts["be2"] != 3 {
			t.Errorf("HTTP over rr: %s, want be1=3 be2=3", lab.TallyString(counts))
		}

		udpTally := lab.Tally(4, func() (string, error) { return lab.UDPRequest(lab.ClientNS, udp, []byte("ping")) })
		t.Logf("UDP answers: %s", lab.TallyString(udpTally))
		if udpTally["be1"] != 2 || udpTally["be2"] != 2 {
			t.Errorf("UDP over rr: %s, want be1=2 be2=2", lab.TallyString(udpTally))
		}
		// NAT keeps the client's address: the backend saw 10.20.0.2.
		who, err := lab.UDPRequest(lab.ClientNS, udp, []byte("who"))
		if err != nil {
			t.Fatal(err)
		}
		if f := strings.Fields(who); len(f) != 2 || !strings.HasPrefix(f[1], lab.ClientAddr+":") {
			t.Errorf("UDP answer %q: want the client address %s as the source", who, lab.ClientAddr)
		}

		// delete the services; the table must no longer list them
		lab.MustRun(t, lab.IPVSADMBin, "-D", "-t", tcp)
		lab.MustRun(t, lab.IPVSADMBin, "-D", "-u", udp)
		svcs = lab.MustIPVSList(t)
		if _, ok := lab.FindIPVSService(svcs, "TCP", tcp); ok {
			t.Errorf("TCP %s still present after ipvsadm -D", tcp)
		}
		if _, ok := lab.FindIPVSService(svcs, "UDP", udp); ok {
			t.Errorf("UDP %s still present after ipvsadm -D", udp)
		}
	})
}

// TestLabSmokeDirect proves the direct-routing and IP-in-IP set-up of the
// lab (e2e/topology/dr-backend.sh): backends answer from the VIP themselves.
func TestLabSmokeDirect(t *testing.T) {
	lab.RequireLab(t)
	for i, mode := range []string{"dr", "tun"} {
		t.Run(mode, func(t *testing.T) {
			vip := fmt.Sprintf("192.0.2.%d", 110+i)
			flag := map[string]string{"dr": "-g", "tun": "-i"}[mode]
			want := map[string]string{"dr": "Route", "tun": "Tunnel"}[mode]
			lab.AddDummyAddr(t, "smoke1", vip+"/32")
			tcp := lab.IPVSHostPort(vip, 80)
			lab.MustRun(t, lab.IPVSADMBin, "-A", "-t", tcp, "-s", "rr")
			t.Cleanup(func() { _, _ = lab.Run(0, lab.IPVSADMBin, "-D", "-t", tcp) })
			for _, be := range lab.Backends[1:] {
				lab.SetupDRBackend(t, vip, be.Name, mode)
				lab.MustRun(t, lab.IPVSADMBin, "-a", "-t", tcp, "-r", lab.IPVSHostPort(be.Addr, 80), flag, "-w", "1")
			}
			s, ok := lab.FindIPVSService(lab.MustIPVSList(t), "TCP", tcp)
			if !ok || len(s.Dests) != 2 || s.Dests[0].Forward != want {
				t.Fatalf("TCP %s: %+v, want 2 real servers with %s", tcp, s, want)
			}
			lab.WaitFor(t, 0, "the VIP answering HTTP over "+mode, func() error {
				_, err := lab.ClientGet("http://" + tcp + "/")
				return err
			})
			tally := lab.Tally(4, func() (string, error) { return lab.ClientGet("http://" + tcp + "/") })
			t.Logf("%s answers: %s", mode, lab.TallyString(tally))
			if tally["be2"] != 2 || tally["be3"] != 2 {
				t.Errorf("%s over rr: %s, want be2=2 be3=2", mode, lab.TallyString(tally))
			}
		})
	}
}
