package nftables

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/switchman-lb/switchman/spec"
)

// ctnetlink attributes (linux/netfilter/nfnetlink_conntrack.h), which
// x/sys/unix does not define.
const (
	ipctnlMsgCtGet = 1

	ctaTupleOrig  = 1
	ctaTupleReply = 2
	ctaProtoinfo  = 4
	ctaFilter     = 25

	ctaTupleIP    = 1
	ctaTupleProto = 2

	ctaIPv4Src = 1
	ctaIPv4Dst = 2
	ctaIPv6Src = 3
	ctaIPv6Dst = 4

	ctaProtoNum     = 1
	ctaProtoSrcPort = 2
	ctaProtoDstPort = 3

	ctaProtoinfoTCP      = 1
	ctaProtoinfoTCPState = 1

	ctaFilterOrigFlags  = 1
	ctaFilterReplyFlags = 2
	// CTA_FILTER_F_CTA_IP_DST | CTA_FILTER_F_CTA_PROTO_NUM |
	// CTA_FILTER_F_CTA_PROTO_DST_PORT
	ctaFilterVIPPort = 1<<1 | 1<<3 | 1<<5

	tcpSynSent     = 1
	tcpSynRecv     = 2
	tcpEstablished = 3
	tcpSynSent2    = 9
)

// Connections implements Kernel with one conntrack dump that the kernel
// filters to the service's vip:port/proto (CTA_FILTER, Linux 5.8 and
// later; on older kernels the whole table comes back and is filtered
// here).
func (n *Netlink) Connections(ctx context.Context, k ConnKey) (map[netip.AddrPort]int, error) {
	proto, ok := protoNumbers[k.Protocol]
	if !ok {
		return nil, fmt.Errorf("protocol %q is not tcp or udp", k.Protocol)
	}
	vip := k.VIP.Unmap()
	fam, ipDst, ipSrc := uint8(unix.AF_INET), uint16(ctaIPv4Dst), uint16(ctaIPv4Src)
	if !vip.Is4() {
		fam, ipDst, ipSrc = unix.AF_INET6, ctaIPv6Dst, ctaIPv6Src
	}
	attrs := encode(func(ae *netlink.AttributeEncoder) {
		ae.Nested(ctaTupleOrig, func(t *netlink.AttributeEncoder) error {
			t.Nested(ctaTupleIP, func(ip *netlink.AttributeEncoder) error {
				ip.Bytes(ipDst, vip.AsSlice())
				return nil
			})
			t.Nested(ctaTupleProto, func(p *netlink.AttributeEncoder) error {
				p.Uint8(ctaProtoNum, proto)
				p.Uint16(ctaProtoDstPort, k.Port)
				return nil
			})
			return nil
		})
		ae.Nested(ctaFilter, func(f *netlink.AttributeEncoder) error {
			// These two are in host byte order.
			f.Bytes(ctaFilterOrigFlags, binary.NativeEndian.AppendUint32(nil, ctaFilterVIPPort))
			f.Bytes(ctaFilterReplyFlags, binary.NativeEndian.AppendUint32(nil, 0))
			return nil
		})
	})
	req := netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_CTNETLINK<<8 | ipctnlMsgCtGet), Flags: netlink.Request | netlink.Dump},
		Data:   append([]byte{fam, unix.NFNETLINK_V0, 0, 0}, attrs...),
	}
	c, done, err := n.session(ctx)
	if err != nil {
		return nil, err
	}
	defer done()
	msgs, err := c.Execute(req)
	if err != nil {
		if ctx.Err() != nil {
			n.reset()
		}
		return nil, ioError(ctx, "dump conntrack", err)
	}
	out := map[netip.AddrPort]int{}
	for _, m := range msgs {
		f, err := decodeFlow(m, ipSrc, ipDst)
		if err != nil {
			return nil, fmt.Errorf("conntrack entry: %w", err)
		}
		if f.origDst != vip || f.proto != proto || f.origPort != k.Port {
			continue
		}
		if k.Protocol == spec.TCP {
			switch f.tcpState {
			case tcpSynSent, tcpSynRecv, tcpEstablished, tcpSynSent2:
			default:
				continue // closing or closed: the backend is done with it
			}
		}
		out[f.backend]++
	}
	return out, nil
}

type flow struct {
	origDst  netip.Addr
	origPort uint16
	proto    uint8
	backend  netip.AddrPort // the source of the reply direction
	tcpState uint8
}

func decodeFlow(m netlink.Message, ipSrc, ipDst uint16) (flow, error) {
	var f flow
	ad, err := decoder(m)
	if err != nil {
		return f, err
	}
	tuple := func(b []byte, want uint16) (addr netip.Addr, proto uint8, port uint16, err error) {
		t, err := nested(b)
		if err != nil {
			return addr, 0, 0, err
		}
		for t.Next() {
			switch t.Type() {
			case ctaTupleIP:
				t.Nested(func(ip *netlink.AttributeDecoder) error {
					for ip.Next() {
						if ip.Type() == want {
							addr, _ = netip.AddrFromSlice(ip.Bytes())
						}
					}
					return nil
				})
			case ctaTupleProto:
				t.Nested(func(p *netlink.AttributeDecoder) error {
					for p.Next() {
						switch p.Type() {
						case ctaProtoNum:
							proto = p.Uint8()
						case ctaProtoSrcPort:
							if want == ipSrc {
								port = p.Uint16()
							}
						case ctaProtoDstPort:
							if want == ipDst {
								port = p.Uint16()
							}
						}
					}
					return nil
				})
			}
		}
		return addr, proto, port, t.Err()
	}
	for ad.Next() {
		switch ad.Type() {
		case ctaTupleOrig:
			f.origDst, f.proto, f.origPort, err = tuple(ad.Bytes(), ipDst)
		case ctaTupleReply:
			var a netip.Addr
			var p uint16
			a, _, p, err = tuple(ad.Bytes(), ipSrc)
			f.backend = netip.AddrPortFrom(a, p)
		case ctaProtoinfo:
			ad.Nested(func(pi *netlink.AttributeDecoder) error {
				for pi.Next() {
					if pi.Type() == ctaProtoinfoTCP {
						pi.Nested(func(tcp *netlink.AttributeDecoder) error {
							for tcp.Next() {
								if tcp.Type() == ctaProtoinfoTCPState {
									f.tcpState = tcp.Uint8()
								}
							}
							return nil
						})
					}
				}
				return nil
			})
		}
		if err != nil {
			return f, err
		}
	}
	return f, ad.Err()
}
