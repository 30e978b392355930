//go:build !linux

package health

import (
	"net/netip"
	"testing"
)

// unanswered has no listener that drops SYNs outside Linux.
func unanswered(*testing.T) (netip.AddrPort, bool) { return netip.AddrPort{}, false }
