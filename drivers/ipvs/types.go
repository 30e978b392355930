// Package ipvs programs kernel IPVS virtual services from switchman's
// desired state. It reads what the kernel has, computes the difference with
// a pure function (Diff) and applies only that: a weight change is one
// UpdateDestination, a scheduler change one UpdateService, and nothing is
// ever flushed. Only services this driver created (recorded in a state file)
// are ever changed or removed.
//
// The kernel is reached through the small Kernel interface. NewNetlink is
// the real implementation (the only file that imports github.com/moby/ipvs);
// package ipvsfake has a stateful fake for tests.
package ipvs

import (
	"errors"
	"fmt"
	"net/netip"
)

// Protocol is an IP protocol number of a virtual service.
type Protocol uint16

// Protocols IPVS services use here (IPPROTO_TCP, IPPROTO_UDP).
const (
	TCP Protocol = 6
	UDP Protocol = 17
)

// String names the protocol as ipvsadm and switchman do ("tcp", "udp").
func (p Protocol) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return fmt.Sprintf("proto%d", uint16(p))
}

// Family is an address family (AF_INET or AF_INET6).
type Family uint16

// Address families.
const (
	IPv4 Family = 2  // AF_INET
	IPv6 Family = 10 // AF_INET6
)

// FamilyOf returns the address family of a.
func FamilyOf(a netip.Addr) Family {
	if a.Is4() || a.Is4In6() {
		return IPv4
	}
	return IPv6
}

// Flags are the IP_VS_SVC_F_* service flags of the kernel ABI.
type Flags uint32

// Service flags (include/uapi/linux/ip_vs.h). The sh and mh schedulers give
// SCHED1 and SCHED2 their own meaning: fallback and port.
const (
	FlagPersistent Flags = 0x0001 // IP_VS_SVC_F_PERSISTENT
	FlagHashed     Flags = 0x0002 // IP_VS_SVC_F_HASHED: set by the kernel, never by us
	FlagOnePacket  Flags = 0x0004 // IP_VS_SVC_F_ONEPACKET
	FlagSched1     Flags = 0x0008 // IP_VS_SVC_F_SCHED1
	FlagSched2     Flags = 0x0010 // IP_VS_SVC_F_SCHED2
	FlagSched3     Flags = 0x0020 // IP_VS_SVC_F_SCHED3

	FlagSHFallback = FlagSched1 // IP_VS_SVC_F_SCHED_SH_FALLBACK
	FlagSHPort     = FlagSched2 // IP_VS_SVC_F_SCHED_SH_PORT
	FlagMHFallback = FlagSched1 // IP_VS_SVC_F_SCHED_MH_FALLBACK
	FlagMHPort     = FlagSched2 // IP_VS_SVC_F_SCHED_MH_PORT
)

// Forwarding is a destination's packet-forwarding method (IP_VS_CONN_F_*
// under IP_VS_CONN_F_FWD_MASK).
type Forwarding uint32

// Forwarding methods, as `ipvsadm -Ln` names them in its Forward column.
const (
	Masq   Forwarding = 0 // IP_VS_CONN_F_MASQ: NAT
	Local  Forwarding = 1 // IP_VS_CONN_F_LOCALNODE
	Tunnel Forwarding = 2 // IP_VS_CONN_F_TUNNEL: IP-in-IP
	Route  Forwarding = 3 // IP_VS_CONN_F_DROUTE: direct routing

	// ForwardingMask selects the forwarding bits of connection flags.
	ForwardingMask = 0x0007
)

// String names the method as `ipvsadm -Ln` does.
func (f Forwarding) String() string {
	switch f {
	case Masq:
		return "Masq"
	case Local:
		return "Local"
	case Tunnel:
		return "Tunnel"
	case Route:
		return "Route"
	}
	return fmt.Sprintf("fwd%d", uint32(f))
}

// Key identifies a virtual service: protocol, address and port.
type Key struct {
	Protocol Protocol
	Address  netip.Addr
	Port     uint16
}

// Service returns the virtual service k names, its other settings unset.
func (k Key) Service() Service {
	return Service{Protocol: k.Protocol, Address: k.Address, Port: k.Port}
}

// String formats the key as switchman does: vip:port/proto.
func (k Key) String() string {
	return netip.AddrPortFrom(k.Address, k.Port).String() + "/" + k.Protocol.String()
}

// Service is one IPVS virtual service. Firewall-mark services are not
// handled by switchman; the kernel adapter skips them when listing.
type Service struct {
	Protocol  Protocol
	Address   netip.Addr
	Port      uint16
	Scheduler string
	// Flags holds the IP_VS_SVC_F_* bits. Listing reports FlagHashed too;
	// compare with Settings, which leaves it out.
	Flags Flags
	// Timeout is the persistence timeout in seconds (with FlagPersistent).
	Timeout uint32
	// Netmask is the persistence granularity: a mask for IPv4
	// (0xffffffff is one client address), a prefix length for IPv6.
	Netmask uint32
}

// Key returns the service's identity.
func (s Service) Key() Key { return Key{Protocol: s.Protocol, Address: s.Address, Port: s.Port} }

// Family returns the service's address family.
func (s Service) Family() Family { return FamilyOf(s.Address) }

// Settings returns the part of s an UpdateService can change, with the
// kernel-owned hashed flag cleared, so two services compare equal when no
// update is needed.
func (s Service) Settings() Service {
	s.Flags &^= FlagHashed
	return s
}

// Destination is one real server of a virtual service.
type Destination struct {
	Address    netip.Addr
	Port       uint16
	Weight     int
	Forwarding Forwarding
	// ActiveConn and InActConn are the kernel's counters, as ipvsadm -Ln
	// shows them; they are read, never written.
	ActiveConn int
	InActConn  int
}

// AddrPort returns the destination's address and port, its identity within
// a service.
func (d Destination) AddrPort() netip.AddrPort { return netip.AddrPortFrom(d.Address, d.Port) }

// ErrUnavailable says the kernel has no IPVS (no ip_vs module loaded, or a
// kernel built without CONFIG_IP_VS). Kernel implementations wrap it.
var ErrUnavailable = errors.New("IPVS is not available in this kernel: load it with `modprobe ip_vs` (the kernel needs CONFIG_IP_VS)")
