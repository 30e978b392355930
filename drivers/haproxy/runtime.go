package haproxy

import (
	"context"
	"errors"
	"net/netip"
)

// Runtime is HAProxy's runtime API as the driver uses it. Names are backend
// and server names exactly as in haproxy.cfg; the implementation refuses
// any name or path that is not a single safe token. Every read names what
// it reads: one backend, or one certificate, except the two whole reads
// (Backends, AllServersState) that only Sync uses.
type Runtime interface {
	// ServersState lists the servers of one backend (`show servers state
	// <backend>`); ErrNoBackend when HAProxy has no such backend.
	ServersState(ctx context.Context, backend string) ([]ServerState, error)
	// AllServersState lists the servers of every backend by backend name
	// (`show servers state`): the read-back of a Sync.
	AllServersState(ctx context.Context) (map[string][]ServerState, error)
	// Backends lists the names of every backend (`show backend`).
	Backends(ctx context.Context) ([]string, error)
	// AddServer adds a dynamic server, which starts in maintenance.
	AddServer(ctx context.Context, backend, server string, addr netip.AddrPort, weight int) error
	// DelServer deletes a server in maintenance; ErrServerBusy when it still
	// has connections.
	DelServer(ctx context.Context, backend, server string) error
	// SetWeight sets a server's weight (0-256).
	SetWeight(ctx context.Context, backend, server string, weight int) error
	// SetAddr moves a server to another address and port.
	SetAddr(ctx context.Context, backend, server string, addr netip.AddrPort) error
	// SetState sets a server's administrative state: ready, drain or maint.
	SetState(ctx context.Context, backend, server string, state AdminState) error
	// ShutdownSessions closes every connection of a server.
	ShutdownSessions(ctx context.Context, backend, server string) error
	// SetCertificate replaces a loaded certificate in memory (`set ssl
	// cert` with the PEM as payload, then `commit ssl cert`).
	SetCertificate(ctx context.Context, path string, pem []byte) error
	// CertificateFingerprint returns the SHA-1 fingerprint (upper-case
	// hex) of the leaf certificate HAProxy serves from path (`show ssl
	// cert <path>`).
	CertificateFingerprint(ctx context.Context, path string) (string, error)
	// Sessions returns the current connection count of every server of one
	// backend, by server name (`show stat <backend> 4 -1`).
	Sessions(ctx context.Context, backend string) (map[string]int, error)
}

// AdminState is a server's administrative state in `set server ... state`.
type AdminState string

// Administrative states.
const (
	StateReady AdminState = "ready"
	StateDrain AdminState = "drain"
	StateMaint AdminState = "maint"
)

// ServerState is one server line of `show servers state`.
type ServerState struct {
	Name   string
	Addr   netip.AddrPort
	Weight int // srv_uweight: the weight in force
	// Maint is true when the server is in maintenance (any of the
	// srv_admin_state maintenance bits).
	Maint bool
}

// Errors the runtime API reports that the driver acts on.
var (
	// ErrServerBusy: del server refused because connections remain.
	ErrServerBusy = errors.New("server still has connections")
	// ErrNoBackend: the backend does not exist in the running HAProxy.
	ErrNoBackend = errors.New("no such backend")
)
