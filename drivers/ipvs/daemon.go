package ipvs

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"syscall"
)

// Role is what an IPVS connection-sync daemon does: a master sends the
// connections this host schedules, a backup takes in the master's.
type Role uint32

// The daemon roles (IP_VS_STATE_MASTER, IP_VS_STATE_BACKUP).
const (
	Master Role = 1
	Backup Role = 2
)

// String names the role as ipvsadm does.
func (r Role) String() string {
	switch r {
	case Master:
		return "master"
	case Backup:
		return "backup"
	}
	return fmt.Sprintf("role%d", uint32(r))
}

// SyncDaemon is one IPVS connection-sync daemon. The optional settings left
// zero take the kernel's defaults (group 224.0.0.81, port 8848, TTL 1, a
// message size from the interface MTU); read back, they hold what the
// kernel uses.
type SyncDaemon struct {
	Role      Role   // Master or Backup
	Interface string // the multicast interface
	SyncID    uint8  // which masters a backup listens to (0: any)
	MaxLen    uint16 // largest sync message payload
	Group     netip.Addr
	Port      uint16
	TTL       uint8
}

// DaemonKernel is implemented by kernels whose sync daemons can be managed.
type DaemonKernel interface {
	// Daemons lists the sync daemons that run.
	Daemons(ctx context.Context) ([]SyncDaemon, error)
	// StartDaemon starts d; EEXIST when a daemon of that role runs already.
	StartDaemon(ctx context.Context, d SyncDaemon) error
	// StopDaemon stops the daemon of role; ESRCH when none runs.
	StopDaemon(ctx context.Context, role Role) error
}

var _ DaemonKernel = (*Netlink)(nil)

// ErrSyncMixedFamily says the kernel refused to start a sync daemon because
// a virtual service has destinations of another address family, which the
// sync protocol cannot carry. Errors that wrap it also wrap EINVAL, the
// errno the kernel answers.
var ErrSyncMixedFamily = errors.New("IPVS connection sync cannot run while a virtual service has destinations of another address family (an IPv4 service with IPv6 tunnel real servers, or the reverse): remove those destinations, or run without connection sync (--ipvs-sync-interface)")

// checkMaxLen refuses a message size the kernel would clamp (and so report
// differently than asked, which would restart the daemon on every check).
func checkMaxLen(d SyncDaemon) error {
	if d.MaxLen == 0 {
		return nil
	}
	lo, hi := 1, 65535-28 // IPv4 and UDP headers
	if d.Role == Backup {
		lo = 1024
	}
	if d.Group.IsValid() && !d.Group.Unmap().Is4() {
		hi = 65535 - 48
	}
	if int(d.MaxLen) < lo || int(d.MaxLen) > hi {
		return badRequest("sync daemon %s max length %d: want %d to %d (or 0 for the default)", d.Role, d.MaxLen, lo, hi)
	}
	return nil
}

// Daemons lists the sync daemons that run, with the settings the kernel
// uses.
func (n *Netlink) Daemons(ctx context.Context) ([]SyncDaemon, error) {
	var out []SyncDaemon
	err := n.genl.do(ctx, func(c *genlConn) error {
		out = out[:0]
		return c.dump(ctx, func(w *msgWriter, seq uint32) { w.writeGetDaemons(c.family, seq) }, func(payload []byte) error {
			d, err := parseDaemon(payload)
			if err != nil {
				return err
			}
			out = append(out, d)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("list IPVS sync daemons: %w", err)
	}
	return out, nil
}

// StartDaemon starts d: EEXIST when a daemon of that role runs already,
// ENODEV when the interface does not exist, and ErrSyncMixedFamily (with
// EINVAL) when a service has destinations of another address family.
func (n *Netlink) StartDaemon(ctx context.Context, d SyncDaemon) error {
	what := fmt.Sprintf("start the IPVS %s sync daemon on %q", d.Role, d.Interface)
	if err := checkDaemon(d); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	err := n.genl.do(ctx, func(c *genlConn) error {
		return c.request(ctx, func(w *msgWriter, seq uint32) { w.writeNewDaemon(c.family, seq, d) })
	})
	if err == nil {
		return nil
	}
	var ke *kernelError
	if errors.As(err, &ke) && ke.errno == syscall.EINVAL {
		// Everything else the kernel answers EINVAL for was checked
		// above; name the service that mixes families when we can.
		if k, dst, ok := n.mixedFamily(ctx); ok {
			return fmt.Errorf("%s: %w (%s has real server %s): %w", what, ErrSyncMixedFamily, k, dst, err)
		}
		return fmt.Errorf("%s: %w: %w", what, ErrSyncMixedFamily, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// mixedFamily finds a service with a destination of another family.
func (n *Netlink) mixedFamily(ctx context.Context) (Key, netip.AddrPort, bool) {
	svcs, err := n.Services(ctx)
	if err != nil {
		return Key{}, netip.AddrPort{}, false
	}
	for _, s := range svcs {
		dsts, err := n.Destinations(ctx, s)
		if err != nil {
			continue
		}
		for _, d := range dsts {
			if FamilyOf(d.Address) != s.Family() {
				return s.Key(), d.AddrPort(), true
			}
		}
	}
	return Key{}, netip.AddrPort{}, false
}

// StopDaemon stops the daemon of role; ESRCH when none runs.
func (n *Netlink) StopDaemon(ctx context.Context, role Role) error {
	if role != Master && role != Backup {
		return fmt.Errorf("stop IPVS sync daemon: %w", badRequest("role %d: want master (1) or backup (2)", uint32(role)))
	}
	err := n.genl.do(ctx, func(c *genlConn) error {
		return c.request(ctx, func(w *msgWriter, seq uint32) { w.writeDelDaemon(c.family, seq, role) })
	})
	if err != nil {
		return fmt.Errorf("stop the IPVS %s sync daemon: %w", role, err)
	}
	return nil
}

// daemonMatches tells whether have, a daemon read back from the kernel,
// runs as want asks: same interface and sync id, and the same value of
// every optional setting want gives (one left zero takes whatever default
// the kernel chose).
func daemonMatches(have, want SyncDaemon) bool {
	return have.Role == want.Role && have.Interface == want.Interface && have.SyncID == want.SyncID &&
		(want.MaxLen == 0 || have.MaxLen == want.MaxLen) &&
		(!want.Group.IsValid() || have.Group.Unmap() == want.Group.Unmap()) &&
		(want.Port == 0 || have.Port == want.Port) &&
		(want.TTL == 0 || have.TTL == want.TTL)
}

// EnsureDaemons makes the sync daemons in want run as asked: it reads back
// what runs, starts what is missing and restarts (stop, then start) a
// daemon whose settings differ. It writes nothing when everything matches,
// and never stops a daemon whose role is not in want (it may be someone
// else's). At most one daemon per role.
func EnsureDaemons(ctx context.Context, k DaemonKernel, want []SyncDaemon) error {
	roles := map[Role]bool{}
	for i, w := range want {
		if err := checkDaemon(w); err != nil {
			return fmt.Errorf("sync daemon %d: %w", i, err)
		}
		if roles[w.Role] {
			return fmt.Errorf("sync daemon %d: %w", i, badRequest("a second %s daemon: the kernel runs at most one per role", w.Role))
		}
		roles[w.Role] = true
	}
	if len(want) == 0 {
		return nil
	}
	have, err := k.Daemons(ctx)
	if err != nil {
		return err
	}
	running := make(map[Role]SyncDaemon, len(have))
	for _, h := range have {
		running[h.Role] = h
	}
	var errs []error
	for _, w := range want {
		h, ok := running[w.Role]
		if ok && daemonMatches(h, w) {
			continue
		}
		if ok {
			if err := k.StopDaemon(ctx, w.Role); err != nil && !errors.Is(err, syscall.ESRCH) {
				errs = append(errs, err)
				continue
			}
		}
		if err := k.StartDaemon(ctx, w); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
