package ipvs

import (
	"context"
	"errors"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// fakeHandle stands for a netlink socket: closing it unblocks a call.
type fakeHandle struct {
	id     int
	closed chan struct{}
}

func TestLender(t *testing.T) {
	var opened, closed atomic.Int32
	open := func() (*fakeHandle, error) {
		return &fakeHandle{id: int(opened.Add(1)), closed: make(chan struct{})}, nil
	}
	closeFn := func(h *fakeHandle) { closed.Add(1); close(h.closed) }
	l := newLender(open, closeFn, brokenHandle)
	ctx := context.Background()

	var used []int
	use := func(h *fakeHandle) error { used = append(used, h.id); return nil }
	for range 3 {
		if err := l.do(ctx, use); err != nil {
			t.Fatal(err)
		}
	}
	if opened.Load() != 1 {
		t.Errorf("opened %d handles for 3 good calls, want 1", opened.Load())
	}

	// A kernel answer (EEXIST) keeps the handle.
	if err := l.do(ctx, func(*fakeHandle) error { return syscall.EEXIST }); !errors.Is(err, syscall.EEXIST) {
		t.Fatal(err)
	}
	if opened.Load() != 1 || closed.Load() != 0 {
		t.Errorf("EEXIST replaced the handle (opened %d, closed %d)", opened.Load(), closed.Load())
	}

	// A broken socket gets a new handle on the next call.
	if err := l.do(ctx, func(*fakeHandle) error { return errors.New("Socket got closed on receive") }); err == nil {
		t.Fatal("error lost")
	}
	if closed.Load() != 1 {
		t.Errorf("broken handle not closed")
	}
	if err := l.do(ctx, use); err != nil || opened.Load() != 2 {
		t.Errorf("after a broken handle: err %v, opened %d, want 2", err, opened.Load())
	}

	// A hung call is abandoned at the deadline, its handle closed (which
	// ends the call) and a new one opened for the next call.
	ended := make(chan struct{})
	tctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	err := l.do(tctx, func(h *fakeHandle) error { <-h.closed; close(ended); return errors.New("closed") })
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("hung call: %v, want deadline exceeded", err)
	}
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		t.Fatal("the hung call did not end after its handle was closed")
	}
	if err := l.do(ctx, use); err != nil || opened.Load() != 3 {
		t.Errorf("after a hung call: err %v, opened %d, want 3", err, opened.Load())
	}

	// A failing open is reported and retried on the next call.
	failing := newLender(func() (*fakeHandle, error) { return nil, ErrUnavailable }, closeFn, brokenHandle)
	for range 2 {
		if err := failing.do(ctx, use); !errors.Is(err, ErrUnavailable) {
			t.Errorf("open failure: %v", err)
		}
	}

	// A caller waiting for the handle gives up with its context.
	hold, took := make(chan struct{}), make(chan struct{})
	go l.do(ctx, func(*fakeHandle) error { close(took); <-hold; return nil })
	<-took
	wctx, wcancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer wcancel()
	werr := l.do(wctx, use)
	close(hold)
	if !errors.Is(werr, context.DeadlineExceeded) {
		t.Errorf("waiting caller: %v", werr)
	}
	l.shutdown()
}
