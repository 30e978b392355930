package main

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// listenNotify is systemd's side of the protocol: a datagram socket.
func listenNotify(t *testing.T, name string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func readNotify(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no notification: %v", err)
	}
	return string(buf[:n])
}

func TestNotifier(t *testing.T) {
	tests := []struct {
		name   string
		socket func(t *testing.T) (env, listen string)
	}{
		{"path", func(t *testing.T) (string, string) {
			p := filepath.Join(t.TempDir(), "notify")
			return p, p
		}},
		{"abstract", func(t *testing.T) (string, string) {
			name := "switchman-test-" + filepath.Base(t.TempDir())
			return "@" + name, "\x00" + name
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			env, listen := tc.socket(t)
			c := listenNotify(t, listen)
			t.Setenv("NOTIFY_SOCKET", env)
			n := newNotifier()
			if v, ok := os.LookupEnv("NOTIFY_SOCKET"); ok {
				t.Fatalf("NOTIFY_SOCKET still set (%q): children such as HAProxy would notify systemd as the agent", v)
			}
			steps := []struct {
				send func() error
				want string
			}{
				{func() error { return n.status("waiting for etcd") }, "STATUS=waiting for etcd\n"},
				{func() error { return n.ready("first pass applied") }, "READY=1\nSTATUS=first pass applied\n"},
				{func() error { return n.stopping("stopping") }, "STOPPING=1\nSTATUS=stopping\n"},
			}
			for _, s := range steps {
				if err := s.send(); err != nil {
					t.Fatal(err)
				}
				if got := readNotify(t, c); got != s.want {
					t.Fatalf("sent %q, want %q", got, s.want)
				}
			}
		})
	}
}

func TestNotifierOutsideSystemd(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	n := newNotifier()
	if err := n.ready("x"); err != nil {
		t.Fatalf("without NOTIFY_SOCKET: %v, want nothing sent and no error", err)
	}
}

func TestNotifierSocketGone(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "absent"))
	err := newNotifier().ready("x")
	if err == nil || !strings.Contains(err.Error(), "absent") {
		t.Fatalf("got %v, want an error naming the socket", err)
	}
}
