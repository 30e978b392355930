package ipvs

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// unhex reads bytes written as hex with spaces and line breaks.
func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The golden messages below are written out by hand from
// include/uapi/linux/ip_vs.h and linux/netlink.h, for a little-endian host
// (the lab and the build hosts are amd64): nlmsghdr {len, type, flags,
// seq, pid}, genlmsghdr {cmd, version, 0}, then nlattr {len, type} and
// the payload, each padded to 4 bytes. The family id is 0x1a.
func TestGoldenRequests(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("golden bytes are little-endian")
	}
	const fam = 0x1a
	v4svc := Service{Protocol: TCP, Address: netip.MustParseAddr("192.0.2.10"), Port: 80, Scheduler: "rr", Netmask: 0xffffffff}
	v6svc := Service{Protocol: TCP, Address: netip.MustParseAddr("2001:db8::10"), Port: 443, Scheduler: "wlc", Netmask: 128}
	tests := []struct {
		name  string
		write func(w *msgWriter)
		want  string
	}{
		{"NEW_SERVICE tcp 192.0.2.10:80 rr", func(w *msgWriter) {
			if err := w.writeOp(fam, 1, Op{Kind: AddService, Service: v4svc}); err != nil {
				t.Fatal(err)
			}
		}, `
			68000000 1a00 0500 01000000 00000000  nlmsghdr: 104 bytes, family, REQUEST|ACK, seq 1
			01 01 0000                            IPVS_CMD_NEW_SERVICE, version 1
			5400 0100                             IPVS_CMD_ATTR_SERVICE, 84 bytes
			  0600 0100 0200 0000                 AF = AF_INET
			  0600 0200 0600 0000                 PROTOCOL = TCP
			  1400 0300 c000020a 00000000 00000000 00000000  ADDR (union nf_inet_addr)
			  0600 0400 0050 0000                 PORT = 80, network order
			  0700 0600 727200 00                 SCHED_NAME "rr"
			  0c00 0700 00000000 ffffffff         FLAGS {flags 0, mask ~0}
			  0800 0800 00000000                  TIMEOUT 0
			  0800 0900 ffffffff                  NETMASK`},
		{"NEW_DEST 10.1.1.2:8080 weight 3 route", func(w *msgWriter) {
			d := Destination{Address: netip.MustParseAddr("10.1.1.2"), Port: 8080, Weight: 3, Forwarding: Route}
			if err := w.writeOp(fam, 2, Op{Kind: AddDestination, Service: v4svc, Destination: d}); err != nil {
				t.Fatal(err)
			}
		}, `
			8c000000 1a00 0500 02000000 00000000  140 bytes, seq 2
			05 01 0000                            IPVS_CMD_NEW_DEST
			3000 0100                             SERVICE, identifying attributes only
			  0600 0100 0200 0000
			  0600 0200 0600 0000
			  1400 0300 c000020a 00000000 00000000 00000000
			  0600 0400 0050 0000
			4800 0200                             IPVS_CMD_ATTR_DEST, 72 bytes
			  1400 0100 0a010102 00000000 00000000 00000000  ADDR
			  0600 0200 1f90 0000                 PORT 8080
			  0800 0300 03000000                  FWD_METHOD = IP_VS_CONN_F_DROUTE
			  0800 0400 03000000                  WEIGHT 3
			  0800 0500 00000000                  U_THRESH
			  0800 0600 00000000                  L_THRESH
			  0600 0b00 0200 0000                 ADDR_FAMILY = AF_INET`},
		{"DEL_DEST ipv6", func(w *msgWriter) {
			d := Destination{Address: netip.MustParseAddr("2001:db8::1"), Port: 443, Weight: 1}
			if err := w.writeOp(fam, 3, Op{Kind: DeleteDestination, Service: v6svc, Destination: d}); err != nil {
				t.Fatal(err)
			}
		}, `
			6c000000 1a00 0500 03000000 00000000  108 bytes
			07 01 0000                            IPVS_CMD_DEL_DEST
			3000 0100
			  0600 0100 0a00 0000                 AF_INET6
			  0600 0200 0600 0000
			  1400 0300 20010db8 00000000 00000000 00000010
			  0600 0400 01bb 0000                 443
			2800 0200                             DEST: address, port, family only
			  1400 0100 20010db8 00000000 00000000 00000001
			  0600 0200 01bb 0000
			  0600 0b00 0a00 0000`},
		{"DEL_SERVICE", func(w *msgWriter) {
			if err := w.writeOp(fam, 4, Op{Kind: DeleteService, Service: v4svc}); err != nil {
				t.Fatal(err)
			}
		}, `
			44000000 1a00 0500 04000000 00000000  68 bytes
			03 01 0000
			3000 0100
			  0600 0100 0200 0000
			  0600 0200 0600 0000
			  1400 0300 c000020a 00000000 00000000 00000000
			  0600 0400 0050 0000`},
		{"NEW_DAEMON master, every setting", func(w *msgWriter) {
			w.writeNewDaemon(fam, 5, SyncDaemon{Role: Master, Interface: "eth1", SyncID: 7, MaxLen: 1400,
				Group: netip.MustParseAddr("224.0.0.82"), Port: 8849, TTL: 2})
		}, `
			54000000 1a00 0500 05000000 00000000  84 bytes
			09 01 0000                            IPVS_CMD_NEW_DAEMON
			4000 0300                             IPVS_CMD_ATTR_DAEMON, 64 bytes
			  0800 0100 01000000                  STATE = IP_VS_STATE_MASTER
			  0900 0200 65746831 00 000000        MCAST_IFN "eth1"
			  0800 0300 07000000                  SYNC_ID 7
			  0600 0400 7805 0000                 SYNC_MAXLEN 1400
			  0800 0500 e0000052                  MCAST_GROUP 224.0.0.82
			  0600 0700 9122 0000                 MCAST_PORT 8849, host order
			  0500 0800 02 000000                 MCAST_TTL 2`},
		{"NEW_DAEMON backup, defaults", func(w *msgWriter) {
			w.writeNewDaemon(fam, 6, SyncDaemon{Role: Backup, Interface: "eth1"})
		}, `
			34000000 1a00 0500 06000000 00000000
			09 01 0000
			2000 0300
			  0800 0100 02000000                  IP_VS_STATE_BACKUP
			  0900 0200 65746831 00 000000
			  0800 0300 00000000`},
		{"NEW_DAEMON ipv6 group", func(w *msgWriter) {
			w.writeNewDaemon(fam, 7, SyncDaemon{Role: Master, Interface: "eth1", Group: netip.MustParseAddr("ff02::81")})
		}, `
			48000000 1a00 0500 07000000 00000000  72 bytes
			09 01 0000
			3400 0300
			  0800 0100 01000000
			  0900 0200 65746831 00 000000
			  0800 0300 00000000
			  1400 0600 ff020000 00000000 00000000 00000081  MCAST_GROUP6`},
		{"DEL_DAEMON backup", func(w *msgWriter) { w.writeDelDaemon(fam, 8, Backup) }, `
			20000000 1a00 0500 08000000 00000000
			0a 01 0000                            IPVS_CMD_DEL_DAEMON
			0c00 0300
			  0800 0100 02000000`},
		{"GET_DAEMON dump", func(w *msgWriter) { w.writeGetDaemons(fam, 9) }, `
			14000000 1a00 0103 09000000 00000000  REQUEST|ROOT|MATCH (NLM_F_DUMP)
			0b 01 0000                            IPVS_CMD_GET_DAEMON`},
		{"CTRL_CMD_GETFAMILY IPVS", func(w *msgWriter) { w.writeGetFamily(10, "IPVS") }, `
			20000000 1000 0100 0a000000 00000000  GENL_ID_CTRL, REQUEST
			03 01 0000                            CTRL_CMD_GETFAMILY
			0900 0200 49505653 00 000000          CTRL_ATTR_FAMILY_NAME "IPVS"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var w msgWriter
			tt.write(&w)
			want := unhexAnnotated(t, tt.want)
			if !bytes.Equal(w.b, want) {
				t.Errorf("encoded\n%s\nwant\n%s", hex.Dump(w.b), hex.Dump(want))
			}
		})
	}
}

// unhexAnnotated reads golden bytes written as hex words, each line
// optionally followed by two spaces and a comment.
func unhexAnnotated(t *testing.T, s string) []byte {
	t.Helper()
	var b strings.Builder
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if i := strings.Index(line, "  "); i >= 0 {
			line = line[:i]
		}
		b.WriteString(line)
	}
	return unhex(t, b.String())
}

// decodeRequest reads back a request written by writeOp, as the kernel's
// ip_vs_genl_parse_service and ip_vs_genl_parse_dest do.
func decodeRequest(b []byte) (cmd uint8, op Op, err error) {
	msgs, err := parseMessages(b)
	if err != nil {
		return 0, Op{}, err
	}
	if len(msgs) != 1 {
		return 0, Op{}, fmt.Errorf("%d messages", len(msgs))
	}
	m := msgs[0]
	if m.flags != unix.NLM_F_REQUEST|unix.NLM_F_ACK || len(m.payload) < 4 || m.payload[1] != ipvsGenlVersion {
		return 0, Op{}, fmt.Errorf("header flags %#x payload %x", m.flags, m.payload)
	}
	cmd = m.payload[0]
	top, err := parseAttrs(m.payload[4:])
	if err != nil {
		return 0, Op{}, err
	}
	addr := func(fam uint16, b []byte) netip.Addr {
		if fam == uint16(IPv4) {
			return netip.AddrFrom4([4]byte(b[:4]))
		}
		return netip.AddrFrom16([16]byte(b))
	}
	for _, t := range top {
		attrs, err := parseAttrs(t.data)
		if err != nil {
			return 0, Op{}, err
		}
		get := map[uint16][]byte{}
		for _, a := range attrs {
			get[a.typ] = a.data
		}
		switch t.typ {
		case ipvsCmdAttrService:
			s := &op.Service
			fam := native.Uint16(get[ipvsSvcAttrAF])
			s.Protocol = Protocol(native.Uint16(get[ipvsSvcAttrProtocol]))
			s.Address = addr(fam, get[ipvsSvcAttrAddr])
			s.Port = binary.BigEndian.Uint16(get[ipvsSvcAttrPort])
			if v, ok := get[ipvsSvcAttrSchedName]; ok {
				s.Scheduler = attrString(nlAttr{data: v})
				flags := get[ipvsSvcAttrFlags]
				if native.Uint32(flags[4:]) != 0xffffffff {
					return 0, Op{}, fmt.Errorf("flags mask %x", flags)
				}
				s.Flags = Flags(native.Uint32(flags))
				s.Timeout = native.Uint32(get[ipvsSvcAttrTimeout])
				s.Netmask = native.Uint32(get[ipvsSvcAttrNetmask])
			}
		case ipvsCmdAttrDest:
			d := &op.Destination
			fam := native.Uint16(get[ipvsDestAttrAddrFamily])
			d.Address = addr(fam, get[ipvsDestAttrAddr])
			d.Port = binary.BigEndian.Uint16(get[ipvsDestAttrPort])
			if v, ok := get[ipvsDestAttrWeight]; ok {
				d.Weight = int(native.Uint32(v))
				d.Forwarding = Forwarding(native.Uint32(get[ipvsDestAttrFwdMethod]))
			}
		}
	}
	return cmd, op, nil
}

func TestOpRoundTrip(t *testing.T) {
	v4 := Service{Protocol: UDP, Address: netip.MustParseAddr("198.18.3.4"), Port: 53, Scheduler: "mh",
		Flags: FlagMHFallback | FlagMHPort | FlagPersistent, Timeout: 300, Netmask: 0xffffffff}
	v6 := Service{Protocol: TCP, Address: netip.MustParseAddr("2001:db8:100::50"), Port: 8443, Scheduler: "wrr", Netmask: 128}
	d4 := Destination{Address: netip.MustParseAddr("10.10.0.11"), Port: 8080, Weight: 65535, Forwarding: Tunnel}
	d6 := Destination{Address: netip.MustParseAddr("fd00:10::2"), Port: 80, Weight: 0, Forwarding: Masq}
	ident := func(s Service) Service { return Service{Protocol: s.Protocol, Address: s.Address, Port: s.Port} }
	identD := func(d Destination) Destination { return Destination{Address: d.Address, Port: d.Port} }
	tests := []struct {
		op      Op
		cmd     uint8
		wantSvc Service
		wantDst Destination
	}{
		{Op{Kind: AddService, Service: v4}, ipvsCmdNewService, v4, Destination{}},
		{Op{Kind: UpdateService, Service: v6}, ipvsCmdSetService, v6, Destination{}},
		{Op{Kind: UpdateService, Service: func() Service { s := v4; s.Flags |= FlagHashed; return s }()}, ipvsCmdSetService, v4, Destination{}},
		{Op{Kind: DeleteService, Service: v6}, ipvsCmdDelService, ident(v6), Destination{}},
		{Op{Kind: AddDestination, Service: v4, Destination: d4}, ipvsCmdNewDest, ident(v4), d4},
		{Op{Kind: AddDestination, Service: v4, Destination: d6}, ipvsCmdNewDest, ident(v4), d6},
		{Op{Kind: UpdateDestination, Service: v6, Destination: d6}, ipvsCmdSetDest, ident(v6), d6},
		{Op{Kind: DeleteDestination, Service: v6, Destination: d6}, ipvsCmdDelDest, ident(v6), identD(d6)},
	}
	for _, tt := range tests {
		t.Run(tt.op.String(), func(t *testing.T) {
			var w msgWriter
			if err := w.writeOp(30, 77, tt.op); err != nil {
				t.Fatal(err)
			}
			cmd, got, err := decodeRequest(w.b)
			if err != nil {
				t.Fatal(err)
			}
			if cmd != tt.cmd || got.Service != tt.wantSvc || got.Destination != tt.wantDst {
				t.Errorf("decoded cmd %d %+v %+v, want cmd %d %+v %+v", cmd, got.Service, got.Destination, tt.cmd, tt.wantSvc, tt.wantDst)
			}
		})
	}
}

func TestOpRefusedBeforeSending(t *testing.T) {
	good := Service{Protocol: TCP, Address: netip.MustParseAddr("192.0.2.1"), Port: 80, Scheduler: "rr"}
	tests := []struct {
		name  string
		op    Op
		errno syscall.Errno
		field string
	}{
		{"no address", Op{Kind: AddService, Service: Service{Protocol: TCP, Scheduler: "rr"}}, syscall.EINVAL, "service address"},
		{"mapped address", Op{Kind: DeleteService, Service: Service{Protocol: TCP, Address: netip.MustParseAddr("::ffff:192.0.2.1")}}, syscall.EINVAL, "service address"},
		{"long scheduler", Op{Kind: AddService, Service: func() Service { s := good; s.Scheduler = "averyveryverylongname"; return s }()}, syscall.EINVAL, "scheduler"},
		{"weight", Op{Kind: AddDestination, Service: good, Destination: Destination{Address: netip.MustParseAddr("10.0.0.1"), Weight: 70000}}, syscall.ERANGE, "weight 70000"},
		{"unknown kind", Op{Kind: OpKind(42), Service: good}, syscall.EINVAL, "unknown"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var w msgWriter
			err := w.writeOp(30, 1, tt.op)
			if !errors.Is(err, tt.errno) || !strings.Contains(err.Error(), tt.field) {
				t.Errorf("error %v, want %v naming %q", err, tt.errno, tt.field)
			}
			if len(w.b) != 0 {
				t.Errorf("%d bytes written for a refused op", len(w.b))
			}
		})
	}
}

func TestParseDaemon(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("golden bytes are little-endian")
	}
	// An IPVS_CMD_NEW_DAEMON part of a GET_DAEMON dump as 6.1's
	// ip_vs_genl_fill_daemon writes it (after the genlmsghdr).
	v4 := unhexAnnotated(t, `
		4400 0300                        IPVS_CMD_ATTR_DAEMON, 68 bytes
		  0800 0100 02000000             STATE backup
		  0d00 0200 73776d73 796e6330 00 000000  MCAST_IFN "swmsync0"
		  0800 0300 07000000             SYNC_ID 7
		  0600 0400 c005 0000            SYNC_MAXLEN 1472
		  0600 0700 9022 0000            MCAST_PORT 8848
		  0500 0800 01 000000            MCAST_TTL 1
		  0800 0500 e0000051             MCAST_GROUP 224.0.0.81`)
	v6 := unhexAnnotated(t, `
		3400 0300
		  0800 0100 01000000             STATE master
		  0900 0200 65746831 00 000000   "eth1"
		  0800 0300 00000000
		  1400 0600 ff020000 00000000 00000000 00000081  MCAST_GROUP6 ff02::81`)
	tests := []struct {
		name    string
		payload []byte
		want    SyncDaemon
		wantErr bool
	}{
		{"ipv4 group", v4, SyncDaemon{Role: Backup, Interface: "swmsync0", SyncID: 7, MaxLen: 1472, Group: netip.MustParseAddr("224.0.0.81"), Port: 8848, TTL: 1}, false},
		{"ipv6 group", v6, SyncDaemon{Role: Master, Interface: "eth1", Group: netip.MustParseAddr("ff02::81")}, false},
		{"no daemon attribute", unhex(t, "08000100 01000000"), SyncDaemon{}, true},
		{"truncated", v4[:20], SyncDaemon{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseDaemon(tt.payload)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Errorf("parseDaemon = %+v, %v; want %+v (error %v)", got, err, tt.want, tt.wantErr)
			}
		})
	}
	// And what writeNewDaemon sends parses back to the same daemon.
	d := SyncDaemon{Role: Master, Interface: "bond0.100", SyncID: 200, MaxLen: 9000, Group: netip.MustParseAddr("239.1.2.3"), Port: 9000, TTL: 16}
	var w msgWriter
	w.writeNewDaemon(30, 1, d)
	if got, err := parseDaemon(w.b[unix.NLMSG_HDRLEN+unix.GENL_HDRLEN:]); err != nil || got != d {
		t.Errorf("round trip: %+v, %v; want %+v", got, err, d)
	}
}

func TestAckError(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("golden bytes are little-endian")
	}
	tests := []struct {
		name  string
		msg   string // the datagram
		errno syscall.Errno
		text  string
	}{
		{"ack", `24000000 0200 0001 05000000 00000000  NLMSG_ERROR, NLM_F_CAPPED
			00000000                           error 0
			68000000 1a00 0500 05000000 00000000  the request's header`, 0, ""},
		{"ESRCH, capped", `24000000 0200 0001 06000000 00000000
			fdffffff                           -3
			8c000000 1a00 0500 06000000 00000000`, syscall.ESRCH, "no such process"},
		{"EINVAL with an extended-ack message", `34000000 0200 0003 07000000 00000000  CAPPED|ACK_TLVS
			eaffffff                           -22
			54000000 1a00 0500 07000000 00000000
			0e00 0100 62616420 67726f75 7000 0000  NLMSGERR_ATTR_MSG "bad group"`, syscall.EINVAL, "invalid argument (bad group)"},
		{"uncapped, with the request copied", `2c000000 0200 0002 08000000 00000000  ACK_TLVS only
			efffffff                           -17
			18000000 1a00 0500 08000000 00000000 01010000 04000100`, syscall.EEXIST, "file exists"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			msgs, err := parseMessages(unhexAnnotated(t, tt.msg))
			if err != nil || len(msgs) != 1 {
				t.Fatal(msgs, err)
			}
			err = ackError(msgs[0])
			if tt.errno == 0 {
				if err != nil {
					t.Errorf("ack read as %v", err)
				}
				return
			}
			if !errors.Is(err, tt.errno) || err.Error() != tt.text {
				t.Errorf("error %q, want %v %q", err, tt.errno, tt.text)
			}
		})
	}
}
