package haproxy

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
)

// TestProbeBind makes real binds on this host, as HAProxy would.
func TestProbeBind(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	heldAddr := netip.MustParseAddrPort(held.Addr().String())
	free := freeVIP(t)

	tests := []struct {
		name string
		addr netip.AddrPort
		is   error // nil: the bind works
		say  string
	}{
		{"free", free, nil, ""},
		{"taken by another listener", heldAddr, syscall.EADDRINUSE, "another process listens there"},
		{"link-local without a zone", netip.MustParseAddrPort("[fe80::1]:443"), syscall.EINVAL, "needs a zone"},
	}
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_nonlocal_bind"); err == nil && strings.TrimSpace(string(b)) == "0" {
		tests = append(tests, struct {
			name string
			addr netip.AddrPort
			is   error
			say  string
		}{"not local", netip.MustParseAddrPort("192.0.2.1:443"), syscall.EADDRNOTAVAIL, "ip_nonlocal_bind"})
	} else {
		t.Log("net.ipv4.ip_nonlocal_bind is not 0 here: a non-local address binds, not probed")
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := probeBind(tc.addr)
			if tc.is == nil {
				if err != nil {
					t.Fatalf("probe of %s: %v", tc.addr, err)
				}
				// The probe never listened and closed its socket: the
				// address is free for HAProxy.
				ln, err := net.Listen("tcp", tc.addr.String())
				if err != nil {
					t.Fatalf("the probe left %s bound: %v", tc.addr, err)
				}
				ln.Close()
				return
			}
			var be *BindError
			if !errors.As(err, &be) || !errors.Is(err, tc.is) || be.Addr != tc.addr {
				t.Fatalf("probe of %s = %v; want a BindError wrapping %v", tc.addr, err, tc.is)
			}
			if msg := err.Error(); !strings.Contains(msg, "cannot bind socket "+tc.addr.String()) || !strings.Contains(msg, tc.say) {
				t.Errorf("message %q lacks the cause or the hint %q", msg, tc.say)
			}
		})
	}
}
