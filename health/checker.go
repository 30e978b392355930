package health

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"syscall"
	"time"

	"github.com/switchman-lb/switchman/spec"
)

// Checker runs one kind of check against one address.
type Checker interface {
	// Check runs one check and returns nil when the backend is healthy.
	// It returns when ctx is done at the latest; ctx carries the check's
	// timeout as its deadline.
	Check(ctx context.Context) error
	// String describes the check, e.g. "tcp 10.1.1.2:8080".
	String() string
}

// maxBody bounds how much of an HTTP response body a check reads before it
// closes the connection.
const maxBody = 4096

// NewChecker returns the checker for a target's settings. Protocol "none"
// gives a checker that always succeeds (the Scheduler never runs it).
func NewChecker(t Target) (Checker, error) {
	addr := t.CheckAddr()
	h := t.Health
	switch h.Protocol {
	case spec.HealthTCP:
		return newTCPChecker(addr, timeout(h))
	case spec.HealthHTTP, spec.HealthHTTPS:
		return newHTTPChecker(addr, h), nil
	case spec.HealthUDP:
		payload := []byte(h.Payload)
		if len(payload) == 0 {
			payload = []byte("\n")
		}
		return udpChecker{addr: addr, payload: payload}, nil
	case spec.HealthNone:
		return noneChecker{}, nil
	}
	return nil, fmt.Errorf("health.protocol %q: unknown check kind", h.Protocol)
}

// httpChecker sends GET path and succeeds on any 2xx status. Every check
// opens a fresh connection (no keep-alive reuse) and reads at most maxBody
// bytes of the body. Redirects are not followed: a 3xx is a failure.
type httpChecker struct {
	desc   string
	url    string
	host   string
	client *http.Client
}

func newHTTPChecker(addr netip.AddrPort, h spec.Health) *httpChecker {
	scheme := "http"
	if h.Protocol == spec.HealthHTTPS {
		scheme = "https"
	}
	path := h.Path
	if path == "" {
		path = "/"
	}
	// The Host header: the SNI name when one is set (the virtual host the
	// backend serves), else the address checked, as a client dialing it
	// directly would send.
	host := addr.String()
	if h.SNI != "" {
		host = h.SNI
		if (scheme == "https" && addr.Port() != 443) || (scheme == "http" && addr.Port() != 80) {
			host = net.JoinHostPort(h.SNI, strconv.Itoa(int(addr.Port())))
		}
	}
	tr := &http.Transport{
		DisableKeepAlives:  true,
		DisableCompression: true,
		Proxy:              nil, // never via HTTP_PROXY: checks go to the backend itself
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			d := net.Dialer{KeepAlive: -1}
			return d.DialContext(ctx, network, addr.String())
		},
		MaxResponseHeaderBytes: 16 << 10,
		ForceAttemptHTTP2:      false,
	}
	if scheme == "https" {
		sni := h.SNI
		if sni == "" {
			// Verification then checks the certificate's IP SANs; Go
			// sends no SNI for an IP address.
			sni = addr.Addr().String()
		}
		tr.TLSClientConfig = &tls.Config{
			ServerName:         sni,
			InsecureSkipVerify: !h.Verify, //nolint:gosec // checks do not verify unless health.verify is set
			NextProtos:         []string{"http/1.1"},
		}
	}
	return &httpChecker{
		desc: fmt.Sprintf("%s %s%s", scheme, addr, path),
		url:  scheme + "://" + addr.String() + path,
		host: host,
		client: &http.Client{
			Transport:     tr,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}
}

func (c *httpChecker) String() string { return c.desc }

func (c *httpChecker) Check(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url, nil)
	if err != nil {
		return fmt.Errorf("%s: %w", c.desc, err)
	}
	req.Host = c.host
	req.Header.Set("User-Agent", "switchman-health")
	resp, err := c.client.Do(req)
	if err != nil {
		return fmt.Errorf("%s: %w", c.desc, err)
	}
	_, _ = io.CopyN(io.Discard, resp.Body, maxBody)
	_ = resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("%s: status %d, want 2xx", c.desc, resp.StatusCode)
	}
	return nil
}

// udpChecker sends a payload from a connected UDP socket and succeeds on any
// reply before the deadline. An ICMP port unreachable comes back as
// ECONNREFUSED on the connected socket and is a failure.
type udpChecker struct {
	addr    netip.AddrPort
	payload []byte
}

func (c udpChecker) String() string { return "udp " + c.addr.String() }

func (c udpChecker) Check(ctx context.Context) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "udp", c.addr.String())
	if err != nil {
		return fmt.Errorf("udp %s: %w", c.addr, err)
	}
	defer conn.Close()
	// Close the socket when ctx ends early (Run stopping); the deadline
	// covers the timeout itself.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if _, err := conn.Write(c.payload); err != nil {
		return c.wrap(err)
	}
	buf := make([]byte, 512)
	if _, err := conn.Read(buf); err != nil {
		return c.wrap(err)
	}
	return nil
}

func (c udpChecker) wrap(err error) error {
	if errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("udp %s: port unreachable: %w", c.addr, err)
	}
	return fmt.Errorf("udp %s: no reply: %w", c.addr, err)
}

// noneChecker always succeeds.
type noneChecker struct{}

func (noneChecker) String() string              { return "none" }
func (noneChecker) Check(context.Context) error { return nil }
