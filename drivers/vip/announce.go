package vip

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
	"github.com/mdlayher/ndp"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv6"
)

// DefaultAnnounceSchedule returns when Announce sends, counted from its
// start: at once, then after 0.1, 0.5, 1 and 2 s, for the switches and
// hosts that missed the first ones.
func DefaultAnnounceSchedule() []time.Duration {
	return []time.Duration{0, 100 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second}
}

// Announce tells the link of iface that this host now holds addrs:
// gratuitous ARP (a request and a reply) for each IPv4 address and an
// unsolicited neighbour advertisement with the override flag for each
// IPv6 address, on DefaultAnnounceSchedule. The addresses must already be
// on the host (the IPv6 ones need a link-local address on iface to send
// from). It returns when the last round is sent or ctx ends, with the
// errors of the first round that failed for each family.
func Announce(ctx context.Context, iface string, addrs []netip.Addr) error {
	return AnnounceOn(ctx, iface, addrs, DefaultAnnounceSchedule())
}

// AnnounceOn is Announce with a schedule of its own.
func AnnounceOn(ctx context.Context, iface string, addrs []netip.Addr, schedule []time.Duration) error {
	ifi, err := net.InterfaceByName(iface)
	if err != nil {
		return fmt.Errorf("announce on %s: %w", iface, err)
	}
	var v4, v6 []netip.Addr
	for _, a := range addrs {
		if a = a.Unmap(); a.Is4() {
			v4 = append(v4, a)
		} else {
			v6 = append(v6, a.WithZone(""))
		}
	}
	var errs []error
	var garp *arp.Client
	if len(v4) > 0 {
		if garp, err = arp.Dial(ifi); err != nil {
			errs = append(errs, fmt.Errorf("gratuitous ARP on %s: %w", iface, err))
		} else {
			defer garp.Close()
		}
	}
	var na *naConn
	if len(v6) > 0 {
		if na, err = listenNA(ifi); err != nil {
			errs = append(errs, fmt.Errorf("neighbour advertisement on %s: %w", iface, err))
		} else {
			defer na.pc.Close()
		}
	}
	if garp == nil && na == nil {
		return errors.Join(errs...)
	}
	var arpErr, ndpErr error
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	start := time.Now()
	for _, at := range schedule {
		timer.Reset(time.Until(start.Add(at)))
		select {
		case <-ctx.Done():
			return errors.Join(append(errs, arpErr, ndpErr)...)
		case <-timer.C:
		}
		if garp != nil {
			for _, a := range v4 {
				if err := sendGARP(garp, ifi.HardwareAddr, a); err != nil && arpErr == nil {
					arpErr = fmt.Errorf("gratuitous ARP for %s on %s: %w", a, iface, err)
				}
			}
		}
		if na != nil {
			for _, a := range v6 {
				if err := sendNA(na, ifi.HardwareAddr, a); err != nil && ndpErr == nil {
					ndpErr = fmt.Errorf("neighbour advertisement for %s on %s: %w", a, iface, err)
				}
			}
		}
	}
	return errors.Join(append(errs, arpErr, ndpErr)...)
}

// sendGARP broadcasts a gratuitous ARP request and reply for a: sender and
// target address both a, sender hardware address hw. Hosts that already
// have an entry for a update it (Linux does even with arp_accept off).
func sendGARP(c *arp.Client, hw net.HardwareAddr, a netip.Addr) error {
	for _, op := range []arp.Operation{arp.OperationRequest, arp.OperationReply} {
		target := ethernet.Broadcast
		if op == arp.OperationRequest {
			target = net.HardwareAddr{0, 0, 0, 0, 0, 0}
		}
		p, err := arp.NewPacket(op, hw, a, target, a)
		if err != nil {
			return err
		}
		if err := c.WriteTo(p, ethernet.Broadcast); err != nil {
			return err
		}
	}
	return nil
}

// naConn sends neighbour advertisements out of one interface, named by
// index, never by name: a zone name goes through the process-wide zone
// cache, which can name another interface (another network namespace's).
type naConn struct {
	pc *ipv6.PacketConn
	cm *ipv6.ControlMessage
}

// listenNA opens an ICMPv6 socket that sends from ifi's link-local address
// with hop limit 255, as RFC 4861 requires.
func listenNA(ifi *net.Interface) (*naConn, error) {
	addrs, err := ifi.Addrs()
	if err != nil {
		return nil, err
	}
	var src netip.Addr
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is6() && p.Addr().IsLinkLocalUnicast() {
			src = p.Addr()
			break
		}
	}
	if !src.IsValid() {
		return nil, errors.New("no IPv6 link-local address to send from")
	}
	c, err := icmp.ListenPacket("ip6:ipv6-icmp", "::")
	if err != nil {
		return nil, err
	}
	pc := c.IPv6PacketConn()
	for _, set := range []func() error{
		func() error { return pc.SetMulticastInterface(ifi) },
		func() error { return pc.SetMulticastHopLimit(ndp.HopLimit) },
		func() error { return pc.SetHopLimit(ndp.HopLimit) },
		func() error { return pc.SetMulticastLoopback(false) },
		func() error { return pc.SetChecksum(true, 2) },
	} {
		if err := set(); err != nil {
			c.Close()
			return nil, err
		}
	}
	return &naConn{pc: pc, cm: &ipv6.ControlMessage{HopLimit: ndp.HopLimit, Src: src.AsSlice(), IfIndex: ifi.Index}}, nil
}

// sendNA sends an unsolicited neighbour advertisement for a to all nodes,
// with the override flag and hw as the target link-layer address, so
// neighbours replace the entry they have.
func sendNA(c *naConn, hw net.HardwareAddr, a netip.Addr) error {
	b, err := ndp.MarshalMessage(&ndp.NeighborAdvertisement{Override: true, TargetAddress: a,
		Options: []ndp.Option{&ndp.LinkLayerAddress{Direction: ndp.Target, Addr: hw}}})
	if err != nil {
		return err
	}
	_, err = c.pc.WriteTo(b, c.cm, &net.IPAddr{IP: netip.IPv6LinkLocalAllNodes().AsSlice()})
	return err
}
