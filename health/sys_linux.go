//go:build linux

package health

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The system calls of a tcp check's hot path. Each of them returns at once
// (the socket is non-blocking, epoll_wait is asked not to wait, closing a
// socket with SO_LINGER 0 sends a reset and does not wait), so they are
// made with RawSyscall: Syscall's bookkeeping for Go's scheduler (which
// expects a call that may block) costs about as much as these calls
// themselves.

// rawSockaddr is a socket address in the kernel's layout, built once per
// target; connect only reads it, so concurrent checks may share it.
type rawSockaddr struct {
	family int
	v4     unix.RawSockaddrInet4
	v6     unix.RawSockaddrInet6
}

// sockaddrOf converts an address for connect(2).
func sockaddrOf(ap netip.AddrPort) (*rawSockaddr, error) {
	a := ap.Addr()
	var sa rawSockaddr
	port := (*[2]byte)(unsafe.Pointer(&sa.v4.Port))
	if a.Is4() || a.Is4In6() {
		sa.family = unix.AF_INET
		sa.v4.Family = unix.AF_INET
		sa.v4.Addr = a.Unmap().As4()
	} else {
		sa.family = unix.AF_INET6
		sa.v6.Family = unix.AF_INET6
		sa.v6.Addr = a.As16()
		port = (*[2]byte)(unsafe.Pointer(&sa.v6.Port))
		if z := a.Zone(); z != "" {
			if ifi, err := net.InterfaceByName(z); err == nil {
				sa.v6.Scope_id = uint32(ifi.Index)
			} else if n, nerr := strconv.ParseUint(z, 10, 32); nerr == nil {
				sa.v6.Scope_id = uint32(n)
			} else {
				return nil, fmt.Errorf("address %s: zone %q: %w", ap, z, err)
			}
		}
	}
	port[0], port[1] = byte(ap.Port()>>8), byte(ap.Port()) // network order
	return &sa, nil
}

func (sa *rawSockaddr) ptr() (unsafe.Pointer, uintptr) {
	if sa.family == unix.AF_INET {
		return unsafe.Pointer(&sa.v4), unix.SizeofSockaddrInet4
	}
	return unsafe.Pointer(&sa.v6), unix.SizeofSockaddrInet6
}

// Option values the kernel reads.
var (
	optOff   int32
	noLinger = unix.Linger{Onoff: 1, Linger: 0}
)

// openConnect makes a non-blocking TCP socket set up for a check and starts
// connecting it to sa. It returns the socket, or the error of a connect
// that failed at once (the socket is then closed).
//
// The socket has TCP_QUICKACK off, so the kernel holds back the last ACK of
// the handshake (waiting for data to carry it): the check learns that the
// backend answered (SYN-ACK) and then resets the connection, so the
// backend's kernel drops the half-open request and its application is
// never woken to accept a connection that carries nothing. It has
// SO_LINGER 0, so close sends RST instead of FIN and leaves no TIME_WAIT:
// thousands of checks a second do not use up ephemeral ports. HAProxy's
// tcp checks work the same way.
func openConnect(sa *rawSockaddr) (int, error) {
	r, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(sa.family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if e != 0 {
		return -1, fmt.Errorf("socket: %w", e)
	}
	fd := int(r)
	if _, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_QUICKACK,
		uintptr(unsafe.Pointer(&optOff)), unsafe.Sizeof(optOff), 0); e != 0 {
		closeFD(fd)
		return -1, fmt.Errorf("setsockopt TCP_QUICKACK: %w", e)
	}
	if _, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_LINGER,
		uintptr(unsafe.Pointer(&noLinger)), unsafe.Sizeof(noLinger), 0); e != 0 {
		closeFD(fd)
		return -1, fmt.Errorf("setsockopt SO_LINGER: %w", e)
	}
	p, n := sa.ptr()
	if _, _, e := unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(p), n); e != 0 && e != unix.EINPROGRESS {
		closeFD(fd)
		return -1, e
	}
	return fd, nil
}

// closeFD closes a check's socket (SO_LINGER 0: a reset, no waiting).
func closeFD(fd int) { _, _, _ = unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0) }

// epollAdd registers fd with epfd for ev.
func epollAdd(epfd, fd int, ev *unix.EpollEvent) error {
	if _, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), unix.EPOLL_CTL_ADD, uintptr(fd),
		uintptr(unsafe.Pointer(ev)), 0, 0); e != 0 {
		return e
	}
	return nil
}

// epollReady fills evs with the events that are ready, without waiting.
func epollReady(epfd int, evs []unix.EpollEvent) (int, error) {
	for {
		r, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&evs[0])), uintptr(len(evs)), 0, 0, 0)
		switch e {
		case 0:
			return int(r), nil
		case unix.EINTR:
			continue
		default:
			return 0, e
		}
	}
}

// peerBuf holds getpeername's and getsockopt's results (so that asking
// allocates nothing).
type peerBuf struct {
	addr unix.RawSockaddrAny
	alen uint32
	v    int32
	vlen uint32
}

// connectState tells whether the connect started on fd is done: connected
// (errno 0), failed (errno), or still going on (done false).
func (b *peerBuf) connectState(fd int) (done bool, errno unix.Errno) {
	b.alen = unix.SizeofSockaddrAny
	_, _, e := unix.RawSyscall(unix.SYS_GETPEERNAME, uintptr(fd), uintptr(unsafe.Pointer(&b.addr)), uintptr(unsafe.Pointer(&b.alen)))
	switch e {
	case 0:
		return true, 0 // it has a peer: the backend answered
	case unix.ENOTCONN: // connecting, or failed: the socket's error says
	default:
		return true, e
	}
	b.v, b.vlen = 0, 4
	if _, _, e := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_ERROR,
		uintptr(unsafe.Pointer(&b.v)), uintptr(unsafe.Pointer(&b.vlen)), 0); e != 0 {
		return true, e
	}
	if b.v != 0 {
		return true, unix.Errno(b.v)
	}
	return false, 0
}
