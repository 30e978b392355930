package ipvs

import (
	"context"
	"errors"
	"sync"
	"time"
)

// readBack is the full read-back of the destinations of the services a
// Sync trusted (every FullResync). It runs in a goroutine of its own,
// outside the driver's turn: with thousands of services it is thousands
// of netlink dumps, and the agent runs this driver's Sync and Apply on one
// worker, so a read-back inside the Sync held back every change that
// arrived meanwhile. What it finds only points the next Sync at services
// that differ from what the driver programmed; the Sync reads those again
// itself before it writes, so a service an Apply changed while the
// read-back ran costs one read, never a wrong write.
type readBack struct {
	mu      sync.Mutex
	running bool
	got     map[Key][]Destination // the last completed read-back, until a Sync takes it
	done    uint64                // read-backs completed
	took    time.Duration         // how long the last one took
}

// ReadBacks returns how many background read-backs have completed and
// how long the last one took.
func (d *Driver) ReadBacks() (done uint64, last time.Duration) {
	d.rb.mu.Lock()
	defer d.rb.mu.Unlock()
	return d.rb.done, d.rb.took
}

// takeReadBack returns the destinations the last completed read-back
// found, once; nil when there is nothing new.
func (d *Driver) takeReadBack() map[Key][]Destination {
	d.rb.mu.Lock()
	defer d.rb.mu.Unlock()
	got := d.rb.got
	d.rb.got = nil
	return got
}

// drifted reports whether the read-back found w's service with other
// destinations than w.
func drifted(got map[Key][]Destination, w Desired) bool {
	dsts, read := got[w.Service.Key()]
	return read && len(diffDestinations(w, dsts)) > 0
}

// startReadBack reads the destinations of keys in the background, unless
// a read-back is already running, and reports whether it started one.
// Each read is bounded by the call timeout; a service that cannot be read
// (an error, or gone) is left out (the Sync's own list finds a missing
// service), and after a read that timed out the rest is (the kernel is
// not answering).
func (d *Driver) startReadBack(keys []Key) bool {
	d.rb.mu.Lock()
	if d.rb.running {
		d.rb.mu.Unlock()
		return false
	}
	d.rb.running = true
	d.rb.mu.Unlock()
	go func() {
		start := time.Now()
		got := make(map[Key][]Destination, len(keys))
		for _, k := range keys {
			dsts, found, err := destinationsOf(context.Background(), d.kernel, d.timeout, k)
			if errors.Is(err, context.DeadlineExceeded) {
				d.log.Warn("IPVS read-back given up: a read timed out", "service", k.String(), "error", err)
				break
			}
			if err == nil && found {
				got[k] = dsts
			}
		}
		took := time.Since(start)
		d.rb.mu.Lock()
		d.rb.got, d.rb.running = got, false
		d.rb.done++
		d.rb.took = took
		d.rb.mu.Unlock()
		d.log.Debug("IPVS read-back done", "services", len(keys), "read", len(got), "took", took)
	}()
	return true
}
