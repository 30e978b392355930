package ipvs

import (
	"context"
	"errors"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ctrlBatch builds n acknowledged CTRL_CMD_GETFAMILY requests, the ones
// for which missing(i) holds asking for a family that does not exist. The
// generic-netlink controller exists in every kernel, so the batch
// machinery is tested against a real kernel on hosts without IPVS.
func ctrlBatch(c *genlConn, n int, missing func(int) bool) *batch {
	b := &batch{first: c.seq + 1}
	var w msgWriter
	for i := range n {
		name := "nlctrl"
		if missing(i) {
			name = "swm-nosuchfam"
		}
		at := w.begin(unix.GENL_ID_CTRL, unix.NLM_F_REQUEST|unix.NLM_F_ACK, b.first+uint32(i))
		w.genl(unix.CTRL_CMD_GETFAMILY, 1)
		w.str(unix.CTRL_ATTR_FAMILY_NAME, name)
		w.end(at)
		b.ends = append(b.ends, len(w.b))
	}
	b.buf = w.b
	c.seq += uint32(n)
	return b
}

func dialForTest(t *testing.T, bufSize int) (*genlConn, *batchCounters) {
	t.Helper()
	stats := &batchCounters{}
	c, err := dialGenl("", bufSize, stats)
	if err != nil {
		t.Skipf("no generic netlink here: %v", err)
	}
	t.Cleanup(c.close)
	return c, stats
}

func TestExchangeMapsAnswersToRequests(t *testing.T) {
	c, stats := dialForTest(t, genlSocketBuffer)
	c.maxReqs = 64 // several sends
	missing := func(i int) bool { return i%7 == 3 }
	const n = 300
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	answers, fatal := c.exchange(ctx, ctrlBatch(c, n, missing))
	if fatal != nil {
		t.Fatal(fatal)
	}
	for i, a := range answers {
		if missing(i) != errors.Is(a, syscall.ENOENT) || (!missing(i) && a != nil) {
			t.Errorf("request %d (missing family %v): answer %v", i, missing(i), a)
		}
	}
	if s := stats.snapshot(); s.Sends != (n+63)/64 || s.Requests != n || s.Largest != 64 || s.Overruns != 0 {
		t.Errorf("stats %+v, want 5 sends of at most 64, no overrun", s)
	}
	// The socket goes on working after the batch.
	if id, err := c.lookupFamily(ctx, "nlctrl"); err != nil || id != unix.GENL_ID_CTRL {
		t.Errorf("nlctrl id %d, %v", id, err)
	}
}

// TestExchangeReceiveBufferOverrun sends more requests at once than the
// acknowledgements (and the controller's replies) can fit in a small
// receive buffer: the kernel drops what does not fit and the read fails
// with ENOBUFS. The answers that came are kept, the lost ones reported
// as such, and later sends are smaller, down to ones that fit.
func TestExchangeReceiveBufferOverrun(t *testing.T) {
	c, stats := dialForTest(t, 4096)
	c.maxReqs = 400
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	missing := func(i int) bool { return i%5 == 0 }
	lostTotal := 0
	for round := range 20 {
		before := c.maxReqs
		answers, fatal := c.exchange(ctx, ctrlBatch(c, 400, missing))
		if fatal != nil {
			t.Fatal(fatal)
		}
		lost := 0
		for i, a := range answers {
			switch {
			case errors.Is(a, errAckLost):
				lost++
			case missing(i) != errors.Is(a, syscall.ENOENT) || (!missing(i) && a != nil):
				t.Errorf("round %d request %d: answer %v", round, i, a)
			}
		}
		lostTotal += lost
		t.Logf("round %d: sends of at most %d requests, %d acknowledgements lost, now %d per send", round, before, lost, c.maxReqs)
		if lost == 0 && round > 0 {
			break
		}
	}
	s := stats.snapshot()
	if s.Overruns == 0 || lostTotal == 0 {
		t.Fatalf("no overrun with a %d-byte receive buffer (stats %+v): the test did not test it", 4096, s)
	}
	if c.maxReqs >= 400 {
		t.Errorf("sends did not shrink after overruns: %d per send", c.maxReqs)
	}
}

// peerConn is a genlConn on one end of a socket pair; the test plays the
// kernel on the other end.
func peerConn(t *testing.T) (*genlConn, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	c, err := newGenlConn(fds[0], 1<<20, 1<<20, &batchCounters{})
	if err != nil {
		t.Fatal(err)
	}
	c.family = 0x1a
	t.Cleanup(func() { c.close(); unix.Close(fds[1]) })
	return c, fds[1]
}

// ack encodes the kernel's NLMSG_ERROR answer to seq (errno 0: done).
func ack(seq uint32, errno syscall.Errno) []byte {
	var w msgWriter
	at := w.begin(unix.NLMSG_ERROR, unix.NLM_F_CAPPED, seq)
	w.b = native.AppendUint32(w.b, uint32(-int32(errno)))
	w.b = append(w.b, make([]byte, unix.NLMSG_HDRLEN)...)
	w.end(at)
	return w.b
}

// TestBatchTimesOut: a peer that answers only some requests, out of order
// and with stray answers to other sequence numbers in between, leaves the
// others failed with context.DeadlineExceeded when the deadline passes.
func TestBatchTimesOut(t *testing.T) {
	c, peer := peerConn(t)
	ops := make([]Op, 6)
	for i := range ops {
		ops[i] = Op{Kind: AddService, Service: Service{Protocol: TCP, Address: netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)}), Port: 80, Scheduler: "rr"}}
	}
	var w msgWriter
	b := &batch{first: 100}
	for i, op := range ops {
		if err := w.writeOp(c.family, b.first+uint32(i), op); err != nil {
			t.Fatal(err)
		}
		b.ends = append(b.ends, len(w.b))
	}
	b.buf = w.b
	go func() {
		buf := make([]byte, 1<<16)
		pfd := []unix.PollFd{{Fd: int32(peer), Events: unix.POLLIN}}
		if _, err := unix.Poll(pfd, 5000); err != nil {
			return
		}
		n, err := unix.Read(peer, buf)
		if err != nil {
			return
		}
		msgs, err := parseMessages(buf[:n])
		if err != nil || len(msgs) != len(ops) {
			return
		}
		// Answer 105 (EEXIST), a stray 7, 103 and 101; never 100, 102, 104.
		for _, a := range [][]byte{ack(105, syscall.EEXIST), ack(7, 0), ack(103, 0), ack(101, syscall.ENOENT)} {
			_, _ = unix.Write(peer, a)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	answers, fatal := c.exchange(ctx, b)
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("exchange took %v with a 300ms deadline", el)
	}
	if fatal == nil {
		t.Error("a time-out mid-batch did not mark the socket for reopening")
	}
	want := []error{context.DeadlineExceeded, syscall.ENOENT, context.DeadlineExceeded, nil, context.DeadlineExceeded, syscall.EEXIST}
	for i, a := range answers {
		if (want[i] == nil) != (a == nil) || (want[i] != nil && !errors.Is(a, want[i])) {
			t.Errorf("request %d: answer %v, want %v", i, a, want[i])
		}
	}
}

// TestNetlinkWithoutIPVS: on a kernel without IPVS (the build hosts) the
// batch and daemon calls say so with ErrUnavailable for every op.
func TestNetlinkWithoutIPVS(t *testing.T) {
	n := NewNetlink("")
	defer n.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := n.Daemons(ctx); !errors.Is(err, ErrUnavailable) {
		t.Skipf("this kernel has IPVS (or no generic netlink): %v", err)
	}
	ops := []Op{
		{Kind: AddService, Service: Service{Protocol: TCP, Address: netip.MustParseAddr("192.0.2.1"), Port: 80, Scheduler: "rr"}},
		{Kind: AddService, Service: Service{Protocol: TCP, Scheduler: "rr"}}, // refused before sending
	}
	errs := n.ApplyBatch(ctx, ops)
	if len(errs) != 2 || !errors.Is(errs[0], ErrUnavailable) || !errors.Is(errs[1], ErrUnavailable) {
		t.Errorf("batch without IPVS: %v", errs)
	}
	if err := n.StartDaemon(ctx, SyncDaemon{Role: Master, Interface: "lo"}); !errors.Is(err, ErrUnavailable) {
		t.Errorf("start daemon without IPVS: %v", err)
	}
	if err := n.StartDaemon(ctx, SyncDaemon{Role: Master, Interface: "an-interface-name-too-long"}); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("bad interface name: %v", err)
	}
}
