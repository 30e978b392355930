package haproxy

import (
	"context"
	"errors"
	"net/netip"

	"github.com/switchman-lb/switchman/render"
)

// Runtime is HAProxy's runtime API as the driver uses it. Names are backend
// and server names exactly as in haproxy.cfg; the implementation refuses
// any name or path that is not a single safe token. Every read names what
// it reads: one backend, one map, one crt-list or one certificate, except
// the two whole reads (Backends, AllServersState) that only Sync uses.
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

	// ReplaceMap replaces every entry of a map file HAProxy loaded, in one
	// atomic step: `prepare map`, `add map @<ver>` (the entries as
	// payloads of a few KiB each), `commit map @<ver>`. Requests see the
	// old entries or the new ones, never a mix.
	ReplaceMap(ctx context.Context, path string, entries []render.HTTPMapEntry) error
	// ShowMap lists the entries a map matches against (`show map <path>`).
	ShowMap(ctx context.Context, path string) ([]render.HTTPMapEntry, error)
	// NewCertificate makes an empty entry in HAProxy's certificate store
	// (`new ssl cert`), to be filled with SetCertificate; ErrCertExists when
	// the store holds path already.
	NewCertificate(ctx context.Context, path string) error
	// DelCertificate removes a certificate no crt-list uses any more from
	// the store (`del ssl cert`).
	DelCertificate(ctx context.Context, path string) error
	// AddCrtListEntry adds a certificate of the store to a crt-list, which
	// every bind line using the list serves at once, chosen by SNI (`add
	// ssl crt-list`).
	AddCrtListEntry(ctx context.Context, list, cert string) error
	// DelCrtListEntry removes a certificate from a crt-list (`del ssl
	// crt-list`).
	DelCrtListEntry(ctx context.Context, list, cert string) error
	// CrtList lists the certificates of a crt-list (`show ssl crt-list`).
	CrtList(ctx context.Context, list string) ([]string, error)
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
	// ErrCertExists: new ssl cert found the certificate in the store.
	ErrCertExists = errors.New("certificate already in the store")
)
