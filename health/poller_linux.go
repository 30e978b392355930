//go:build linux

package health

import (
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// connectPoller runs tcp checks the way HAProxy's event loop does: each
// check is a non-blocking connect, and one loop (the Scheduler's Run)
// starts the checks that are due and, in the same turn, reads the connects
// that are done, enforces the timeouts from one deadline heap and closes
// the sockets. A check costs no goroutine, dialer, context, timer or
// wake-up of its own, and nothing on its way allocates; when checks are in
// flight the loop comes back every loopTick.
//
// A check's socket is asked whether it is connected (getpeername, then
// SO_ERROR) at the end of the turn that started it and, if it was still
// connecting, at the next turn: on loopback and on a LAN the connect is
// done by then, and the check ends without touching epoll (and, when it
// ends in its own turn, closes its socket while the socket is still in
// the CPU's caches). Only a socket still connecting after that is
// registered with the poller's epoll instance, which later turns read
// (epoll_wait with no timeout).
//
// start, harvest, pending and close belong to that one loop; cancel may be
// called from any goroutine. Every check that start accepted comes out of
// harvest exactly once (success, failure, timeout, or errCheckCanceled
// after cancel), unless the poller is closed first. Only harvest and close
// close the sockets of accepted checks.
type connectPoller struct {
	epfd      int
	base      time.Time // deadlines are nanoseconds since base (monotonic)
	slots     []*connSlot
	free      []int32
	deadlines keyedHeap[*connSlot] // live slots by deadline
	live      int                  // checks in flight
	polled    int                  // of them, registered with epoll
	// fresh are the checks started since the last harvest; probe those of
	// the turn before that were still connecting.
	fresh, probe []slotRef
	closed       bool
	// Buffers reused from turn to turn.
	evs     []unix.EpollEvent
	res     []checkResult
	closing []pendingClose
	ev      unix.EpollEvent // epoll_ctl's argument
	peer    peerBuf

	mu       sync.Mutex
	canceled []uint64 // ids for harvest to close
}

// connSlot is one check in flight.
type connSlot struct {
	e        *entry
	idx      int32 // in slots
	fd       int32
	gen      uint32 // grows each time the slot is released
	live     bool
	polled   bool // registered with epoll
	hidx     int  // in deadlines; -1 when not there
	deadline int64
}

// slotRef names a slot while it holds one check.
type slotRef struct {
	idx int32
	gen uint32
}

// ref returns the reference to sl's current check.
func (sl *connSlot) ref() slotRef { return slotRef{idx: sl.idx, gen: sl.gen} }

// pendingClose is a socket harvest closes.
type pendingClose struct {
	fd       int32
	res      int  // its result's index
	askError bool // read SO_ERROR first: the result's error
}

// newConnectPoller returns a poller with nothing in flight.
func newConnectPoller() (*connectPoller, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	p := &connectPoller{epfd: epfd, base: time.Now(), evs: make([]unix.EpollEvent, 256)}
	p.deadlines.place = func(sl *connSlot, i int) { sl.hidx = i }
	return p, nil
}

func (p *connectPoller) now() int64 { return int64(time.Since(p.base)) }

// pending returns how many checks are in flight.
func (p *connectPoller) pending() int { return p.live }

// start begins the checks of batch (entries whose checker is a
// tcpChecker) and fills res with each one's id for cancel, or an error:
// errPollerStopped (the check has not run), or the check's failure when
// its connect failed at once. An id means its result comes out of harvest.
func (p *connectPoller) start(batch []*entry, res []startedCheck) {
	now := p.now()
	for i, e := range batch {
		if p.closed {
			res[i] = startedCheck{err: errPollerStopped}
			continue
		}
		fd, err := openConnect(e.tcp.sa)
		if err != nil {
			res[i] = startedCheck{err: e.tcp.connectError(err)}
			continue
		}
		idx := p.alloc()
		sl := p.slots[idx]
		sl.e, sl.fd, sl.deadline, sl.live = e, int32(fd), now+int64(e.tcp.timeout), true
		p.fresh = append(p.fresh, sl.ref())
		p.deadlines.push(sl, sl.deadline)
		p.live++
		res[i] = startedCheck{id: uint64(sl.gen)<<32 | uint64(idx)}
	}
}

// cancel ends the check id early: the next harvest closes its socket and
// returns errCheckCanceled for it, unless its result came first.
func (p *connectPoller) cancel(id uint64) {
	p.mu.Lock()
	p.canceled = append(p.canceled, id)
	p.mu.Unlock()
}

// harvest returns the checks that ended since the last call: the connects
// that are done, the checks past their deadline and the canceled ones, and
// closes their sockets. The slice is valid until the next call. An error
// means epoll failed: every check in flight is returned with
// errPollerStopped (it has no result), and the poller is closed.
func (p *connectPoller) harvest() ([]checkResult, error) {
	p.res, p.closing = p.res[:0], p.closing[:0]
	if p.live == 0 {
		p.mu.Lock()
		p.canceled = p.canceled[:0] // stale: nothing is in flight
		p.mu.Unlock()
		return nil, nil
	}
	// Read every event that is ready and ask the sockets to probe before
	// looking at deadlines: a turn that comes late must not time out
	// checks whose connect is done.
	for p.polled > 0 {
		n, err := epollReady(p.epfd, p.evs)
		if err != nil {
			for _, sl := range p.slots {
				if sl.live {
					p.done(sl, checkResult{e: sl.e, err: errPollerStopped}, false)
				}
			}
			p.finish()
			p.close()
			return p.res, fmt.Errorf("epoll_wait: %w", err)
		}
		for _, ev := range p.evs[:n] {
			sl := p.slots[ev.Pad]
			switch {
			case ev.Events&unix.EPOLLERR != 0:
				p.done(sl, checkResult{e: sl.e}, true)
			case ev.Events&unix.EPOLLOUT != 0: // connected: the backend answered
				p.done(sl, checkResult{e: sl.e}, false)
			default: // hung up without an error
				p.done(sl, checkResult{e: sl.e, err: sl.e.tcp.errnoError(unix.ECONNRESET)}, false)
			}
		}
		if n < len(p.evs) {
			break
		}
		// A full batch: read on. The sockets above are still open, but
		// EPOLLONESHOT reports each socket once.
	}
	// Ask the sockets of last turn's checks still connecting (those still
	// connecting now go to epoll), then those of this turn's (those still
	// connecting are asked again next turn).
	p.ask(p.probe, true)
	spare := p.probe[:0] // every one of them ended or went to epoll
	p.probe = p.ask(p.fresh, false)
	p.fresh = spare // a storage of its own: probe keeps fresh's
	now := p.now()
	for p.deadlines.len() > 0 {
		sl, deadline := p.deadlines.min()
		if deadline > now {
			break
		}
		if !sl.polled { // not asked yet: its connect may be done
			if connected, errno := p.peer.connectState(int(sl.fd)); connected {
				var err error
				if errno != 0 {
					err = sl.e.tcp.errnoError(errno)
				}
				p.done(sl, checkResult{e: sl.e, err: err}, false)
				continue
			}
		}
		p.done(sl, checkResult{e: sl.e, err: sl.e.tcp.timeoutError()}, false)
	}
	p.mu.Lock()
	for _, id := range p.canceled {
		idx, gen := int(uint32(id)), uint32(id>>32)
		if idx < len(p.slots) {
			if sl := p.slots[idx]; sl.live && sl.gen == gen {
				p.done(sl, checkResult{e: sl.e, err: errCheckCanceled}, false)
			}
		}
	}
	p.canceled = p.canceled[:0]
	p.mu.Unlock()
	p.finish()
	return p.res, nil
}

// ask asks the sockets of refs whether their connects are done and ends
// the checks that are. Of those still connecting, it registers each with
// epoll when toEpoll, else returns them (reusing refs' storage).
func (p *connectPoller) ask(refs []slotRef, toEpoll bool) []slotRef {
	out := refs[:0]
	for _, ref := range refs {
		sl := p.slots[ref.idx]
		if !sl.live || sl.gen != ref.gen {
			continue // ended already (canceled, timed out)
		}
		connected, errno := p.peer.connectState(int(sl.fd))
		switch {
		case connected && errno == 0:
			p.done(sl, checkResult{e: sl.e}, false)
		case connected:
			p.done(sl, checkResult{e: sl.e, err: sl.e.tcp.errnoError(errno)}, false)
		case !toEpoll:
			out = append(out, ref)
		default: // epoll reports when it is done
			// One report per socket (EPOLLONESHOT), however long it
			// stays writable before harvest closes it.
			p.ev = unix.EpollEvent{Events: unix.EPOLLOUT | unix.EPOLLONESHOT, Fd: sl.fd, Pad: sl.idx}
			if err := epollAdd(p.epfd, int(sl.fd), &p.ev); err != nil {
				p.done(sl, checkResult{e: sl.e, err: fmt.Errorf("tcp connect %s: epoll_ctl: %w", sl.e.tcp.addr, err)}, false)
				continue
			}
			sl.polled = true
			p.polled++
		}
	}
	return out
}

// done takes a check out of flight with its result; its socket is closed
// by finish.
func (p *connectPoller) done(sl *connSlot, r checkResult, askError bool) {
	p.closing = append(p.closing, pendingClose{fd: sl.fd, res: len(p.res), askError: askError})
	p.res = append(p.res, r)
	if sl.polled {
		p.polled--
	}
	p.release(sl.idx)
	p.live--
}

// finish reads the errors of the failed connects and closes the sockets
// of the checks done.
func (p *connectPoller) finish() {
	for _, c := range p.closing {
		if c.askError {
			r := &p.res[c.res]
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
		closeFD(int(c.fd))
	}
	clear(p.closing)
	p.closing = p.closing[:0]
}

// close closes every socket in flight (their checks have no result) and
// the poller; later starts are refused. A second close does nothing.
func (p *connectPoller) close() {
	if p.closed {
		return
	}
	p.closed = true
	for _, sl := range p.slots {
		if sl.live {
			closeFD(int(sl.fd))
			p.release(sl.idx)
			p.live--
			p.polled = 0
		}
	}
	unix.Close(p.epfd)
}

// alloc returns a free slot.
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

// release frees a slot (its socket is the caller's to close).
func (p *connectPoller) release(idx int32) {
	sl := p.slots[idx]
	if sl.hidx >= 0 {
		p.deadlines.remove(sl.hidx)
	}
	sl.e, sl.fd, sl.live, sl.polled = nil, -1, false, false
	sl.gen++
	p.free = append(p.free, idx)
}
