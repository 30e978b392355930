package lab

import (
	"bufio"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"
)

// L4Service is one virtual service as ipvsadm -Ln prints it.
type L4Service struct {
	Protocol   string     // TCP, UDP, SCTP or FWM
	Address    string     // "192.0.2.10:80", "[2001:db8::1]:443", or the mark for FWM
	Scheduler  string     // rr, wrr, lc, wlc, sh, mh, ...
	Flags      []string   // scheduler flags, e.g. mh-fallback, mh-port, sh-port
	Persistent int        // persistence timeout in seconds; 0 = off
	Netmask    string     // persistence mask, when ipvsadm prints one
	PE         string     // persistence engine, e.g. sip
	OnePacket  bool       // ops
	Dests      []IPVSDest // real servers in ipvsadm's order
}

// IPVSDest is one real server of an L4Service.
type IPVSDest struct {
	Address    string // "10.10.0.11:80" or "[fd00:10::11]:80"
	Forward    string // Masq (nat), Route (dr), Tunnel (tun) or Local
	Weight     int
	ActiveConn int
	InActConn  int
}

// Key returns "TCP 192.0.2.10:80", the service's identity in the kernel.
func (s L4Service) Key() string { return s.Protocol + " " + s.Address }

// HasFlag reports whether the scheduler flag f is set.
func (s L4Service) HasFlag(f string) bool {
	for _, x := range s.Flags {
		if x == f {
			return true
		}
	}
	return false
}

// Dest returns the real server at address ("10.10.0.11:80"), if present.
func (s L4Service) Dest(address string) (IPVSDest, bool) {
	for _, d := range s.Dests {
		if d.Address == address {
			return d, true
		}
	}
	return IPVSDest{}, false
}

// ForwardingName maps ipvsadm's Forward column to the service definition's
// word: Masq -> nat, Route -> dr, Tunnel -> tun, Local -> local.
func ForwardingName(forward string) string {
	switch forward {
	case "Masq":
		return "nat"
	case "Route":
		return "dr"
	case "Tunnel":
		return "tun"
	case "Local":
		return "local"
	}
	return strings.ToLower(forward)
}

// ParseIPVSList parses the output of ipvsadm -Ln (numeric, no --stats or
// --rate) into services with their real servers, in ipvsadm's order.
func ParseIPVSList(out string) ([]L4Service, error) {
	var svcs []L4Service
	sc := bufio.NewScanner(strings.NewReader(out))
	line := 0
	for sc.Scan() {
		line++
		text := sc.Text()
		f := strings.Fields(text)
		if len(f) == 0 {
			continue
		}
		switch {
		case strings.HasPrefix(text, "IP Virtual Server"), f[0] == "Prot", f[0] == "->" && len(f) > 1 && f[1] == "RemoteAddress:Port":
			continue // headers
		case f[0] == "->":
			if len(svcs) == 0 {
				return nil, fmt.Errorf("line %d: real server before any service: %q", line, text)
			}
			if len(f) < 6 {
				return nil, fmt.Errorf("line %d: short real server line: %q", line, text)
			}
			var n [3]int
			for i := range n {
				v, err := strconv.Atoi(f[3+i])
				if err != nil {
					return nil, fmt.Errorf("line %d: %q: %v", line, text, err)
				}
				n[i] = v
			}
			s := &svcs[len(svcs)-1]
			s.Dests = append(s.Dests, IPVSDest{Address: f[1], Forward: f[2], Weight: n[0], ActiveConn: n[1], InActConn: n[2]})
		case f[0] == "TCP" || f[0] == "UDP" || f[0] == "SCTP" || f[0] == "FWM":
			if len(f) < 3 {
				return nil, fmt.Errorf("line %d: short service line: %q", line, text)
			}
			s := L4Service{Protocol: f[0], Address: f[1], Scheduler: f[2]}
			for i := 3; i < len(f); i++ {
				switch w := f[i]; {
				case strings.HasPrefix(w, "(") && strings.HasSuffix(w, ")"):
					s.Flags = strings.Split(strings.Trim(w, "()"), ",")
				case w == "persistent" && i+1 < len(f):
					v, err := strconv.Atoi(f[i+1])
					if err != nil {
						return nil, fmt.Errorf("line %d: persistent %q: %v", line, f[i+1], err)
					}
					s.Persistent = v
					i++
				case w == "mask" && i+1 < len(f):
					s.Netmask = f[i+1]
					i++
				case w == "pe" && i+1 < len(f):
					s.PE = f[i+1]
					i++
				case w == "ops":
					s.OnePacket = true
				default:
					return nil, fmt.Errorf("line %d: unknown service attribute %q in %q", line, w, text)
				}
			}
			svcs = append(svcs, s)
		default:
			return nil, fmt.Errorf("line %d: unexpected line %q", line, text)
		}
	}
	return svcs, sc.Err()
}

// IPVSList runs ipvsadm -Ln in the current (root) namespace and parses it.
func IPVSList() ([]L4Service, error) {
	out, err := Run(0, IPVSADMBin, "-Ln")
	if err != nil {
		return nil, err
	}
	return ParseIPVSList(out)
}

// MustIPVSList is IPVSList that fails the test on error.
func MustIPVSList(t testing.TB) []L4Service {
	t.Helper()
	svcs, err := IPVSList()
	if err != nil {
		t.Fatal(err)
	}
	return svcs
}

// FindIPVSService returns the service with protocol ("TCP") and address
// ("192.0.2.10:80") from svcs.
func FindIPVSService(svcs []L4Service, protocol, address string) (L4Service, bool) {
	for _, s := range svcs {
		if s.Protocol == protocol && s.Address == address {
			return s, true
		}
	}
	return L4Service{}, false
}

// IPVSHostPort formats an address and port as ipvsadm -Ln prints them:
// "192.0.2.10:80", "[2001:db8::1]:80".
func IPVSHostPort(addr string, port int) string {
	return net.JoinHostPort(addr, strconv.Itoa(port))
}

// WaitIPVS polls ipvsadm -Ln until cond accepts the table (it returns nil)
// and fails the test with cond's last error and the table otherwise.
func WaitIPVS(t testing.TB, timeout time.Duration, what string, cond func([]L4Service) error) {
	t.Helper()
	var last string
	err := Poll(timeout, func() error {
		out, err := Run(0, IPVSADMBin, "-Ln")
		last = out
		if err != nil {
			return err
		}
		svcs, err := ParseIPVSList(out)
		if err != nil {
			return err
		}
		return cond(svcs)
	})
	if err != nil {
		t.Fatalf("waiting for %s: %v\nlast ipvsadm -Ln:\n%s", what, err, last)
	}
}

// ParseStatsConns finds a service's Conns counter in the output of
// ipvsadm -Ln --stats --exact.
func ParseStatsConns(out, proto, addr string) (int, error) {
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 3 && f[0] == proto && f[1] == addr {
			n, err := strconv.Atoi(f[2])
			if err != nil {
				return 0, fmt.Errorf("stats line %q: %w", sc.Text(), err)
			}
			return n, nil
		}
	}
	return 0, fmt.Errorf("%s %s not in ipvsadm -Ln --stats:\n%s", proto, addr, out)
}
