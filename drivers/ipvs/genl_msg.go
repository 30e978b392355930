package ipvs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// The IPVS generic-netlink ABI (include/uapi/linux/ip_vs.h), as the
// kernel's net/netfilter/ipvs/ip_vs_ctl.c parses it. A request is
//
//	nlmsghdr (16 bytes: len, type = the family id, flags, seq, pid)
//	genlmsghdr (4 bytes: cmd, version 1, reserved)
//	IPVS_CMD_ATTR_SERVICE { AF u16, PROTOCOL u16, ADDR [16], PORT be16,
//	                        SCHED_NAME string, FLAGS {flags, mask u32},
//	                        TIMEOUT u32, NETMASK u32 }
//	IPVS_CMD_ATTR_DEST    { ADDR [16], PORT be16, FWD_METHOD u32, WEIGHT u32,
//	                        U_THRESH u32, L_THRESH u32, ADDR_FAMILY u16 }
//	IPVS_CMD_ATTR_DAEMON  { STATE u32, MCAST_IFN string, SYNC_ID u32,
//	                        SYNC_MAXLEN u16, MCAST_GROUP [4] | MCAST_GROUP6 [16],
//	                        MCAST_PORT u16, MCAST_TTL u8 }
//
// Integers are in host order except the ports of services and destinations
// (network order) and the multicast groups (address bytes). Addresses are
// sent as the kernel's union nf_inet_addr, 16 bytes with IPv4 in the first
// four. Nested attributes carry no NLA_F_NESTED flag: IPVS parses them with
// the non-strict nested parser, as ipvsadm and moby/ipvs send them.
const (
	ipvsGenlName    = "IPVS"
	ipvsGenlVersion = 1

	ipvsCmdNewService = 1
	ipvsCmdSetService = 2
	ipvsCmdDelService = 3
	ipvsCmdNewDest    = 5
	ipvsCmdSetDest    = 6
	ipvsCmdDelDest    = 7
	ipvsCmdNewDaemon  = 9
	ipvsCmdDelDaemon  = 10
	ipvsCmdGetDaemon  = 11

	ipvsCmdAttrService = 1
	ipvsCmdAttrDest    = 2
	ipvsCmdAttrDaemon  = 3

	ipvsSvcAttrAF        = 1
	ipvsSvcAttrProtocol  = 2
	ipvsSvcAttrAddr      = 3
	ipvsSvcAttrPort      = 4
	ipvsSvcAttrSchedName = 6
	ipvsSvcAttrFlags     = 7
	ipvsSvcAttrTimeout   = 8
	ipvsSvcAttrNetmask   = 9

	ipvsDestAttrAddr       = 1
	ipvsDestAttrPort       = 2
	ipvsDestAttrFwdMethod  = 3
	ipvsDestAttrWeight     = 4
	ipvsDestAttrUThresh    = 5
	ipvsDestAttrLThresh    = 6
	ipvsDestAttrAddrFamily = 11

	ipvsDaemonAttrState       = 1
	ipvsDaemonAttrMcastIfn    = 2
	ipvsDaemonAttrSyncID      = 3
	ipvsDaemonAttrSyncMaxLen  = 4
	ipvsDaemonAttrMcastGroup  = 5
	ipvsDaemonAttrMcastGroup6 = 6
	ipvsDaemonAttrMcastPort   = 7
	ipvsDaemonAttrMcastTTL    = 8

	// ipvsSchedNameMax and ipvsIfNameMax are the longest names the kernel
	// takes (IP_VS_SCHEDNAME_MAXLEN and IP_VS_IFNAME_MAXLEN, less the NUL).
	ipvsSchedNameMax = 15
	ipvsIfNameMax    = 15
)

var native = binary.NativeEndian

// msgWriter appends netlink messages and attributes to one buffer, so a
// whole batch is encoded into a single allocation.
type msgWriter struct{ b []byte }

func align4(n int) int { return (n + 3) &^ 3 }

// begin starts a message and returns its offset, for end.
func (w *msgWriter) begin(typ, flags uint16, seq uint32) int {
	at := len(w.b)
	w.b = append(w.b, make([]byte, unix.NLMSG_HDRLEN)...)
	native.PutUint16(w.b[at+4:], typ)
	native.PutUint16(w.b[at+6:], flags)
	native.PutUint32(w.b[at+8:], seq)
	return at
}

// genl appends a generic-netlink header.
func (w *msgWriter) genl(cmd, version uint8) { w.b = append(w.b, cmd, version, 0, 0) }

// end sets the length of the message begun at at.
func (w *msgWriter) end(at int) { native.PutUint32(w.b[at:], uint32(len(w.b)-at)) }

func (w *msgWriter) attr(typ uint16, data ...byte) {
	at := len(w.b)
	w.b = append(w.b, 0, 0, 0, 0)
	native.PutUint16(w.b[at:], uint16(unix.NLA_HDRLEN+len(data)))
	native.PutUint16(w.b[at+2:], typ)
	w.b = append(w.b, data...)
	w.pad()
}

func (w *msgWriter) pad() {
	for len(w.b)%4 != 0 {
		w.b = append(w.b, 0)
	}
}

func (w *msgWriter) u8(typ uint16, v uint8) { w.attr(typ, v) }
func (w *msgWriter) u16(typ uint16, v uint16) {
	w.attr(typ, native.AppendUint16(nil, v)...)
}
func (w *msgWriter) be16(typ uint16, v uint16) {
	w.attr(typ, binary.BigEndian.AppendUint16(nil, v)...)
}
func (w *msgWriter) u32(typ uint16, v uint32) {
	w.attr(typ, native.AppendUint32(nil, v)...)
}
func (w *msgWriter) str(typ uint16, s string) { w.attr(typ, append([]byte(s), 0)...) }

// nest starts a nested attribute; endNest closes it.
func (w *msgWriter) nest(typ uint16) int {
	at := len(w.b)
	w.b = append(w.b, 0, 0, 0, 0)
	native.PutUint16(w.b[at+2:], typ)
	return at
}

func (w *msgWriter) endNest(at int) { native.PutUint16(w.b[at:], uint16(len(w.b)-at)) }

// inetAddr returns a as the kernel's union nf_inet_addr.
func inetAddr(a netip.Addr) []byte {
	var u [16]byte
	if a.Is4() {
		b := a.As4()
		copy(u[:], b[:])
	} else {
		u = a.As16()
	}
	return u[:]
}

// errBadRequest marks a write refused before it is sent. It wraps EINVAL,
// the errno the kernel would answer.
func badRequest(format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), unix.EINVAL)
}

// checkService reports what the kernel would refuse in s, naming the field.
func checkService(s Service, full bool) error {
	if !s.Address.IsValid() || s.Address.Is4In6() {
		return badRequest("service address %v is not a plain IPv4 or IPv6 address", s.Address)
	}
	if full && (s.Scheduler == "" || len(s.Scheduler) > ipvsSchedNameMax) {
		return badRequest("scheduler %q: want 1 to %d characters", s.Scheduler, ipvsSchedNameMax)
	}
	return nil
}

func checkDestination(d Destination) error {
	if !d.Address.IsValid() || d.Address.Is4In6() {
		return badRequest("destination address %v is not a plain IPv4 or IPv6 address", d.Address)
	}
	if d.Weight < 0 || d.Weight > 65535 {
		return fmt.Errorf("destination %s: weight %d is not 0-65535: %w", d.AddrPort(), d.Weight, unix.ERANGE)
	}
	return nil
}

// service appends the IPVS_CMD_ATTR_SERVICE of s: only what identifies it,
// or, when full (new and set), its settings too.
func (w *msgWriter) service(s Service, full bool) {
	n := w.nest(ipvsCmdAttrService)
	w.u16(ipvsSvcAttrAF, uint16(s.Family()))
	w.u16(ipvsSvcAttrProtocol, uint16(s.Protocol))
	w.attr(ipvsSvcAttrAddr, inetAddr(s.Address)...)
	w.be16(ipvsSvcAttrPort, s.Port)
	if full {
		w.str(ipvsSvcAttrSchedName, s.Scheduler)
		flags := native.AppendUint32(nil, uint32(s.Flags&^FlagHashed))
		w.attr(ipvsSvcAttrFlags, native.AppendUint32(flags, 0xffffffff)...) // struct ip_vs_flags: flags, mask
		w.u32(ipvsSvcAttrTimeout, s.Timeout)
		// The kernel reads a be32 but compares IPv6 prefix lengths as
		// plain integers; like ipvsadm and moby/ipvs (whose listing the
		// driver compares with) we send the value in host order.
		w.u32(ipvsSvcAttrNetmask, s.Netmask)
	}
	w.endNest(n)
}

// destination appends the IPVS_CMD_ATTR_DEST of d: only what identifies it,
// or, when full (new and set), its settings too.
func (w *msgWriter) destination(d Destination, full bool) {
	n := w.nest(ipvsCmdAttrDest)
	w.attr(ipvsDestAttrAddr, inetAddr(d.Address)...)
	w.be16(ipvsDestAttrPort, d.Port)
	if full {
		w.u32(ipvsDestAttrFwdMethod, uint32(d.Forwarding)&ForwardingMask)
		w.u32(ipvsDestAttrWeight, uint32(d.Weight))
		w.u32(ipvsDestAttrUThresh, 0)
		w.u32(ipvsDestAttrLThresh, 0)
	}
	w.u16(ipvsDestAttrAddrFamily, uint16(FamilyOf(d.Address)))
	w.endNest(n)
}

// opCommand returns the IPVS command of a write and whether it carries the
// full service and destination settings.
func opCommand(k OpKind) (cmd uint8, fullService, hasDest, fullDest bool) {
	switch k {
	case AddService:
		return ipvsCmdNewService, true, false, false
	case UpdateService:
		return ipvsCmdSetService, true, false, false
	case DeleteService:
		return ipvsCmdDelService, false, false, false
	case AddDestination:
		return ipvsCmdNewDest, false, true, true
	case UpdateDestination:
		return ipvsCmdSetDest, false, true, true
	case DeleteDestination:
		return ipvsCmdDelDest, false, true, false
	}
	return 0, false, false, false
}

// writeOp appends the request for op, acknowledged (NLM_F_ACK), with
// sequence number seq, or says why the kernel would refuse it without
// appending anything.
func (w *msgWriter) writeOp(family uint16, seq uint32, op Op) error {
	cmd, fullSvc, hasDest, fullDest := opCommand(op.Kind)
	if cmd == 0 {
		return badRequest("unknown IPVS write %v", op.Kind)
	}
	if err := checkService(op.Service, fullSvc); err != nil {
		return err
	}
	if hasDest {
		if err := checkDestination(op.Destination); err != nil {
			return err
		}
	}
	at := w.begin(family, unix.NLM_F_REQUEST|unix.NLM_F_ACK, seq)
	w.genl(cmd, ipvsGenlVersion)
	w.service(op.Service, fullSvc)
	if hasDest {
		w.destination(op.Destination, fullDest)
	}
	w.end(at)
	return nil
}

// checkDaemon reports what is wrong with d before the kernel sees it,
// naming the field and the value.
func checkDaemon(d SyncDaemon) error {
	if d.Role != Master && d.Role != Backup {
		return badRequest("sync daemon role %d: want master (1) or backup (2)", uint32(d.Role))
	}
	if d.Interface == "" || len(d.Interface) > ipvsIfNameMax {
		return badRequest("sync daemon interface %q: want an interface name of 1 to %d characters", d.Interface, ipvsIfNameMax)
	}
	if d.Group.IsValid() && !d.Group.Unmap().IsMulticast() {
		return badRequest("sync daemon group %s is not a multicast address", d.Group)
	}
	return checkMaxLen(d)
}

// writeNewDaemon appends IPVS_CMD_NEW_DAEMON for d; optional settings left
// zero are left out, so the kernel picks its defaults.
func (w *msgWriter) writeNewDaemon(family uint16, seq uint32, d SyncDaemon) {
	at := w.begin(family, unix.NLM_F_REQUEST|unix.NLM_F_ACK, seq)
	w.genl(ipvsCmdNewDaemon, ipvsGenlVersion)
	n := w.nest(ipvsCmdAttrDaemon)
	w.u32(ipvsDaemonAttrState, uint32(d.Role))
	w.str(ipvsDaemonAttrMcastIfn, d.Interface)
	w.u32(ipvsDaemonAttrSyncID, uint32(d.SyncID))
	if d.MaxLen != 0 {
		w.u16(ipvsDaemonAttrSyncMaxLen, d.MaxLen)
	}
	if g := d.Group.Unmap(); g.Is4() {
		b := g.As4()
		w.attr(ipvsDaemonAttrMcastGroup, b[:]...)
	} else if g.IsValid() {
		b := g.As16()
		w.attr(ipvsDaemonAttrMcastGroup6, b[:]...)
	}
	if d.Port != 0 {
		w.u16(ipvsDaemonAttrMcastPort, d.Port)
	}
	if d.TTL != 0 {
		w.u8(ipvsDaemonAttrMcastTTL, d.TTL)
	}
	w.endNest(n)
	w.end(at)
}

// writeDelDaemon appends IPVS_CMD_DEL_DAEMON for role.
func (w *msgWriter) writeDelDaemon(family uint16, seq uint32, role Role) {
	at := w.begin(family, unix.NLM_F_REQUEST|unix.NLM_F_ACK, seq)
	w.genl(ipvsCmdDelDaemon, ipvsGenlVersion)
	n := w.nest(ipvsCmdAttrDaemon)
	w.u32(ipvsDaemonAttrState, uint32(role))
	w.endNest(n)
	w.end(at)
}

// writeGetDaemons appends the IPVS_CMD_GET_DAEMON dump request.
func (w *msgWriter) writeGetDaemons(family uint16, seq uint32) {
	at := w.begin(family, unix.NLM_F_REQUEST|unix.NLM_F_DUMP, seq)
	w.genl(ipvsCmdGetDaemon, ipvsGenlVersion)
	w.end(at)
}

// writeGetFamily appends the controller's CTRL_CMD_GETFAMILY for name.
func (w *msgWriter) writeGetFamily(seq uint32, name string) {
	at := w.begin(unix.GENL_ID_CTRL, unix.NLM_F_REQUEST, seq)
	w.genl(unix.CTRL_CMD_GETFAMILY, 1)
	w.str(unix.CTRL_ATTR_FAMILY_NAME, name)
	w.end(at)
}

// nlAttr is one attribute of a received message.
type nlAttr struct {
	typ  uint16 // without the NLA_F_NESTED and byte-order flags
	data []byte
}

var errShortAttr = errors.New("netlink attribute runs past its message")

// parseAttrs splits b into attributes.
func parseAttrs(b []byte) ([]nlAttr, error) {
	var out []nlAttr
	for len(b) >= unix.NLA_HDRLEN {
		l := int(native.Uint16(b))
		if l < unix.NLA_HDRLEN || l > len(b) {
			return nil, errShortAttr
		}
		out = append(out, nlAttr{typ: native.Uint16(b[2:]) & 0x3fff, data: b[unix.NLA_HDRLEN:l]})
		if a := align4(l); a < len(b) {
			b = b[a:]
		} else {
			b = nil
		}
	}
	return out, nil
}

func attrU32(a nlAttr) (uint32, error) {
	if len(a.data) < 4 {
		return 0, fmt.Errorf("attribute %d: %d bytes, want 4", a.typ, len(a.data))
	}
	return native.Uint32(a.data), nil
}

func attrU16(a nlAttr) (uint16, error) {
	if len(a.data) < 2 {
		return 0, fmt.Errorf("attribute %d: %d bytes, want 2", a.typ, len(a.data))
	}
	return native.Uint16(a.data), nil
}

func attrString(a nlAttr) string {
	b := a.data
	for i, c := range b {
		if c == 0 {
			b = b[:i]
			break
		}
	}
	return string(b)
}

// parseDaemon reads one IPVS_CMD_NEW_DAEMON message of a GET_DAEMON dump
// (its attributes, after the generic-netlink header).
func parseDaemon(payload []byte) (SyncDaemon, error) {
	top, err := parseAttrs(payload)
	if err != nil {
		return SyncDaemon{}, err
	}
	var d SyncDaemon
	found := false
	for _, t := range top {
		if t.typ != ipvsCmdAttrDaemon {
			continue
		}
		found = true
		attrs, err := parseAttrs(t.data)
		if err != nil {
			return SyncDaemon{}, err
		}
		for _, a := range attrs {
			var v32 uint32
			var v16 uint16
			switch a.typ {
			case ipvsDaemonAttrState:
				v32, err = attrU32(a)
				d.Role = Role(v32)
			case ipvsDaemonAttrMcastIfn:
				d.Interface = attrString(a)
			case ipvsDaemonAttrSyncID:
				v32, err = attrU32(a)
				d.SyncID = uint8(v32)
			case ipvsDaemonAttrSyncMaxLen:
				v16, err = attrU16(a)
				d.MaxLen = v16
			case ipvsDaemonAttrMcastGroup:
				if len(a.data) == 4 {
					d.Group = netip.AddrFrom4([4]byte(a.data))
				}
			case ipvsDaemonAttrMcastGroup6:
				if len(a.data) == 16 {
					d.Group = netip.AddrFrom16([16]byte(a.data))
				}
			case ipvsDaemonAttrMcastPort:
				v16, err = attrU16(a)
				d.Port = v16
			case ipvsDaemonAttrMcastTTL:
				if len(a.data) >= 1 {
					d.TTL = a.data[0]
				}
			}
			if err != nil {
				return SyncDaemon{}, fmt.Errorf("sync daemon: %w", err)
			}
		}
	}
	if !found {
		return SyncDaemon{}, errors.New("sync daemon message without IPVS_CMD_ATTR_DAEMON")
	}
	return d, nil
}

// parseFamilyID reads CTRL_ATTR_FAMILY_ID from a CTRL_CMD_NEWFAMILY reply.
func parseFamilyID(payload []byte) (uint16, error) {
	attrs, err := parseAttrs(payload)
	if err != nil {
		return 0, err
	}
	for _, a := range attrs {
		if a.typ == unix.CTRL_ATTR_FAMILY_ID {
			return attrU16(a)
		}
	}
	return 0, errors.New("generic netlink controller reply without a family id")
}
