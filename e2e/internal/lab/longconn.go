package lab

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/status"
)

// The HA echo service: a second service of the HA group on the VIP, TCP
// port EchoPort, to the HA backends' line echo (labserver -echo), for
// long-lived connections through a failover.
const (
	EchoService = "echo"
	EchoPort    = 7
	// SyncInterface is the HA hosts' interface that carries the IPVS
	// connection sync (the control segment) and SyncID its sync id.
	SyncInterface = "eth2"
	SyncID        = 7
)

// PutEcho writes the echo service with scheduler sched: NAT to the HA
// backends' port EchoPort, TCP health checks; on nf_tables in the native
// world (no IPVS there), on the agents' IPVS in the QEMU lab.
func (h *HALab) PutEcho(t testing.TB, sched string) {
	t.Helper()
	def := map[string]any{"vip": HAVIP, "port": EchoPort, "ha_group": HAGroup, "scheduler": sched,
		"backends": BackendsDef(EchoPort, 1, HABackends...), "health": map[string]any{"protocol": "tcp", "interval": "1s", "timeout": "500ms", "rise": 1}}
	if Native() {
		def["driver"] = "nftables"
	}
	v, _ := json.Marshal(def)
	h.Etcd.Put(t, ServiceKey(EchoService), string(v))
	h.services[EchoService] = true
}

// NodeStatus reads the status key of service name written by node.
func (h *HALab) NodeStatus(node, name string) (status.Status, bool, error) {
	v, ok, err := h.Etcd.Get(Prefix + "/status/" + node + "/" + name)
	if err != nil || !ok {
		return status.Status{}, ok, err
	}
	var st status.Status
	if err := json.Unmarshal(v, &st); err != nil {
		return st, true, fmt.Errorf("status of %s on %s: %w", name, node, err)
	}
	return st, true, nil
}

// WaitApplied waits until node reports service name applied by this
// generation of the definition (revision at least rev when given) with
// every backend healthy.
func (h *HALab) WaitApplied(t testing.TB, node, name string) {
	t.Helper()
	WaitFor(t, 2*WaitTimeout, node+" applying "+name+" with every backend healthy", func() error {
		h.Agents[node].Check(t)
		st, ok, err := h.NodeStatus(node, name)
		switch {
		case err != nil:
			return err
		case !ok:
			return errors.New("no status key yet")
		case st.State != status.StateApplied:
			return fmt.Errorf("state %s: %s", st.State, st.Error)
		}
		if healthy, total := st.Counts(); healthy != total || total == 0 {
			return fmt.Errorf("%d of %d backends healthy", healthy, total)
		}
		return nil
	})
}

// Node reads the node key of node.
func (h *HALab) Node(node string) (status.Node, bool, error) {
	v, ok, err := h.Etcd.Get(Prefix + "/nodes/" + node)
	if err != nil || !ok {
		return status.Node{}, ok, err
	}
	var n status.Node
	err = json.Unmarshal(v, &n)
	return n, true, err
}

// LongConn is a long-lived TCP connection from the client through a VIP
// to a line echo: it sends a numbered line every interval and reads the
// echoes ("hbe1 17"), remembering which backend answers and when.
type LongConn struct {
	conn     net.Conn
	interval time.Duration
	stop     chan struct{}
	wg       sync.WaitGroup
	// Port is the client's source port (the connection's IPVS entry).
	Port int

	mu      sync.Mutex
	sentAt  []time.Time // when line i+1 was written
	echoes  int
	backend string
	// lastSent is when the last line echoed was written.
	lastSent time.Time
	err      error
}

// DialLong connects from the client namespace to addr with d and starts
// sending a line every interval.
func DialLong(d *NSDialer, addr string, interval time.Duration) (*LongConn, error) {
	return DialLongFrom(d, netip.Addr{}, addr, interval)
}

// DialLongFrom is DialLong from the client's address from (the zero
// Addr: the kernel's choice).
func DialLongFrom(d *NSDialer, from netip.Addr, addr string, interval time.Duration) (*LongConn, error) {
	var local net.Addr
	if from.IsValid() {
		local = net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))
	}
	c, err := d.DialFrom("tcp", local, addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	l := &LongConn{conn: c, interval: interval, stop: make(chan struct{}), Port: c.LocalAddr().(*net.TCPAddr).Port}
	l.wg.Add(2)
	go l.write()
	go l.read()
	return l, nil
}

func (l *LongConn) fail(err error) {
	l.mu.Lock()
	if l.err == nil {
		l.err = err
	}
	l.mu.Unlock()
}

func (l *LongConn) write() {
	defer l.wg.Done()
	t := time.NewTicker(l.interval)
	defer t.Stop()
	for n := 1; ; n++ {
		l.mu.Lock()
		l.sentAt = append(l.sentAt, time.Now())
		l.mu.Unlock()
		if _, err := fmt.Fprintf(l.conn, "%d\n", n); err != nil {
			l.fail(fmt.Errorf("write line %d: %w", n, err))
			return
		}
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
	}
}

func (l *LongConn) read() {
	defer l.wg.Done()
	r := bufio.NewScanner(l.conn)
	for r.Scan() {
		f := strings.Fields(r.Text())
		if len(f) != 2 {
			l.fail(fmt.Errorf("echo %q: want \"<backend> <n>\"", r.Text()))
			return
		}
		n, err := strconv.Atoi(f[1])
		l.mu.Lock()
		switch {
		case err != nil:
			l.err = fmt.Errorf("echo %q: %w", r.Text(), err)
		case l.backend != "" && f[0] != l.backend:
			// Not reachable with TCP (another backend would reset), but
			// a test must not count it as carrying on.
			l.err = fmt.Errorf("echo from %s, the connection was held by %s", f[0], l.backend)
		case n != l.echoes+1 || n > len(l.sentAt):
			l.err = fmt.Errorf("echo of line %d after line %d", n, l.echoes)
		default:
			l.backend, l.echoes, l.lastSent = f[0], n, l.sentAt[n-1]
		}
		failed := l.err != nil
		l.mu.Unlock()
		if failed {
			return
		}
	}
	select {
	case <-l.stop:
	default:
		err := r.Err()
		if err == nil {
			err = errors.New("closed by the other end")
		}
		l.fail(fmt.Errorf("read after line %d: %w", l.Echoes(), err))
	}
}

// Close ends the connection.
func (l *LongConn) Close() {
	select {
	case <-l.stop:
		return
	default:
	}
	close(l.stop)
	_ = l.conn.Close()
	l.wg.Wait()
}

// Echoes returns how many lines came back.
func (l *LongConn) Echoes() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.echoes
}

// Err returns what broke the connection, nil while it carries on.
func (l *LongConn) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// Backend returns the backend that echoes.
func (l *LongConn) Backend() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.backend
}

// EchoedAfter reports whether a line written after t came back (so the
// path worked after t: an echo in flight before t does not count), and
// the error that broke the connection if one did.
func (l *LongConn) EchoedAfter(t time.Time) (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lastSent.After(t), l.err
}

// String describes the connection for logs.
func (l *LongConn) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := fmt.Sprintf("client port %d: %d lines sent, %d echoed by %s", l.Port, len(l.sentAt), l.echoes, l.backend)
	if l.err != nil {
		s += fmt.Sprintf(", broken: %v", l.err)
	}
	return s
}

// WaitEchoes waits until l has carried n lines.
func (l *LongConn) WaitEchoes(t testing.TB, n int) {
	t.Helper()
	WaitFor(t, WaitTimeout, fmt.Sprintf("%d lines echoed on the connection from port %d", n, l.Port), func() error {
		if l.Err() != nil {
			t.Fatalf("the connection broke: %s", l)
		}
		if e := l.Echoes(); e < n {
			return fmt.Errorf("%d echoed", e)
		}
		return nil
	})
}

// WaitCarriesOn waits until l echoes a line after t, and fails the test
// when it breaks instead.
func (l *LongConn) WaitCarriesOn(t testing.TB, after time.Time, what string) {
	t.Helper()
	WaitFor(t, 2*WaitTimeout, what, func() error {
		ok, err := l.EchoedAfter(after)
		if err != nil {
			t.Fatalf("%s: the connection broke: %s", what, l)
		}
		if !ok {
			return fmt.Errorf("no echo yet (%s)", l)
		}
		return nil
	})
}

// IPVSConns lists the IPVS connection entries of host ns (ipvsadm -Lnc):
// one per line, as ipvsadm prints them.
func IPVSConns(ns string) ([]string, error) {
	out, err := RunNS(0, ns, IPVSADMBin, "-Lnc")
	if err != nil {
		return nil, err
	}
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) >= 5 && (f[0] == "TCP" || f[0] == "UDP") {
			lines = append(lines, strings.Join(f, " "))
		}
	}
	return lines, nil
}

// ClientExtraAddrs adds n more addresses (10.20.0.50 on) to the client's
// interface, for connections from several clients, and removes them when
// the test ends.
func ClientExtraAddrs(t testing.TB, n int) []netip.Addr {
	t.Helper()
	var out []netip.Addr
	a := netip.MustParseAddr("10.20.0.50")
	for range n {
		p := a.String() + "/24"
		MustRunNS(t, ClientNS, IPBin, "addr", "add", p, "dev", "eth0")
		t.Cleanup(func() { _, _ = RunNS(0, ClientNS, IPBin, "addr", "del", p, "dev", "eth0") })
		out = append(out, a)
		a = a.Next()
	}
	return out
}

// IPVSConnOf returns the IPVS entry of host ns for the client's
// connection from port through the echo service, if it has one.
func IPVSConnOf(ns string, port int) (string, bool, error) {
	lines, err := IPVSConns(ns)
	if err != nil {
		return "", false, err
	}
	src := fmt.Sprintf("%s:%d", ClientAddr, port)
	dst := fmt.Sprintf("%s:%d", HAVIP, EchoPort)
	for _, l := range lines {
		f := strings.Fields(l)
		if f[3] == src && f[4] == dst {
			return l, true, nil
		}
	}
	return "", false, nil
}

// The conntrack settings a failover on nf_tables depends on (per network
// namespace, under /proc/sys/net/netfilter):
const (
	// ConntrackLoose lets conntrack pick up a TCP flow mid-stream (a
	// packet of a connection it has no entry for); 1 by default.
	ConntrackLoose = "nf_conntrack_tcp_loose"
	// ConntrackLiberal stops conntrack from calling out-of-window
	// packets invalid (0 by default): a host that owned the group before
	// keeps entries whose windows went stale while another host carried
	// the flows, and without it the failback resets those connections.
	ConntrackLiberal = "nf_conntrack_tcp_be_liberal"
)

// SetConntrack sets the conntrack sysctl name (ConntrackLoose,
// ConntrackLiberal) on or off in host ns and reads it back.
func SetConntrack(ns, name string, on bool) error {
	v := "0"
	if on {
		v = "1"
	}
	file := "/proc/sys/net/netfilter/" + name
	if _, err := RunNS(0, ns, "/bin/sh", "-c", "echo "+v+" > "+file); err != nil {
		return fmt.Errorf("set %s=%s in %s: %w", name, v, ns, err)
	}
	out, err := RunNS(0, ns, "/bin/cat", file)
	if err != nil {
		return fmt.Errorf("read %s in %s: %w", name, ns, err)
	}
	if got := strings.TrimSpace(out); got != v {
		return fmt.Errorf("%s in %s is %s after writing %s", name, ns, got, v)
	}
	return nil
}
