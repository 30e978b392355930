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

	"golang.org/x/sys/unix"
)

// unansweredAddr returns a loopback address whose listener never answers a
// SYN: its accept queue (backlog 0) is kept full by one connection nobody
// accepts, so the kernel drops further SYNs and a connect times out.
func unansweredAddr(t *testing.T) netip.AddrPort {
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
	return addr
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

// pollerHarness runs a connectPoller whose results arrive on a channel.
type pollerHarness struct {
	p       *connectPoller
	results chan checkResult
}

func newPollerHarness(t *testing.T) *pollerHarness {
	t.Helper()
	h := &pollerHarness{results: make(chan checkResult, 4096)}
	p, err := newConnectPoller(func(rs []checkResult) {
		for _, r := range rs {
			h.results <- r
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	h.p = p
	go p.run()
	t.Cleanup(p.stop)
	return h
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

// next waits for one result.
func (h *pollerHarness) next(t *testing.T) checkResult {
	t.Helper()
	select {
	case r := <-h.results:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("no result from the poller within 10s")
		return checkResult{}
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
			if _, err := h.p.start(e, tt.timeout); err != nil {
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
		if _, err := h.p.start(e, e.tcp.timeout); err != nil {
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
	select {
	case r := <-h.results:
		t.Fatalf("an extra result: %+v", r)
	case <-time.After(50 * time.Millisecond):
	}
	// Every socket is closed once its result is out (plus epoll and
	// eventfd while the poller lives).
	if got := openFDs(t); got > before+2 {
		t.Errorf("%d descriptors open after every result, %d before the poller", got, before)
	}
}

func TestConnectPollerCancelAndStop(t *testing.T) {
	silent := unansweredAddr(t)
	before := openFDs(t)
	h := newPollerHarness(t)
	e := tcpEntry(t, silent, time.Minute)
	id, err := h.p.start(e, time.Minute)
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
	if _, err := h.p.start(e2, time.Minute); err != nil {
		t.Fatal(err)
	}
	h.p.cancel(id)
	select {
	case r := <-h.results:
		t.Fatalf("a stale cancel ended another check: %+v", r)
	case <-time.After(100 * time.Millisecond):
	}

	// stop closes what is in flight, delivers nothing, and refuses starts.
	h.p.stop()
	if _, err := h.p.start(tcpEntry(t, silent, time.Minute), time.Minute); !errors.Is(err, errPollerStopped) {
		t.Errorf("start after stop: %v, want errPollerStopped", err)
	}
	select {
	case r := <-h.results:
		t.Fatalf("a result after stop: %+v", r)
	default:
	}
	if got := openFDs(t); got != before {
		t.Errorf("%d descriptors open after stop, %d before the poller", got, before)
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
	done := make(chan struct{}, 1)
	p, err := newConnectPoller(func(rs []checkResult) {
		for range rs {
			done <- struct{}{}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	go p.run()
	defer p.stop()
	e := tcpEntry(t, addrOf(t, l.Addr()), time.Second)
	check := func() {
		if _, err := p.start(e, time.Second); err != nil {
			t.Fatal(err)
		}
		<-done
	}
	for range 10 { // grow the slot table and result buffers
		check()
	}
	if n := testing.AllocsPerRun(200, check); n != 0 {
		t.Errorf("%v allocations per check, want 0", n)
	}
}

// BenchmarkConnectPoller runs checks of a loopback listener through the
// poller, 64 in flight at a time.
func BenchmarkConnectPoller(b *testing.B) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	addr := netip.MustParseAddrPort(l.Addr().String())
	done := make(chan struct{}, 64)
	p, err := newConnectPoller(func(rs []checkResult) {
		for _, r := range rs {
			if r.err != nil {
				b.Error(r.err)
			}
			done <- struct{}{}
		}
	})
	if err != nil {
		b.Fatal(err)
	}
	go p.run()
	defer p.stop()
	var es []*entry
	for range 64 {
		c, _ := newTCPChecker(addr, time.Second)
		es = append(es, &entry{checker: c, tcp: c})
	}
	b.ReportAllocs()
	b.ResetTimer()
	inFlight := 0
	for i := range b.N {
		if inFlight == len(es) {
			<-done
			inFlight--
		}
		if _, err := p.start(es[i%len(es)], time.Second); err != nil {
			b.Fatal(err)
		}
		inFlight++
	}
	for ; inFlight > 0; inFlight-- {
		<-done
	}
}

// unanswered is unansweredAddr for tests shared with other systems.
func unanswered(t *testing.T) (netip.AddrPort, bool) { return unansweredAddr(t), true }
