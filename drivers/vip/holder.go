package vip

import (
	"context"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/switchman-lb/switchman/spec"
)

// Hold implements ha.Holder: when held, it adds at once the VIPs of the
// group's services (on the HA interface) and the group's floating
// addresses (on their interfaces) and announces them in the background;
// when not, it removes them at once, stopping their announcements. A
// second call with held true applies a change of the floating addresses.
// Outside HA mode it does nothing. Failures are logged: the elector
// cannot act on them, and Sync adds what is missing again.
func (d *Driver) Hold(group string, held bool, floatingAddrs []spec.GroupAddress) {
	if d.ha == "" {
		d.log.Error("VIP driver: Hold called without an HA interface; ignored", "group", group)
		return
	}
	d.mu.Lock()
	old := d.held[group]
	for _, k := range old {
		delete(d.floats[k], group)
		if len(d.floats[k]) == 0 {
			delete(d.floats, k)
		}
	}
	delete(d.held, group)
	var now []slot
	if held {
		now = floating(floatingAddrs)
		d.held[group] = now
		for _, k := range now {
			if d.floats[k] == nil {
				d.floats[k] = map[string]bool{}
			}
			d.floats[k][group] = true
		}
	}
	slots := append(slices.Clone(old), now...)
	for v := range d.groupVIPs[group] {
		slots = append(slots, d.vipSlot(v))
	}
	d.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), d.timeout)
	defer cancel()
	failed, added := d.converge(ctx, slots, nil, 0)
	for k, err := range failed {
		d.log.Error("HA address not brought to its state", "group", group, "held", held, "address", k.Addr, "interface", k.Iface, "error", err)
	}
	d.announceAdded(added)
}

// Run, in HA mode, first removes what an earlier run left behind (a crash
// while owning: the record lists it, and this agent owns no group yet),
// then renews the lifetime of every held address every third of it,
// until ctx ends. Outside HA mode it only waits for ctx.
func (d *Driver) Run(ctx context.Context) error {
	if d.ha == "" {
		<-ctx.Done()
		return ctx.Err()
	}
	d.mu.Lock()
	leftovers := slices.Collect(maps.Keys(d.rec))
	d.mu.Unlock()
	if len(leftovers) > 0 {
		d.log.Info("removing addresses an earlier run left behind (those of groups this agent does not own)", "recorded", len(leftovers))
		if failed, _ := d.converge(ctx, leftovers, nil, 0); len(failed) > 0 {
			for k, err := range failed {
				d.log.Error("cannot remove an address an earlier run left behind", "address", k.Addr, "interface", k.Iface, "error", err)
			}
		}
	}
	if d.lifetime <= 0 {
		<-ctx.Done()
		return ctx.Err()
	}
	t := time.NewTicker(d.lifetime / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			d.renew(ctx)
		}
	}
}

// renew sets the lifetime of every held address anew, one locked step
// per address, adding any that went missing.
func (d *Driver) renew(ctx context.Context) {
	d.mu.Lock()
	slots := slices.Collect(maps.Keys(d.on))
	d.mu.Unlock()
	for _, k := range slots {
		d.mu.Lock()
		if d.on[k] && d.wanted(k) && ctx.Err() == nil {
			if err := d.call(ctx, func(c context.Context) error { return d.links.RenewAddress(c, k.Iface, k.Addr, d.lifetime) }); err != nil {
				d.log.Warn("cannot renew the lifetime of a held address", "address", k.Addr, "interface", k.Iface, "error", err)
			}
		}
		d.mu.Unlock()
	}
}

// announceAdded announces, in HA mode, the addresses just added, on
// their interfaces, following the schedule. Each round announces only the
// addresses still held, under the lock, so an address dropped in between
// is never announced again.
func (d *Driver) announceAdded(added []slot) {
	if d.ha == "" || len(added) == 0 {
		return
	}
	byIface := map[string][]slot{}
	for _, k := range added {
		byIface[k.Iface] = append(byIface[k.Iface], k)
	}
	for iface, slots := range byIface {
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			d.announceRounds(iface, slots)
		}()
	}
}

func (d *Driver) announceRounds(iface string, slots []slot) {
	start := time.Now()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var reported bool
	for _, at := range d.schedule {
		timer.Reset(time.Until(start.Add(at)))
		select {
		case <-d.bg.Done():
			return
		case <-timer.C:
		}
		d.mu.Lock()
		var addrs []netip.Addr
		for _, k := range slots {
			if d.on[k] && d.wanted(k) {
				addrs = append(addrs, k.Addr.Addr())
			}
		}
		var err error
		if len(addrs) > 0 {
			err = d.announce(d.bg, iface, addrs)
		}
		d.mu.Unlock()
		if len(addrs) == 0 {
			return
		}
		if err != nil && !reported {
			reported = true
			d.log.Warn("announcing held addresses failed; neighbours may keep sending to the previous holder until their entries expire", "interface", iface, "error", err)
		}
	}
}
