//go:build e2e

// Package e2e holds the tests that need a real kernel with IPVS. They run in
// the QEMU lab (e2e/lab/run.sh), which sets E2E_LAB=1 and SWITCHMAN_BIN and
// builds the topology of e2e/topology/README.md before the tests start:
// the load balancer is the root network namespace, the backends be1..be3 and
// the client live in their own namespaces. Elsewhere the tests skip.
//
// This file holds the helpers the scenarios share: running commands (in a
// namespace, with a timeout), polling for a condition, parsing ipvsadm -Ln,
// and sending HTTP and UDP requests from the client namespace.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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

// CmdError is returned by Run when a command fails; it carries the output.
type CmdError struct {
	Cmd    string
	Output string
	Err    error
}

func (e *CmdError) Error() string {
	return fmt.Sprintf("%s: %v\n%s", e.Cmd, e.Err, strings.TrimRight(e.Output, "\n"))
}

func (e *CmdError) Unwrap() error { return e.Err }

// Run runs name with args, killing it after timeout (CmdTimeout when 0), and
// returns its combined stdout and stderr. A failure, a non-zero exit or the
// timeout is a *CmdError that includes the output.
func Run(timeout time.Duration, name string, args ...string) (string, error) {
	if timeout <= 0 {
		timeout = CmdTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = 5 * time.Second // do not hang on children holding the pipes
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	if ctx.Err() == context.DeadlineExceeded {
		err = fmt.Errorf("timed out after %s", timeout)
	}
	if err != nil {
		return out.String(), &CmdError{Cmd: strings.Join(append([]string{name}, args...), " "), Output: out.String(), Err: err}
	}
	return out.String(), nil
}

// MustRun is Run with CmdTimeout that fails the test on error.
func MustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := Run(0, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// RunNS runs name with args in network namespace ns (ip netns exec), like Run.
func RunNS(timeout time.Duration, ns, name string, args ...string) (string, error) {
	return Run(timeout, IPBin, append([]string{"netns", "exec", ns, name}, args...)...)
}

// MustRunNS is RunNS with CmdTimeout that fails the test on error.
func MustRunNS(t testing.TB, ns, name string, args ...string) string {
	t.Helper()
	out, err := RunNS(0, ns, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// WaitFor polls cond until it returns nil and fails the test with cond's
// last error when timeout (WaitTimeout when 0) passes first. It polls often
// at first and backs off to once a second, so it costs little when the
// condition already holds. what names the condition in the failure.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	if err := Poll(timeout, cond); err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}

// Poll is WaitFor without a test: it returns nil as soon as cond does, or
// cond's last error wrapped with the time waited.
func Poll(timeout time.Duration, cond func() error) error {
	if timeout <= 0 {
		timeout = WaitTimeout
	}
	start := time.Now()
	deadline := start.Add(timeout)
	interval := 20 * time.Millisecond
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still not true after %s: %w", time.Since(start).Round(time.Millisecond), err)
		}
		time.Sleep(interval)
		if interval < time.Second {
			interval = min(interval*2, time.Second)
		}
	}
}

// L4Service is one virtual service as ipvsadm -Ln prints it.
type L4Service struct {
	Protocol   string     // TCP, UDP, SCTP or FWM
	Address    string     // "192.0.2.10:80", "[2001:db8::1]:443", or the mark for FWM
	Scheduler  string     // rr, wrr, lc, wlc, sh, mh, ...
	Flags      []string   // scheduler flags, e.g. mh-fallback, mh-port, sh-port
	Persistent int        // persistence timeout in seconds; 0 = off
	Netmask    string     // persistence mask, when ipvsadm prints one
	PE         string     // persistence engine, e.g. sip
	OnePacket  bool       // ops
	Dests      []IPVSDest // real servers in ipvsadm's order
}

// IPVSDest is one real server of an L4Service.
type IPVSDest struct {
	Address    string // "10.10.0.11:80" or "[fd00:10::11]:80"
	Forward    string // Masq (nat), Route (dr), Tunnel (tun) or Local
	Weight     int
	ActiveConn int
	InActConn  int
}

// Key returns "TCP 192.0.2.10:80", the service's identity in the kernel.
func (s L4Service) Key() string { return s.Protocol + " " + s.Address }

// HasFlag reports whether the scheduler flag f is set.
func (s L4Service) HasFlag(f string) bool {
	for _, x := range s.Flags {
		if x == f {
			return true
		}
	}
	return false
}

// Dest returns the real server at address ("10.10.0.11:80"), if present.
func (s L4Service) Dest(address string) (IPVSDest, bool) {
	for _, d := range s.Dests {
		if d.Address == address {
			return d, true
		}
	}
	return IPVSDest{}, false
}

// ForwardingName maps ipvsadm's Forward column to the service definition's
// word: Masq -> nat, Route -> dr, Tunnel -> tun, Local -> local.
func ForwardingName(forward string) string {
	switch forward {
	case "Masq":
		return "nat"
	case "Route":
		return "dr"
	case "Tunnel":
		return "tun"
	case "Local":
		return "local"
	}
	return strings.ToLower(forward)
}

// ParseIPVSList parses the output of ipvsadm -Ln (numeric, no --stats or
// --rate) into services with their real servers, in ipvsadm's order.
func ParseIPVSList(out string) ([]L4Service, error) {
	var svcs []L4Service
	sc := bufio.NewScanner(strings.NewReader(out))
	line := 0
	for sc.Scan() {
		line++
		text := sc.Text()
		f := strings.Fields(text)
		if len(f) == 0 {
			continue
		}
		switch {
		case strings.HasPrefix(text, "IP Virtual Server"), f[0] == "Prot", f[0] == "->" && len(f) > 1 && f[1] == "RemoteAddress:Port":
			continue // headers
		case f[0] == "->":
			if len(svcs) == 0 {
				return nil, fmt.Errorf("line %d: real server before any service: %q", line, text)
			}
			if len(f) < 6 {
				return nil, fmt.Errorf("line %d: short real server line: %q", line, text)
			}
			var n [3]int
			for i := range n {
				v, err := strconv.Atoi(f[3+i])
				if err != nil {
					return nil, fmt.Errorf("line %d: %q: %v", line, text, err)
				}
				n[i] = v
			}
			s := &svcs[len(svcs)-1]
			s.Dests = append(s.Dests, IPVSDest{Address: f[1], Forward: f[2], Weight: n[0], ActiveConn: n[1], InActConn: n[2]})
		case f[0] == "TCP" || f[0] == "UDP" || f[0] == "SCTP" || f[0] == "FWM":
			if len(f) < 3 {
				return nil, fmt.Errorf("line %d: short service line: %q", line, text)
			}
			s := L4Service{Protocol: f[0], Address: f[1], Scheduler: f[2]}
			for i := 3; i < len(f); i++ {
				switch w := f[i]; {
				case strings.HasPrefix(w, "(") && strings.HasSuffix(w, ")"):
					s.Flags = strings.Split(strings.Trim(w, "()"), ",")
				case w == "persistent" && i+1 < len(f):
					v, err := strconv.Atoi(f[i+1])
					if err != nil {
						return nil, fmt.Errorf("line %d: persistent %q: %v", line, f[i+1], err)
					}
					s.Persistent = v
					i++
				case w == "mask" && i+1 < len(f):
					s.Netmask = f[i+1]
					i++
				case w == "pe" && i+1 < len(f):
					s.PE = f[i+1]
					i++
				case w == "ops":
					s.OnePacket = true
				default:
					return nil, fmt.Errorf("line %d: unknown service attribute %q in %q", line, w, text)
				}
			}
			svcs = append(svcs, s)
		default:
			return nil, fmt.Errorf("line %d: unexpected line %q", line, text)
		}
	}
	return svcs, sc.Err()
}

// IPVSList runs ipvsadm -Ln in the current (root) namespace and parses it.
func IPVSList() ([]L4Service, error) {
	out, err := Run(0, IPVSADMBin, "-Ln")
	if err != nil {
		return nil, err
	}
	return ParseIPVSList(out)
}

// MustIPVSList is IPVSList that fails the test on error.
func MustIPVSList(t testing.TB) []L4Service {
	t.Helper()
	svcs, err := IPVSList()
	if err != nil {
		t.Fatal(err)
	}
	return svcs
}

// FindIPVSService returns the service with protocol ("TCP") and address
// ("192.0.2.10:80") from svcs.
func FindIPVSService(svcs []L4Service, protocol, address string) (L4Service, bool) {
	for _, s := range svcs {
		if s.Protocol == protocol && s.Address == address {
			return s, true
		}
	}
	return L4Service{}, false
}

// IPVSHostPort formats an address and port as ipvsadm -Ln prints them:
// "192.0.2.10:80", "[2001:db8::1]:80".
func IPVSHostPort(addr string, port int) string {
	return net.JoinHostPort(addr, strconv.Itoa(port))
}

// WaitIPVS polls ipvsadm -Ln until cond accepts the table (it returns nil)
// and fails the test with cond's last error and the table otherwise.
func WaitIPVS(t testing.TB, timeout time.Duration, what string, cond func([]L4Service) error) {
	t.Helper()
	var last string
	err := Poll(timeout, func() error {
		out, err := Run(0, IPVSADMBin, "-Ln")
		last = out
		if err != nil {
			return err
		}
		svcs, err := ParseIPVSList(out)
		if err != nil {
			return err
		}
		return cond(svcs)
	})
	if err != nil {
		t.Fatalf("waiting for %s: %v\nlast ipvsadm -Ln:\n%s", what, err, last)
	}
}

// HTTPGet fetches url from network namespace ns with busybox wget (one new
// connection per call) and returns the body. RequestTimeout bounds it (not
// wget -T: busybox 1.35's wget crashes with -T).
func HTTPGet(ns, url string) (string, error) {
	return RunNS(RequestTimeout, ns, BusyboxBin, "wget", "-q", "-O-", url)
}

// ClientGet is HTTPGet from the client namespace with the body trimmed, so
// a backend's answer reads "be1".
func ClientGet(url string) (string, error) {
	out, err := HTTPGet(ClientNS, url)
	return strings.TrimSpace(out), err
}

// InNetns runs fn on an OS thread that has joined network namespace ns
// (/run/netns/ns). Sockets fn creates belong to ns for their whole life and
// may be used from any goroutine afterwards. The thread is thrown away when
// fn returns, so no other goroutine ever runs in ns by accident.
func InNetns(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// No UnlockOSThread: the goroutine exits locked and the runtime
		// retires the thread, whose namespace was changed.
		runtime.LockOSThread()
		f, err := os.Open(filepath.Join("/run/netns", ns))
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// DialNS opens a connection from network namespace ns ("tcp", "udp",
// "tcp6", ...) with the given dial timeout.
func DialNS(ns, network, address string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := InNetns(ns, func() error {
		var err error
		c, err = net.DialTimeout(network, address, timeout)
		return err
	})
	return c, err
}

// HTTPClientNS returns an HTTP client whose connections start in network
// namespace ns. Keep-alives are off, so every request is a new connection
// that IPVS schedules afresh.
func HTTPClientNS(ns string) *http.Client {
	tr := &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			d := RequestTimeout
			if dl, ok := ctx.Deadline(); ok {
				d = time.Until(dl)
			}
			return DialNS(ns, network, addr, d)
		},
		DisableKeepAlives: true,
	}
	return &http.Client{Transport: tr, Timeout: RequestTimeout}
}

// UDPRequest sends payload to address ("192.0.2.10:53") from network
// namespace ns and returns the first reply, trimmed; the lab's backends
// answer "be1 10.20.0.2:40312" (their name and the source they saw).
func UDPRequest(ns, address string, payload []byte) (string, error) {
	c, err := DialNS(ns, "udp", address, RequestTimeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(RequestTimeout)); err != nil {
		return "", err
	}
	if _, err := c.Write(payload); err != nil {
		return "", err
	}
	buf := make([]byte, 2048)
	n, err := c.Read(buf)
	if err != nil {
		return "", fmt.Errorf("udp %s from %s: %w", address, ns, err)
	}
	return strings.TrimSpace(string(buf[:n])), nil
}

// Tally sends n requests with get and counts the answers. Answers from the
// lab's backends start with the backend's name; only that first word is
// counted. Errors are counted under "error: ..." rather than stopping.
func Tally(n int, get func() (string, error)) map[string]int {
	seen := map[string]int{}
	for i := 0; i < n; i++ {
		out, err := get()
		if err != nil {
			seen["error: "+firstLine(err.Error())]++
			continue
		}
		if f := strings.Fields(out); len(f) > 0 {
			seen[f[0]]++
		} else {
			seen[""]++
		}
	}
	return seen
}

// TallyString renders a Tally result in a stable order for messages.
func TallyString(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, m[k])
	}
	return strings.Join(parts, " ")
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

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

// StartProcess starts name with args in the background with its output in
// logPath, and stops it at cleanup (SIGTERM, then SIGKILL after 20 s). When
// the test failed, the cleanup logs the last 60 lines of logPath. env adds
// KEY=VALUE pairs to the environment.
func StartProcess(t testing.TB, logPath string, env []string, name string, args ...string) *exec.Cmd {
	t.Helper()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(done)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("last lines of %s:\n%s", logPath, TailFile(logPath, 60))
		}
	})
	return cmd
}

// TailFile returns the last n lines of path, or a note why it cannot.
func TailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
