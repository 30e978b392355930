//go:build linux

package health

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// tcpChecker succeeds when the backend answers a TCP connection attempt
// (SYN-ACK). It completes no handshake at the backend (see openConnect) and
// resets the connection at once.
//
// The Scheduler runs its checks on its connect poller, from its one loop;
// Check runs one check on its own, with the same socket set-up.
type tcpChecker struct {
	addr netip.AddrPort
	desc string
	sa   *rawSockaddr // read-only

	timeout time.Duration // for the timeout's error text

	// The last error the poller reported, reused while the cause repeats
	// (a backend that is down fails the same way every interval), so a
	// failing check allocates nothing. Only the Scheduler's loop uses
	// them.
	lastErrno  unix.Errno
	lastErr    error
	timeoutErr error
}

func newTCPChecker(addr netip.AddrPort, timeout time.Duration) (*tcpChecker, error) {
	sa, err := sockaddrOf(addr)
	if err != nil {
		return nil, err
	}
	return &tcpChecker{addr: addr, desc: "tcp " + addr.String(), sa: sa, timeout: timeout}, nil
}

func (c *tcpChecker) String() string { return c.desc }

// connectError is the error of a check whose connect failed with errno.
func (c *tcpChecker) connectError(err error) error {
	if errors.Is(err, unix.ECONNREFUSED) {
		return fmt.Errorf("tcp connect %s: refused: %w", c.addr, err)
	}
	return fmt.Errorf("tcp connect %s: %w", c.addr, err)
}

// errnoError is the error of a check whose connect failed with errno: the
// same value as last time while the cause repeats. Only the Scheduler's
// loop calls it.
func (c *tcpChecker) errnoError(errno unix.Errno) error {
	if errno != c.lastErrno || c.lastErr == nil {
		c.lastErrno, c.lastErr = errno, c.connectError(errno)
	}
	return c.lastErr
}

// timeoutError is the error of a check that got no answer in time. Only
// the Scheduler's loop calls it.
func (c *tcpChecker) timeoutError() error {
	if c.timeoutErr == nil {
		c.timeoutErr = fmt.Errorf("tcp connect %s: no answer within %v: %w", c.addr, c.timeout, os.ErrDeadlineExceeded)
	}
	return c.timeoutErr
}

// Check runs one check on its own: the Scheduler's poller is not involved.
// It waits for the connect on Go's network poller, until ctx is done: a
// timeout's error wraps os.ErrDeadlineExceeded (as the poller's does), a
// cancellation's wraps context.Canceled.
func (c *tcpChecker) Check(ctx context.Context) error {
	fd, err := openConnect(c.sa)
	if err != nil {
		return c.connectError(err)
	}
	// A non-blocking descriptor: os.NewFile registers it with Go's poller.
	f := os.NewFile(uintptr(fd), "tcp-check")
	defer f.Close() // SO_LINGER 0: a reset
	if dl, ok := ctx.Deadline(); ok {
		_ = f.SetWriteDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = f.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	rc, err := f.SyscallConn()
	if err != nil {
		return c.connectError(err)
	}
	var cerr error
	werr := rc.Write(func(fd uintptr) bool {
		// Look at the socket itself: a connect that ended before the wait
		// began has no edge left for Go's poller to report.
		pfd := [1]unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		n, err := unix.Poll(pfd[:], 0)
		for errors.Is(err, unix.EINTR) {
			n, err = unix.Poll(pfd[:], 0)
		}
		switch {
		case err != nil:
			cerr = err
			return true
		case n == 0:
			return false // still connecting: wait until it is writable
		}
		errno, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		switch {
		case err != nil:
			cerr = err
		case errno != 0:
			cerr = unix.Errno(errno)
		case pfd[0].Revents&unix.POLLOUT == 0:
			cerr = unix.ECONNRESET // hung up without an error
		}
		return true
	})
	switch {
	case werr != nil && errors.Is(ctx.Err(), context.Canceled):
		return fmt.Errorf("tcp connect %s: %w", c.addr, ctx.Err())
	case werr != nil:
		return c.connectError(werr)
	case cerr != nil:
		return c.connectError(cerr)
	}
	return nil
}
