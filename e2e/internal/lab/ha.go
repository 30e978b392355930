package lab

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// The HA topology (e2e/topology/setup.sh): two load-balancer hosts, lb1
// and lb2, as namespaces on the client bridge (eth0, the HA interface),
// the backend bridge (eth1) and the control bridge (eth2), where the
// tests' etcd listens on EtcdHost. Their backends hbe1 and hbe2 route
// through HAGateway, a floating address of the group, so NAT replies
// return through whichever host owns the group.
const (
	// HAGroup is the HA group of the lab's HA service.
	HAGroup = "web"
	// HAService is the name of the lab's HA service.
	HAService = "web"
	// HAVIP is the service's VIP, on the client segment: the client
	// finds its holder by ARP, so a takeover moves it with gratuitous ARP.
	HAVIP = "10.20.0.100"
	// HAGateway is the group's floating address on the backend segment,
	// the HA backends' default gateway.
	HAGateway = "10.10.0.254"
	// HAInterface and HABackendInterface are the HA hosts' client-side
	// and backend-side interfaces.
	HAInterface        = "eth0"
	HABackendInterface = "eth1"
	// EtcdHost is the root namespace's address on the control segment.
	EtcdHost = "10.30.0.1"
	// haMetricsAddr is each agent's /metrics, inside its namespace.
	haMetricsAddr = "127.0.0.1:9469"
	// LabHARound and LabHALeaseTTL are the agents' --ha-round and
	// --ha-lease-ttl in the QEMU lab. Under software emulation an etcd
	// read takes 70 ms at the median and 500 ms or more when the host is
	// busy (measured): with the default round of 100 ms, whose hold
	// deadline is 4 rounds and whose "etcd contact" lapses after 2, contact
	// would flap, each lapse holding claims back for the regain time (20
	// rounds). Every HA timing scales with the round; the lease must last
	// 12 rounds.
	LabHARound    = 500 * time.Millisecond
	LabHALeaseTTL = 6 * time.Second
)

// HAHost is one load-balancer host of the HA topology.
type HAHost struct {
	// Name is the namespace and the agent's --node.
	Name string
	// Client, Backend and Control are its addresses on the three segments.
	Client, Backend, Control string
	// Links are the root-side ends of its veth pairs; down, the host is
	// cut off (as a dead host is).
	Links []string
}

// HAHosts are the HA hosts.
var HAHosts = []HAHost{
	{Name: "lb1", Client: "10.20.0.11", Backend: "10.10.0.21", Control: "10.30.0.11", Links: []string{"lb1c", "lb1b", "lb1e"}},
	{Name: "lb2", Client: "10.20.0.12", Backend: "10.10.0.22", Control: "10.30.0.12", Links: []string{"lb2c", "lb2b", "lb2e"}},
}

// HABackends are the HA hosts' backends.
var HABackends = []Backend{
	{Name: "hbe1", Addr: "10.10.0.31", Addr6: "fd00:10::31"},
	{Name: "hbe2", Addr: "10.10.0.32", Addr6: "fd00:10::32"},
}

// HAHeld lists the addresses the owner of the group holds, each on its
// interface: the VIP and the floating gateway.
var HAHeld = []HeldAddr{
	{Addr: netip.MustParseAddr(HAVIP), Iface: HAInterface},
	{Addr: netip.MustParseAddr(HAGateway), Iface: HABackendInterface},
}

// HeldAddr is an address and the interface it is held on.
type HeldAddr struct {
	Addr  netip.Addr
	Iface string
}

// HALab is the two-host HA fixture: an etcd on the control segment, the
// group's settings and service, and an agent per host.
type HALab struct {
	Etcd   *Etcd
	Agents map[string]*Agent
	dir    string
	// Lifetime is --ha-address-lifetime for the agents (0: the default).
	Lifetime time.Duration
	// Round and LeaseTTL are --ha-round and --ha-lease-ttl.
	Round, LeaseTTL time.Duration
	// Sync runs the IPVS connection sync (--ipvs-sync-interface
	// SyncInterface --ipvs-sync-id SyncID) in the QEMU lab.
	Sync bool
	// services names the services the lab defined, which a serving
	// agent has applied.
	services map[string]bool
}

// NewHALab starts etcd on EtcdHost, writes the group's settings (the
// floating gateway) and the HA service (the VIP on port 80, NAT to the HA
// backends, HTTP health checks), and registers a cleanup that stops the
// agents (SIGTERM), brings every link up again and shows the agents' logs
// when the test failed. It starts no agent.
func NewHALab(t *testing.T) *HALab {
	t.Helper()
	RequireHALab(t)
	SwitchmanBin(t)
	h := &HALab{Etcd: StartEtcd(t, EtcdHost), Agents: map[string]*Agent{}, dir: t.TempDir(), Round: LabHARound, LeaseTTL: LabHALeaseTTL,
		services: map[string]bool{HAService: true}}
	if Native() {
		h.Round, h.LeaseTTL = 100*time.Millisecond, 3*time.Second // ha's defaults
	}
	for _, host := range HAHosts {
		h.Agents[host.Name] = &Agent{NS: host.Name, LogPath: filepath.Join(h.dir, host.Name+".log"), MetricsAddr: haMetricsAddr}
	}
	t.Cleanup(func() {
		for _, host := range HAHosts {
			h.Agents[host.Name].Stop(t)
			if err := SetLinks(host, true); err != nil {
				t.Errorf("bring %s's links up: %v", host.Name, err)
			}
			// HAProxy outlives its agent by design (it keeps serving
			// through a restart): end what runs in the host's namespace.
			// (This process may be listed too: a thread that joined the
			// namespace and was retired locked may be its main thread.)
			if out, err := Run(0, IPBin, "netns", "pids", host.Name); err == nil {
				for _, f := range strings.Fields(out) {
					if pid, err := strconv.Atoi(f); err == nil && pid != os.Getpid() {
						_ = syscall.Kill(pid, syscall.SIGKILL)
					}
				}
			}
			// What the agents leave in place by design (the data plane
			// and the sync daemons outlive them) would meet the next
			// test's agents, whose data directories are new.
			h.clearHost(host.Name)
			if t.Failed() {
				log := h.Agents[host.Name].LogPath
				t.Logf("%s's agent log: %d lines saying etcd contact was lost, %d address holds; the last lines:\n%s", host.Name,
					CountLines(log, "etcd contact lost"), CountLines(log, "ha: address hold"), TailFile(log, 80))
			}
		}
	})
	group, _ := json.Marshal(map[string]any{"addresses": []map[string]string{{"address": HAGateway + "/24", "interface": HABackendInterface}}})
	h.Etcd.Put(t, Prefix+"/groups/"+HAGroup, string(group))
	def := map[string]any{"vip": HAVIP, "port": 80, "ha_group": HAGroup,
		"backends": BackendsDef(80, 1, HABackends...), "health": HTTPCheck()}
	if Native() {
		def["driver"] = "haproxy" // no IPVS in the host's kernel
	}
	svc, _ := json.Marshal(def)
	h.Etcd.Put(t, ServiceKey(HAService), string(svc))
	return h
}

// clearHost removes what the agents of a test left in host ns: its IPVS
// services and sync daemons (QEMU lab), its nf_tables table (native).
func (h *HALab) clearHost(ns string) {
	if Native() {
		_, _ = RunNS(0, ns, "nft", "delete", "table", "ip", "switchman")
		return
	}
	_, _ = RunNS(0, ns, IPVSADMBin, "-C")
	for _, role := range []string{"master", "backup"} {
		_, _ = RunNS(0, ns, IPVSADMBin, "--stop-daemon", role)
	}
}

// LogHA logs, for each agent, its HA lines (ownership, holds, drops,
// releases, VIP changes; not the etcd contact lines, which are counted).
func (h *HALab) LogHA(t testing.TB) {
	t.Helper()
	for _, host := range HAHosts {
		b, err := os.ReadFile(h.Agents[host.Name].LogPath)
		if err != nil {
			continue
		}
		var lines []string
		contact := 0
		for _, l := range strings.Split(string(b), "\n") {
			switch {
			case strings.Contains(l, "etcd contact"):
				contact++
			case strings.Contains(l, "ha: ") || strings.Contains(l, "VIP") || strings.Contains(l, "=== e2e") || strings.Contains(l, "handed over"):
				lines = append(lines, l)
			}
		}
		if len(lines) > 200 {
			lines = lines[len(lines)-200:]
		}
		t.Logf("%s: %d log lines, %d etcd contact changes; HA lines:\n%s", host.Name, strings.Count(string(b), "\n"), contact, strings.Join(lines, "\n"))
	}
}

// StartAgent starts the agent of host node (again, on the same data dir).
func (h *HALab) StartAgent(t testing.TB, node string) {
	t.Helper()
	args := []string{"--log-level", "info", "agent",
		"--etcd-endpoints", h.Etcd.URL(),
		"--node", node,
		"--data-dir", filepath.Join(h.dir, node),
		"--metrics-addr", haMetricsAddr,
		"--ha-interface", HAInterface,
		"--ha-round", h.Round.String(),
		"--ha-lease-ttl", h.LeaseTTL.String(),
		"--vip-cidrs", "10.20.0.0/24",
		"--backend-cidrs", "10.10.0.0/24",
	}
	if Native() {
		args = append(args, "--drivers", "haproxy,vip,nftables", "--haproxy-dir", filepath.Join(h.dir, node, "haproxy"))
	} else {
		args = append(args, "--drivers", "ipvs,vip")
		if h.Sync {
			args = append(args, "--ipvs-sync-interface", SyncInterface, "--ipvs-sync-id", strconv.Itoa(SyncID))
		}
	}
	if h.Lifetime > 0 {
		args = append(args, "--ha-address-lifetime", h.Lifetime.String())
	}
	h.Agents[node].Spawn(t, args...)
}

// StartAll starts the agent of every HA host, then waits until each
// serves.
func (h *HALab) StartAll(t testing.TB) {
	t.Helper()
	for _, host := range HAHosts {
		h.StartAgent(t, host.Name)
	}
	for _, host := range HAHosts {
		h.WaitServing(t, host.Name)
	}
}

// WaitServing waits until the agent of node (this process of it) is in
// contact with etcd and has programmed the HA service into its IPVS with
// both backends at weight 1 (checked healthy), so it can take over at once.
func (h *HALab) WaitServing(t testing.TB, node string) {
	t.Helper()
	a := h.Agents[node]
	vip := IPVSHostPort(HAVIP, 80)
	WaitFor(t, 2*WaitTimeout, node+" serving the HA service with both backends healthy", func() error {
		a.Check(t)
		m, err := a.Metrics()
		if err != nil {
			return err
		}
		if m["switchman_ha_etcd_contact"] != 1 {
			return errors.New("no etcd contact yet")
		}
		if Native() {
			// HAProxy: the services applied by this process, and
			// HAProxy listening on the VIP (bound whether held or not).
			if m[MetricApplied] != float64(len(h.services)) {
				return fmt.Errorf("%s = %v, want %d", MetricApplied, m[MetricApplied], len(h.services))
			}
			out, err := RunNS(0, node, "/bin/cat", "/proc/net/tcp")
			if err != nil {
				return err
			}
			if !strings.Contains(out, " 6400140A:0050 00000000:0000 0A ") { // 10.20.0.100:80 LISTEN
				return errors.New("HAProxy does not listen on the VIP yet")
			}
			return nil
		}
		out, err := RunNS(0, node, IPVSADMBin, "-Ln", "-t", vip)
		if err != nil {
			return err
		}
		svcs, err := ParseIPVSList(out)
		if err != nil || len(svcs) != 1 {
			return fmt.Errorf("%s not in %s's IPVS (%v)", vip, node, err)
		}
		for _, be := range HABackends {
			if d, ok := svcs[0].Dest(IPVSHostPort(be.Addr, 80)); !ok || d.Weight != 1 {
				return fmt.Errorf("%s in %s's IPVS: %+v, want each backend at weight 1", vip, node, svcs[0].Dests)
			}
		}
		return nil
	})
}

// WaitStandby waits until the agent of node serves the HA service and has
// been in contact with etcd, as its metrics show, for regain and two
// rounds more: an agent claims nothing for its regain time after gaining
// (or regaining) etcd, so a standby younger than that would slow a
// takeover down.
func (h *HALab) WaitStandby(t testing.TB, node string, regain time.Duration) {
	t.Helper()
	h.WaitServing(t, node)
	var since time.Time
	WaitFor(t, 2*WaitTimeout, node+" in contact with etcd for its regain time", func() error {
		m, err := h.Agents[node].Metrics()
		switch {
		case err != nil:
			since = time.Time{}
			return err
		case m["switchman_ha_etcd_contact"] != 1:
			since = time.Time{}
			return errors.New("no etcd contact")
		case since.IsZero():
			since = time.Now()
		}
		if d := time.Since(since); d < regain+2*h.Round {
			return fmt.Errorf("in contact for %v", d.Round(time.Millisecond))
		}
		return nil
	})
}

// HAOwner is the owner key of the group.
type HAOwner struct {
	Node  string    `json:"node"`
	Since time.Time `json:"since"`
	Epoch int64     `json:"epoch"`
}

// Owner reads the group's owner key; ok is false when there is none.
func (h *HALab) Owner() (HAOwner, bool, error) {
	v, ok, err := h.Etcd.Get(Prefix + "/owners/" + HAGroup)
	if err != nil || !ok {
		return HAOwner{}, false, err
	}
	var o HAOwner
	if err := json.Unmarshal(v, &o); err != nil {
		return HAOwner{}, true, fmt.Errorf("owner key %s: %w", v, err)
	}
	return o, true, nil
}

// Holding reports, for each HA host, which of HAHeld it holds: the
// address is on its interface and that interface is up with a carrier (a
// host whose links are down holds nothing, whatever its kernel keeps).
func Holding() (map[string][]netip.Addr, error) {
	v := newHostViews()
	defer v.close()
	return v.holding()
}

// HostHolds returns which of HAHeld the host ns has on their interfaces;
// with needUp only those on an interface that is up with a carrier.
func HostHolds(ns string, needUp bool) ([]netip.Addr, error) {
	v := newHostViews()
	defer v.close()
	return v.holds(ns, needUp)
}

// hostViews keeps a netlink handle in each HA host's namespace.
type hostViews map[string]*netlink.Handle

func newHostViews() hostViews { return hostViews{} }

func (v hostViews) close() {
	for _, h := range v {
		h.Close()
	}
}

func (v hostViews) handle(ns string) (*netlink.Handle, error) {
	if h := v[ns]; h != nil {
		return h, nil
	}
	nsh, err := netns.GetFromName(ns)
	if err != nil {
		return nil, fmt.Errorf("network namespace %s: %w", ns, err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", ns, err)
	}
	v[ns] = h
	return h, nil
}

func (v hostViews) holding() (map[string][]netip.Addr, error) {
	out := map[string][]netip.Addr{}
	for _, host := range HAHosts {
		held, err := v.holds(host.Name, true)
		if err != nil {
			return nil, err
		}
		out[host.Name] = held
	}
	return out, nil
}

func (v hostViews) holds(ns string, needUp bool) ([]netip.Addr, error) {
	nh, err := v.handle(ns)
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, want := range HAHeld {
		l, err := nh.LinkByName(want.Iface)
		if err != nil {
			return nil, fmt.Errorf("%s in %s: %w", want.Iface, ns, err)
		}
		if needUp && l.Attrs().OperState != netlink.OperUp {
			continue
		}
		addrs, err := nh.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return nil, fmt.Errorf("addresses of %s in %s: %w", want.Iface, ns, err)
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == want.Addr {
				out = append(out, want.Addr)
			}
		}
	}
	return out, nil
}

// WaitHolder waits until node is the group's owner in etcd, holds every
// address of HAHeld, and no other host holds any, and returns the owner
// key.
func (h *HALab) WaitHolder(t testing.TB, timeout time.Duration, node string) HAOwner {
	t.Helper()
	var o HAOwner
	WaitFor(t, timeout, node+" the only holder of the HA group", func() error {
		var err error
		if o, err = h.CheckHolder(node); err != nil {
			return err
		}
		return nil
	})
	return o
}

// CheckHolder returns the owner key when node owns the group and is the
// only host holding its addresses, and an error saying what differs
// otherwise.
func (h *HALab) CheckHolder(node string) (HAOwner, error) {
	o, ok, err := h.Owner()
	switch {
	case err != nil:
		return o, err
	case !ok:
		return o, errors.New("no owner key")
	case o.Node != node:
		return o, fmt.Errorf("owner key names %s", o.Node)
	}
	held, err := Holding()
	if err != nil {
		return o, err
	}
	for host, addrs := range held {
		want := 0
		if host == node {
			want = len(HAHeld)
		}
		if len(addrs) != want {
			return o, fmt.Errorf("holders now: %v", held)
		}
	}
	return o, nil
}

// Cut kills the agent of node with SIGKILL and takes the host's links
// down at once, as when the host dies, and returns when the links were
// down: from then on nothing the host holds is reachable.
func (h *HALab) Cut(t testing.TB, node string) time.Time {
	t.Helper()
	if err := h.Agents[node].Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := SetLinks(HostNamed(node), false); err != nil {
		t.Fatal(err)
	}
	at := time.Now()
	h.Agents[node].Kill() // reaps it
	return at
}

// SetLinks takes the host's links (the root-side ends) down or up: down,
// the host is cut off from every segment, as a host that died.
func SetLinks(host HAHost, up bool) error {
	for _, name := range host.Links {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if up {
			err = netlink.LinkSetUp(l)
		} else {
			err = netlink.LinkSetDown(l)
		}
		if err != nil {
			return fmt.Errorf("set %s up=%v: %w", name, up, err)
		}
	}
	return nil
}

// HostNamed returns the HA host called name.
func HostNamed(name string) HAHost {
	for _, h := range HAHosts {
		if h.Name == name {
			return h
		}
	}
	panic("no HA host " + name)
}

// Other returns the other HA host's name.
func Other(name string) string {
	if name == HAHosts[0].Name {
		return HAHosts[1].Name
	}
	return HAHosts[0].Name
}

// MAC returns the hardware address of iface in network namespace ns.
func MAC(ns, iface string) (string, error) {
	nsh, err := netns.GetFromName(ns)
	if err != nil {
		return "", err
	}
	defer nsh.Close()
	nh, err := netlink.NewHandleAt(nsh, unix.NETLINK_ROUTE)
	if err != nil {
		return "", err
	}
	defer nh.Close()
	l, err := nh.LinkByName(iface)
	if err != nil {
		return "", err
	}
	return l.Attrs().HardwareAddr.String(), nil
}

// Neighbour returns the link-layer address namespace ns has for addr, ""
// when it has none.
func Neighbour(ns, addr string) (string, error) {
	out, err := RunNS(0, ns, IPBin, "neigh", "show", addr)
	if err != nil {
		return "", err
	}
	f := strings.Fields(out)
	if i := slices.Index(f, "lladdr"); i >= 0 && i+1 < len(f) {
		return f[i+1], nil
	}
	return "", nil
}

// Sampler looks every Interval at which HA host holds which address (as
// Holding does) and counts the samples in which two hosts hold the same
// one.
type Sampler struct {
	Interval time.Duration
	stop     chan struct{}
	done     chan struct{}

	mu      sync.Mutex
	samples int
	dual    []string // one line per sample seeing two holders
	errs    int
	lastErr error
}

// StartSampler samples until Stop.
func StartSampler(interval time.Duration) *Sampler {
	s := &Sampler{Interval: interval, stop: make(chan struct{}), done: make(chan struct{})}
	go s.run()
	return s
}

func (s *Sampler) run() {
	defer close(s.done)
	views := newHostViews()
	defer views.close()
	t := time.NewTicker(s.Interval)
	defer t.Stop()
	for {
		held, err := views.holding()
		now := time.Now()
		s.mu.Lock()
		s.samples++
		if err != nil {
			s.errs++
			s.lastErr = err
		} else {
			count := map[netip.Addr][]string{}
			for host, addrs := range held {
				for _, a := range addrs {
					count[a] = append(count[a], host)
				}
			}
			for a, hosts := range count {
				if len(hosts) > 1 {
					slices.Sort(hosts)
					s.dual = append(s.dual, fmt.Sprintf("%s: %s held by %v", now.Format("15:04:05.000"), a, hosts))
				}
			}
		}
		s.mu.Unlock()
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
	}
}

// Stop ends the sampling.
func (s *Sampler) Stop() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
}

// Report returns how many samples were taken, the samples (one line per
// address) that saw two holders, and the sampling errors.
func (s *Sampler) Report() (samples int, dual []string, errs int, lastErr error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.samples, slices.Clone(s.dual), s.errs, s.lastErr
}

// Probe is one request from the client to the VIP.
type Probe struct {
	Start, End time.Time
	OK         bool
	Body       string
}

// Prober starts a request from the client namespace to url every Interval,
// each a new TCP connection (so a new IPVS scheduling and a fresh look at
// the neighbour table), with a short connect timeout.
type Prober struct {
	Interval time.Duration
	addr     string
	dialer   *NSDialer
	stop     chan struct{}
	wg       sync.WaitGroup

	mu     sync.Mutex
	probes []Probe
}

// Probe timeouts: a connection whose SYN went to a holder that is gone is
// abandoned quickly; the probes that follow find the new one.
const (
	probeConnect = 300 * time.Millisecond
	probeTotal   = 2 * time.Second
)

// StartProber probes addr ("10.20.0.100:80") until Stop.
func StartProber(addr string, interval time.Duration) (*Prober, error) {
	d, err := NewNSDialer(ClientNS, 16)
	if err != nil {
		return nil, err
	}
	p := &Prober{Interval: interval, addr: addr, dialer: d, stop: make(chan struct{})}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			p.wg.Add(1)
			go func() { defer p.wg.Done(); p.one() }()
			select {
			case <-p.stop:
				return
			case <-t.C:
			}
		}
	}()
	return p, nil
}

func (p *Prober) one() {
	pr := Probe{Start: time.Now()}
	body, err := httpGetRaw(p.dialer, p.addr)
	pr.End, pr.OK, pr.Body = time.Now(), err == nil, body
	p.mu.Lock()
	p.probes = append(p.probes, pr)
	p.mu.Unlock()
}

// httpGetRaw sends GET / over a new connection and returns the body of a
// 200 answer.
func httpGetRaw(d *NSDialer, addr string) (string, error) {
	c, err := d.Dial("tcp", addr, probeConnect)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(probeTotal)); err != nil {
		return "", err
	}
	if _, err := c.Write([]byte("GET / HTTP/1.0\r\nHost: lab\r\n\r\n")); err != nil {
		return "", err
	}
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return "", err
			}
			break
		}
	}
	head, body, _ := strings.Cut(b.String(), "\r\n\r\n")
	if !strings.HasPrefix(head, "HTTP/1.") || !strings.Contains(strings.SplitN(head, "\r\n", 2)[0], " 200") {
		return "", fmt.Errorf("answer %q", head)
	}
	return strings.TrimSpace(body), nil
}

// Stop ends the probing and waits for the requests in flight.
func (p *Prober) Stop() {
	select {
	case <-p.stop:
	default:
		close(p.stop)
		p.wg.Wait()
		p.dialer.Close()
	}
}

// Probes returns every probe so far, by start time.
func (p *Prober) Probes() []Probe {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := slices.Clone(p.probes)
	slices.SortFunc(out, func(a, b Probe) int { return a.Start.Compare(b.Start) })
	return out
}

// FirstOKAfter returns the end of the first successful probe started at
// or after t.
func (p *Prober) FirstOKAfter(t time.Time) (time.Time, bool) {
	var first time.Time
	for _, pr := range p.Probes() {
		if pr.OK && !pr.Start.Before(t) && (first.IsZero() || pr.End.Before(first)) {
			first = pr.End
		}
	}
	return first, !first.IsZero()
}

// LongestGap returns the longest time between two successful probes (by
// their end) within [from, to], and how many probes in it failed.
func (p *Prober) LongestGap(from, to time.Time) (gap time.Duration, failed int) {
	var last time.Time
	for _, pr := range p.Probes() {
		if pr.Start.Before(from) || pr.Start.After(to) {
			continue
		}
		if !pr.OK {
			failed++
			continue
		}
		if !last.IsZero() && pr.End.Sub(last) > gap {
			gap = pr.End.Sub(last)
		}
		if pr.End.After(last) {
			last = pr.End
		}
	}
	return gap, failed
}

// AddrEvents records, from netlink notifications, when each HA host added
// and removed the VIP: precise times for a hand-over, beside the sampler.
type AddrEvents struct {
	done chan struct{}

	mu      sync.Mutex
	present map[string]bool
	changes map[string][]AddrChange
}

// AddrChange is one host starting (Held) or stopping to hold the VIP.
type AddrChange struct {
	At   time.Time
	Held bool
}

// WatchVIP follows the VIP's additions and removals in every HA host.
func WatchVIP() (*AddrEvents, error) {
	w := &AddrEvents{done: make(chan struct{}), present: map[string]bool{}, changes: map[string][]AddrChange{}}
	vip := netip.MustParseAddr(HAVIP)
	for _, host := range HAHosts {
		nsh, err := netns.GetFromName(host.Name)
		if err != nil {
			w.Close()
			return nil, err
		}
		ch := make(chan netlink.AddrUpdate, 256)
		err = netlink.AddrSubscribeWithOptions(ch, w.done, netlink.AddrSubscribeOptions{Namespace: &nsh, ListExisting: true})
		nsh.Close()
		if err != nil {
			w.Close()
			return nil, fmt.Errorf("watch addresses in %s: %w", host.Name, err)
		}
		go func() {
			for u := range ch {
				ip, ok := netip.AddrFromSlice(u.LinkAddress.IP)
				if !ok || ip.Unmap() != vip {
					continue
				}
				now := time.Now()
				w.mu.Lock()
				if w.present[host.Name] != u.NewAddr { // a renewal is no change
					w.present[host.Name] = u.NewAddr
					w.changes[host.Name] = append(w.changes[host.Name], AddrChange{At: now, Held: u.NewAddr})
				}
				w.mu.Unlock()
			}
		}()
	}
	return w, nil
}

// Close stops watching.
func (w *AddrEvents) Close() {
	select {
	case <-w.done:
	default:
		close(w.done)
	}
}

// Change returns the first change of host to held at or after t.
func (w *AddrEvents) Change(host string, held bool, t time.Time) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, c := range w.changes[host] {
		if c.Held == held && !c.At.Before(t) {
			return c.At, true
		}
	}
	return time.Time{}, false
}
