//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
)

// TestLabSmoke proves the lab itself, without the agent: IPVS is in the
// kernel, the topology exists, and a hand-made NAT service balances HTTP and
// UDP from the client namespace across two backends.
func TestLabSmoke(t *testing.T) {
	RequireLab(t)

	t.Run("ipvs", func(t *testing.T) {
		out := MustRun(t, IPVSADMBin, "-Ln")
		if !strings.Contains(out, "IP Virtual Server version") {
			t.Fatalf("ipvsadm -Ln does not look like IPVS:\n%s", out)
		}
		if _, err := ParseIPVSList(out); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("namespaces", func(t *testing.T) {
		out := MustRun(t, IPBin, "netns", "list")
		for _, ns := range []string{"be1", "be2", "be3", ClientNS} {
			if !strings.Contains(" "+strings.Join(strings.Fields(out), " ")+" ", " "+ns+" ") {
				t.Errorf("namespace %s missing from ip netns list:\n%s", ns, out)
			}
		}
		// every backend answers directly (routing through the LB) with its name
		for _, be := range Backends {
			WaitFor(t, 0, be.Name+" answering the client directly", func() error {
				got, err := ClientGet("http://" + be.Addr + "/")
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
		AddDummyAddr(t, "smoke0", vip+"/32")
		tcp := IPVSHostPort(vip, 80)
		udp := IPVSHostPort(vip, 53)
		MustRun(t, IPVSADMBin, "-A", "-t", tcp, "-s", "rr")
		t.Cleanup(func() { _, _ = Run(0, IPVSADMBin, "-D", "-t", tcp) })
		MustRun(t, IPVSADMBin, "-A", "-u", udp, "-s", "rr")
		t.Cleanup(func() { _, _ = Run(0, IPVSADMBin, "-D", "-u", udp) })
		for _, be := range Backends[:2] {
			MustRun(t, IPVSADMBin, "-a", "-t", tcp, "-r", IPVSHostPort(be.Addr, 80), "-m", "-w", "1")
			MustRun(t, IPVSADMBin, "-a", "-u", udp, "-r", IPVSHostPort(be.Addr, 53), "-m", "-w", "1")
		}

		svcs := MustIPVSList(t)
		s, ok := FindIPVSService(svcs, "TCP", tcp)
		if !ok {
			t.Fatalf("TCP %s not in ipvsadm -Ln: %+v", tcp, svcs)
		}
		if s.Scheduler != "rr" || len(s.Dests) != 2 {
			t.Fatalf("TCP %s: scheduler %q with %d real servers, want rr with 2: %+v", tcp, s.Scheduler, len(s.Dests), s)
		}
		for _, d := range s.Dests {
			if ForwardingName(d.Forward) != "nat" || d.Weight != 1 {
				t.Errorf("real server %s: forward %s weight %d, want Masq weight 1", d.Address, d.Forward, d.Weight)
			}
		}

		// The first request may race the client's neighbour discovery;
		// wait until the VIP answers at all, then count.
		WaitFor(t, 0, "the VIP answering HTTP", func() error {
			_, err := ClientGet("http://" + tcp + "/")
			return err
		})
		var got []string
		for i := 0; i < 6; i++ {
			body, err := ClientGet("http://" + tcp + "/")
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
			t.Errorf("HTTP over rr: %s, want be1=3 be2=3", TallyString(counts))
		}

		udpTally := Tally(4, func() (string, error) { return UDPRequest(ClientNS, udp, []byte("ping")) })
		t.Logf("UDP answers: %s", TallyString(udpTally))
		if udpTally["be1"] != 2 || udpTally["be2"] != 2 {
			t.Errorf("UDP over rr: %s, want be1=2 be2=2", TallyString(udpTally))
		}
		// NAT keeps the client's address: the backend saw 10.20.0.2.
		who, err := UDPRequest(ClientNS, udp, []byte("who"))
		if err != nil {
			t.Fatal(err)
		}
		if f := strings.Fields(who); len(f) != 2 || !strings.HasPrefix(f[1], ClientAddr+":") {
			t.Errorf("UDP answer %q: want the client address %s as the source", who, ClientAddr)
		}

		// delete the services; the table must no longer list them
		MustRun(t, IPVSADMBin, "-D", "-t", tcp)
		MustRun(t, IPVSADMBin, "-D", "-u", udp)
		svcs = MustIPVSList(t)
		if _, ok := FindIPVSService(svcs, "TCP", tcp); ok {
			t.Errorf("TCP %s still present after ipvsadm -D", tcp)
		}
		if _, ok := FindIPVSService(svcs, "UDP", udp); ok {
			t.Errorf("UDP %s still present after ipvsadm -D", udp)
		}
	})
}

// TestLabSmokeDirect proves the direct-routing and IP-in-IP set-up of the
// lab (e2e/topology/dr-backend.sh): backends answer from the VIP themselves.
func TestLabSmokeDirect(t *testing.T) {
	RequireLab(t)
	for i, mode := range []string{"dr", "tun"} {
		t.Run(mode, func(t *testing.T) {
			vip := fmt.Sprintf("192.0.2.%d", 110+i)
			flag := map[string]string{"dr": "-g", "tun": "-i"}[mode]
			want := map[string]string{"dr": "Route", "tun": "Tunnel"}[mode]
			AddDummyAddr(t, "smoke1", vip+"/32")
			tcp := IPVSHostPort(vip, 80)
			MustRun(t, IPVSADMBin, "-A", "-t", tcp, "-s", "rr")
			t.Cleanup(func() { _, _ = Run(0, IPVSADMBin, "-D", "-t", tcp) })
			for _, be := range Backends[1:] {
				SetupDRBackend(t, vip, be.Name, mode)
				MustRun(t, IPVSADMBin, "-a", "-t", tcp, "-r", IPVSHostPort(be.Addr, 80), flag, "-w", "1")
			}
			s, ok := FindIPVSService(MustIPVSList(t), "TCP", tcp)
			if !ok || len(s.Dests) != 2 || s.Dests[0].Forward != want {
				t.Fatalf("TCP %s: %+v, want 2 real servers with %s", tcp, s, want)
			}
			WaitFor(t, 0, "the VIP answering HTTP over "+mode, func() error {
				_, err := ClientGet("http://" + tcp + "/")
				return err
			})
			tally := Tally(4, func() (string, error) { return ClientGet("http://" + tcp + "/") })
			t.Logf("%s answers: %s", mode, TallyString(tally))
			if tally["be2"] != 2 || tally["be3"] != 2 {
				t.Errorf("%s over rr: %s, want be2=2 be3=2", mode, TallyString(tally))
			}
		})
	}
}

// TestParseIPVSList checks the ipvsadm -Ln parser on fixed output; it needs
// no lab.
func TestParseIPVSList(t *testing.T) {
	const out = `IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  192.0.2.10:80 rr
  -> 10.10.0.11:80                Masq    1      0          3
  -> 10.10.0.12:80                Masq    0      2          0
UDP  [2001:db8:100::1]:53 mh (mh-fallback,mh-port) persistent 300 mask 255.255.255.0
  -> [fd00:10::11]:53             Route   5      0          0
FWM  7 wlc ops
`
	svcs, err := ParseIPVSList(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(svcs) != 3 {
		t.Fatalf("got %d services, want 3: %+v", len(svcs), svcs)
	}
	s := svcs[0]
	if s.Key() != "TCP 192.0.2.10:80" || s.Scheduler != "rr" || len(s.Dests) != 2 {
		t.Errorf("service 0: %+v", s)
	}
	if d, ok := s.Dest("10.10.0.12:80"); !ok || d.Weight != 0 || d.ActiveConn != 2 || ForwardingName(d.Forward) != "nat" {
		t.Errorf("dest 10.10.0.12:80: %+v %v", d, ok)
	}
	u := svcs[1]
	if u.Address != "[2001:db8:100::1]:53" || !u.HasFlag("mh-fallback") || !u.HasFlag("mh-port") ||
		u.Persistent != 300 || u.Netmask != "255.255.255.0" || u.Dests[0].Forward != "Route" || u.Dests[0].Weight != 5 {
		t.Errorf("service 1: %+v", u)
	}
	if f := svcs[2]; f.Protocol != "FWM" || f.Address != "7" || !f.OnePacket || len(f.Dests) != 0 {
		t.Errorf("service 2: %+v", f)
	}
	if _, err := ParseIPVSList("TCP 1.2.3.4:80 rr bogus\n"); err == nil {
		t.Error("unknown attribute accepted")
	}
	if got := IPVSHostPort("2001:db8::1", 80); got != "[2001:db8::1]:80" {
		t.Errorf("IPVSHostPort = %q", got)
	}
}
