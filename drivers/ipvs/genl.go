package ipvs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sort"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Socket sizing for batches. The kernel handles all the requests of one
// sendmsg before sendmsg returns and queues one acknowledgement per request
// on our socket; an acknowledgement that does not fit in the receive buffer
// is dropped and the next read fails with ENOBUFS. So one send carries at
// most as many requests as acknowledgements fit in the receive buffer.
const (
	// genlSocketBuffer is asked for in both directions (SO_SNDBUFFORCE and
	// SO_RCVBUFFORCE as root, else SO_SNDBUF and SO_RCVBUF, which
	// net.core.[rw]mem_max caps); the kernel doubles it.
	genlSocketBuffer = 8 << 20
	// ackTruesize is the receive-buffer space one acknowledgement takes,
	// counted generously: an skb of about 768 bytes on Linux 6.1.
	ackTruesize = 1024
	// maxSendRequests and maxSendBytes bound one sendmsg even when the
	// buffers are larger.
	maxSendRequests = 4096
	maxSendBytes    = 4 << 20
	// familyLookupTimeout bounds the look-up of the IPVS family when a
	// socket is opened.
	familyLookupTimeout = 10 * time.Second
	// recvBufferSize holds the largest datagram the kernel sends us (dump
	// parts are at most 32 KiB).
	recvBufferSize = 64 << 10
)

// kernelError is an errno the kernel answered a request with, with the
// message of its extended acknowledgement when it gave one. It unwraps to
// the errno, so errors.Is(err, syscall.EEXIST) works.
type kernelError struct {
	errno syscall.Errno
	msg   string
}

func (e *kernelError) Error() string {
	if e.msg != "" {
		return e.errno.Error() + " (" + e.msg + ")"
	}
	return e.errno.Error()
}

func (e *kernelError) Unwrap() error { return e.errno }

// errAckLost is the answer of a request whose acknowledgement the kernel
// dropped because our receive buffer overran: whether it took effect is
// unknown, so it is treated like a time-out (the next pass reads back).
var errAckLost = fmt.Errorf("acknowledgement lost to a netlink receive-buffer overrun, the write may or may not have taken effect: %w", syscall.ENOBUFS)

// BatchStats counts what ApplyBatch did, for benchmarks and logs.
type BatchStats struct {
	Batches  uint64 // ApplyBatch calls
	Requests uint64 // requests sent
	Sends    uint64 // sendmsg calls carrying them
	Largest  uint64 // most requests in one sendmsg
	Shrinks  uint64 // sends refused (ENOBUFS, ENOMEM, EMSGSIZE) and retried smaller
	Overruns uint64 // receive-buffer overruns (acknowledgements lost)
}

type batchCounters struct {
	batches, requests, sends, largest, shrinks, overruns atomic.Uint64
}

func (b *batchCounters) snapshot() BatchStats {
	return BatchStats{Batches: b.batches.Load(), Requests: b.requests.Load(), Sends: b.sends.Load(),
		Largest: b.largest.Load(), Shrinks: b.shrinks.Load(), Overruns: b.overruns.Load()}
}

func (b *batchCounters) sent(n int) {
	b.sends.Add(1)
	b.requests.Add(uint64(n))
	for {
		cur := b.largest.Load()
		if uint64(n) <= cur || b.largest.CompareAndSwap(cur, uint64(n)) {
			return
		}
	}
}

// genlConn is one generic-netlink socket to the kernel's IPVS family,
// non-blocking under Go's poller so reads honour deadlines. It is used by
// one goroutine at a time (the lender hands it out).
type genlConn struct {
	f        *os.File
	rc       syscall.RawConn
	family   uint16 // the IPVS family id, looked up once when opened
	seq      uint32
	rbuf     []byte
	maxReqs  int // requests per sendmsg, shrunk after ENOBUFS
	maxBytes int // bytes per sendmsg: below the send buffer
	stats    *batchCounters
}

// openGenl opens a socket in the network namespace at nsPath ("" for the
// current one) and looks up the IPVS family.
func openGenl(nsPath string, stats *batchCounters) (*genlConn, error) {
	c, err := dialGenl(nsPath, genlSocketBuffer, stats)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), familyLookupTimeout)
	defer cancel()
	if c.family, err = c.lookupFamily(ctx, ipvsGenlName); err != nil {
		c.close()
		if errors.Is(err, syscall.ENOENT) {
			return nil, fmt.Errorf("%w (generic netlink family %s: %w)", ErrUnavailable, ipvsGenlName, err)
		}
		return nil, fmt.Errorf("look up the %s generic netlink family: %w", ipvsGenlName, err)
	}
	return c, nil
}

// dialGenl opens and binds a generic-netlink socket asking for buffers of
// bufSize bytes each way.
func dialGenl(nsPath string, bufSize int, stats *batchCounters) (*genlConn, error) {
	fd, err := socketIn(nsPath)
	if err != nil {
		return nil, fmt.Errorf("open generic netlink socket: %w", err)
	}
	// Best effort: a smaller buffer means smaller sends, not failure.
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, bufSize) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, bufSize)
	}
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, bufSize) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, bufSize)
	}
	// Short acknowledgements (no copy of the request) with the kernel's
	// message when it refuses one; both optional.
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 1)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind generic netlink socket: %w", err)
	}
	rcv, err1 := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF)
	snd, err2 := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
	if err := errors.Join(err1, err2); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("read generic netlink socket buffers: %w", err)
	}
	return newGenlConn(fd, rcv, snd, stats)
}

// newGenlConn wraps a non-blocking datagram socket whose buffers are rcv
// and snd bytes.
func newGenlConn(fd, rcv, snd int, stats *batchCounters) (*genlConn, error) {
	f := os.NewFile(uintptr(fd), "genetlink")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	c := &genlConn{f: f, rc: rc, rbuf: make([]byte, recvBufferSize), stats: stats,
		maxReqs: min(max(rcv/ackTruesize, 1), maxSendRequests), maxBytes: min(max(snd-64, 4096), maxSendBytes)}
	return c, nil
}

func (c *genlConn) close() { c.f.Close() }

// socketIn opens a non-blocking NETLINK_GENERIC socket in the namespace at
// nsPath, on a thread of its own that returns to its namespace (or, if it
// cannot, ends with its goroutine).
func socketIn(nsPath string) (int, error) {
	open := func() (int, error) {
		return unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_GENERIC)
	}
	if nsPath == "" {
		return open()
	}
	type result struct {
		fd  int
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{-1, fmt.Errorf("current network namespace: %w", err)}
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(nsPath)
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{-1, fmt.Errorf("network namespace %s: %w", nsPath, err)}
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			done <- result{-1, fmt.Errorf("enter network namespace %s: %w", nsPath, err)}
			return
		}
		fd, err := open()
		if rerr := netns.Set(orig); rerr != nil {
			// The thread stays locked and dies with this goroutine.
			if err == nil {
				unix.Close(fd)
			}
			done <- result{-1, fmt.Errorf("return from network namespace %s: %w", nsPath, rerr)}
			return
		}
		runtime.UnlockOSThread()
		done <- result{fd, err}
	}()
	r := <-done
	return r.fd, r.err
}

func (c *genlConn) nextSeq() uint32 {
	c.seq++
	return c.seq
}

// deadline applies ctx's deadline to the socket.
func (c *genlConn) deadline(ctx context.Context) error {
	dl, _ := ctx.Deadline()
	return c.f.SetDeadline(dl)
}

// write sends b as one datagram to the kernel.
func (c *genlConn) write(b []byte) error {
	var werr error
	err := c.rc.Write(func(fd uintptr) bool {
		_, werr = unix.Write(int(fd), b)
		return werr != unix.EAGAIN
	})
	if err != nil {
		return err
	}
	return werr
}

// read receives one datagram; with drain it does not wait (EAGAIN when
// nothing is queued).
func (c *genlConn) read(drain bool) ([]byte, error) {
	var n int
	var rerr error
	recv := func(fd uintptr, flags int) {
		n, _, rerr = unix.Recvfrom(int(fd), c.rbuf, flags|unix.MSG_TRUNC)
	}
	var err error
	if drain {
		err = c.rc.Control(func(fd uintptr) { recv(fd, unix.MSG_DONTWAIT) })
	} else {
		err = c.rc.Read(func(fd uintptr) bool { recv(fd, 0); return rerr != unix.EAGAIN })
	}
	if err != nil {
		return nil, err
	}
	if rerr != nil {
		return nil, rerr
	}
	if n > len(c.rbuf) {
		return nil, fmt.Errorf("netlink message of %d bytes truncated to %d", n, len(c.rbuf))
	}
	return c.rbuf[:n], nil
}

// nlMessage is one message of a received datagram.
type nlMessage struct {
	typ, flags uint16
	seq        uint32
	payload    []byte
}

// parseMessages splits a datagram into messages.
func parseMessages(b []byte) ([]nlMessage, error) {
	var out []nlMessage
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(native.Uint32(b))
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return nil, fmt.Errorf("netlink message length %d in a datagram of %d bytes", l, len(b))
		}
		out = append(out, nlMessage{typ: native.Uint16(b[4:]), flags: native.Uint16(b[6:]), seq: native.Uint32(b[8:]), payload: b[unix.NLMSG_HDRLEN:l]})
		if a := align4(l); a < len(b) {
			b = b[a:]
		} else {
			b = nil
		}
	}
	return out, nil
}

// ackError reads an NLMSG_ERROR payload: nil for an acknowledgement, the
// kernel's errno (with its extended-ack message) otherwise.
func ackError(m nlMessage) error {
	if len(m.payload) < 4 {
		return errors.New("short netlink error message")
	}
	code := int32(native.Uint32(m.payload))
	if code == 0 {
		return nil
	}
	ke := &kernelError{errno: syscall.Errno(-code)}
	if m.flags&unix.NLM_F_ACK_TLVS != 0 && len(m.payload) >= 4+unix.NLMSG_HDRLEN {
		off := 4 + unix.NLMSG_HDRLEN
		if m.flags&unix.NLM_F_CAPPED == 0 {
			off = 4 + align4(int(native.Uint32(m.payload[4:])))
		}
		if off <= len(m.payload) {
			if tlvs, err := parseAttrs(m.payload[off:]); err == nil {
				for _, t := range tlvs {
					if t.typ == unix.NLMSGERR_ATTR_MSG {
						ke.msg = attrString(t)
					}
				}
			}
		}
	}
	return ke
}

// abandoned turns a read or write that failed because ctx ended (the
// deadline passed, or the lender closed the socket) into ctx's error.
func abandoned(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return fmt.Errorf("no answer from the kernel: %w", context.Cause(ctx))
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("no answer from the kernel before the deadline: %w", context.DeadlineExceeded)
	}
	return err
}

// roundTrip sends one request built by build (with the sequence number it
// is given) and hands each answer message to fn until fn says it is done.
func (c *genlConn) roundTrip(ctx context.Context, build func(w *msgWriter, seq uint32), fn func(m nlMessage) (done bool, err error)) error {
	if err := c.deadline(ctx); err != nil {
		return err
	}
	seq := c.nextSeq()
	var w msgWriter
	build(&w, seq)
	if err := c.write(w.b); err != nil {
		return abandoned(ctx, err)
	}
	for {
		b, err := c.read(false)
		if err != nil {
			return abandoned(ctx, err)
		}
		msgs, err := parseMessages(b)
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.seq != seq {
				continue // a late answer to an earlier, abandoned request
			}
			if done, err := fn(m); done || err != nil {
				return err
			}
		}
	}
}

// request sends one acknowledged request and returns the kernel's answer.
func (c *genlConn) request(ctx context.Context, build func(w *msgWriter, seq uint32)) error {
	var answer error
	err := c.roundTrip(ctx, build, func(m nlMessage) (bool, error) {
		if m.typ != unix.NLMSG_ERROR {
			return false, nil
		}
		answer = ackError(m)
		return true, nil
	})
	if err != nil {
		return err
	}
	return answer
}

// dump sends a dump request and hands each part's generic-netlink payload
// (after the genlmsghdr) to fn.
func (c *genlConn) dump(ctx context.Context, build func(w *msgWriter, seq uint32), fn func(payload []byte) error) error {
	var answer error
	err := c.roundTrip(ctx, build, func(m nlMessage) (bool, error) {
		switch m.typ {
		case unix.NLMSG_DONE:
			return true, nil
		case unix.NLMSG_ERROR:
			answer = ackError(m)
			return answer != nil, nil
		}
		if len(m.payload) < unix.GENL_HDRLEN {
			return true, errors.New("short generic netlink message")
		}
		if err := fn(m.payload[unix.GENL_HDRLEN:]); err != nil {
			answer = err
			return true, nil
		}
		return false, nil
	})
	if err != nil {
		return err
	}
	return answer
}

// lookupFamily asks the generic-netlink controller for the id of name.
func (c *genlConn) lookupFamily(ctx context.Context, name string) (uint16, error) {
	var id uint16
	var answer error
	err := c.roundTrip(ctx, func(w *msgWriter, seq uint32) { w.writeGetFamily(seq, name) }, func(m nlMessage) (bool, error) {
		if m.typ == unix.NLMSG_ERROR {
			answer = ackError(m)
			return true, nil
		}
		if m.typ != unix.GENL_ID_CTRL || len(m.payload) < unix.GENL_HDRLEN {
			return false, nil
		}
		id, answer = parseFamilyID(m.payload[unix.GENL_HDRLEN:])
		return true, nil
	})
	if err != nil {
		return 0, err
	}
	return id, answer
}

// batch is a run of requests encoded back to back into one buffer: request
// k ends at ends[k] and has sequence number first+k.
type batch struct {
	buf   []byte
	ends  []int
	first uint32
}

func (b *batch) start(k int) int {
	if k == 0 {
		return 0
	}
	return b.ends[k-1]
}

// exchange sends the requests of b, as many per sendmsg as the socket
// buffers take, reads every acknowledgement and returns one answer per
// request: nil (done), the kernel's errno, errAckLost, or ctx's error for
// those left unanswered when ctx ended. fatal is set when the socket should
// not be used again (it failed, or answers may still be on their way).
func (c *genlConn) exchange(ctx context.Context, b *batch) (answers []error, fatal error) {
	n := len(b.ends)
	answers = make([]error, n)
	answered := make([]bool, n)
	unanswered := func(from, to int, err error) {
		for i := from; i < to; i++ {
			if !answered[i] {
				answers[i], answered[i] = err, true
			}
		}
	}
	if err := c.deadline(ctx); err != nil {
		unanswered(0, n, err)
		return answers, err
	}
	for k := 0; k < n; {
		if ctx.Err() != nil {
			unanswered(k, n, fmt.Errorf("not sent: %w", context.Cause(ctx)))
			return answers, nil
		}
		// As many requests as fit both limits; at least one.
		from := b.start(k)
		m := sort.Search(min(c.maxReqs, n-k), func(i int) bool { return b.ends[k+i]-from > c.maxBytes })
		m = max(m, 1)
		err := c.write(b.buf[from:b.ends[k+m-1]])
		if errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.ENOMEM) || errors.Is(err, unix.EMSGSIZE) {
			if m > 1 {
				// Nothing of a refused send reached IPVS: retry smaller,
				// and keep the smaller size for this socket.
				c.maxReqs = max(m/2, 1)
				c.stats.shrinks.Add(1)
				continue
			}
		}
		if err != nil {
			err = abandoned(ctx, fmt.Errorf("send %d IPVS requests: %w", m, err))
			unanswered(k, n, err)
			return answers, err
		}
		c.stats.sent(m)
		lost, err := c.collect(ctx, b, k, m, answers, answered)
		if err != nil {
			unanswered(k, n, err)
			return answers, err
		}
		if lost {
			unanswered(k, k+m, errAckLost)
			c.maxReqs = max(m/2, 1)
			c.stats.overruns.Add(1)
		}
		k += m
	}
	return answers, nil
}

// collect reads the acknowledgements of requests k..k+m-1 of b. After a
// receive-buffer overrun it reads only what is queued (the kernel queued
// every acknowledgement it could before sendmsg returned) and reports that
// some were lost.
func (c *genlConn) collect(ctx context.Context, b *batch, k, m int, answers []error, answered []bool) (lost bool, err error) {
	lo, hi := b.first+uint32(k), b.first+uint32(k+m)
	pending := m
	for pending > 0 {
		data, err := c.read(lost)
		switch {
		case lost && errors.Is(err, unix.EAGAIN):
			return true, nil
		case errors.Is(err, unix.ENOBUFS):
			lost = true
			continue
		case err != nil:
			return lost, abandoned(ctx, err)
		}
		msgs, err := parseMessages(data)
		if err != nil {
			return lost, err
		}
		for _, msg := range msgs {
			if msg.typ != unix.NLMSG_ERROR || msg.seq-lo >= hi-lo {
				continue
			}
			i := int(msg.seq - b.first)
			if !answered[i] {
				answers[i], answered[i] = ackError(msg), true
				pending--
			}
		}
	}
	return lost, nil
}

// genlBroken tells whether err leaves a genlConn unusable: anything but an
// answer of the kernel.
func genlBroken(err error) bool {
	var ke *kernelError
	return !errors.As(err, &ke)
}
