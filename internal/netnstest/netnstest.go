// Package netnstest builds test topologies out of network namespaces: it
// creates namespaces that are removed when the test ends, runs ip and
// other commands in them, and skips a test that is not run as root.
package netnstest

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/switchman-lb/switchman/internal/netns"
)

// Require skips the test unless it runs as root with iproute2's ip and
// the other binaries named (with the Debian package that has each, as
// "bin:package" or just "bin").
func Require(t testing.TB, bins ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	if _, err := netns.IPBin(); err != nil {
		t.Skip(err)
	}
	for _, b := range bins {
		bin, pkg, ok := strings.Cut(b, ":")
		if !ok {
			pkg = bin
		}
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("needs %s (apt-get install %s): %v", bin, pkg, err)
		}
	}
}

// Run runs a command and returns its output; it fails the test when the
// command fails.
func Run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// IP runs iproute2's ip with args and fails the test when it fails.
func IP(t testing.TB, args ...string) string {
	t.Helper()
	out, err := netns.IP(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Exec runs a command inside namespace ns (ip netns exec) and fails the
// test when it fails.
func Exec(t testing.TB, ns string, args ...string) string {
	t.Helper()
	return IP(t, append([]string{"netns", "exec", ns}, args...)...)
}

// New creates a namespace named prefix-role-<random>, with loopback up
// and without duplicate address detection (IPv6 addresses are usable at
// once), removed when the test ends, and returns its name. Keep
// prefix-role short: an interface-free name, but ip shows it in errors.
func New(t testing.TB, prefix, role string) string {
	t.Helper()
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	name := prefix + "-" + role + "-" + hex.EncodeToString(b)
	if err := netns.Add(name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := netns.Delete(name); err != nil {
			t.Errorf("remove network namespace: %v", err)
		}
	})
	Sysctl(t, name, "net/ipv6/conf/all/accept_dad", "0")
	Sysctl(t, name, "net/ipv6/conf/default/accept_dad", "0")
	return name
}

// Sysctl writes value to /proc/sys/key (e.g. net/ipv4/ip_forward) inside
// namespace ns.
func Sysctl(t testing.TB, ns, key, value string) {
	t.Helper()
	if err := netns.Do(ns, func() error {
		return os.WriteFile("/proc/sys/"+key, []byte(value), 0o644)
	}); err != nil {
		t.Fatalf("sysctl %s=%s in %s: %v", key, value, ns, err)
	}
}

// Veth links namespaces a and b with a veth pair: devA in a, devB in b.
// Both ends are brought up.
func Veth(t testing.TB, a, devA, b, devB string) {
	t.Helper()
	IP(t, "-n", a, "link", "add", devA, "type", "veth", "peer", "name", devB, "netns", b)
	IP(t, "-n", a, "link", "set", devA, "up")
	IP(t, "-n", b, "link", "set", devB, "up")
}

// Addr adds addresses (CIDR notation) to dev in namespace ns, IPv6 ones
// without duplicate address detection.
func Addr(t testing.TB, ns, dev string, cidrs ...string) {
	t.Helper()
	for _, c := range cidrs {
		args := []string{"-n", ns, "addr", "add", c, "dev", dev}
		if strings.Contains(c, ":") {
			args = append(args, "nodad")
		}
		IP(t, args...)
	}
}
