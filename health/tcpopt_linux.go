package health

import "syscall"

// delayFinalACK turns TCP_QUICKACK off on a socket before it connects, so
// the kernel holds back the last ACK of the handshake (waiting for data to
// carry it). The check learns that the backend answered (SYN-ACK), then
// resets the connection: the backend's kernel drops the half-open request
// and its application is never woken to accept and read a connection that
// carries nothing. HAProxy's TCP checks work the same way.
func delayFinalACK(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_QUICKACK, 0)
	}); err != nil {
		return err
	}
	return serr
}
