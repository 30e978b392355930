package health

import "errors"

// checkResult is the outcome of one check of e: err nil when the backend
// is healthy.
type checkResult struct {
	e   *entry
	err error
}

// errPollerStopped is the connect poller's answer for a check it did not
// run (it is closed, or epoll failed): the Scheduler runs it on a worker.
var errPollerStopped = errors.New("health: connect poller stopped")

// errCheckCanceled is the result of a check canceled in flight.
var errCheckCanceled = errors.New("health: check canceled")
