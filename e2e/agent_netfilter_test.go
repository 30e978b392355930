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

	"github.com/switchman-lb/switchman/e2e/internal/lab"
	"github.com/switchman-lb/switchman/status"
)

// TestAgentNetfilter runs the agent's netfilter driver in the lab: allow_cidrs
// lets only the listed sources reach a VIP, and preserve_client_ip false
// masquerades so a backend with no route back through the load balancer
// still serves.
func TestAgentNetfilter(t *testing.T) {
	l := lab.NewAgentLab(t)
	all := lab.Backends

	t.Run("allow-cidrs", func(t *testing.T) {
		const vip = "192.0.2.171"
		const outside = "10.20.0.3"
		lab.MustRunNS(t, lab.ClientNS, lab.IPBin, "addr", "add", outside+"/24", "dev", "eth0")
		t.Cleanup(func() { _, _ = lab.RunNS(0, lab.ClientNS, lab.IPBin, "addr", "del", outside+"/24", "dev", "eth0") })

		def := lab.SvcDef{"vip": vip, "port": 80, "backends": lab.BackendsDef(80, 1, all...), "health": lab.HTTPCheck()}
		l.PutService(t, "acl", def)
		addr := lab.IPVSHostPort(vip, 80)
		l.WaitUp(t, "acl", "TCP", addr, lab.WeightsOf(80, 1, all...))
		// without allow_cidrs both sources connect
		for _, src := range []string{lab.ClientAddr, outside} {
			lab.WaitFor(t, 0, addr+" answering "+src, func() error {
				_, err := getFrom(src, addr, "/whoami", lab.RequestTimeout)
				return err
			})
		}

		def["allow_cidrs"] = []string{lab.ClientAddr + "/32"}
		l.PutService(t, "acl", def)
		lab.WaitFor(t, 0, "the agent dropping "+outside, func() error {
			if body, err := getFrom(outside, addr, "/", 2*time.Second); err == nil {
				return fmt.Errorf("%s still answered %q", outside, body)
			}
			return nil
		})
		t.Logf("SWITCHMAN-FILTER and the service chain:\n%s", lab.MustRun(t, "iptables", "-S"))
		for i := 0; i < 3; i++ {
			who, err := getFrom(lab.ClientAddr, addr, "/whoami", lab.RequestTimeout)
			if err != nil {
				t.Fatalf("allowed source %s: %v", lab.ClientAddr, err)
			}
			if !strings.Contains(who, " "+lab.ClientAddr+":") {
				t.Errorf("allowed source: /whoami %q", who)
			}
			if body, err := getFrom(outside, addr, "/", 2*time.Second); err == nil {
				t.Fatalf("source %s outside allow_cidrs got an answer: %q", outside, body)
			} else if ne := net.Error(nil); !errors.As(err, &ne) || !ne.Timeout() {
				t.Errorf("source %s outside allow_cidrs: %v, want a timeout (dropped)", outside, err)
			}
		}

		delete(def, "allow_cidrs")
		l.PutService(t, "acl", def)
		lab.WaitFor(t, 0, outside+" allowed again once allow_cidrs is gone", func() error {
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
		lab.MustRunNS(t, lab.ClientNS, lab.IPBin, "addr", "add", outside+"/24", "dev", "eth0")
		t.Cleanup(func() { _, _ = lab.RunNS(0, lab.ClientNS, lab.IPBin, "addr", "del", outside+"/24", "dev", "eth0") })
		addr := lab.IPVSHostPort(vip, 80)
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
		def := lab.SvcDef{"vip": vip, "port": 80, "backends": lab.BackendsDef(80, 1, all...), "health": lab.HTTPCheck(), "allow_cidrs": []string{lab.ClientAddr + "/32"}}
		l.PutService(t, "acl-new", def)
		l.WaitUp(t, "acl-new", "TCP", addr, lab.WeightsOf(80, 1, all...))
		lab.WaitFor(t, 0, "the allowed client answered", func() error {
			_, err := getFrom(lab.ClientAddr, addr, "/", lab.RequestTimeout)
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
		addr := lab.IPVSHostPort(vip, 80)
		def := lab.SvcDef{"vip": vip, "port": 80, "backends": lab.BackendsDef(80, 1, all...), "health": lab.HTTPCheck(), "allow_cidrs": []string{lab.ClientAddr + "/32"}}
		l.PutService(t, "acl-broken", def)
		got := l.WaitStatus(t, 0, "acl-broken", "failed", func(s status.Status) error {
			if s.State != status.StateFailed || !strings.Contains(s.Error, "netfilter") {
				return fmt.Errorf("state %s %q", s.State, s.Error)
			}
			return nil
		})
		t.Logf("status with iptables unusable: %s", got.Error)
		for i := 0; i < 3; i++ {
			if _, ok := lab.FindIPVSService(lab.MustIPVSList(t), "TCP", addr); ok {
				t.Fatal("the service was created in IPVS without its filter")
			}
			if body, err := getFrom(lab.ClientAddr, addr, "/", 2*time.Second); err == nil {
				t.Fatalf("the service answered without its filter: %q", body)
			}
		}
		restore()
		l.WaitUp(t, "acl-broken", "TCP", addr, lab.WeightsOf(80, 1, all...))
		lab.WaitFor(t, 0, "the service answering once filtered", func() error {
			_, err := getFrom(lab.ClientAddr, addr, "/", lab.RequestTimeout)
			return err
		})
	})

	t.Run("preserve-client-ip", func(t *testing.T) {
		const vip = "192.0.2.172"
		be := all[2]
		def := lab.SvcDef{"vip": vip, "port": 80, "preserve_client_ip": true, "backends": lab.BackendsDef(80, 1, be), "health": lab.HTTPCheck()}
		l.PutService(t, "keepip", def)
		addr := lab.IPVSHostPort(vip, 80)
		l.WaitUp(t, "keepip", "TCP", addr, lab.WeightsOf(80, 1, be))
		var who string
		lab.WaitFor(t, 0, addr+" answering", func() error {
			var err error
			who, err = getFrom(lab.ClientAddr, addr, "/whoami", lab.RequestTimeout)
			return err
		})
		if !strings.HasPrefix(who, be.Name+" "+lab.ClientAddr+":") {
			t.Errorf("preserve_client_ip true: /whoami %q, want %s seeing %s", who, be.Name, lab.ClientAddr)
		}

		// Take away the backend's route back to the client: it keeps only
		// its own segment, where the load balancer is 10.10.0.1.
		lab.MustRunNS(t, be.Name, lab.IPBin, "route", "del", "default")
		t.Cleanup(func() {
			_, _ = lab.RunNS(0, be.Name, lab.IPBin, "route", "replace", "default", "via", lab.LBBackendSide)
		})
		if body, err := getFrom(lab.ClientAddr, addr, "/whoami", 3*time.Second); err == nil {
			t.Fatalf("with the client's address kept and no route back, %s still answered %q", be.Name, body)
		}

		def["preserve_client_ip"] = false
		l.PutService(t, "keepip", def)
		lab.WaitFor(t, 0, addr+" answering through masquerade", func() error {
			var err error
			who, err = getFrom(lab.ClientAddr, addr, "/whoami", 3*time.Second)
			return err
		})
		t.Logf("masqueraded: /whoami %q", who)
		if !strings.HasPrefix(who, be.Name+" "+lab.LBBackendSide+":") {
			t.Errorf("preserve_client_ip false: /whoami %q, want %s seeing the load balancer %s", who, be.Name, lab.LBBackendSide)
		}
		tally := lab.Tally(5, func() (string, error) { return getFrom(lab.ClientAddr, addr, "/", 3*time.Second) })
		requireNoErrors(t, tally)
	})
}

// getFrom sends GET path to addr from source address src in the client
// namespace, on a new connection, within timeout, and returns the trimmed
// body.
func getFrom(src, addr, path string, timeout time.Duration) (string, error) {
	var c net.Conn
	err := lab.InNetns(lab.ClientNS, func() error {
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
