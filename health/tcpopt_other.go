//go:build !linux

package health

import "syscall"

// delayFinalACK does nothing where TCP_QUICKACK does not exist: the check
// then completes the handshake before it resets the connection.
func delayFinalACK(_, _ string, _ syscall.RawConn) error { return nil }
