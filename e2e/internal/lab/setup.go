package lab

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// AddDummyAddr creates dummy interface dev (when missing) in the root
// namespace, puts cidr ("192.0.2.100/32") on it and brings it up; the
// cleanup removes the interface again when this call created it, else the
// address.
func AddDummyAddr(t testing.TB, dev, cidr string) {
	t.Helper()
	created := false
	if _, err := Run(0, IPBin, "link", "show", dev); err != nil {
		MustRun(t, IPBin, "link", "add", dev, "type", "dummy")
		created = true
	}
	args := []string{"addr", "add", cidr, "dev", dev}
	if strings.Contains(cidr, ":") {
		args = append([]string{"-6"}, append(args, "nodad")...)
	}
	MustRun(t, IPBin, args...)
	MustRun(t, IPBin, "link", "set", dev, "up")
	t.Cleanup(func() {
		if created {
			_, _ = Run(0, IPBin, "link", "del", dev)
		} else {
			_, _ = Run(0, IPBin, "addr", "del", cidr, "dev", dev)
		}
	})
}

// SetupDRBackend prepares backend namespace ns for direct routing (mode
// "dr") or IP-in-IP (mode "tun") to vip with e2e/topology/dr-backend.sh,
// and removes the VIP from the backend again at cleanup.
func SetupDRBackend(t testing.TB, vip, ns, mode string) {
	t.Helper()
	script := filepath.Join(TopologyDir(), "dr-backend.sh")
	MustRun(t, "/bin/sh", script, vip, ns, mode)
	t.Cleanup(func() { _, _ = Run(0, "/bin/sh", script, "-d", vip, ns, mode) })
}

// SetBackendHealth makes backend ns's /healthz answer 200 (healthy) or 503,
// through the down file labserver watches (/run/labserver/NS.down).
func SetBackendHealth(t testing.TB, ns string, healthy bool) {
	t.Helper()
	path := filepath.Join("/run/labserver", ns+".down")
	if healthy {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		return
	}
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(path) })
}

// RejectPort makes backend namespace ns refuse proto ("tcp", "udp") traffic
// to port with an iptables rule in that namespace, so TCP health checks and
// connections fail fast; the returned func and the test's cleanup remove it.
func RejectPort(t testing.TB, ns, proto string, port int) (undo func()) {
	t.Helper()
	rule := []string{"INPUT", "-p", proto, "--dport", strconv.Itoa(port), "-j", "REJECT"}
	if proto == "tcp" {
		rule = append(rule, "--reject-with", "tcp-reset")
	}
	MustRunNS(t, ns, "iptables", append([]string{"-I"}, rule...)...)
	done := false
	undo = func() {
		if !done {
			done = true
			_, _ = RunNS(0, ns, "iptables", append([]string{"-D"}, rule...)...)
		}
	}
	t.Cleanup(undo)
	return undo
}
