package ipvs

import (
	"context"
	"fmt"
)

// lender lends a single netlink handle to one call at a time and bounds
// every call by the caller's context: when the context ends during a call,
// the handle is closed (which unblocks the stuck socket read), the call
// reports the context's error and the next call opens a fresh handle. A call that fails with an error that leaves the
// handle unusable also gets it replaced.
//
// The handle travels through a one-slot channel rather than sitting under a
// mutex, so a caller waiting for its turn gives up when its context ends.
type lender[H comparable] struct {
	slot   chan H // holds the idle handle, or the zero H when none is open
	open   func() (H, error)
	close  func(H)
	broken func(error) bool // the handle cannot be used after this error
}

func newLender[H comparable](open func() (H, error), closeFn func(H), broken func(error) bool) *lender[H] {
	l := &lender[H]{slot: make(chan H, 1), open: open, close: closeFn, broken: broken}
	var none H
	l.slot <- none
	return l
}

// do runs call with the handle, opening one if needed.
func (l *lender[H]) do(ctx context.Context, call func(H) error) error {
	var h, none H
	select {
	case h = <-l.slot:
	case <-ctx.Done():
		return fmt.Errorf("waiting for the netlink handle: %w", context.Cause(ctx))
	}
	if h == none {
		var err error
		if h, err = l.open(); err != nil {
			l.slot <- none
			return err
		}
	}
	// The call runs on this goroutine (no goroutine and channel hand-off
	// per call); only if ctx ends first does AfterFunc close the handle,
	// which makes the blocked send or receive return.
	stop := context.AfterFunc(ctx, func() { l.close(h) })
	err := call(h)
	if !stop() {
		// ctx ended during the call and the handle is (being) closed: the
		// reply, if any, is lost with the socket. The next call opens a
		// new handle.
		l.slot <- none
		return fmt.Errorf("netlink call abandoned, handle will be reopened: %w", context.Cause(ctx))
	}
	if err != nil && l.broken(err) {
		l.close(h)
		h = none
	}
	l.slot <- h
	return err
}

// shutdown closes the idle handle, waiting for a call in progress.
func (l *lender[H]) shutdown() {
	var none H
	h := <-l.slot
	if h != none {
		l.close(h)
	}
	l.slot <- none
}
