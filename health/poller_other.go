//go:build !linux

package health

import (
	"errors"
	"time"
)

// connectPoller exists only on Linux (epoll): elsewhere tcp checks run on
// the Scheduler's workers.
type connectPoller struct{}

func newConnectPoller(func([]checkResult)) (*connectPoller, error) {
	return nil, errors.ErrUnsupported
}

func (*connectPoller) start(*entry, time.Duration) (uint64, error) { return 0, errPollerStopped }
func (*connectPoller) cancel(uint64)                               {}
func (*connectPoller) run()                                        {}
func (*connectPoller) stop()                                       {}
