package ipvs

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	mobyipvs "github.com/moby/ipvs"
	"github.com/vishvananda/netlink"
)

// Netlink is the real Kernel: IPVS over generic netlink, through
// github.com/moby/ipvs. Every call is bounded by its context (give it a
// deadline); a call that overruns, or fails in a way that leaves the socket
// unusable, gets the handle closed and a new one opened on the next call.
// Calls are serialized on the one handle.
type Netlink struct {
	handles *lender[*mobyipvs.Handle]
	// genl is our own generic-netlink socket, for what moby/ipvs cannot
	// do: batched writes and the connection-sync daemons.
	genl  *lender[*genlConn]
	stats batchCounters
}

// NewNetlink returns a Kernel for the network namespace at nsPath ("" for
// the current one). It opens nothing yet: each call opens the handle when
// needed, so a kernel without IPVS is reported on every call (wrapping
// ErrUnavailable) and picked up as soon as ip_vs is loaded.
func NewNetlink(nsPath string) *Netlink {
	n := &Netlink{handles: newLender(func() (*mobyipvs.Handle, error) { return openHandle(nsPath) }, (*mobyipvs.Handle).Close, brokenHandle)}
	n.genl = newLender(func() (*genlConn, error) { return openGenl(nsPath, &n.stats) }, (*genlConn).close, genlBroken)
	return n
}

// Close closes the handles.
func (n *Netlink) Close() {
	n.handles.shutdown()
	n.genl.shutdown()
}

// openHandle checks that the kernel has the IPVS generic-netlink family
// before moby/ipvs looks it up: moby/ipvs does its look-up once per process
// and, when it fails, sends every later request to family 0, which the
// kernel acknowledges without doing anything.
func openHandle(nsPath string) (*mobyipvs.Handle, error) {
	if _, err := netlink.GenlFamilyGet("IPVS"); err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.EPROTONOSUPPORT) || errors.Is(err, syscall.ENOPROTOOPT) {
			return nil, fmt.Errorf("%w (generic netlink family IPVS: %w)", ErrUnavailable, err)
		}
		return nil, fmt.Errorf("look up the IPVS netlink family: %w", err)
	}
	h, err := mobyipvs.New(nsPath)
	if err != nil {
		if errors.Is(err, syscall.EPROTONOSUPPORT) {
			return nil, fmt.Errorf("%w (%w)", ErrUnavailable, err)
		}
		return nil, fmt.Errorf("open IPVS netlink handle: %w", err)
	}
	return h, nil
}

// brokenHandle tells whether err leaves the socket unusable. Errnos the
// kernel answers a request with (exists, no such service, bad argument)
// are answers, not faults; anything else (closed socket, a reply that could
// not be parsed, a sequence mix-up) gets a fresh handle.
func brokenHandle(err error) bool {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return true
	}
	switch errno {
	case syscall.EEXIST, syscall.ESRCH, syscall.ENOENT, syscall.EINVAL, syscall.ERANGE,
		syscall.EBUSY, syscall.EPERM, syscall.EOPNOTSUPP, syscall.EAFNOSUPPORT, syscall.ENOMEM:
		return false
	}
	return true
}

// Services lists the kernel's virtual services, leaving out firewall-mark
// services.
func (n *Netlink) Services(ctx context.Context) ([]Service, error) {
	var out []Service
	err := n.handles.do(ctx, func(h *mobyipvs.Handle) error {
		list, err := h.GetServices()
		if err != nil {
			return err
		}
		out = make([]Service, 0, len(list))
		for _, s := range list {
			if s.FWMark != 0 {
				continue
			}
			addr, ok := toAddr(s.Address)
			if !ok {
				return fmt.Errorf("service with unreadable address %v", s.Address)
			}
			out = append(out, Service{
				Protocol: Protocol(s.Protocol), Address: addr, Port: s.Port,
				Scheduler: s.SchedName, Flags: Flags(s.Flags), Timeout: s.Timeout, Netmask: s.Netmask,
			})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list IPVS services: %w", err)
	}
	return out, nil
}

// Destinations lists the real servers of s.
func (n *Netlink) Destinations(ctx context.Context, s Service) ([]Destination, error) {
	var out []Destination
	err := n.handles.do(ctx, func(h *mobyipvs.Handle) error {
		list, err := h.GetDestinations(toMobyService(s))
		if err != nil {
			return err
		}
		out = make([]Destination, 0, len(list))
		for _, d := range list {
			addr, ok := toAddr(d.Address)
			if !ok {
				return fmt.Errorf("destination with unreadable address %v", d.Address)
			}
			out = append(out, Destination{
				Address: addr, Port: d.Port, Weight: d.Weight,
				Forwarding: Forwarding(d.ConnectionFlags & ForwardingMask),
				ActiveConn: d.ActiveConnections, InActConn: d.InactiveConnections,
			})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list destinations of %s: %w", s.Key(), err)
	}
	return out, nil
}

// AddService creates s.
func (n *Netlink) AddService(ctx context.Context, s Service) error {
	return n.write(ctx, "add service "+s.Key().String(), func(h *mobyipvs.Handle) error { return h.NewService(toMobyService(s)) })
}

// UpdateService changes the scheduler, flags and persistence of s.
func (n *Netlink) UpdateService(ctx context.Context, s Service) error {
	return n.write(ctx, "update service "+s.Key().String(), func(h *mobyipvs.Handle) error { return h.UpdateService(toMobyService(s)) })
}

// DeleteService removes s and its destinations.
func (n *Netlink) DeleteService(ctx context.Context, s Service) error {
	return n.write(ctx, "delete service "+s.Key().String(), func(h *mobyipvs.Handle) error { return h.DelService(toMobyService(s)) })
}

// AddDestination adds d to s.
func (n *Netlink) AddDestination(ctx context.Context, s Service, d Destination) error {
	return n.write(ctx, "add destination "+d.AddrPort().String()+" to "+s.Key().String(), func(h *mobyipvs.Handle) error {
		return h.NewDestination(toMobyService(s), toMobyDestination(d))
	})
}

// UpdateDestination changes the weight and forwarding of d in s.
func (n *Netlink) UpdateDestination(ctx context.Context, s Service, d Destination) error {
	return n.write(ctx, "update destination "+d.AddrPort().String()+" of "+s.Key().String(), func(h *mobyipvs.Handle) error {
		return h.UpdateDestination(toMobyService(s), toMobyDestination(d))
	})
}

// DeleteDestination removes d from s.
func (n *Netlink) DeleteDestination(ctx context.Context, s Service, d Destination) error {
	return n.write(ctx, "delete destination "+d.AddrPort().String()+" of "+s.Key().String(), func(h *mobyipvs.Handle) error {
		return h.DelDestination(toMobyService(s), toMobyDestination(d))
	})
}

func (n *Netlink) write(ctx context.Context, what string, call func(*mobyipvs.Handle) error) error {
	if err := n.handles.do(ctx, call); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

func toMobyService(s Service) *mobyipvs.Service {
	return &mobyipvs.Service{
		Address:       net.IP(s.Address.Unmap().AsSlice()),
		Protocol:      uint16(s.Protocol),
		Port:          s.Port,
		SchedName:     s.Scheduler,
		Flags:         uint32(s.Flags &^ FlagHashed),
		Timeout:       s.Timeout,
		Netmask:       s.Netmask,
		AddressFamily: uint16(s.Family()),
	}
}

func toMobyDestination(d Destination) *mobyipvs.Destination {
	return &mobyipvs.Destination{
		Address:         net.IP(d.Address.Unmap().AsSlice()),
		Port:            d.Port,
		Weight:          d.Weight,
		ConnectionFlags: uint32(d.Forwarding) & ForwardingMask,
		AddressFamily:   uint16(FamilyOf(d.Address)),
	}
}

func toAddr(ip net.IP) (netip.Addr, bool) {
	a, ok := netip.AddrFromSlice(ip)
	return a.Unmap(), ok
}
