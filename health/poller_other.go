//go:build !linux

package health

import "errors"

// connectPoller exists only on Linux (epoll): elsewhere tcp checks run on
// the Scheduler's workers.
type connectPoller struct{}

func newConnectPoller() (*connectPoller, error) { return nil, errors.ErrUnsupported }

func (*connectPoller) start(batch []*entry, res []startedCheck) {
	for i := range batch {
		res[i] = startedCheck{err: errPollerStopped}
	}
}

func (*connectPoller) harvest() ([]checkResult, error) { return nil, nil }
func (*connectPoller) pending() int                    { return 0 }
func (*connectPoller) cancel(uint64)                   {}
func (*connectPoller) close()                          {}
