// Package netns runs code and commands inside named network namespaces
// (those `ip netns` keeps under /run/netns), for the demo and for the
// tests that build load balancers, backends and clients out of
// namespaces on one host.
//
// A namespace is a property of an OS thread: Do runs a function on a
// thread that has joined the namespace, and sockets made there belong to
// it for their whole life, whichever goroutine uses them later. Processes
// started from such a thread start in the namespace.
package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Dir is where `ip netns` keeps the namespaces it names.
const Dir = "/run/netns"

// Path returns the file that names namespace name.
func Path(name string) string { return filepath.Join(Dir, name) }

// Exists reports whether namespace name exists.
func Exists(name string) bool {
	_, err := os.Stat(Path(name))
	return err == nil
}

var (
	ipOnce sync.Once
	ipPath string
	ipErr  error
)

// IPBin returns iproute2's ip. Busybox's ip applet, which is first on the
// path in some initramfs images, has no `netns` and is passed over.
func IPBin() (string, error) {
	ipOnce.Do(func() {
		candidates := []string{"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"}
		if p, err := exec.LookPath("ip"); err == nil {
			candidates = append([]string{p}, candidates...)
		}
		for _, c := range candidates {
			real, err := filepath.EvalSymlinks(c)
			if err != nil || filepath.Base(real) == "busybox" {
				continue
			}
			if fi, err := os.Stat(real); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
				ipPath = c
				return
			}
		}
		ipErr = errors.New("iproute2's ip was not found (apt-get install iproute2)")
	})
	return ipPath, ipErr
}

// IP runs iproute2's ip with args and returns its output; the error
// carries the command and its output.
func IP(args ...string) (string, error) {
	bin, err := IPBin()
	if err != nil {
		return "", err
	}
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// Add creates namespace name with its loopback up.
func Add(name string) error {
	if _, err := IP("netns", "add", name); err != nil {
		return err
	}
	if _, err := IP("-n", name, "link", "set", "lo", "up"); err != nil {
		_ = Delete(name)
		return err
	}
	return nil
}

// Delete removes the name of namespace name. The namespace itself, with
// its interfaces, nf_tables tables and IPVS services, goes when no
// process and no open socket holds it any more.
func Delete(name string) error {
	_, err := IP("netns", "del", name)
	return err
}

// Do runs fn on an OS thread that has joined namespace name and returns
// its error. The thread is never handed back to the Go scheduler: it ends
// with fn.
func Do(name string, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: Go ends the thread afterwards
		if err := enter(name); err != nil {
			done <- err
			return
		}
		done <- fn()
	}()
	return <-done
}

// enter moves the calling thread into namespace name and checks that it
// got there.
func enter(name string) error {
	f, err := os.Open(Path(name))
	if err != nil {
		return fmt.Errorf("network namespace %s: %w", name, err)
	}
	defer f.Close()
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("setns %s: %w", name, err)
	}
	var want, got unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &want); err != nil {
		return err
	}
	if err := unix.Stat(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), &got); err != nil {
		return err
	}
	if want.Ino != got.Ino || want.Dev != got.Dev {
		return fmt.Errorf("thread is not in network namespace %s after setns", name)
	}
	return nil
}

// Dial connects to address from inside namespace name, as net.Dialer d
// would (nil: the zero Dialer).
func Dial(ctx context.Context, name string, d *net.Dialer, network, address string) (net.Conn, error) {
	if d == nil {
		d = &net.Dialer{}
	}
	var c net.Conn
	err := Do(name, func() (err error) {
		c, err = d.DialContext(ctx, network, address)
		return err
	})
	return c, err
}

// Dialer returns a DialContext function that connects from inside
// namespace name, for http.Transport and gRPC.
func Dialer(name string) func(ctx context.Context, network, address string) (net.Conn, error) {
	return func(ctx context.Context, network, address string) (net.Conn, error) {
		return Dial(ctx, name, nil, network, address)
	}
}

// Thread is one OS thread kept in a namespace for as long as it is open.
// A process started on it (Start) gets its parent-death signal only when
// the Thread is closed or this process ends.
type Thread struct {
	work chan func()
	done chan struct{}
}

// NewThread starts a thread in namespace name.
func NewThread(name string) (*Thread, error) {
	t := &Thread{work: make(chan func()), done: make(chan struct{})}
	ready := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: Go ends the thread with Close
		defer close(t.done)
		if err := enter(name); err != nil {
			ready <- err
			return
		}
		ready <- nil
		for fn := range t.work {
			fn()
		}
	}()
	if err := <-ready; err != nil {
		return nil, err
	}
	return t, nil
}

// Do runs fn on the thread and returns its error.
func (t *Thread) Do(fn func() error) error {
	errc := make(chan error, 1)
	t.work <- func() { errc <- fn() }
	return <-errc
}

// Start starts cmd on the thread, so it runs in the thread's namespace.
func (t *Thread) Start(cmd *exec.Cmd) error { return t.Do(cmd.Start) }

// Close ends the thread. Processes started on it with a parent-death
// signal (SysProcAttr.Pdeathsig) get that signal.
func (t *Thread) Close() {
	close(t.work)
	<-t.done
}
