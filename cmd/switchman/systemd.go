package main

import (
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
)

// notifier speaks systemd's notification protocol (sd_notify(3)): one
// datagram of newline-separated VAR=value lines to the Unix socket named
// by $NOTIFY_SOCKET. Outside a Type=notify unit it does nothing.
type notifier struct {
	mu   sync.Mutex
	addr *net.UnixAddr // nil: not run by systemd with a notify socket
}

// newNotifier reads $NOTIFY_SOCKET and removes it from the environment, so
// that children (HAProxy, which speaks the same protocol) do not report to
// systemd as if they were the agent.
func newNotifier() *notifier {
	path := os.Getenv("NOTIFY_SOCKET")
	os.Unsetenv("NOTIFY_SOCKET")
	if path == "" {
		return &notifier{}
	}
	if strings.HasPrefix(path, "@") {
		path = "\x00" + path[1:] // an abstract socket
	}
	return &notifier{addr: &net.UnixAddr{Name: path, Net: "unixgram"}}
}

// send sends one notification of the given lines, e.g. "READY=1".
func (n *notifier) send(lines ...string) error {
	if n.addr == nil {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	c, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("notify systemd at %s: %w", n.addr.Name, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(strings.Join(lines, "\n") + "\n")); err != nil {
		return fmt.Errorf("notify systemd at %s: %w", n.addr.Name, err)
	}
	return nil
}

// status sets the line `systemctl status` shows.
func (n *notifier) status(s string) error { return n.send("STATUS=" + s) }

// ready says the first pass is applied: `systemctl start` returns.
func (n *notifier) ready(s string) error { return n.send("READY=1", "STATUS="+s) }

// stopping says the agent is shutting down.
func (n *notifier) stopping(s string) error { return n.send("STOPPING=1", "STATUS="+s) }
