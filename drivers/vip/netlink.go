package vip

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// maxCallTime bounds a call whose context has no deadline.
const maxCallTime = 30 * time.Second

// Netlink is the real Links, over rtnetlink with
// github.com/vishvananda/netlink. Each call is bounded by its context's
// deadline (as the socket's send and receive time-outs); after a failure
// that is not the kernel's answer, the handle is closed and a new one is
// opened on the next call. Calls take turns on the one handle.
type Netlink struct {
	nsPath string
	slot   chan *netlink.Handle // the idle handle, or nil when none is open
}

// NewNetlink returns Links for the network namespace at nsPath ("" for the
// current one). The handle is opened on first use.
func NewNetlink(nsPath string) *Netlink {
	n := &Netlink{nsPath: nsPath, slot: make(chan *netlink.Handle, 1)}
	n.slot <- nil
	return n
}

// Close closes the handle, waiting for a call in progress.
func (n *Netlink) Close() {
	if h := <-n.slot; h != nil {
		h.Close()
	}
	n.slot <- nil
}

func (n *Netlink) open() (*netlink.Handle, error) {
	if n.nsPath == "" {
		return netlink.NewHandle(unix.NETLINK_ROUTE)
	}
	ns, err := netns.GetFromPath(n.nsPath)
	if err != nil {
		return nil, fmt.Errorf("open network namespace %s: %w", n.nsPath, err)
	}
	defer ns.Close()
	return netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
}

// do runs call on the handle with the socket time-outs set from ctx.
func (n *Netlink) do(ctx context.Context, call func(*netlink.Handle) error) error {
	var h *netlink.Handle
	select {
	case h = <-n.slot:
	case <-ctx.Done():
		return fmt.Errorf("waiting for the netlink handle: %w", ctx.Err())
	}
	if h == nil {
		var err error
		if h, err = n.open(); err != nil {
			n.slot <- nil
			return fmt.Errorf("open netlink handle: %w", err)
		}
	}
	limit := maxCallTime
	if dl, ok := ctx.Deadline(); ok {
		limit = time.Until(dl)
	}
	err := ctx.Err()
	if err == nil && limit < time.Millisecond {
		err = context.DeadlineExceeded
	}
	if err == nil {
		if err = h.SetSocketTimeout(limit); err == nil {
			err = call(h)
		}
	}
	if err != nil && broken(err) {
		h.Close()
		h = nil
	}
	n.slot <- h
	return err
}

// broken tells whether err leaves the handle in doubt: a time-out (a late
// reply would confuse the next request) or anything that is not an errno
// the kernel answered with.
func broken(err error) bool {
	var errno unix.Errno
	if errors.Is(err, context.DeadlineExceeded) || !errors.As(err, &errno) {
		var nf netlink.LinkNotFoundError
		return !errors.As(err, &nf)
	}
	return errno == unix.EAGAIN || errno == unix.EWOULDBLOCK || errno == unix.EBADF || errno == unix.ENOBUFS
}

// Link reports whether the interface exists and is up.
func (n *Netlink) Link(ctx context.Context, name string) (exists, up bool, err error) {
	err = n.do(ctx, func(h *netlink.Handle) error {
		l, err := h.LinkByName(name)
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		if err != nil {
			return err
		}
		exists, up = true, l.Attrs().Flags&net.FlagUp != 0
		return nil
	})
	if err != nil {
		return false, false, fmt.Errorf("look up interface %s: %w", name, err)
	}
	return exists, up, nil
}

// AddDummy creates a dummy interface.
func (n *Netlink) AddDummy(ctx context.Context, name string) error {
	err := n.do(ctx, func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: name}})
	})
	if err != nil {
		return fmt.Errorf("create dummy interface %s: %w", name, err)
	}
	return nil
}

// SetUp brings the interface up.
func (n *Netlink) SetUp(ctx context.Context, name string) error {
	err := n.do(ctx, func(h *netlink.Handle) error {
		l, err := h.LinkByName(name)
		if err != nil {
			return err
		}
		return h.LinkSetUp(l)
	})
	if err != nil {
		return fmt.Errorf("bring interface %s up: %w", name, err)
	}
	return nil
}

// Addresses lists the interface's addresses, IPv4 and IPv6.
func (n *Netlink) Addresses(ctx context.Context, name string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	err := n.do(ctx, func(h *netlink.Handle) error {
		l, err := h.LinkByName(name)
		if err != nil {
			return err
		}
		list, err := h.AddrList(l, netlink.FAMILY_ALL)
		if errors.Is(err, netlink.ErrDumpInterrupted) {
			list, err = h.AddrList(l, netlink.FAMILY_ALL) // changed while dumping: once more
		}
		if err != nil {
			return err
		}
		out = out[:0]
		for _, a := range list {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok || a.IPNet == nil {
				continue
			}
			bits, _ := a.Mask.Size()
			out = append(out, netip.PrefixFrom(ip.Unmap(), bits))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", name, err)
	}
	return out, nil
}

// AddAddress adds p to the interface, with the kernel's valid and
// preferred lifetimes set to lifetime (rounded up to whole seconds) when
// it is above zero; IPv6 addresses skip duplicate address detection, so
// they are usable at once.
func (n *Netlink) AddAddress(ctx context.Context, name string, p netip.Prefix, lifetime time.Duration) error {
	return n.address(ctx, "add %s to %s", name, p, lifetime, (*netlink.Handle).AddrAdd)
}

// RenewAddress replaces p on the interface with the lifetime given
// (NLM_F_REPLACE), which restarts the kernel's count, or adds it when it
// is missing.
func (n *Netlink) RenewAddress(ctx context.Context, name string, p netip.Prefix, lifetime time.Duration) error {
	return n.address(ctx, "renew %s on %s", name, p, lifetime, (*netlink.Handle).AddrReplace)
}

// DeleteAddress removes p from the interface.
func (n *Netlink) DeleteAddress(ctx context.Context, name string, p netip.Prefix) error {
	return n.address(ctx, "remove %s from %s", name, p, 0, (*netlink.Handle).AddrDel)
}

// address runs one address call on the interface name; what formats the
// error with p and name.
func (n *Netlink) address(ctx context.Context, what, name string, p netip.Prefix, lifetime time.Duration,
	call func(*netlink.Handle, netlink.Link, *netlink.Addr) error) error {
	err := n.do(ctx, func(h *netlink.Handle) error {
		l, err := h.LinkByName(name)
		if err != nil {
			return err
		}
		return call(h, l, toAddr(p, lifetime))
	})
	if err != nil {
		return fmt.Errorf(what+": %w", p, name, err)
	}
	return nil
}

func toAddr(p netip.Prefix, lifetime time.Duration) *netlink.Addr {
	a := &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if lifetime > 0 {
		secs := int((lifetime + time.Second - 1) / time.Second)
		a.ValidLft, a.PreferedLft = secs, secs
	}
	return a
}
