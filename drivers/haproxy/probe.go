package haproxy

import (
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// BindError says a service's bind address cannot be bound: HAProxy would
// fail to load any configuration holding it. It wraps the system's errno
// (errors.Is(err, syscall.EADDRINUSE)).
type BindError struct {
	Addr netip.AddrPort
	Err  error
}

// Error says which address, why, and what usually causes it.
func (e *BindError) Error() string {
	msg := fmt.Sprintf("cannot bind socket %s: %v", e.Addr, e.Err)
	switch {
	case errors.Is(e.Err, unix.EADDRINUSE):
		msg += " (another process listens there)"
	case errors.Is(e.Err, unix.EADDRNOTAVAIL):
		msg += " (the address is not local: hold the VIP, or set net.ipv4.ip_nonlocal_bind / net.ipv6.ip_nonlocal_bind to 1)"
	case errors.Is(e.Err, unix.EINVAL) && e.Addr.Addr().Is6() && e.Addr.Addr().IsLinkLocalUnicast():
		msg += " (an IPv6 link-local address needs a zone, which HAProxy services do not take)"
	}
	return msg
}

// Unwrap returns the errno.
func (e *BindError) Unwrap() error { return e.Err }

// probeBind makes the bind HAProxy makes for a new TCP listener on Linux
// (a socket with SO_REUSEADDR and SO_REUSEPORT, bound to addr) and closes
// it at once, without listening, so no connection is ever accepted on it.
// When it fails, HAProxy would fail too: the error is a *BindError.
// Only binds that the running HAProxy does not hold already are probed;
// those it holds are handed over to the new workers on a reload.
func probeBind(addr netip.AddrPort) error {
	a := addr.Addr().Unmap()
	var (
		fd  int
		err error
		sa  unix.Sockaddr
	)
	if a.Is4() {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		sa = &unix.SockaddrInet4{Port: int(addr.Port()), Addr: a.As4()}
	} else {
		fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		sa = &unix.SockaddrInet6{Port: int(addr.Port()), Addr: a.As16()}
	}
	if err != nil {
		return fmt.Errorf("probe bind %s: socket: %w", addr, err)
	}
	defer unix.Close(fd)
	for _, opt := range []int{unix.SO_REUSEADDR, unix.SO_REUSEPORT} {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt, 1); err != nil {
			return fmt.Errorf("probe bind %s: setsockopt: %w", addr, err)
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return &BindError{Addr: addr, Err: err}
	}
	return nil
}
