// Package health checks the backends of every service from this host and
// tells the agent which of them are fit to receive traffic.
//
// A Target is one backend of one service with its service's check settings
// (spec.Health). One Scheduler runs the checks of all targets. Targets are
// set per service (SetService), and a call costs in proportion to that
// service's targets: the other services' targets keep their state and
// schedule.
//
// # Running the checks
//
// One loop (Run) keeps every target's next check in one heap of due times.
// Each turn starts the checks that are due and reads the checks that
// ended; turns come when the next check is due, but no more often than
// every 10 ms, so checks due close together share a turn (a check starts
// at most 10 ms late, never early; the next one is due one interval after
// the previous one was due). The first check of a new target is placed at
// a random offset within min(interval, Options.StartSpread), so thousands
// of targets do not fire at once, and at most Options.MaxConcurrent checks
// run at the same time.
//
// tcp checks (on Linux) run on the loop itself, as HAProxy's do: a
// non-blocking connect with TCP_QUICKACK off and SO_LINGER 0 (the backend
// answers SYN-ACK and gets a reset; its application is never woken, no
// TIME_WAIT is left), asked at the end of its turn and at the next whether
// it is connected, and watched by one epoll instance after that. A tcp
// check costs no goroutine, timer or allocation. http, https and udp
// checks run on worker goroutines (started on demand, gone after two idle
// seconds), each with a context that ends at its timeout or when Run's
// context is done.
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
// A target whose address and settings are unchanged by SetService keeps
// its state and schedule. A target whose settings changed is restarted:
// its counters reset and it is pending again (its first new result
// decides), but it keeps reporting its previous Healthy value until then,
// so editing, say, an interval does not take weight away for a round. A
// target with protocol "none" is healthy at once and never checked.
//
// # Outputs
//
// Changes are keyed, as seesaw's notifications carry an id and the new
// state: Changed fires (coalesced; it never blocks the checker) when a
// target's Healthy or Pending changed, TakeChanged returns those keys and
// forgets them, and Status returns one target's state. Settled and
// WaitSettled tell whether every current target has its first result;
// the agent waits for that, bounded, before its first apply so that a
// restart does not zero weights.
//
// Checks run whether or not etcd is reachable: the package knows nothing of
// etcd.
package health
