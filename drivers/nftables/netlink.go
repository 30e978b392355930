package nftables

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
)

// This file is the one place that speaks nf_tables' netlink protocol. The
// expressions of rules are encoded by github.com/google/nftables (v0.3.0);
// everything else is done here, because that library cannot do it:
//   - its Flush joins the kernel's errors without saying which write
//     failed, and never returns the handles of new rules (we ask the
//     kernel to echo them);
//   - its read functions turn errnos into text ("%v"), and its ct
//     expression cannot say "original direction" for ct original ip daddr
//     (and encodes the one-byte direction in four bytes, which its own
//     parser then rejects);
//   - it requests an answer for every write on a default-sized socket,
//     which overflows on large batches (ENOBUFS); we enlarge the socket's
//     buffers and the driver bounds the batches.
// Rules read back are recognized by re-encoding: a rule is known when its
// expressions equal, attribute for attribute, those switchman writes for
// the rule it appears to be.

// Netlink reaches nf_tables through a netlink socket. It implements Kernel.
type Netlink struct {
	netns int

	mu    sync.Mutex
	conn  *netlink.Conn
	seq   uint32
	setID uint32
	buf   []byte
}

var _ Kernel = (*Netlink)(nil)

// NewNetlink returns a Kernel for the network namespace that netnsFD
// refers to (0 or negative: the caller's). The socket is opened on first
// use.
func NewNetlink(netnsFD int) *Netlink {
	// The netlink library enters any non-zero NetNS, so -1 ("none", as
	// the agent passes it) would fail every call with EBADF.
	return &Netlink{netns: max(netnsFD, 0)}
}

// Close closes the socket.
func (n *Netlink) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.reset()
	return nil
}

func (n *Netlink) reset() {
	if n.conn != nil {
		n.conn.Close()
		n.conn = nil
	}
}

const socketBuffer = 32 << 20

// open returns the socket, opening it and checking that nf_tables answers.
func (n *Netlink) open() (*netlink.Conn, error) {
	if n.conn != nil {
		return n.conn, nil
	}
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: n.netns})
	if err != nil {
		if errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.EAFNOSUPPORT) {
			return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		return nil, fmt.Errorf("open a netfilter netlink socket: %w", err)
	}
	// The kernel's explanation with errors, and room for the answers to a
	// large batch. (Successful writes are answered with a header only;
	// capping the answers to errors too would save little and confuses
	// the netlink library's own reads.)
	if err := c.SetOption(netlink.ExtendedAcknowledge, true); err != nil {
		c.Close()
		return nil, fmt.Errorf("netlink socket option: %w", err)
	}
	if rc, err := c.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, socketBuffer) != nil {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, socketBuffer)
			}
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, socketBuffer) != nil {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, socketBuffer)
			}
		})
	}
	// Does nf_tables answer at all?
	if _, err := c.Execute(request(unix.NFT_MSG_GETGEN, unix.AF_UNSPEC, 0, nil)); err != nil {
		c.Close()
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EPROTONOSUPPORT) {
			return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		return nil, fmt.Errorf("nf_tables generation: %w", err)
	}
	n.conn = c
	return c, nil
}

// session takes the socket for one call, with ctx's deadline on it; done
// gives it back.
func (n *Netlink) session(ctx context.Context) (c *netlink.Conn, done func(), err error) {
	n.mu.Lock()
	if c, err = n.open(); err != nil {
		n.mu.Unlock()
		return nil, nil, err
	}
	stop := deadline(ctx, c)
	return c, func() { stop(); n.mu.Unlock() }, nil
}

// deadline applies ctx's deadline and cancellation to the socket until
// the returned function is called.
func deadline(ctx context.Context, c *netlink.Conn) func() {
	d, _ := ctx.Deadline()
	_ = c.SetDeadline(d)
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	return func() { stop() }
}

// ioError wraps a socket error, preferring ctx's error when ctx ended.
func ioError(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%s: %w", what, ctx.Err())
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%s: %w", what, context.DeadlineExceeded)
	}
	return fmt.Errorf("%s: %w", what, err)
}

func family(f render.NFTFamily) uint8 {
	if f == render.NFTIPv6 {
		return unix.NFPROTO_IPV6
	}
	return unix.NFPROTO_IPV4
}

func request(msg int, fam uint8, flags netlink.HeaderFlags, attrs []byte) netlink.Message {
	return netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | msg), Flags: netlink.Request | flags},
		Data:   append([]byte{fam, unix.NFNETLINK_V0, 0, 0}, attrs...),
	}
}

func encode(fn func(ae *netlink.AttributeEncoder)) []byte {
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	fn(ae)
	b, err := ae.Encode()
	if err != nil {
		panic(fmt.Sprintf("nftables: encode attributes: %v", err)) // only on an encoder bug: lengths are bounded
	}
	return b
}

// Generation implements Kernel.
func (n *Netlink) Generation(ctx context.Context) (uint32, error) {
	c, done, err := n.session(ctx)
	if err != nil {
		return 0, err
	}
	defer done()
	msgs, err := c.Execute(request(unix.NFT_MSG_GETGEN, unix.AF_UNSPEC, 0, nil))
	if err != nil {
		n.reset()
		return 0, ioError(ctx, "nf_tables generation", err)
	}
	for _, m := range msgs {
		ad, err := decoder(m)
		if err != nil {
			return 0, err
		}
		for ad.Next() {
			if ad.Type() == unix.NFTA_GEN_ID {
				return ad.Uint32(), nil
			}
		}
	}
	return 0, errors.New("nf_tables generation: no generation in the answer")
}

// Commit implements Kernel.
func (n *Netlink) Commit(ctx context.Context, ops []Op) ([]uint64, error) {
	c, done, err := n.session(ctx)
	if err != nil {
		return nil, err
	}
	defer done()
	var msgs []netlink.Message
	var owner []int
	for i, op := range ops {
		ms, err := n.encodeOp(op)
		if err != nil {
			return nil, &OpError{Index: i, Op: op, Err: fmt.Errorf("%w: %w", syscall.EINVAL, err)}
		}
		for range ms {
			owner = append(owner, i)
		}
		msgs = append(msgs, ms...)
	}
	if len(msgs) == 0 {
		return make([]uint64, len(ops)), nil
	}
	first := n.seq + 1
	n.seq += uint32(len(msgs)) + 2
	batch := make([]netlink.Message, 0, len(msgs)+2)
	batch = append(batch, netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_MSG_BATCH_BEGIN), Flags: netlink.Request, Sequence: first},
		Data:   []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES},
	})
	for i := range msgs {
		msgs[i].Header.Sequence = first + 1 + uint32(i)
		msgs[i].Header.Flags |= netlink.Acknowledge
		batch = append(batch, msgs[i])
	}
	batch = append(batch, netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_MSG_BATCH_END), Flags: netlink.Request, Sequence: first + 1 + uint32(len(msgs))},
		Data:   []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES},
	})
	if _, err := c.SendMessages(batch); err != nil {
		n.reset()
		return nil, ioError(ctx, "send nf_tables batch", err)
	}
	// The kernel answers every write in order, after echoing the rules it
	// added; an error on the batch itself (ENOMEM, ENOBUFS) is the only
	// answer.
	handles := make([]uint64, len(ops))
	var refused *OpError
	for acked := 0; acked < len(msgs); {
		replies, err := n.receive(c)
		if err != nil {
			n.reset() // answers may be lost or still coming: start afresh
			return nil, ioError(ctx, "receive nf_tables answers", err)
		}
		for _, m := range replies {
			idx := int(m.Header.Sequence) - int(first) - 1
			switch {
			case m.Header.Type == netlink.Error:
				errno, text := ackError(m)
				if idx < 0 || idx >= len(msgs) {
					if errno != 0 {
						return nil, fmt.Errorf("nf_tables refused the batch: %w", kernelError(errno, text))
					}
					continue
				}
				acked++
				if errno != 0 && refused == nil {
					refused = &OpError{Index: owner[idx], Op: ops[owner[idx]], Err: kernelError(errno, text)}
				}
			case m.Header.Type == netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWRULE) && idx >= 0 && idx < len(msgs):
				if h, ok := ruleHandle(m); ok {
					handles[owner[idx]] = h
				}
			}
		}
	}
	if refused != nil {
		return nil, refused
	}
	return handles, nil
}

// receive reads one datagram and splits it into messages.
func (n *Netlink) receive(c *netlink.Conn) ([]netlink.Message, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	if n.buf == nil {
		n.buf = make([]byte, 1<<20)
	}
	var nr int
	var rerr error
	if err := rc.Read(func(fd uintptr) bool {
		nr, _, rerr = unix.Recvfrom(int(fd), n.buf, 0)
		return rerr != unix.EAGAIN
	}); err != nil {
		return nil, err
	}
	if rerr != nil {
		return nil, os.NewSyscallError("recvfrom", rerr)
	}
	return splitMessages(n.buf[:nr])
}

func splitMessages(b []byte) ([]netlink.Message, error) {
	var out []netlink.Message
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(b[0:4]))
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return nil, errors.New("malformed netlink message")
		}
		out = append(out, netlink.Message{
			Header: netlink.Header{
				Length:   uint32(l),
				Type:     netlink.HeaderType(binary.NativeEndian.Uint16(b[4:6])),
				Flags:    netlink.HeaderFlags(binary.NativeEndian.Uint16(b[6:8])),
				Sequence: binary.NativeEndian.Uint32(b[8:12]),
				PID:      binary.NativeEndian.Uint32(b[12:16]),
			},
			Data: slices.Clone(b[unix.NLMSG_HDRLEN:l]),
		})
		b = b[min(len(b), (l+unix.NLMSG_ALIGNTO-1)&^(unix.NLMSG_ALIGNTO-1)):]
	}
	return out, nil
}

// ackError returns the errno of an acknowledgement and the kernel's
// extended-ack message, if any.
func ackError(m netlink.Message) (syscall.Errno, string) {
	if len(m.Data) < 4 {
		return syscall.EIO, ""
	}
	code := int32(binary.NativeEndian.Uint32(m.Data[:4]))
	if code == 0 {
		return 0, ""
	}
	var text string
	if m.Header.Flags&netlink.AcknowledgeTLVs != 0 && len(m.Data) >= 4+unix.NLMSG_HDRLEN {
		off := 4 + unix.NLMSG_HDRLEN // capped: the request's header only
		if m.Header.Flags&netlink.Capped == 0 {
			off = 4 + int(binary.NativeEndian.Uint32(m.Data[4:8]))
		}
		if off <= len(m.Data) {
			if ad, err := netlink.NewAttributeDecoder(m.Data[off:]); err == nil {
				for ad.Next() {
					if ad.Type() == unix.NLMSGERR_ATTR_MSG {
						text = ad.String()
					}
				}
			}
		}
	}
	return syscall.Errno(-code), text
}

func kernelError(errno syscall.Errno, text string) error {
	if text == "" {
		return errno
	}
	return fmt.Errorf("%s: %w", text, errno)
}

func ruleHandle(m netlink.Message) (uint64, bool) {
	if len(m.Data) < 4 {
		return 0, false
	}
	ad, err := netlink.NewAttributeDecoder(m.Data[4:])
	if err != nil {
		return 0, false
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		if ad.Type() == unix.NFTA_RULE_HANDLE {
			return ad.Uint64(), true
		}
	}
	return 0, false
}

// elementsPerMessage bounds one element write, so that a message stays
// well below the size a netlink attribute can describe.
const elementsPerMessage = 256

// encodeOp turns one write into its netlink messages (several for many
// elements).
func (n *Netlink) encodeOp(op Op) ([]netlink.Message, error) {
	fam := family(op.Family)
	create := netlink.Create | netlink.Excl
	switch op.Kind {
	case AddTable, DelTable:
		attrs := encode(func(ae *netlink.AttributeEncoder) { ae.String(unix.NFTA_TABLE_NAME, render.NFTTable) })
		if op.Kind == AddTable {
			return []netlink.Message{request(unix.NFT_MSG_NEWTABLE, fam, create, attrs)}, nil
		}
		return []netlink.Message{request(unix.NFT_MSG_DELTABLE, fam, 0, attrs)}, nil
	case AddChain:
		var hook, prio uint32
		if h := op.Hook; h != nil {
			num, ok := hookNumbers[h.Hook]
			if !ok || (h.Type != "filter" && h.Type != "nat") {
				return nil, fmt.Errorf("chain %s: hook %+v", op.Chain, *h)
			}
			hook, prio = num, uint32(int32(h.Priority))
		}
		attrs := encode(func(ae *netlink.AttributeEncoder) {
			ae.String(unix.NFTA_CHAIN_TABLE, render.NFTTable)
			ae.String(unix.NFTA_CHAIN_NAME, op.Chain)
			if op.Hook != nil {
				ae.Nested(unix.NFTA_CHAIN_HOOK, func(h *netlink.AttributeEncoder) error {
					h.Uint32(unix.NFTA_HOOK_HOOKNUM, hook)
					h.Uint32(unix.NFTA_HOOK_PRIORITY, prio)
					return nil
				})
				ae.Uint32(unix.NFTA_CHAIN_POLICY, nfAccept)
				ae.String(unix.NFTA_CHAIN_TYPE, op.Hook.Type)
			}
		})
		return []netlink.Message{request(unix.NFT_MSG_NEWCHAIN, fam, create, attrs)}, nil
	case DelChain:
		attrs := encode(func(ae *netlink.AttributeEncoder) {
			ae.String(unix.NFTA_CHAIN_TABLE, render.NFTTable)
			ae.String(unix.NFTA_CHAIN_NAME, op.Chain)
		})
		return []netlink.Message{request(unix.NFT_MSG_DELCHAIN, fam, 0, attrs)}, nil
	case AddSet:
		attrs, err := n.encodeSet(op.Family, op.Set)
		if err != nil {
			return nil, err
		}
		return []netlink.Message{request(unix.NFT_MSG_NEWSET, fam, create, attrs)}, nil
	case DelSet:
		attrs := encode(func(ae *netlink.AttributeEncoder) {
			ae.String(unix.NFTA_SET_TABLE, render.NFTTable)
			ae.String(unix.NFTA_SET_NAME, op.Set.Name)
		})
		return []netlink.Message{request(unix.NFT_MSG_DELSET, fam, 0, attrs)}, nil
	case AddElements, DelElements:
		msg, flags := unix.NFT_MSG_NEWSETELEM, create
		if op.Kind == DelElements {
			msg, flags = unix.NFT_MSG_DELSETELEM, 0
		}
		var out []netlink.Message
		for chunk := range slices.Chunk(op.Elements, elementsPerMessage) {
			attrs, err := encodeElements(op.Family, op.Set, chunk, op.Kind == AddElements)
			if err != nil {
				return nil, err
			}
			out = append(out, request(msg, fam, flags, attrs))
		}
		return out, nil
	case AddRule, ReplaceRule:
		exprs, err := encodeRule(op.Family, op.Rule)
		if err != nil {
			return nil, err
		}
		attrs := encode(func(ae *netlink.AttributeEncoder) {
			ae.String(unix.NFTA_RULE_TABLE, render.NFTTable)
			ae.String(unix.NFTA_RULE_CHAIN, op.Chain)
			if op.Kind == ReplaceRule {
				ae.Uint64(unix.NFTA_RULE_HANDLE, op.Handle)
			} else if op.Handle != 0 {
				ae.Uint64(unix.NFTA_RULE_POSITION, op.Handle)
			}
			ae.Nested(unix.NFTA_RULE_EXPRESSIONS, func(l *netlink.AttributeEncoder) error {
				for _, e := range exprs {
					l.Bytes(unix.NFTA_LIST_ELEM|unix.NLA_F_NESTED, e)
				}
				return nil
			})
		})
		flags := netlink.Create | unix.NLM_F_ECHO
		switch {
		case op.Kind == ReplaceRule:
			flags = netlink.Replace | unix.NLM_F_ECHO
		case op.Handle == 0:
			flags |= netlink.Append
		}
		return []netlink.Message{request(unix.NFT_MSG_NEWRULE, fam, flags, attrs)}, nil
	case DelRule:
		attrs := encode(func(ae *netlink.AttributeEncoder) {
			ae.String(unix.NFTA_RULE_TABLE, render.NFTTable)
			ae.String(unix.NFTA_RULE_CHAIN, op.Chain)
			ae.Uint64(unix.NFTA_RULE_HANDLE, op.Handle)
		})
		return []netlink.Message{request(unix.NFT_MSG_DELRULE, fam, 0, attrs)}, nil
	}
	return nil, fmt.Errorf("unknown write %v", op.Kind)
}

var hookNumbers = map[string]uint32{
	"prerouting": unix.NF_INET_PRE_ROUTING, "input": unix.NF_INET_LOCAL_IN, "forward": unix.NF_INET_FORWARD,
	"output": unix.NF_INET_LOCAL_OUT, "postrouting": unix.NF_INET_POST_ROUTING,
}

// Set key types, by family: nft's datatype numbers (concatenations are
// 6 bits per part) and lengths (each part padded to 4 bytes).
func keyType(f render.NFTFamily, k render.NFTKey) (magic, length uint32, err error) {
	addr := nftables.TypeIPAddr
	if f == render.NFTIPv6 {
		addr = nftables.TypeIP6Addr
	}
	var t nftables.SetDatatype
	switch k {
	case render.NFTKeyAddr:
		t = addr
	case render.NFTKeyAddrPort:
		t, err = nftables.ConcatSetType(addr, nftables.TypeInetService)
	case render.NFTKeyAddrProtoPort:
		t, err = nftables.ConcatSetType(addr, nftables.TypeInetProto, nftables.TypeInetService)
	case render.NFTKeySlot:
		t = nftables.TypeInteger
	default:
		return 0, 0, fmt.Errorf("unknown key type %d", k)
	}
	return t.GetNFTMagic(), t.Bytes, err
}

// Userdata nft stores for the slots maps, so that `nft list` shows them as
// nft would write them (a plain integer key type has no name nft can parse
// back): `typeof numgen inc mod 1024 : verdict` for a verdict map, and
// `typeof numgen inc mod 1024 : ip daddr . th dport` (ip6 daddr in family
// ip6) for a data map to backends.
var (
	slotKeyUserdata      = mustHex("000401000000010400000000031a000417000000011200040000000001040004000002040000000004080004010000000100060400000000")
	slotBackendsUserdata = map[render.NFTFamily][]byte{
		render.NFTIPv4: mustHex("000401000000010400000000031a0004170000000112000400000000010400040000020400000000043400040d000000012c0014000407000000010c00040c00000001040c0000000114000407000000010c00040b000000010402000000060400000000"),
		render.NFTIPv6: mustHex("000401000000010400000000031a0004170000000112000400000000010400040000020400000000043400040d000000012c0014000407000000010c00040d0000000104090000000114000407000000010c00040b000000010402000000060400000000"),
	}
)

func mustHex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err) // the constants above are hex
	}
	return b
}

// slotUserdata returns the userdata of a slots map of family f.
func slotUserdata(f render.NFTFamily, s render.NFTSet) []byte {
	if s.Backends {
		return slotBackendsUserdata[f]
	}
	return slotKeyUserdata
}

// backendType returns nft's data type and length of a backend (address .
// port) in family f.
func backendType(f render.NFTFamily) (magic, length uint32, err error) {
	return keyType(f, render.NFTKeyAddrPort)
}

const (
	verdictType           = 0xffffff00 // nft's datatype of verdicts in maps
	verdictLen            = 16
	verdictGoto           = 0xfffffffc // NFT_GOTO (-4) as the kernel's u32
	nfAccept              = 1          // NF_ACCEPT, a base chain's policy
	ctDirOrig             = 0          // IP_CT_DIR_ORIGINAL
	ctStatusDNAT          = 1 << 5     // IPS_DST_NAT
	icmpPortUnreachable   = 3          // ICMP_PORT_UNREACH
	icmpv6PortUnreachable = 4          // ICMPV6_PORT_UNREACH
)

func (n *Netlink) encodeSet(f render.NFTFamily, s render.NFTSet) ([]byte, error) {
	magic, length, err := keyType(f, s.Key)
	if err != nil {
		return nil, err
	}
	var flags uint32
	if s.Verdicts || s.Backends {
		flags |= unix.NFT_SET_MAP
	}
	var dataMagic, dataLen uint32
	if s.Backends {
		if dataMagic, dataLen, err = backendType(f); err != nil {
			return nil, err
		}
	}
	if s.Interval {
		flags |= unix.NFT_SET_INTERVAL
	}
	if s.Timeout > 0 {
		flags |= unix.NFT_SET_TIMEOUT | unix.NFT_SET_EVAL
	}
	n.setID++
	id := n.setID
	return encode(func(ae *netlink.AttributeEncoder) {
		ae.String(unix.NFTA_SET_TABLE, render.NFTTable)
		ae.String(unix.NFTA_SET_NAME, s.Name)
		ae.Uint32(unix.NFTA_SET_FLAGS, flags)
		ae.Uint32(unix.NFTA_SET_KEY_TYPE, magic)
		ae.Uint32(unix.NFTA_SET_KEY_LEN, length)
		switch {
		case s.Verdicts:
			ae.Uint32(unix.NFTA_SET_DATA_TYPE, verdictType)
			ae.Uint32(unix.NFTA_SET_DATA_LEN, verdictLen)
		case s.Backends:
			ae.Uint32(unix.NFTA_SET_DATA_TYPE, dataMagic)
			ae.Uint32(unix.NFTA_SET_DATA_LEN, dataLen)
		}
		if s.Timeout > 0 {
			ae.Uint64(unix.NFTA_SET_TIMEOUT, uint64(s.Timeout.Milliseconds()))
		}
		ae.Uint32(unix.NFTA_SET_ID, id)
		if s.Size > 0 {
			ae.Nested(unix.NFTA_SET_DESC, func(d *netlink.AttributeEncoder) error {
				d.Uint32(unix.NFTA_SET_DESC_SIZE, s.Size)
				return nil
			})
		}
		if s.Key == render.NFTKeySlot {
			ae.Bytes(unix.NFTA_SET_USERDATA, slotUserdata(f, s))
		}
	}), nil
}

var protoNumbers = map[spec.Protocol]byte{spec.TCP: unix.IPPROTO_TCP, spec.UDP: unix.IPPROTO_UDP}

func addrBytes(f render.NFTFamily, a netip.Addr) ([]byte, error) {
	a = a.Unmap()
	if (f == render.NFTIPv4) != a.Is4() {
		return nil, fmt.Errorf("address %s is not in family %s", a, f)
	}
	return a.AsSlice(), nil
}

func elementKey(f render.NFTFamily, k render.NFTKey, e render.NFTElement) ([]byte, error) {
	if k == render.NFTKeySlot {
		return binary.NativeEndian.AppendUint32(nil, e.Slot), nil
	}
	b, err := addrBytes(f, e.Addr)
	if err != nil {
		return nil, err
	}
	switch k {
	case render.NFTKeyAddr:
		return b, nil
	case render.NFTKeyAddrPort:
		return append(binary.BigEndian.AppendUint16(b, e.Port), 0, 0), nil
	case render.NFTKeyAddrProtoPort:
		p, ok := protoNumbers[e.Proto]
		if !ok {
			return nil, fmt.Errorf("protocol %q", e.Proto)
		}
		b = append(b, p, 0, 0, 0)
		return append(binary.BigEndian.AppendUint16(b, e.Port), 0, 0), nil
	}
	return nil, fmt.Errorf("unknown key type %d", k)
}

// Element userdata nft writes for an interval open at its end
// (NFTNL_UDATA_SET_ELEM_FLAGS = NFTNL_SET_ELEM_F_INTERVAL_OPEN).
var openIntervalUserdata = []byte{1, 4, 1, 0, 0, 0}

func encodeElements(f render.NFTFamily, s render.NFTSet, elems []render.NFTElement, add bool) ([]byte, error) {
	type enc struct {
		key, data []byte
		e         render.NFTElement
	}
	var list []enc
	for _, e := range elems {
		key, err := elementKey(f, s.Key, e)
		if err != nil {
			return nil, err
		}
		x := enc{key: key, e: e}
		if add && s.Backends {
			if x.data, err = elementKey(f, render.NFTKeyAddrPort, render.NFTElement{Addr: e.Backend.Addr(), Port: e.Backend.Port()}); err != nil {
				return nil, err
			}
		}
		list = append(list, x)
	}
	return encode(func(ae *netlink.AttributeEncoder) {
		ae.String(unix.NFTA_SET_ELEM_LIST_TABLE, render.NFTTable)
		ae.String(unix.NFTA_SET_ELEM_LIST_SET, s.Name)
		ae.Nested(unix.NFTA_SET_ELEM_LIST_ELEMENTS, func(l *netlink.AttributeEncoder) error {
			for _, x := range list {
				l.Nested(unix.NFTA_LIST_ELEM, func(el *netlink.AttributeEncoder) error {
					el.Nested(unix.NFTA_SET_ELEM_KEY, func(k *netlink.AttributeEncoder) error {
						k.Bytes(unix.NFTA_DATA_VALUE, x.key)
						return nil
					})
					if x.e.End {
						el.Uint32(unix.NFTA_SET_ELEM_FLAGS, unix.NFT_SET_ELEM_INTERVAL_END)
					}
					if add && s.Verdicts {
						el.Nested(unix.NFTA_SET_ELEM_DATA, func(d *netlink.AttributeEncoder) error {
							d.Nested(unix.NFTA_DATA_VERDICT, func(v *netlink.AttributeEncoder) error {
								v.Uint32(unix.NFTA_VERDICT_CODE, verdictGoto)
								v.String(unix.NFTA_VERDICT_CHAIN, x.e.Goto)
								return nil
							})
							return nil
						})
					}
					if x.data != nil {
						el.Nested(unix.NFTA_SET_ELEM_DATA, func(d *netlink.AttributeEncoder) error {
							d.Bytes(unix.NFTA_DATA_VALUE, x.data)
							return nil
						})
					}
					if add && x.e.Open {
						el.Bytes(unix.NFTA_SET_ELEM_USERDATA, openIntervalUserdata)
					}
					return nil
				})
			}
			return nil
		})
	}), nil
}

// Registers as nft allocates them: reg 1 is 16 bytes wide; the 4-byte
// registers after an IPv4 address are 9 and 10, after an IPv6 one reg 2 (16
// bytes) and 13.
const (
	regVerdict = unix.NFT_REG_VERDICT
	reg1       = unix.NFT_REG_1
	reg2       = unix.NFT_REG_2
)

func regAfterAddr(f render.NFTFamily) (next, after uint32) {
	if f == render.NFTIPv6 {
		return reg2, unix.NFT_REG32_05
	}
	return unix.NFT_REG32_01, unix.NFT_REG32_02
}

// saddr and daddr load the source and destination address into reg.
func saddr(f render.NFTFamily, reg uint32) expr.Any {
	if f == render.NFTIPv6 {
		return &expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: 8, Len: 16}
	}
	return &expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4}
}

func daddr(f render.NFTFamily, reg uint32) expr.Any {
	if f == render.NFTIPv6 {
		return &expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: 24, Len: 16}
	}
	return &expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4}
}

func addrLen(f render.NFTFamily) uint32 {
	if f == render.NFTIPv6 {
		return 16
	}
	return 4
}

// ctExpr encodes a ct load. The library cannot send a direction with the
// address keys (and sends four bytes where the kernel reads one), so this
// one expression is encoded here.
func ctExpr(key, reg uint32, original bool) []byte {
	return encode(func(ae *netlink.AttributeEncoder) {
		ae.String(unix.NFTA_EXPR_NAME, "ct")
		ae.Nested(unix.NFTA_EXPR_DATA, func(d *netlink.AttributeEncoder) error {
			d.Uint32(unix.NFTA_CT_DREG, reg)
			d.Uint32(unix.NFTA_CT_KEY, key)
			if original {
				d.Uint8(unix.NFTA_CT_DIRECTION, ctDirOrig)
			}
			return nil
		})
	})
}

// dnatExpr encodes DNAT to the address in reg 1 and the port in register
// port. The kernel reports back the maximum registers (the minimum ones
// when none are given) and the flag for a mapped address, which the
// library cannot send; sending them makes what is read back equal what was
// written.
func dnatExpr(f render.NFTFamily, port uint32) []byte {
	natFamily := uint32(unix.NFPROTO_IPV4)
	if f == render.NFTIPv6 {
		natFamily = unix.NFPROTO_IPV6
	}
	return encode(func(ae *netlink.AttributeEncoder) {
		ae.String(unix.NFTA_EXPR_NAME, "nat")
		ae.Nested(unix.NFTA_EXPR_DATA, func(d *netlink.AttributeEncoder) error {
			d.Uint32(unix.NFTA_NAT_TYPE, unix.NFT_NAT_DNAT)
			d.Uint32(unix.NFTA_NAT_FAMILY, natFamily)
			d.Uint32(unix.NFTA_NAT_REG_ADDR_MIN, reg1)
			d.Uint32(unix.NFTA_NAT_REG_ADDR_MAX, reg1)
			d.Uint32(unix.NFTA_NAT_REG_PROTO_MIN, port)
			d.Uint32(unix.NFTA_NAT_REG_PROTO_MAX, port)
			d.Uint32(unix.NFTA_NAT_FLAGS, unix.NF_NAT_RANGE_MAP_IPS|unix.NF_NAT_RANGE_PROTO_SPECIFIED)
			return nil
		})
	})
}

// encodeRule returns the expressions of a rule, each as nested attributes
// (the contents of one NFTA_LIST_ELEM).
func encodeRule(f render.NFTFamily, r render.NFTRule) ([][]byte, error) {
	fam := family(f)
	var out [][]byte
	add := func(es ...expr.Any) error {
		for _, e := range es {
			b, err := expr.Marshal(fam, e)
			if err != nil {
				return err
			}
			out = append(out, b)
		}
		return nil
	}
	l4proto := func(reg uint32) []expr.Any {
		p := protoNumbers[r.Proto]
		return []expr.Any{
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte{p}},
		}
	}
	vmap := &expr.Lookup{SourceRegister: reg1, DestRegister: regVerdict, IsDestRegSet: true, SetName: r.Set}
	var err error
	switch r.Kind {
	case render.NFTDispatch:
		next, after := regAfterAddr(f)
		err = add(daddr(f, reg1), &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: next},
			&expr.Payload{DestRegister: after, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2}, vmap)
	case render.NFTMasquerade:
		if _, ok := protoNumbers[r.Proto]; !ok {
			return nil, fmt.Errorf("protocol %q", r.Proto)
		}
		status := binary.NativeEndian.AppendUint32(nil, ctStatusDNAT) // ct status is a host-order word
		zero := []byte{0, 0, 0, 0}
		err = add(append(l4proto(reg1),
			&expr.Ct{Register: reg1, Key: expr.CtKeySTATUS},
			&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: 4, Mask: status, Xor: zero},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: reg1, Data: zero})...)
		if err == nil {
			key := uint32(unix.NFT_CT_DST_IP)
			if f == render.NFTIPv6 {
				key = unix.NFT_CT_DST_IP6
			}
			next, _ := regAfterAddr(f)
			out = append(out, ctExpr(key, reg1, true), ctExpr(unix.NFT_CT_PROTO_DST, next, true))
			err = add(&expr.Lookup{SourceRegister: reg1, SetName: r.Set}, &expr.Masq{})
		}
	case render.NFTAllow:
		err = add(saddr(f, reg1), &expr.Lookup{SourceRegister: reg1, SetName: r.Set, Invert: true}, &expr.Verdict{Kind: expr.VerdictDrop})
	case render.NFTAffinity:
		err = add(saddr(f, reg1), &expr.Lookup{SourceRegister: reg1, SetName: r.Set}, &expr.Verdict{Kind: expr.VerdictGoto, Chain: r.Chain})
	case render.NFTRoundRobin:
		err = add(&expr.Numgen{Register: reg1, Modulus: r.Modulus, Type: unix.NFT_NG_INCREMENTAL}, vmap)
	case render.NFTSourceHash:
		err = add(saddr(f, reg2),
			&expr.Hash{SourceRegister: reg2, DestRegister: reg1, Length: addrLen(f), Modulus: r.Modulus, Seed: render.NFTHashSeed, Type: expr.HashTypeJenkins},
			vmap)
	case render.NFTReject:
		code := uint8(icmpPortUnreachable)
		if f == render.NFTIPv6 {
			code = icmpv6PortUnreachable
		}
		err = add(&expr.Reject{Type: unix.NFT_REJECT_ICMP_UNREACH, Code: code})
	case render.NFTRemember:
		err = add(saddr(f, reg1), &expr.Dynset{SrcRegKey: reg1, SetName: r.Set, Operation: unix.NFT_DYNSET_OP_UPDATE})
	case render.NFTDNAT:
		if _, ok := protoNumbers[r.Proto]; !ok {
			return nil, fmt.Errorf("protocol %q", r.Proto)
		}
		addr, aerr := addrBytes(f, r.Addr)
		if aerr != nil {
			return nil, aerr
		}
		err = add(append(l4proto(reg1),
			&expr.Immediate{Register: reg1, Data: addr},
			&expr.Immediate{Register: reg2, Data: binary.BigEndian.AppendUint16(nil, r.Port)})...)
		out = append(out, dnatExpr(f, reg2))
	case render.NFTDNATRoundRobin, render.NFTDNATSourceHash:
		// The slots map's data, address . port, lands in reg 1 and the
		// register after the address, as nft places a concatenation.
		if _, ok := protoNumbers[r.Proto]; !ok {
			return nil, fmt.Errorf("protocol %q", r.Proto)
		}
		selector := []expr.Any{&expr.Numgen{Register: reg1, Modulus: r.Modulus, Type: unix.NFT_NG_INCREMENTAL}}
		if r.Kind == render.NFTDNATSourceHash {
			selector = []expr.Any{saddr(f, reg2),
				&expr.Hash{SourceRegister: reg2, DestRegister: reg1, Length: addrLen(f), Modulus: r.Modulus, Seed: render.NFTHashSeed, Type: expr.HashTypeJenkins}}
		}
		lookup := &expr.Lookup{SourceRegister: reg1, DestRegister: reg1, IsDestRegSet: true, SetName: r.Set}
		err = add(append(append(l4proto(reg1), selector...), lookup)...)
		port, _ := regAfterAddr(f)
		out = append(out, dnatExpr(f, port))
	default:
		return nil, fmt.Errorf("unknown rule kind %d", r.Kind)
	}
	if err != nil {
		return nil, err
	}
	// expr.Marshal returns the attributes of one expression.
	return out, nil
}

// Tables implements Kernel: one dump each of the chains, rules and sets of
// each family's table, and one of each set's elements (dynamic sets
// excepted).
func (n *Netlink) Tables(ctx context.Context) (map[render.NFTFamily]*Table, error) {
	c, done, err := n.session(ctx)
	if err != nil {
		return nil, err
	}
	defer done()
	out := map[render.NFTFamily]*Table{}
	for _, f := range []render.NFTFamily{render.NFTIPv4, render.NFTIPv6} {
		t, err := n.readTable(c, f)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, os.ErrDeadlineExceeded) {
				n.reset()
			}
			return nil, ioError(ctx, "read table "+string(f)+" "+render.NFTTable, err)
		}
		if t != nil {
			out[f] = t
		}
	}
	return out, nil
}

func (n *Netlink) readTable(c *netlink.Conn, f render.NFTFamily) (*Table, error) {
	fam := family(f)
	_, err := c.Execute(request(unix.NFT_MSG_GETTABLE, fam, 0, encode(func(ae *netlink.AttributeEncoder) {
		ae.String(unix.NFTA_TABLE_NAME, render.NFTTable)
	})))
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	t := NewTable(f)
	chains, err := dumpTable(c, unix.NFT_MSG_GETCHAIN, fam, unix.NFTA_CHAIN_TABLE)
	if err != nil {
		return nil, fmt.Errorf("chains: %w", err)
	}
	for _, m := range chains {
		ch, table, err := decodeChain(m)
		if err != nil {
			return nil, err
		}
		if table == render.NFTTable {
			t.Chains[ch.Name] = ch
		}
	}
	rules, err := dumpTable(c, unix.NFT_MSG_GETRULE, fam, unix.NFTA_RULE_TABLE)
	if err != nil {
		return nil, fmt.Errorf("rules: %w", err)
	}
	for _, m := range rules {
		chain, table, r, err := decodeRule(f, m)
		if err != nil {
			return nil, err
		}
		if ch := t.Chains[chain]; ch != nil && table == render.NFTTable {
			ch.Rules = append(ch.Rules, r)
		}
	}
	sets, err := dumpTable(c, unix.NFT_MSG_GETSET, fam, unix.NFTA_SET_TABLE)
	if err != nil {
		return nil, fmt.Errorf("sets: %w", err)
	}
	for _, m := range sets {
		s, table, anonymous, err := decodeSet(f, m)
		if err != nil {
			return nil, err
		}
		if table != render.NFTTable || anonymous {
			continue
		}
		t.Sets[s.Name] = s
		if s.Timeout > 0 || s.Key == 0 {
			continue // the packet path's state, or nothing switchman reads
		}
		elems, err := c.Execute(request(unix.NFT_MSG_GETSETELEM, fam, netlink.Dump, encode(func(ae *netlink.AttributeEncoder) {
			ae.String(unix.NFTA_SET_ELEM_LIST_TABLE, render.NFTTable)
			ae.String(unix.NFTA_SET_ELEM_LIST_SET, s.Name)
		})))
		if err != nil {
			return nil, fmt.Errorf("elements of %s: %w", s.Name, err)
		}
		for _, m := range elems {
			es, err := decodeElements(f, s, m)
			if err != nil {
				return nil, fmt.Errorf("elements of %s: %w", s.Name, err)
			}
			s.Elements = append(s.Elements, es...)
		}
		slices.SortFunc(s.Elements, render.NFTElement.Compare)
	}
	return t, nil
}

// dumpTable dumps the objects of one kind in switchman's table (the
// kernel filters by the table named in attribute tableAttr).
func dumpTable(c *netlink.Conn, msg int, fam uint8, tableAttr uint16) ([]netlink.Message, error) {
	return c.Execute(request(msg, fam, netlink.Dump, encode(func(ae *netlink.AttributeEncoder) {
		ae.String(tableAttr, render.NFTTable)
	})))
}

func decoder(m netlink.Message) (*netlink.AttributeDecoder, error) {
	if len(m.Data) < 4 {
		return nil, errors.New("short nf_tables message")
	}
	ad, err := netlink.NewAttributeDecoder(m.Data[4:])
	if err != nil {
		return nil, err
	}
	ad.ByteOrder = binary.BigEndian
	return ad, nil
}

func nested(b []byte) (*netlink.AttributeDecoder, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, err
	}
	ad.ByteOrder = binary.BigEndian
	return ad, nil
}

func decodeChain(m netlink.Message) (*Chain, string, error) {
	ad, err := decoder(m)
	if err != nil {
		return nil, "", err
	}
	c := &Chain{}
	var table, typ string
	var hook *render.NFTHook
	policy := uint32(nfAccept)
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_CHAIN_POLICY:
			policy = ad.Uint32()
		case unix.NFTA_CHAIN_TABLE:
			table = ad.String()
		case unix.NFTA_CHAIN_NAME:
			c.Name = ad.String()
		case unix.NFTA_CHAIN_TYPE:
			typ = ad.String()
		case unix.NFTA_CHAIN_HOOK:
			hook = &render.NFTHook{}
			ad.Nested(func(h *netlink.AttributeDecoder) error {
				for h.Next() {
					switch h.Type() {
					case unix.NFTA_HOOK_HOOKNUM:
						num := h.Uint32()
						for name, v := range hookNumbers {
							if v == num {
								hook.Hook = name
							}
						}
					case unix.NFTA_HOOK_PRIORITY:
						hook.Priority = int(int32(h.Uint32()))
					}
				}
				return nil
			})
		}
	}
	if hook != nil {
		hook.Type = typ
		if policy != nfAccept {
			// Not a chain switchman makes: it never equals the desired
			// one, so a full pass makes it anew with policy accept.
			hook.Type = fmt.Sprintf("%s policy %d", typ, policy)
		}
		c.Hook = hook
	}
	return c, table, ad.Err()
}

// rawExpr is one expression as attributes: its name and its data, nested
// attributes of data values and verdicts kept as such.
type rawExpr struct {
	name  string
	attrs map[uint16][]byte
}

func parseExpr(b []byte) (rawExpr, error) {
	e := rawExpr{attrs: map[uint16][]byte{}}
	ad, err := nested(b)
	if err != nil {
		return e, err
	}
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_EXPR_NAME:
			e.name = ad.String()
		case unix.NFTA_EXPR_DATA:
			d, err := nested(ad.Bytes())
			if err != nil {
				return e, err
			}
			for d.Next() {
				e.attrs[d.Type()] = d.Bytes()
			}
		}
	}
	return e, ad.Err()
}

// nestedData lists, per expression, the attributes that hold nested data
// (NFTA_DATA_VALUE or NFTA_DATA_VERDICT).
var nestedData = map[string][]uint16{
	"immediate": {unix.NFTA_IMMEDIATE_DATA},
	"cmp":       {unix.NFTA_CMP_DATA},
	"bitwise":   {unix.NFTA_BITWISE_MASK, unix.NFTA_BITWISE_XOR},
}

// canonical writes attributes sorted by type, leaving out those whose value
// is all zeros (the kernel reports some defaults that are not sent, and
// the other way round) and descending into nested data.
func canonical(b *strings.Builder, attrs map[uint16][]byte, nestedTypes []uint16) {
	types := make([]int, 0, len(attrs))
	for t := range attrs {
		types = append(types, int(t))
	}
	sort.Ints(types)
	for _, t := range types {
		v := attrs[uint16(t)]
		if !slices.ContainsFunc(v, func(x byte) bool { return x != 0 }) {
			continue
		}
		fmt.Fprintf(b, " %d=", t)
		if !slices.Contains(nestedTypes, uint16(t)) {
			b.WriteString(hex.EncodeToString(v))
			continue
		}
		inner := map[uint16][]byte{}
		if ad, err := nested(v); err == nil {
			for ad.Next() {
				inner[ad.Type()] = ad.Bytes()
			}
		}
		b.WriteString("{")
		canonical(b, inner, []uint16{unix.NFTA_DATA_VERDICT})
		b.WriteString(" }")
	}
}

func canonicalExprs(list []rawExpr) string {
	var b strings.Builder
	for _, e := range list {
		b.WriteString(e.name + "(")
		canonical(&b, e.attrs, nestedData[e.name])
		b.WriteString(")")
	}
	return b.String()
}

func decodeRule(f render.NFTFamily, m netlink.Message) (chain, table string, r Rule, err error) {
	ad, err := decoder(m)
	if err != nil {
		return "", "", r, err
	}
	var list []rawExpr
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_RULE_TABLE:
			table = ad.String()
		case unix.NFTA_RULE_CHAIN:
			chain = ad.String()
		case unix.NFTA_RULE_HANDLE:
			r.Handle = ad.Uint64()
		case unix.NFTA_RULE_EXPRESSIONS:
			l, lerr := nested(ad.Bytes())
			if lerr != nil {
				return "", "", r, lerr
			}
			for l.Next() {
				e, perr := parseExpr(l.Bytes())
				if perr != nil {
					return "", "", r, perr
				}
				list = append(list, e)
			}
		}
	}
	if err := ad.Err(); err != nil {
		return "", "", r, err
	}
	if spec, ok := recognize(f, list); ok {
		r.Spec, r.Known = spec, true
	}
	return chain, table, r, nil
}

// recognize guesses which rule list is from its shape and parameters, and
// accepts the guess only if switchman's encoding of it is exactly list.
func recognize(f render.NFTFamily, list []rawExpr) (render.NFTRule, bool) {
	names := make([]string, len(list))
	for i, e := range list {
		names[i] = e.name
	}
	str := func(i int, t uint16) string {
		if i >= len(list) {
			return ""
		}
		return strings.TrimRight(string(list[i].attrs[t]), "\x00")
	}
	u32 := func(i int, t uint16) uint32 {
		if i < len(list) && len(list[i].attrs[t]) == 4 {
			return binary.BigEndian.Uint32(list[i].attrs[t])
		}
		return 0
	}
	dataValue := func(i int, t uint16) []byte {
		if i >= len(list) {
			return nil
		}
		ad, err := nested(list[i].attrs[t])
		if err != nil {
			return nil
		}
		for ad.Next() {
			if ad.Type() == unix.NFTA_DATA_VALUE {
				return ad.Bytes()
			}
			if ad.Type() == unix.NFTA_DATA_VERDICT {
				v, err := nested(ad.Bytes())
				if err != nil {
					return nil
				}
				for v.Next() {
					if v.Type() == unix.NFTA_VERDICT_CHAIN {
						return bytes.TrimRight(v.Bytes(), "\x00")
					}
				}
			}
		}
		return nil
	}
	proto := func(i int) spec.Protocol {
		v := dataValue(i, unix.NFTA_CMP_DATA)
		for p, n := range protoNumbers {
			if len(v) == 1 && v[0] == n {
				return p
			}
		}
		return ""
	}
	var r render.NFTRule
	switch strings.Join(names, " ") {
	case "payload meta payload lookup":
		r = render.NFTRule{Kind: render.NFTDispatch, Set: str(3, unix.NFTA_LOOKUP_SET)}
	case "meta cmp ct bitwise cmp ct ct lookup masq":
		r = render.NFTRule{Kind: render.NFTMasquerade, Proto: proto(1), Set: str(7, unix.NFTA_LOOKUP_SET)}
	case "payload lookup immediate":
		r = render.NFTRule{Kind: render.NFTAllow, Set: str(1, unix.NFTA_LOOKUP_SET)}
		if chain := string(dataValue(2, unix.NFTA_IMMEDIATE_DATA)); chain != "" {
			r = render.NFTRule{Kind: render.NFTAffinity, Set: str(1, unix.NFTA_LOOKUP_SET), Chain: chain}
		}
	case "numgen lookup":
		r = render.NFTRule{Kind: render.NFTRoundRobin, Set: str(1, unix.NFTA_LOOKUP_SET), Modulus: u32(0, unix.NFTA_NG_MODULUS)}
	case "payload hash lookup":
		r = render.NFTRule{Kind: render.NFTSourceHash, Set: str(2, unix.NFTA_LOOKUP_SET), Modulus: u32(1, unix.NFTA_HASH_MODULUS)}
	case "reject":
		r = render.NFTRule{Kind: render.NFTReject}
	case "payload dynset":
		r = render.NFTRule{Kind: render.NFTRemember, Set: str(1, unix.NFTA_DYNSET_SET_NAME)}
	case "meta cmp immediate immediate nat":
		addr, _ := netip.AddrFromSlice(dataValue(2, unix.NFTA_IMMEDIATE_DATA))
		var port uint16
		if p := dataValue(3, unix.NFTA_IMMEDIATE_DATA); len(p) == 2 {
			port = binary.BigEndian.Uint16(p)
		}
		r = render.NFTRule{Kind: render.NFTDNAT, Proto: proto(1), Addr: addr, Port: port}
	case "meta cmp numgen lookup nat":
		r = render.NFTRule{Kind: render.NFTDNATRoundRobin, Proto: proto(1), Set: str(3, unix.NFTA_LOOKUP_SET), Modulus: u32(2, unix.NFTA_NG_MODULUS)}
	case "meta cmp payload hash lookup nat":
		r = render.NFTRule{Kind: render.NFTDNATSourceHash, Proto: proto(1), Set: str(4, unix.NFTA_LOOKUP_SET), Modulus: u32(3, unix.NFTA_HASH_MODULUS)}
	default:
		return r, false
	}
	want, err := encodeRule(f, r)
	if err != nil || len(want) != len(list) {
		return r, false
	}
	parsed := make([]rawExpr, len(want))
	for i, b := range want {
		if parsed[i], err = parseExpr(b); err != nil {
			return r, false
		}
	}
	return r, canonicalExprs(parsed) == canonicalExprs(list)
}

func decodeSet(f render.NFTFamily, m netlink.Message) (s *render.NFTSet, table string, anonymous bool, err error) {
	ad, err := decoder(m)
	if err != nil {
		return nil, "", false, err
	}
	s = &render.NFTSet{}
	var flags, magic, length, dataType, dataLen uint32
	var timeout time.Duration
	var udata []byte
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_SET_TABLE:
			table = ad.String()
		case unix.NFTA_SET_NAME:
			s.Name = ad.String()
		case unix.NFTA_SET_FLAGS:
			flags = ad.Uint32()
		case unix.NFTA_SET_KEY_TYPE:
			magic = ad.Uint32()
		case unix.NFTA_SET_KEY_LEN:
			length = ad.Uint32()
		case unix.NFTA_SET_DATA_TYPE:
			dataType = ad.Uint32()
		case unix.NFTA_SET_DATA_LEN:
			dataLen = ad.Uint32()
		case unix.NFTA_SET_TIMEOUT:
			timeout = time.Duration(ad.Uint64()) * time.Millisecond
		case unix.NFTA_SET_USERDATA:
			udata = ad.Bytes()
		case unix.NFTA_SET_DESC:
			ad.Nested(func(d *netlink.AttributeDecoder) error {
				for d.Next() {
					if d.Type() == unix.NFTA_SET_DESC_SIZE {
						s.Size = d.Uint32()
					}
				}
				return nil
			})
		}
	}
	if err := ad.Err(); err != nil {
		return nil, "", false, err
	}
	for _, k := range []render.NFTKey{render.NFTKeyAddr, render.NFTKeyAddrPort, render.NFTKeyAddrProtoPort, render.NFTKeySlot} {
		if km, kl, err := keyType(f, k); err == nil && km == magic && kl == length {
			s.Key = k
		}
	}
	const known = unix.NFT_SET_MAP | unix.NFT_SET_INTERVAL | unix.NFT_SET_TIMEOUT | unix.NFT_SET_EVAL
	backendMagic, backendLen, _ := backendType(f)
	isMap := flags&unix.NFT_SET_MAP != 0
	s.Verdicts = isMap && dataType == verdictType
	s.Backends = isMap && dataType == backendMagic && dataLen == backendLen
	s.Interval = flags&unix.NFT_SET_INTERVAL != 0
	dynamic := flags&(unix.NFT_SET_TIMEOUT|unix.NFT_SET_EVAL) == unix.NFT_SET_TIMEOUT|unix.NFT_SET_EVAL
	switch {
	case s.Key == render.NFTKeySlot && !bytes.Equal(udata, slotUserdata(f, *s)):
		s.Key = 0 // not the map switchman makes
	case s.Backends && s.Key != render.NFTKeySlot:
		s.Key = 0 // switchman maps only slots to backends
	case flags&^known != 0, isMap && !s.Verdicts && !s.Backends, flags&(unix.NFT_SET_TIMEOUT|unix.NFT_SET_EVAL) != 0 && !dynamic:
		s.Key = 0
	case dynamic:
		s.Timeout = timeout
	}
	return s, table, flags&unix.NFT_SET_ANONYMOUS != 0, nil
}

func decodeElements(f render.NFTFamily, s *render.NFTSet, m netlink.Message) ([]render.NFTElement, error) {
	ad, err := decoder(m)
	if err != nil {
		return nil, err
	}
	var out []render.NFTElement
	for ad.Next() {
		if ad.Type() != unix.NFTA_SET_ELEM_LIST_ELEMENTS {
			continue
		}
		l, err := nested(ad.Bytes())
		if err != nil {
			return nil, err
		}
		for l.Next() {
			e, err := decodeElement(f, s, l.Bytes())
			if err != nil {
				return nil, err
			}
			out = append(out, e)
		}
	}
	return out, ad.Err()
}

func decodeElement(f render.NFTFamily, s *render.NFTSet, b []byte) (render.NFTElement, error) {
	var e render.NFTElement
	ad, err := nested(b)
	if err != nil {
		return e, err
	}
	var key []byte
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_SET_ELEM_KEY:
			d, err := nested(ad.Bytes())
			if err != nil {
				return e, err
			}
			for d.Next() {
				if d.Type() == unix.NFTA_DATA_VALUE {
					key = d.Bytes()
				}
			}
		case unix.NFTA_SET_ELEM_FLAGS:
			e.End = ad.Uint32()&unix.NFT_SET_ELEM_INTERVAL_END != 0
		case unix.NFTA_SET_ELEM_USERDATA:
			e.Open = bytes.Equal(ad.Bytes(), openIntervalUserdata)
		case unix.NFTA_SET_ELEM_DATA:
			d, err := nested(ad.Bytes())
			if err != nil {
				return e, err
			}
			for d.Next() {
				if d.Type() == unix.NFTA_DATA_VALUE && s.Backends {
					var b render.NFTElement
					if err := decodeKey(f, render.NFTKeyAddrPort, d.Bytes(), &b); err != nil {
						return e, fmt.Errorf("backend: %w", err)
					}
					e.Backend = netip.AddrPortFrom(b.Addr, b.Port)
					continue
				}
				if d.Type() != unix.NFTA_DATA_VERDICT {
					continue
				}
				v, err := nested(d.Bytes())
				if err != nil {
					return e, err
				}
				var code int32
				var chain string
				for v.Next() {
					switch v.Type() {
					case unix.NFTA_VERDICT_CODE:
						code = int32(v.Uint32())
					case unix.NFTA_VERDICT_CHAIN:
						chain = v.String()
					}
				}
				e.Goto = chain
				if code != unix.NFT_GOTO {
					e.Goto = fmt.Sprintf("verdict %d %s", code, chain) // never a chain switchman makes
				}
			}
		}
	}
	if err := ad.Err(); err != nil {
		return e, err
	}
	if err := decodeKey(f, s.Key, key, &e); err != nil {
		return e, err
	}
	return e, nil
}

func decodeKey(f render.NFTFamily, k render.NFTKey, key []byte, e *render.NFTElement) error {
	n := int(addrLen(f))
	if k == render.NFTKeySlot {
		if len(key) != 4 {
			return fmt.Errorf("slot key of %d bytes", len(key))
		}
		e.Slot = binary.NativeEndian.Uint32(key)
		return nil
	}
	if len(key) < n {
		return fmt.Errorf("key of %d bytes", len(key))
	}
	e.Addr, _ = netip.AddrFromSlice(key[:n])
	rest := key[n:]
	switch k {
	case render.NFTKeyAddrPort:
		if len(rest) < 2 {
			return errors.New("short key")
		}
		e.Port = binary.BigEndian.Uint16(rest)
	case render.NFTKeyAddrProtoPort:
		if len(rest) < 6 {
			return errors.New("short key")
		}
		for p, num := range protoNumbers {
			if rest[0] == num {
				e.Proto = p
			}
		}
		if e.Proto == "" {
			e.Proto = spec.Protocol(fmt.Sprintf("proto%d", rest[0]))
		}
		e.Port = binary.BigEndian.Uint16(rest[4:])
	}
	return nil
}
