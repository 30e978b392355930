package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

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

// NSDialer dials from a network namespace with a few threads that joined
// it once, so that frequent connections (a prober's) do not each start
// and retire a thread, which is slow under emulation.
type NSDialer struct {
	jobs chan dialJob
	wg   sync.WaitGroup
}

type dialJob struct {
	network, addr string
	timeout       time.Duration
	reply         chan dialReply
}

type dialReply struct {
	c   net.Conn
	err error
}

// NewNSDialer starts workers threads in network namespace ns.
func NewNSDialer(ns string, workers int) (*NSDialer, error) {
	d := &NSDialer{jobs: make(chan dialJob)}
	ready := make(chan error, workers)
	for range workers {
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			// No UnlockOSThread: the thread is retired when the
			// goroutine ends, as in InNetns.
			runtime.LockOSThread()
			f, err := os.Open(filepath.Join("/run/netns", ns))
			if err == nil {
				err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
				f.Close()
			}
			ready <- err
			if err != nil {
				return
			}
			for j := range d.jobs {
				c, err := net.DialTimeout(j.network, j.addr, j.timeout)
				j.reply <- dialReply{c, err}
			}
		}()
	}
	var errs []error
	for range workers {
		if err := <-ready; err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		d.Close()
		return nil, fmt.Errorf("dialer in %s: %w", ns, errors.Join(errs...))
	}
	return d, nil
}

// Dial connects from the namespace, like net.DialTimeout.
func (d *NSDialer) Dial(network, addr string, timeout time.Duration) (net.Conn, error) {
	reply := make(chan dialReply, 1)
	d.jobs <- dialJob{network: network, addr: addr, timeout: timeout, reply: reply}
	r := <-reply
	return r.c, r.err
}

// Close ends the workers; no Dial may follow.
func (d *NSDialer) Close() {
	close(d.jobs)
	d.wg.Wait()
}
