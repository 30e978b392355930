//go:build !linux

package health

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"time"
)

// tcpChecker succeeds when the backend answers a TCP connection attempt.
// Outside Linux it uses Go's dialer on the Scheduler's workers (there is no
// connect poller) and completes the handshake before it resets the
// connection (there is no TCP_QUICKACK to hold back the last ACK).
type tcpChecker struct{ addr netip.AddrPort }

func newTCPChecker(addr netip.AddrPort, _ time.Duration) (*tcpChecker, error) {
	return &tcpChecker{addr: addr}, nil
}

func (c *tcpChecker) String() string { return "tcp " + c.addr.String() }

func (c *tcpChecker) Check(ctx context.Context) error {
	d := net.Dialer{KeepAlive: -1}
	conn, err := d.DialContext(ctx, "tcp", c.addr.String())
	if err != nil {
		return fmt.Errorf("tcp connect %s: %w", c.addr, err)
	}
	// SO_LINGER 0: close sends RST and leaves no TIME_WAIT.
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	return conn.Close()
}
