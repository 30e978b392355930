//go:build e2e

package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/e2e/internal/lab"
	"github.com/switchman-lb/switchman/status"
)

// TestAgentHealth runs the agent's health checker against the lab's
// backends (HTTP /healthz every 1 s, timeout 500 ms, fall 2, rise 2): a
// failing backend's weight goes to 0 and comes back, fail_open decides
// what happens when every backend fails, and a removed backend drains.
func TestAgentHealth(t *testing.T) {
	l := lab.NewAgentLab(t)
	all := lab.Backends

	t.Run("down-and-up", func(t *testing.T) {
		const vip = "192.0.2.161"
		be2 := all[1]
		l.PutService(t, "hc", lab.SvcDef{"vip": vip, "port": 80, "backends": lab.BackendsDef(80, 1, all...), "health": lab.FastHTTPCheck()})
		addr := lab.IPVSHostPort(vip, 80)
		l.WaitUp(t, "hc", "TCP", addr, lab.WeightsOf(80, 1, all...))
		l.WaitStatus(t, 0, "hc", "3 healthy backends", appliedHealthy(3))
		lab.WaitHTTP(t, "http://"+addr+"/")

		be2Addr := lab.IPVSHostPort(be2.Addr, 80)
		lab.SetBackendHealth(t, be2.Name, false)
		took := timeWeight(t, addr, be2Addr, 0)
		t.Logf("FIGURE health detection (down-file written to weight 0 in ipvsadm, interval 1s x fall 2): %s", took.Round(time.Millisecond))
		// interval x fall, plus a wide margin for the emulated VM: what
		// this catches is detection by something other than the checks'
		// own cadence (a late periodic pass, a resync).
		if bound := lab.FastInterval*lab.FastFall + 10*time.Second; took > bound {
			t.Errorf("be2 reached weight 0 after %s, more than interval x fall + margin = %s", took, bound)
		}
		st := l.WaitStatus(t, 0, "hc", "be2 unhealthy", func(st status.Status) error {
			for _, b := range st.Backends {
				if b.Address == be2.Addr && !b.Healthy && b.Weight == 0 && b.LastError != "" {
					return nil
				}
			}
			return errors.New("be2 not reported unhealthy with weight 0 and its last error")
		})
		t.Logf("status: %+v", st.Backends)
		tally := lab.Tally(15, func() (string, error) { return lab.ClientGet("http://" + addr + "/") })
		t.Logf("15 requests with be2 down: %s", lab.TallyString(tally))
		requireNoErrors(t, tally)
		if tally[be2.Name] != 0 {
			t.Errorf("be2 still got %d of 15 new connections at weight 0", tally[be2.Name])
		}

		lab.SetBackendHealth(t, be2.Name, true)
		took = timeWeight(t, addr, be2Addr, 1)
		t.Logf("FIGURE health recovery (down-file removed to weight 1, rise 2): %s", took.Round(time.Millisecond))
		l.WaitStatus(t, 0, "hc", "3 healthy backends again", appliedHealthy(3))
		tally = lab.Tally(9, func() (string, error) { return lab.ClientGet("http://" + addr + "/") })
		requireNoErrors(t, tally)
		if tally[be2.Name] == 0 {
			t.Errorf("be2 got none of 9 requests after it recovered: %s", lab.TallyString(tally))
		}
	})

	t.Run("fail-open", func(t *testing.T) {
		const vip = "192.0.2.162"
		def := lab.SvcDef{"vip": vip, "port": 80, "fail_open": true, "backends": lab.BackendsDef(80, 1, all...), "health": lab.FastHTTPCheck()}
		l.PutService(t, "fo", def)
		addr := lab.IPVSHostPort(vip, 80)
		l.WaitUp(t, "fo", "TCP", addr, lab.WeightsOf(80, 1, all...))
		l.WaitStatus(t, 0, "fo", "3 healthy backends", appliedHealthy(3))

		for _, be := range all {
			lab.SetBackendHealth(t, be.Name, false)
		}
		l.WaitStatus(t, 0, "fo", "failing open with every backend unhealthy", func(st status.Status) error {
			if !st.FailingOpen {
				return errors.New("failing_open not set")
			}
			for _, b := range st.Backends {
				if b.Healthy {
					return fmt.Errorf("%s still healthy", b.Address)
				}
			}
			return nil
		})
		// the configured weights stay, and traffic still flows
		s := lab.WaitService(t, "TCP", addr, lab.WeightsOf(80, 1, all...))
		t.Logf("failing open: %+v", s.Dests)
		lab.WaitHTTP(t, "http://"+addr+"/")
		requireNoErrors(t, lab.Tally(6, func() (string, error) { return lab.ClientGet("http://" + addr + "/") }))

		def["fail_open"] = false
		l.PutService(t, "fo", def)
		lab.WaitService(t, "TCP", addr, lab.WeightsOf(80, 0, all...))
		l.WaitStatus(t, 0, "fo", "not failing open with fail_open false", func(st status.Status) error {
			if st.FailingOpen {
				return errors.New("failing_open still set")
			}
			return nil
		})

		for _, be := range all {
			lab.SetBackendHealth(t, be.Name, true)
		}
		l.WaitUp(t, "fo", "TCP", addr, lab.WeightsOf(80, 1, all...))
	})

	t.Run("drain", func(t *testing.T) {
		const vip = "192.0.2.163"
		const drain = 60 * time.Second
		def := lab.SvcDef{"vip": vip, "port": 80, "drain": "60s", "backends": lab.BackendsDef(80, 1, all...), "health": lab.HTTPCheck()}
		l.PutService(t, "drain", def)
		addr := lab.IPVSHostPort(vip, 80)
		l.WaitUp(t, "drain", "TCP", addr, lab.WeightsOf(80, 1, all...))
		l.WaitStatus(t, 0, "drain", "3 healthy backends", appliedHealthy(3))

		// The first traffic to the VIP: one keep-alive connection. Nothing
		// else has touched the backends through IPVS, so the backend it
		// lands on has exactly this one connection.
		var conn *keepAlive
		lab.WaitFor(t, 0, "a keep-alive connection to "+addr, func() error {
			c, err := dialKeepAlive(addr)
			if err == nil {
				conn = c
			}
			return err
		})
		defer conn.Close()
		who, err := conn.get("/whoami")
		if err != nil {
			t.Fatal(err)
		}
		var target lab.Backend
		for _, be := range all {
			if strings.HasPrefix(who, be.Name+" ") {
				target = be
			}
		}
		if target.Name == "" {
			t.Fatalf("/whoami answered %q", who)
		}
		t.Logf("the held connection is on %s (%s)", target.Name, who)

		var rest []lab.Backend
		for _, be := range all {
			if be != target {
				rest = append(rest, be)
			}
		}
		def["backends"] = lab.BackendsDef(80, 1, rest...)
		l.PutService(t, "drain", def)
		removed := time.Now()
		targetAddr := lab.IPVSHostPort(target.Addr, 80)
		want := lab.WeightsOf(80, 1, rest...)
		want[targetAddr] = 0
		s := l.WaitUp(t, "drain", "TCP", addr, want)
		d, _ := s.Dest(targetAddr)
		t.Logf("draining: %+v", d)
		if d.ActiveConn+d.InActConn == 0 {
			t.Errorf("the draining destination shows no connection: %+v", d)
		}
		l.WaitStatus(t, 0, "drain", target.Name+" draining", func(st status.Status) error {
			for _, b := range st.Backends {
				if b.Address == target.Addr && b.Draining && b.Weight == 0 {
					return nil
				}
			}
			return errors.New("not reported draining with weight 0")
		})
		// the held connection still works; new ones go elsewhere
		if got, err := conn.get("/"); err != nil || got != target.Name {
			t.Errorf("the held connection during the drain: %q, %v", got, err)
		}
		tally := lab.Tally(6, func() (string, error) { return lab.ClientGet("http://" + addr + "/") })
		requireNoErrors(t, tally)
		if tally[target.Name] != 0 {
			t.Errorf("the draining %s got %d new connections: %s", target.Name, tally[target.Name], lab.TallyString(tally))
		}

		// Close with a reset: IPVS keeps a gracefully closed connection in
		// TIME_WAIT (counted in InActConn) for 2 minutes, longer than the
		// drain; a reset leaves it in CLOSE for 10 s.
		if err := conn.reset(); err != nil {
			t.Fatal(err)
		}
		closed := time.Now()
		lab.WaitIPVS(t, drain, targetAddr+" deleted after its connection closed", func(svcs []lab.L4Service) error {
			s, ok := lab.FindIPVSService(svcs, "TCP", addr)
			if !ok {
				return errors.New("service missing")
			}
			if d, ok := s.Dest(targetAddr); ok {
				return fmt.Errorf("still present: %+v", d)
			}
			if len(s.Dests) != len(rest) {
				return fmt.Errorf("%d real servers, want %d", len(s.Dests), len(rest))
			}
			return nil
		})
		gone := time.Since(removed)
		t.Logf("FIGURE drain: destination deleted %s after its connection was reset, %s after the backend was removed (drain %s)",
			time.Since(closed).Round(time.Millisecond), gone.Round(time.Millisecond), drain)
		if gone > drain*3/4 {
			t.Errorf("the destination went %s after removal: the drain ran (nearly) to its %s deadline instead of ending when the connection did", gone, drain)
		}
	})
}

// timeWeight polls ipvsadm every 100 ms until real server dest of service
// addr has weight w, and returns how long that took (at most 60 s).
func timeWeight(t *testing.T, addr, dest string, w int) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(60 * time.Second)
	var last string
	for {
		svcs, err := lab.IPVSList()
		if err == nil {
			s, _ := lab.FindIPVSService(svcs, "TCP", addr)
			d, ok := s.Dest(dest)
			if ok && d.Weight == w {
				return time.Since(start)
			}
			last = fmt.Sprintf("%+v", s)
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s in %s did not reach weight %d in 60s: %s", dest, addr, w, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// keepAlive is one HTTP/1.1 connection from the client namespace that
// stays open between requests.
type keepAlive struct {
	c  net.Conn
	br *bufio.Reader
}

func dialKeepAlive(addr string) (*keepAlive, error) {
	c, err := lab.DialNS(lab.ClientNS, "tcp", addr, lab.RequestTimeout)
	if err != nil {
		return nil, err
	}
	return &keepAlive{c: c, br: bufio.NewReader(c)}, nil
}

// get sends GET path on the connection and returns the trimmed body.
func (k *keepAlive) get(path string) (string, error) {
	if err := k.c.SetDeadline(time.Now().Add(lab.RequestTimeout)); err != nil {
		return "", err
	}
	if _, err := fmt.Fprintf(k.c, "GET %s HTTP/1.1\r\nHost: lab\r\n\r\n", path); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(k.br, nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK || resp.Close {
		return "", fmt.Errorf("GET %s: %s (close %v)", path, resp.Status, resp.Close)
	}
	return strings.TrimSpace(string(b)), nil
}

// reset closes the connection with a TCP reset (SO_LINGER 0).
func (k *keepAlive) reset() error {
	if tc, ok := k.c.(*net.TCPConn); ok {
		if err := tc.SetLinger(0); err != nil {
			return err
		}
	}
	return k.c.Close()
}

// Close closes the connection (a no-op error after reset).
func (k *keepAlive) Close() { _ = k.c.Close() }
