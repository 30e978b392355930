// Package lab is the e2e harness: the helpers the real-kernel scenarios
// in e2e/ share. The tests run in the QEMU lab (e2e/lab/run.sh), which sets
// E2E_LAB=1 and SWITCHMAN_BIN and builds the topology of
// e2e/topology/README.md before they start: the load balancer of the
// single-host scenarios is the root network namespace; the backends
// be1..be3, the client, and the HA hosts lb1 and lb2 live in namespaces of
// their own. Elsewhere RequireLab skips.
//
// It holds: running commands (in a namespace, with a timeout) and polling
// for a condition (run.go), the ipvsadm -Ln parser (ipvsadm.go, tested as
// ordinary code in `make unit`), requests from the client namespace
// (client.go), lab set-up helpers (setup.go), the single-agent fixture with
// an in-process etcd (agent.go), the two-host HA fixture (ha.go) and
// figures (figures.go).
package lab

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Paths of the tools in the lab. /sbin/ip is called by full path because
// busybox's own ip applet has no netns support.
const (
	IPBin      = "/sbin/ip"
	IPVSADMBin = "/sbin/ipvsadm"
	BusyboxBin = "/bin/busybox"
)

// Default bounds. Everything runs under software emulation, so they are
// generous; a condition that holds returns as soon as it is seen.
const (
	// CmdTimeout bounds one command run by Run and the Must* helpers.
	CmdTimeout = 60 * time.Second
	// WaitTimeout is a generous bound for WaitFor in the scenarios.
	WaitTimeout = 90 * time.Second
	// RequestTimeout bounds one HTTP or UDP request from the client.
	RequestTimeout = 10 * time.Second
)

// Lab namespaces and addresses; they mirror e2e/topology/setup.sh.
const (
	// ClientNS is the client's network namespace.
	ClientNS = "client"
	// ClientAddr and ClientAddr6 are the client's addresses.
	ClientAddr  = "10.20.0.2"
	ClientAddr6 = "fd00:20::2"
	// LBBackendSide and LBBackendSide6 are the load balancer's addresses on
	// the backend bridge (the backends' default gateway).
	LBBackendSide  = "10.10.0.1"
	LBBackendSide6 = "fd00:10::1"
	// LBClientSide is the load balancer's address towards the client.
	LBClientSide = "10.20.0.1"
	// VIPRange and VIPRange6 hold the lab's virtual addresses; the client
	// reaches them through its default route via the load balancer.
	VIPRange  = "192.0.2.0/24"
	VIPRange6 = "2001:db8:100::/64"
)

// Ports the lab's backend servers (labserver) listen on in every backend.
var (
	BackendTCPPorts = []int{80, 8080, 8443}
	BackendUDPPorts = []int{53, 5353}
)

// Backend is one backend namespace of the lab topology.
type Backend struct {
	Name  string // namespace and the name its servers answer with
	Addr  string // IPv4 address on the backend bridge
	Addr6 string // IPv6 address on the backend bridge
}

// Backends lists the lab's backends in order.
var Backends = []Backend{
	{Name: "be1", Addr: "10.10.0.11", Addr6: "fd00:10::11"},
	{Name: "be2", Addr: "10.10.0.12", Addr6: "fd00:10::12"},
	{Name: "be3", Addr: "10.10.0.13", Addr6: "fd00:10::13"},
}

// RequireLab skips the test unless it runs inside the QEMU lab (E2E_LAB=1).
func RequireLab(t testing.TB) {
	t.Helper()
	if os.Getenv("E2E_LAB") != "1" {
		t.Skip("needs the real-kernel lab: run e2e/lab/run.sh (E2E_LAB=1 is not set)")
	}
}

// Native reports whether the tests run in the host-native world of
// e2e/lab/host-ha.sh (the lab topology in private namespaces on the
// host's own kernel, without IPVS).
func Native() bool { return os.Getenv("E2E_NATIVE") == "1" }

// RequireHALab skips the test unless it runs in the QEMU lab or in the
// host-native world.
func RequireHALab(t testing.TB) {
	t.Helper()
	if os.Getenv("E2E_LAB") != "1" && !Native() {
		t.Skip("needs the lab topology: run e2e/lab/run.sh or e2e/lab/host-ha.sh")
	}
}

// SwitchmanBin returns the switchman binary to test (SWITCHMAN_BIN), and
// fails the test when it is not set or not executable.
func SwitchmanBin(t testing.TB) string {
	t.Helper()
	p := os.Getenv("SWITCHMAN_BIN")
	if p == "" {
		t.Fatal("SWITCHMAN_BIN is not set")
	}
	if st, err := os.Stat(p); err != nil || st.Mode()&0o111 == 0 {
		t.Fatalf("SWITCHMAN_BIN=%s is not an executable: %v", p, err)
	}
	return p
}

// TopologyDir returns the folder holding e2e/topology's scripts: E2E_TOPOLOGY
// when set, else ./topology (the test binary runs in /e2e in the lab).
func TopologyDir() string {
	if d := os.Getenv("E2E_TOPOLOGY"); d != "" {
		return d
	}
	d, _ := filepath.Abs("topology")
	return d
}
