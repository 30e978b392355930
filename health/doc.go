// Package health checks the backends of every service from this host and
// tells the agent which of them are fit to receive traffic.
//
// A Target is one backend of one service with its service's check settings
// (spec.Health). One Scheduler runs the checks of all targets: each target
// has its own interval timer (kept in one heap, served by one goroutine), the
// first check of a new target is placed at a random offset within
// min(interval, Options.StartSpread) so thousands of targets do not fire at
// once, and at most Options.MaxConcurrent checks run at the same time. Checks
// run on worker goroutines that are started on demand and exit after two
// idle seconds; each check has a context that ends at its timeout or when
// the Scheduler's Run context is done.
//
// # State
//
// A target is pending until its first check finishes. That first result
// decides its state at once: a success makes it healthy, a failure
// unhealthy. After that, state changes only with hysteresis: an unhealthy
// target becomes healthy after Rise consecutive successes, a healthy one
// unhealthy after Fall consecutive failures. The first result deciding at
// once means that a new backend gets weight only after its first successful
// check (not before, and not Rise intervals later), and that an agent
// restart settles in one check round instead of Rise x Interval.
//
// Update replaces the set of targets. A target whose key (service, backend
// address) and settings are unchanged keeps its state and schedule. A target
// whose settings changed is restarted: its counters reset and it is pending
// again (its first new result decides), but it keeps reporting its previous
// Healthy value until then, so editing, say, an interval does not take weight
// away for a round. A target with protocol "none" is healthy at once and
// never checked.
//
// # Outputs
//
// Changed fires (coalesced; it never blocks the checker) whenever any
// target's state changes, including a target's first result. Snapshot
// returns every target's state. Settled and WaitSettled tell whether every
// current target has its first result; the agent waits for that, bounded,
// before its first apply so that a restart does not zero weights.
//
// Checks run whether or not etcd is reachable: the package knows nothing of
// etcd.
package health
