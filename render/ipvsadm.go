package render

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/switchman-lb/switchman/spec"
)

// IPVSRules formats IPVS services the way `ipvsadm -S -n` does, one -A line
// per service followed by an -a line per destination, so an operator can
// compare a plan with the kernel or feed it to `ipvsadm -R`.
func IPVSRules(services []L4Service) string {
	var b strings.Builder
	for _, s := range services {
		svc := ipvsadmService(s.Protocol, s.Address, s.Port)
		fmt.Fprintf(&b, "-A %s -s %s", svc, s.Scheduler)
		if len(s.Flags) > 0 {
			fmt.Fprintf(&b, " -b %s", strings.Join(s.Flags, ","))
		}
		if s.Persistence > 0 {
			fmt.Fprintf(&b, " -p %d", int(s.Persistence.Seconds()))
		}
		b.WriteByte('\n')
		for _, d := range s.Destinations {
			fmt.Fprintf(&b, "-a %s -r %s %s -w %d\n", svc, netip.AddrPortFrom(d.Address, d.Port), forwardingFlag(d.Forwarding), d.Weight)
		}
	}
	return b.String()
}

func ipvsadmService(p spec.Protocol, a netip.Addr, port uint16) string {
	flag := "-t"
	if p == spec.UDP {
		flag = "-u"
	}
	return flag + " " + netip.AddrPortFrom(a, port).String()
}

func forwardingFlag(f spec.Forwarding) string {
	switch f {
	case spec.Direct:
		return "-g"
	case spec.Tunnel:
		return "-i"
	default:
		return "-m"
	}
}
