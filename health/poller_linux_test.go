//go:build linux

package health

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// unansweredAddr returns a loopback address whose listener never answers a
// SYN: its accept queue (backlog 0) is kept full by one connection nobody
// accepts, so the kernel drops further SYNs and a connect times out.
func unansweredAddr(t *testing.T) netip.AddrPort {
	addr, _ := droppingListener(t)
	return addr
}

// droppingListener is unansweredAddr's listener, and its socket: listen
// again on it with a larger backlog and it answers the SYNs the clients
// retransmit (after about a second).
func droppingListener(t *testing.T) (netip.AddrPort, int) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*unix.SockaddrInet4).Port))
	filler, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
	if err != nil {
		t.Fatalf("filling the accept queue of %s: %v", addr, err)
	}
	t.Cleanup(func() { filler.Close() })
	return addr, fd
}

// openFDs counts this process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// startOne starts one check of e.
func startOne(p *connectPoller, e *entry) (uint64, error) {
	var res [1]startedCheck
	p.start([]*entry{e}, res[:])
	return res[0].id, res[0].err
}

// pollerHarness drives a connectPoller as the Scheduler's loop does.
type pollerHarness struct {
	p       *connectPoller
	results []checkResult
}

func newPollerHarness(t *testing.T) *pollerHarness {
	t.Helper()
	p, err := newConnectPoller()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.close)
	return &pollerHarness{p: p}
}

// tcpEntry is an entry of a tcp target at addr, as the Scheduler makes it.
func tcpEntry(t *testing.T, addr netip.AddrPort, timeout time.Duration) *entry {
	t.Helper()
	c, err := newTCPChecker(addr, timeout)
	if err != nil {
		t.Fatal(err)
	}
	return &entry{target: Target{Service: "s", Addr: addr}, checker: c, tcp: c}
}

// next harvests (every millisecond) until a result comes.
func (h *pollerHarness) next(t *testing.T) checkResult {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(h.results) == 0 {
		rs, err := h.p.harvest()
		if err != nil {
			t.Fatalf("harvest: %v", err)
		}
		h.results = append(h.results, rs...)
		if len(h.results) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no result from the poller within 10s")
		}
		time.Sleep(time.Millisecond)
	}
	r := h.results[0]
	h.results = h.results[1:]
	return r
}

// none checks that no result comes for a while.
func (h *pollerHarness) none(t *testing.T, what string) {
	t.Helper()
	for range 50 {
		rs, err := h.p.harvest()
		if err != nil {
			t.Fatalf("harvest: %v", err)
		}
		if len(rs) > 0 || len(h.results) > 0 {
			t.Fatalf("%s: a result %+v", what, append(h.results, rs...)[0])
		}
		time.Sleep(time.Millisecond)
	}
}

func TestConnectPoller(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	open := addrOf(t, l.Addr())
	tests := []struct {
		name    string
		addr    netip.AddrPort
		timeout time.Duration
		wantErr error // nil: success
	}{
		{"listener answers", open, 5 * time.Second, nil},
		{"closed port is refused", closedPort(t, "tcp"), 5 * time.Second, syscall.ECONNREFUSED},
		{"no answer times out", unansweredAddr(t), 200 * time.Millisecond, os.ErrDeadlineExceeded},
	}
	h := newPollerHarness(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := tcpEntry(t, tt.addr, tt.timeout)
			start := time.Now()
			if _, err := startOne(h.p, e); err != nil {
				t.Fatalf("start: %v", err)
			}
			r := h.next(t)
			took := time.Since(start)
			if r.e != e {
				t.Fatalf("result for another entry")
			}
			checkErr(t, r.err, tt.wantErr)
			if errors.Is(tt.wantErr, os.ErrDeadlineExceeded) && took < tt.timeout {
				t.Errorf("timed out after %v, before its %v timeout", took, tt.timeout)
			}
		})
	}
}

func TestConnectPollerManyAtOnce(t *testing.T) {
	var open []netip.AddrPort
	for range 10 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		open = append(open, addrOf(t, l.Addr()))
	}
	closed := closedPort(t, "tcp")
	silent := unansweredAddr(t)
	before := openFDs(t)
	h := newPollerHarness(t)
	const n = 1000
	want := map[*entry]error{}
	for i := range n {
		var e *entry
		var wantErr error
		switch {
		case i%10 == 9:
			e, wantErr = tcpEntry(t, closed, 5*time.Second), syscall.ECONNREFUSED
		case i%100 == 50:
			e, wantErr = tcpEntry(t, silent, 300*time.Millisecond), os.ErrDeadlineExceeded
		default:
			e = tcpEntry(t, open[i%len(open)], 5*time.Second)
		}
		if _, err := startOne(h.p, e); err != nil {
			t.Fatalf("start %d: %v", i, err)
		}
		want[e] = wantErr
	}
	for range n {
		r := h.next(t)
		wantErr, ok := want[r.e]
		if !ok {
			t.Fatal("a result for an unknown or already answered check")
		}
		delete(want, r.e)
		checkErr(t, r.err, wantErr)
	}
	h.none(t, "after every check's result")
	// Every socket is closed once its result is out (the epoll instance
	// stays while the poller lives).
	if got := openFDs(t); got != before+1 {
		t.Errorf("%d descriptors open after every result, %d before the poller", got, before)
	}
}

func TestConnectPollerCancelAndStop(t *testing.T) {
	silent := unansweredAddr(t)
	before := openFDs(t)
	h := newPollerHarness(t)
	e := tcpEntry(t, silent, time.Minute)
	id, err := startOne(h.p, e)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	h.p.cancel(id)
	if r := h.next(t); r.e != e || !errors.Is(r.err, errCheckCanceled) {
		t.Fatalf("after cancel: result %+v, want errCheckCanceled", r)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("cancel took %v", took)
	}
	// A second cancel of the same id (its slot may be reused) does nothing.
	e2 := tcpEntry(t, silent, time.Minute)
	if _, err := startOne(h.p, e2); err != nil {
		t.Fatal(err)
	}
	h.p.cancel(id)
	h.none(t, "a stale cancel")
	if h.p.pending() != 1 {
		t.Errorf("%d checks in flight, want 1", h.p.pending())
	}

	// close closes what is in flight, and refuses starts.
	h.p.close()
	if _, err := startOne(h.p, tcpEntry(t, silent, time.Minute)); !errors.Is(err, errPollerStopped) {
		t.Errorf("start after close: %v, want errPollerStopped", err)
	}
	if got := openFDs(t); got != before {
		t.Errorf("%d descriptors open after close, %d before the poller", got, before)
	}
}

// TestConnectPollerNoAllocations: a check on the poller (start, the
// connect's result, delivery) allocates nothing once the poller's tables
// have grown.
func TestConnectPollerNoAllocations(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	p, err := newConnectPoller()
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	e := tcpEntry(t, addrOf(t, l.Addr()), time.Second)
	batch := []*entry{e}
	res := make([]startedCheck, 1)
	check := func() {
		p.start(batch, res)
		if res[0].err != nil {
			t.Fatal(res[0].err)
		}
		for p.pending() > 0 {
			if _, err := p.harvest(); err != nil {
				t.Fatal(err)
			}
		}
	}
	for range 10 { // grow the slot table and result buffers
		check()
	}
	if n := testing.AllocsPerRun(200, check); n != 0 {
		t.Errorf("%v allocations per check, want 0", n)
	}
}

// BenchmarkConnectPoller runs checks of a loopback listener through the
// poller in batches of 64, as one turn of the Scheduler's loop does.
func BenchmarkConnectPoller(b *testing.B) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	addr := netip.MustParseAddrPort(l.Addr().String())
	p, err := newConnectPoller()
	if err != nil {
		b.Fatal(err)
	}
	defer p.close()
	var batch []*entry
	for range 64 {
		c, _ := newTCPChecker(addr, time.Second)
		batch = append(batch, &entry{checker: c, tcp: c})
	}
	res := make([]startedCheck, len(batch))
	b.ReportAllocs()
	b.ResetTimer()
	for done := 0; done < b.N; {
		n := min(len(batch), b.N-done)
		p.start(batch[:n], res[:n])
		for p.pending() > 0 {
			rs, err := p.harvest()
			if err != nil {
				b.Fatal(err)
			}
			for _, r := range rs {
				if r.err != nil {
					b.Fatal(r.err)
				}
			}
		}
		done += n
	}
}

// unanswered is unansweredAddr for tests shared with other systems.
func unanswered(t *testing.T) (netip.AddrPort, bool) { return unansweredAddr(t), true }

// TestConnectPollerLateTurn: a turn that comes after the checks' deadlines
// reports connects that were done as successes, however many they are
// (more than one epoll_wait returns), and reports each once.
func TestConnectPollerLateTurn(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	addr := addrOf(t, l.Addr())
	h := newPollerHarness(t)
	const n = 600 // > 256, the events one epoll_wait returns
	var batch []*entry
	for range n {
		batch = append(batch, tcpEntry(t, addr, 20*time.Millisecond))
	}
	res := make([]startedCheck, n)
	h.p.start(batch, res)
	for i, r := range res {
		if r.err != nil {
			t.Fatalf("start %d: %v", i, r.err)
		}
	}
	// Wait past every deadline, and until every connect is done (the
	// listener's kernel answers them all: nothing accepts, nothing needs to).
	time.Sleep(100 * time.Millisecond)
	seen := map[*entry]bool{}
	for range n {
		r := h.next(t)
		if seen[r.e] {
			t.Fatal("a check reported twice")
		}
		seen[r.e] = true
		if r.err != nil {
			t.Errorf("a connect done before a late turn: %v, want success", r.err)
		}
	}
	h.none(t, "after every check's result")
}

func TestSockaddrOf(t *testing.T) {
	tests := []struct {
		addr   string
		family int
		raw    []byte // family (host order), port (network order), address
	}{
		{"10.1.2.3:8080", unix.AF_INET, []byte{10, 1, 2, 3}},
		{"[::ffff:10.1.2.3]:8080", unix.AF_INET, []byte{10, 1, 2, 3}},
		{"[2001:db8::1]:8080", unix.AF_INET6, netip.MustParseAddr("2001:db8::1").AsSlice()},
	}
	for _, tt := range tests {
		sa, err := sockaddrOf(netip.MustParseAddrPort(tt.addr))
		if err != nil {
			t.Fatalf("%s: %v", tt.addr, err)
		}
		if sa.family != tt.family {
			t.Errorf("%s: family %d, want %d", tt.addr, sa.family, tt.family)
		}
		p, n := sa.ptr()
		b := unsafe.Slice((*byte)(p), n)
		if port := b[2:4]; port[0] != 8080>>8 || port[1] != 8080&0xff {
			t.Errorf("%s: port bytes %v, want 8080 in network order", tt.addr, port)
		}
		off := 4 // sin_addr
		if tt.family == unix.AF_INET6 {
			off = 8 // after sin6_flowinfo
		}
		if got := b[off : off+len(tt.raw)]; string(got) != string(tt.raw) {
			t.Errorf("%s: address bytes %v, want %v", tt.addr, got, tt.raw)
		}
	}
	sa, err := sockaddrOf(netip.MustParseAddrPort("[fe80::1%7]:80"))
	if err != nil || sa.v6.Scope_id != 7 {
		t.Errorf("numeric zone: %+v, %v; want scope 7", sa, err)
	}
	if _, err := sockaddrOf(netip.MustParseAddrPort("[fe80::1%no-such-if]:80")); err == nil {
		t.Error("an unknown zone was accepted")
	}
}

func TestConnectPollerIPv6(t *testing.T) {
	l, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	defer l.Close()
	h := newPollerHarness(t)
	for _, c := range []struct {
		addr    netip.AddrPort
		wantErr error
	}{{addrOf(t, l.Addr()), nil}, {netip.AddrPortFrom(netip.IPv6Loopback(), closedPort(t, "tcp").Port()), syscall.ECONNREFUSED}} {
		e := tcpEntry(t, c.addr, 5*time.Second)
		if _, err := startOne(h.p, e); err != nil {
			t.Fatal(err)
		}
		checkErr(t, h.next(t).err, c.wantErr)
	}
}

// TestConnectPollerSlowConnects: connects still going on when the poller
// asks are registered with epoll, which reports each once when it is done,
// however many finish together (more than one epoll_wait returns), and a
// turn that comes after their deadlines reports them as successes.
func TestConnectPollerSlowConnects(t *testing.T) {
	addr, lfd := droppingListener(t)
	h := newPollerHarness(t)
	const n = 300 // > 256, the events one epoll_wait returns
	// The kernel retransmits a SYN after 1s (then 3s): the deadline falls
	// between the connect being done and the turn that reads it.
	const timeout = 1600 * time.Millisecond
	var batch []*entry
	for range n {
		batch = append(batch, tcpEntry(t, addr, timeout))
	}
	res := make([]startedCheck, n)
	start := time.Now()
	h.p.start(batch, res)
	for i, r := range res {
		if r.err != nil {
			t.Fatalf("start %d: %v", i, r.err)
		}
	}
	for range 2 { // the turn of the start and the next ask them
		if rs, err := h.p.harvest(); err != nil || len(rs) != 0 {
			t.Fatalf("harvest while the SYNs are dropped: %d results, %v", len(rs), err)
		}
	}
	if h.p.polled != n {
		t.Fatalf("%d checks registered with epoll, want %d", h.p.polled, n)
	}
	// Let the listener answer: the retransmitted SYNs connect.
	if err := unix.Listen(lfd, 1024); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Until(start.Add(timeout + 600*time.Millisecond)))
	rs, err := h.p.harvest()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[*entry]bool{}
	for _, r := range rs {
		if seen[r.e] {
			t.Fatal("a check reported twice")
		}
		seen[r.e] = true
		if r.err != nil {
			t.Errorf("a slow connect done before a late turn: %v, want success", r.err)
		}
	}
	if len(seen) != n {
		t.Errorf("%d results in the late turn, want %d", len(seen), n)
	}
	h.none(t, "after every check's result")
	if h.p.polled != 0 || h.p.pending() != 0 {
		t.Errorf("%d polled, %d in flight after every result", h.p.polled, h.p.pending())
	}
}

// TestConnectPollerAsksEachTurnsChecks: the checks still connecting at the
// end of their turn are asked again at the next turn and then registered
// with epoll, while that turn's own checks wait for theirs.
func TestConnectPollerAsksEachTurnsChecks(t *testing.T) {
	silent := unansweredAddr(t)
	h := newPollerHarness(t)
	turn := func(n int) []uint64 {
		var ids []uint64
		for range n {
			id, err := startOne(h.p, tcpEntry(t, silent, time.Minute))
			if err != nil {
				t.Fatal(err)
			}
			ids = append(ids, id)
		}
		if rs, err := h.p.harvest(); err != nil || len(rs) != 0 {
			t.Fatalf("harvest: %d results, %v", len(rs), err)
		}
		return ids
	}
	polled := func(ids []uint64) (n int) {
		for _, id := range ids {
			if h.p.slots[uint32(id)].polled {
				n++
			}
		}
		return n
	}
	first := turn(5)
	if n := polled(first); n != 0 {
		t.Fatalf("%d checks in epoll after their own turn, want 0", n)
	}
	second := turn(7)
	if n := polled(first); n != len(first) {
		t.Errorf("%d of the first turn's %d checks in epoll after the next turn", n, len(first))
	}
	if n := polled(second); n != 0 {
		t.Errorf("%d of the second turn's checks in epoll after their own turn, want 0", n)
	}
	turn(0)
	if n := polled(second); n != len(second) {
		t.Errorf("%d of the second turn's %d checks in epoll after the next turn", n, len(second))
	}
}
