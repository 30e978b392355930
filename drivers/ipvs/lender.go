package ipvs

import (
	"context"
	"fmt"
)

// lender lends a single netlink handle to one call at a time and bounds
// every call by the caller's context: a call that does not return in time
// has its handle closed (which unblocks the stuck socket read) and the next
// call opens a fresh one. A call that fails with an error that leaves the
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
	done := make(chan error, 1) // buffered: a call abandoned below still ends
	go func() { done <- call(h) }()
	select {
	case err := <-done:
		if err != nil && l.broken(err) {
			l.close(h)
			h = none
		}
		l.slot <- h
		return err
	case <-ctx.Done():
		// Closing the socket makes the blocked send or receive return, so
		// the goroutine ends; the reply, if any ever comes, is lost with
		// the socket. The next call opens a new handle.
		l.close(h)
		l.slot <- none
		return fmt.Errorf("netlink call abandoned, handle will be reopened: %w", context.Cause(ctx))
	}
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
