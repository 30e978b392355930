package health

import "errors"

// checkResult is the outcome of one check of e: err nil when the backend
// is healthy.
type checkResult struct {
	e   *entry
	err error
}

// errPollerStopped is the connect poller's answer to start once it is
// stopped: the check has not run (the Scheduler runs it on a worker).
var errPollerStopped = errors.New("health: connect poller stopped")

// errCheckCanceled is the result of a check canceled in flight.
var errCheckCanceled = errors.New("health: check canceled")
