//go:build linux

package health

import (
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// connectPoller runs tcp checks the way HAProxy's event loop does: each
// check is a non-blocking connect whose socket is watched by one epoll
// instance, and one goroutine (run) waits for all of them, enforces their
// timeouts from one deadline heap, closes their sockets and hands the
// results over in batches. A check costs no goroutine, dialer, context or
// timer of its own, and nothing on its way allocates.
//
// Every check that start accepted gets exactly one result through deliver
// (success, failure, timeout, or errCheckCanceled after cancel), unless the
// poller is stopped first. Only run closes the sockets of accepted checks,
// so a descriptor it reads is never one that was closed and reused.
type connectPoller struct {
	epfd, evfd int
	base       time.Time // deadlines are nanoseconds since base (monotonic)
	deliver    func([]checkResult)
	done       chan struct{} // closed when run returns

	mu        sync.Mutex
	slots     []*connSlot
	free      []int32
	deadlines keyedHeap[*connSlot] // live slots by deadline
	canceled  []uint64             // ids for run to close
	// sleepUntil is when run's epoll_wait returns at the latest
	// (math.MaxInt64: only on an event). A check due to time out earlier
	// wakes run through evfd.
	sleepUntil int64
	// minTimeout is the shortest timeout seen: with nothing in flight, run
	// sleeps that long, so a check started meanwhile never needs a wake-up.
	minTimeout int64
	woken      bool            // evfd holds an unread wake-up
	stopping   bool            // run ends (stop, or epoll failed)
	released   bool            // stop was called
	ev         unix.EpollEvent // epoll_ctl's argument
	one, buf   [8]byte         // evfd's write and read buffers
}

// connSlot is one check in flight.
type connSlot struct {
	e        *entry
	idx      int32 // in slots
	fd       int32
	gen      uint32 // grows each time the slot is released
	live     bool
	hidx     int // in deadlines; -1 when not there
	deadline int64
}

func (sl *connSlot) setHeapIndex(i int) { sl.hidx = i }

// newConnectPoller returns a poller that hands results to deliver (from
// run's goroutine; deliver must not keep the slice).
func newConnectPoller(deliver func([]checkResult)) (*connectPoller, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	evfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(evfd)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, evfd, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(evfd)
		return nil, fmt.Errorf("epoll_ctl eventfd: %w", err)
	}
	p := &connectPoller{
		epfd: epfd, evfd: evfd, base: time.Now(), deliver: deliver,
		done: make(chan struct{}), sleepUntil: math.MaxInt64,
	}
	p.one[0] = 1 // eventfd adds the 8-byte integer written; any non-zero value wakes
	return p, nil
}

func (p *connectPoller) now() int64 { return int64(time.Since(p.base)) }

// start begins one check of e (whose checker is a tcpChecker) and returns
// its id for cancel. An error means no result will come: errPollerStopped
// (the check has not run), or the check's failure when the connect failed
// at once.
func (p *connectPoller) start(e *entry, timeout time.Duration) (uint64, error) {
	fd, err := openConnect(e.tcp.family, e.tcp.sa)
	if err != nil {
		return 0, e.tcp.connectError(err)
	}
	deadline := p.now() + int64(timeout)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopping {
		unix.Close(fd)
		return 0, errPollerStopped
	}
	idx := p.alloc()
	sl := p.slots[idx]
	sl.e, sl.fd, sl.deadline, sl.live = e, int32(fd), deadline, true
	// Under mu, so run cannot see the event before the slot is filled in.
	p.ev = unix.EpollEvent{Events: unix.EPOLLOUT, Fd: int32(fd), Pad: idx}
	if err := unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, fd, &p.ev); err != nil {
		p.release(idx)
		unix.Close(fd)
		return 0, fmt.Errorf("tcp connect %s: epoll_ctl: %w", e.tcp.addr, err)
	}
	p.deadlines.push(sl, deadline)
	if t := int64(timeout); p.minTimeout == 0 || t < p.minTimeout {
		p.minTimeout = t
	}
	if deadline < p.sleepUntil {
		p.wakeLocked()
	}
	return uint64(sl.gen)<<32 | uint64(idx), nil
}

// cancel ends the check id early: run closes its socket at once and
// delivers errCheckCanceled, unless its result is already on its way.
func (p *connectPoller) cancel(id uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	idx, gen := int(uint32(id)), uint32(id>>32)
	if p.stopping || idx >= len(p.slots) || !p.slots[idx].live || p.slots[idx].gen != gen {
		return
	}
	p.canceled = append(p.canceled, id)
	p.wakeLocked()
}

// stop ends run, closing the sockets of the checks in flight without
// results, and releases the poller. run must have been started; a second
// stop does nothing.
func (p *connectPoller) stop() {
	p.mu.Lock()
	if p.released {
		p.mu.Unlock()
		return
	}
	p.released = true
	p.stopping = true
	p.wakeLocked()
	p.mu.Unlock()
	<-p.done
	unix.Close(p.epfd)
	unix.Close(p.evfd)
}

// wakeLocked makes run's epoll_wait return. p.mu is held.
func (p *connectPoller) wakeLocked() {
	if !p.woken {
		p.woken = true
		_, _ = unix.Write(p.evfd, p.one[:])
	}
}

// pendingClose is a socket run closes after it lets go of mu.
type pendingClose struct {
	fd       int32
	res      int  // its result's index
	askError bool // read SO_ERROR first: the result's error
}

// run waits for the checks' sockets and their deadlines until stop.
func (p *connectPoller) run() {
	defer close(p.done)
	evs := make([]unix.EpollEvent, 256)
	var res []checkResult
	var closing []pendingClose
	idle := false
	for {
		p.mu.Lock()
		if p.stopping {
			p.closeAllLocked()
			p.mu.Unlock()
			return
		}
		timeout := p.sleepLocked(p.now(), idle)
		p.mu.Unlock()

		n, err := unix.EpollWait(p.epfd, evs, timeout)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			p.fail(fmt.Errorf("epoll_wait: %w", err))
			return
		}
		now := p.now()
		res, closing = res[:0], closing[:0]
		p.mu.Lock()
		for _, ev := range evs[:n] {
			if int(ev.Fd) == p.evfd {
				_, _ = unix.Read(p.evfd, p.buf[:])
				p.woken = false
				continue
			}
			idx := ev.Pad
			sl := p.slots[idx]
			c := pendingClose{fd: sl.fd, res: len(res)}
			r := checkResult{e: sl.e}
			switch {
			case ev.Events&unix.EPOLLERR != 0:
				c.askError = true
			case ev.Events&unix.EPOLLOUT != 0: // connected: the backend answered
			default: // hung up without an error
				r.err = sl.e.tcp.connectError(unix.ECONNRESET)
			}
			closing = append(closing, c)
			res = append(res, r)
			p.release(idx)
		}
		for p.deadlines.len() > 0 {
			sl, deadline := p.deadlines.min()
			if deadline > now {
				break
			}
			closing = append(closing, pendingClose{fd: sl.fd, res: len(res)})
			res = append(res, checkResult{e: sl.e, err: sl.e.tcp.timeoutError()})
			p.release(sl.idx)
		}
		for _, id := range p.canceled {
			idx, gen := int32(uint32(id)), uint32(id>>32)
			sl := p.slots[idx]
			if !sl.live || sl.gen != gen {
				continue // its result came first
			}
			closing = append(closing, pendingClose{fd: sl.fd, res: len(res)})
			res = append(res, checkResult{e: sl.e, err: errCheckCanceled})
			p.release(idx)
		}
		p.canceled = p.canceled[:0]
		idle = n == 0 && len(res) == 0
		p.mu.Unlock()

		for _, c := range closing {
			if c.askError {
				r := &res[c.res]
				v, err := unix.GetsockoptInt(int(c.fd), unix.SOL_SOCKET, unix.SO_ERROR)
				switch {
				case err != nil:
					r.err = r.e.tcp.connectError(err)
				case v != 0:
					r.err = r.e.tcp.errnoError(unix.Errno(v))
				default:
					r.err = r.e.tcp.errnoError(unix.ECONNRESET)
				}
			}
			unix.Close(int(c.fd))
		}
		if len(res) > 0 {
			p.deliver(res)
		}
	}
}

// sleepLocked returns how long run's epoll_wait may sleep, in
// milliseconds, and records until when. p.mu is held.
func (p *connectPoller) sleepLocked(now int64, idle bool) int {
	switch {
	case p.deadlines.len() > 0:
		_, p.sleepUntil = p.deadlines.min()
	case idle || p.minTimeout == 0:
		// Nothing in flight and nothing happened since the last wake-up:
		// sleep until an event (start wakes run when it must).
		p.sleepUntil = math.MaxInt64
		return -1
	default:
		p.sleepUntil = now + p.minTimeout
	}
	d := p.sleepUntil - now
	if d <= 0 {
		return 0
	}
	return int((d + int64(time.Millisecond) - 1) / int64(time.Millisecond))
}

// fail ends run after an epoll error: every check in flight fails with
// err, and later starts are refused (the Scheduler then runs them on its
// workers).
func (p *connectPoller) fail(err error) {
	p.mu.Lock()
	p.stopping = true
	var res []checkResult
	for _, sl := range p.slots {
		if sl.live {
			unix.Close(int(sl.fd))
			res = append(res, checkResult{e: sl.e, err: err})
			p.release(sl.idx)
		}
	}
	p.mu.Unlock()
	if len(res) > 0 {
		p.deliver(res)
	}
}

// closeAllLocked closes every socket in flight. p.mu is held.
func (p *connectPoller) closeAllLocked() {
	for _, sl := range p.slots {
		if sl.live {
			unix.Close(int(sl.fd))
			p.release(sl.idx)
		}
	}
}

// alloc returns a free slot. p.mu is held.
func (p *connectPoller) alloc() int32 {
	if n := len(p.free); n > 0 {
		idx := p.free[n-1]
		p.free = p.free[:n-1]
		return idx
	}
	idx := int32(len(p.slots))
	p.slots = append(p.slots, &connSlot{idx: idx, gen: 1, hidx: -1})
	return idx
}

// release frees a slot (its socket is the caller's to close). p.mu is held.
func (p *connectPoller) release(idx int32) {
	sl := p.slots[idx]
	if sl.hidx >= 0 {
		p.deadlines.remove(sl.hidx)
	}
	sl.e, sl.fd, sl.live = nil, -1, false
	sl.gen++
	p.free = append(p.free, idx)
}
