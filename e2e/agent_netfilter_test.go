//go:build e2e

package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/status"
)

// TestAgentNetfilter runs the agent's netfilter driver in the lab: allow_cidrs
// lets only the listed sources reach a VIP, and preserve_client_ip false
// masquerades so a backend with no route back through the load balancer
// still serves.
func TestAgentNetfilter(t *testing.T) {
	l := newAgentLab(t)
	all := Backends

	t.Run("allow-cidrs", func(t *testing.T) {
		const vip = "192.0.2.171"
		const outside = "10.20.0.3"
		MustRunNS(t, ClientNS, IPBin, "addr", "add", outside+"/24", "dev", "eth0")
		t.Cleanup(func() { _, _ = RunNS(0, ClientNS, IPBin, "addr", "del", outside+"/24", "dev", "eth0") })

		def := svcDef{"vip": vip, "port": 80, "backends": backendsDef(80, 1, all...), "health": httpCheck()}
		l.putService(t, "acl", def)
		addr := IPVSHostPort(vip, 80)
		l.waitUp(t, "acl", "TCP", addr, weightsOf(80, 1, all...))
		// without allow_cidrs both sources connect
		for _, src := range []string{ClientAddr, outside} {
			WaitFor(t, 0, addr+" answering "+src, func() error {
				_, err := getFrom(src, addr, "/whoami", RequestTimeout)
				return err
			})
		}

		def["allow_cidrs"] = []string{ClientAddr + "/32"}
		l.putService(t, "acl", def)
		WaitFor(t, 0, "the agent dropping "+outside, func() error {
			if body, err := getFrom(outside, addr, "/", 2*time.Second); err == nil {
				return fmt.Errorf("%s still answered %q", outside, body)
			}
			return nil
		})
		t.Logf("SWITCHMAN-FILTER and the service chain:\n%s", MustRun(t, "iptables", "-S"))
		for i := 0; i < 3; i++ {
			who, err := getFrom(ClientAddr, addr, "/whoami", RequestTimeout)
			if err != nil {
				t.Fatalf("allowed source %s: %v", ClientAddr, err)
			}
			if !strings.Contains(who, " "+ClientAddr+":") {
				t.Errorf("allowed source: /whoami %q", who)
			}
			if body, err := getFrom(outside, addr, "/", 2*time.Second); err == nil {
				t.Fatalf("source %s outside allow_cidrs got an answer: %q", outside, body)
			} else if ne := net.Error(nil); !errors.As(err, &ne) || !ne.Timeout() {
				t.Errorf("source %s outside allow_cidrs: %v, want a timeout (dropped)", outside, err)
			}
		}

		delete(def, "allow_cidrs")
		l.putService(t, "acl", def)
		WaitFor(t, 0, outside+" allowed again once allow_cidrs is gone", func() error {
			_, err := getFrom(outside, addr, "/", 2*time.Second)
			return err
		})
	})

	// The filter is in place before the VIP answers: an outside client
	// dialling in a tight loop while the service is created never gets
	// through (issue 10, defect 5: IPVS used to be programmed first).
	t.Run("no-window-before-the-filter", func(t *testing.T) {
		const vip = "192.0.2.173"
		const outside = "10.20.0.4"
		MustRunNS(t, ClientNS, IPBin, "addr", "add", outside+"/24", "dev", "eth0")
		t.Cleanup(func() { _, _ = RunNS(0, ClientNS, IPBin, "addr", "del", outside+"/24", "dev", "eth0") })
		addr := IPVSHostPort(vip, 80)
		stop := make(chan struct{})
		leaked := make(chan string, 1)
		attempts := make(chan int, 4)
		for range 4 {
			go func() {
				n := 0
				defer func() { attempts <- n }()
				for {
					select {
					case <-stop:
						return
					default:
					}
					n++
					if body, err := getFrom(outside, addr, "/", 300*time.Millisecond); err == nil {
						select {
						case leaked <- body:
						default:
						}
						return
					}
				}
			}()
		}
		def := svcDef{"vip": vip, "port": 80, "backends": backendsDef(80, 1, all...), "health": httpCheck(), "allow_cidrs": []string{ClientAddr + "/32"}}
		l.putService(t, "acl-new", def)
		l.waitUp(t, "acl-new", "TCP", addr, weightsOf(80, 1, all...))
		WaitFor(t, 0, "the allowed client answered", func() error {
			_, err := getFrom(ClientAddr, addr, "/", RequestTimeout)
			return err
		})
		close(stop)
		total := 0
		for range 4 {
			total += <-attempts
		}
		select {
		case body := <-leaked:
			t.Fatalf("an outside client reached the new service before its filter was in place: %q", body)
		default:
		}
		t.Logf("%d dials from %s while the service came up: none answered", total, outside)
	})

	// A filter that cannot be installed keeps the service unreachable
	// (failed), never open: with iptables unusable the new service is not
	// created in IPVS at all; once iptables works again it comes up.
	t.Run("fail-closed", func(t *testing.T) {
		const vip = "192.0.2.174"
		bin, err := exec.LookPath("iptables")
		if err != nil {
			t.Fatal(err)
		}
		real, err := filepath.EvalSymlinks(bin)
		if err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(real)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(real, 0o644); err != nil {
			t.Fatal(err)
		}
		restored := false
		restore := func() {
			if !restored {
				restored = true
				if err := os.Chmod(real, st.Mode().Perm()); err != nil {
					t.Errorf("restore %s: %v", real, err)
				}
			}
		}
		t.Cleanup(restore)
		addr := IPVSHostPort(vip, 80)
		def := svcDef{"vip": vip, "port": 80, "backends": backendsDef(80, 1, all...), "health": httpCheck(), "allow_cidrs": []string{ClientAddr + "/32"}}
		l.putService(t, "acl-broken", def)
		got := l.waitStatus(t, 0, "acl-broken", "failed", func(s status.Status) error {
			if s.State != status.StateFailed || !strings.Contains(s.Error, "netfilter") {
				return fmt.Errorf("state %s %q", s.State, s.Error)
			}
			return nil
		})
		t.Logf("status with iptables unusable: %s", got.Error)
		for i := 0; i < 3; i++ {
			if _, ok := FindIPVSService(MustIPVSList(t), "TCP", addr); ok {
				t.Fatal("the service was created in IPVS without its filter")
			}
			if body, err := getFrom(ClientAddr, addr, "/", 2*time.Second); err == nil {
				t.Fatalf("the service answered without its filter: %q", body)
			}
		}
		restore()
		l.waitUp(t, "acl-broken", "TCP", addr, weightsOf(80, 1, all...))
		WaitFor(t, 0, "the service answering once filtered", func() error {
			_, err := getFrom(ClientAddr, addr, "/", RequestTimeout)
			return err
		})
	})

	t.Run("preserve-client-ip", func(t *testing.T) {
		const vip = "192.0.2.172"
		be := all[2]
		def := svcDef{"vip": vip, "port": 80, "preserve_client_ip": true, "backends": backendsDef(80, 1, be), "health": httpCheck()}
		l.putService(t, "keepip", def)
		addr := IPVSHostPort(vip, 80)
		l.waitUp(t, "keepip", "TCP", addr, weightsOf(80, 1, be))
		var who string
		WaitFor(t, 0, addr+" answering", func() error {
			var err error
			who, err = getFrom(ClientAddr, addr, "/whoami", RequestTimeout)
			return err
		})
		if !strings.HasPrefix(who, be.Name+" "+ClientAddr+":") {
			t.Errorf("preserve_client_ip true: /whoami %q, want %s seeing %s", who, be.Name, ClientAddr)
		}

		// Take away the backend's route back to the client: it keeps only
		// its own segment, where the load balancer is 10.10.0.1.
		MustRunNS(t, be.Name, IPBin, "route", "del", "default")
		t.Cleanup(func() {
			_, _ = RunNS(0, be.Name, IPBin, "route", "replace", "default", "via", LBBackendSide)
		})
		if body, err := getFrom(ClientAddr, addr, "/whoami", 3*time.Second); err == nil {
			t.Fatalf("with the client's address kept and no route back, %s still answered %q", be.Name, body)
		}

		def["preserve_client_ip"] = false
		l.putService(t, "keepip", def)
		WaitFor(t, 0, addr+" answering through masquerade", func() error {
			var err error
			who, err = getFrom(ClientAddr, addr, "/whoami", 3*time.Second)
			return err
		})
		t.Logf("masqueraded: /whoami %q", who)
		if !strings.HasPrefix(who, be.Name+" "+LBBackendSide+":") {
			t.Errorf("preserve_client_ip false: /whoami %q, want %s seeing the load balancer %s", who, be.Name, LBBackendSide)
		}
		tally := Tally(5, func() (string, error) { return getFrom(ClientAddr, addr, "/", 3*time.Second) })
		requireNoErrors(t, tally)
	})
}

// getFrom sends GET path to addr from source address src in the client
// namespace, on a new connection, within timeout, and returns the trimmed
// body.
func getFrom(src, addr, path string, timeout time.Duration) (string, error) {
	var c net.Conn
	err := InNetns(ClientNS, func() error {
		d := net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		var err error
		c, err = d.Dial("tcp", addr)
		return err
	})
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return "", err
	}
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n", path); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s from %s: %s", path, src, resp.Status)
	}
	return strings.TrimSpace(string(b)), nil
}
