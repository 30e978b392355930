package haproxy

import (
	"bytes"
	"context"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/switchman-lb/switchman/render"
)

// socketRuntime speaks HAProxy's runtime API over its admin Unix socket:
// one connection per command (HAProxy's non-interactive mode answers and
// closes), each bounded by a deadline.
type socketRuntime struct {
	path    string
	timeout time.Duration
}

// newSocketRuntime returns a Runtime over the admin socket at path.
func newSocketRuntime(path string, timeout time.Duration) *socketRuntime {
	return &socketRuntime{path: path, timeout: timeout}
}

// cliExchange sends one command line, an optional payload (the runtime
// API's `<<` syntax: the command ends with " <<", the payload follows and
// an empty line ends it) and returns the whole answer. halfClose shuts the
// write side after sending, which the master CLI needs to answer.
func cliExchange(ctx context.Context, path string, timeout time.Duration, cmd string, payload []byte, halfClose bool) (string, error) {
	if strings.ContainsAny(cmd, "\r\n;") {
		return "", fmt.Errorf("runtime command %q contains a line break or ';'", cmd)
	}
	if payload != nil && bytes.Contains(append([]byte{'\n'}, payload...), []byte("\n\n")) {
		return "", errors.New("runtime payload contains an empty line, which would end it early")
	}
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	var dialer net.Dialer
	dctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	conn, err := dialer.DialContext(dctx, "unix", path)
	if err != nil {
		return "", fmt.Errorf("runtime API %s: %w", path, err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(deadline); err != nil {
		return "", err
	}
	var msg bytes.Buffer
	msg.WriteString(cmd)
	if payload != nil {
		msg.WriteString(" <<\n")
		msg.Write(bytes.TrimRight(payload, "\n"))
		msg.WriteString("\n")
	}
	msg.WriteString("\n")
	if _, err := conn.Write(msg.Bytes()); err != nil {
		return "", fmt.Errorf("runtime API %s: %q: %w", path, firstWords(cmd), err)
	}
	if halfClose {
		if uc, ok := conn.(*net.UnixConn); ok {
			if err := uc.CloseWrite(); err != nil {
				return "", err
			}
		}
	}
	out, err := io.ReadAll(conn)
	if err != nil {
		return "", fmt.Errorf("runtime API %s: %q: %w", path, firstWords(cmd), err)
	}
	return string(out), nil
}

// firstWords keeps errors short: the command without its arguments' tail.
func firstWords(cmd string) string {
	f := strings.Fields(cmd)
	return strings.Join(f[:min(len(f), 4)], " ")
}

func (r *socketRuntime) do(ctx context.Context, cmd string, payload []byte) (string, error) {
	return cliExchange(ctx, r.path, r.timeout, cmd, payload, false)
}

// expect runs cmd and fails unless the trimmed answer starts with want
// (an empty want: the answer must be empty, HAProxy's silent success).
func (r *socketRuntime) expect(ctx context.Context, cmd string, payload []byte, want string) error {
	out, err := r.do(ctx, cmd, payload)
	if err != nil {
		return err
	}
	got := strings.TrimSpace(out)
	if (want == "" && got != "") || !strings.HasPrefix(got, want) {
		return fmt.Errorf("haproxy refused %q: %s", firstWords(cmd), got)
	}
	return nil
}

func checkServer(backend, server string) error {
	if err := render.CheckHAProxyToken("backend", backend); err != nil {
		return err
	}
	return render.CheckHAProxyServerName(server)
}

func (r *socketRuntime) ServersState(ctx context.Context, backend string) ([]ServerState, error) {
	if err := render.CheckHAProxyToken("backend", backend); err != nil {
		return nil, err
	}
	out, err := r.do(ctx, "show servers state "+backend, nil)
	if err != nil {
		return nil, err
	}
	all, err := parseServersState(out)
	if err != nil {
		return nil, fmt.Errorf("backend %s: %w", backend, err)
	}
	return all[backend], nil
}

func (r *socketRuntime) AllServersState(ctx context.Context) (map[string][]ServerState, error) {
	out, err := r.do(ctx, "show servers state", nil)
	if err != nil {
		return nil, err
	}
	return parseServersState(out)
}

func (r *socketRuntime) Backends(ctx context.Context) ([]string, error) {
	out, err := r.do(ctx, "show backend", nil)
	if err != nil {
		return nil, err
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) == 0 || lines[0] != "# name" {
		return nil, fmt.Errorf("unexpected show backend answer: %.80q", out)
	}
	var names []string
	for _, l := range lines[1:] {
		if l = strings.TrimSpace(l); l != "" {
			names = append(names, l)
		}
	}
	return names, nil
}

// parseServersState reads `show servers state` output: a version line,
// a "# be_id be_name ..." header naming the columns, then one line per
// server. It returns the servers by backend name.
func parseServersState(out string) (map[string][]ServerState, error) {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) > 0 && strings.HasPrefix(lines[0], "Can't find backend") {
		return nil, fmt.Errorf("%w: %s", ErrNoBackend, lines[0])
	}
	if len(lines) < 2 || lines[0] != "1" || !strings.HasPrefix(lines[1], "# ") {
		return nil, fmt.Errorf("unexpected show servers state answer: %.80q", out)
	}
	col := map[string]int{}
	for i, name := range strings.Fields(strings.TrimPrefix(lines[1], "# ")) {
		col[name] = i
	}
	for _, c := range []string{"be_name", "srv_name", "srv_addr", "srv_port", "srv_uweight", "srv_admin_state"} {
		if _, ok := col[c]; !ok {
			return nil, fmt.Errorf("show servers state has no %s column", c)
		}
	}
	res := map[string][]ServerState{}
	for _, l := range lines[2:] {
		f := strings.Fields(l)
		if len(f) < len(col) || strings.HasPrefix(l, "#") {
			continue
		}
		addr, err := netip.ParseAddr(f[col["srv_addr"]])
		if err != nil {
			return nil, fmt.Errorf("show servers state: %q: %w", l, err)
		}
		port, err1 := strconv.ParseUint(f[col["srv_port"]], 10, 16)
		w, err2 := strconv.Atoi(f[col["srv_uweight"]])
		admin, err3 := strconv.Atoi(f[col["srv_admin_state"]])
		if err := errors.Join(err1, err2, err3); err != nil {
			return nil, fmt.Errorf("show servers state: %q: %w", l, err)
		}
		// Maintenance bits: forced (0x01), inherited (0x02), from the
		// configuration (0x04), from DNS resolution (0x20).
		be := f[col["be_name"]]
		res[be] = append(res[be], ServerState{Name: f[col["srv_name"]], Addr: netip.AddrPortFrom(addr, uint16(port)), Weight: w, Maint: admin&0x27 != 0})
	}
	return res, nil
}

func (r *socketRuntime) AddServer(ctx context.Context, backend, server string, addr netip.AddrPort, weight int) error {
	if err := checkServer(backend, server); err != nil {
		return err
	}
	return r.expect(ctx, fmt.Sprintf("add server %s/%s %s weight %d", backend, server, addr, weight), nil, "New server registered.")
}

func (r *socketRuntime) DelServer(ctx context.Context, backend, server string) error {
	if err := checkServer(backend, server); err != nil {
		return err
	}
	out, err := r.do(ctx, fmt.Sprintf("del server %s/%s", backend, server), nil)
	if err != nil {
		return err
	}
	got := strings.TrimSpace(out)
	switch {
	case strings.HasPrefix(got, "Server deleted."):
		return nil
	case strings.Contains(got, "connections attached") || strings.Contains(got, "has active") || strings.Contains(got, "connection"):
		return fmt.Errorf("del server %s/%s: %w: %s", backend, server, ErrServerBusy, got)
	}
	return fmt.Errorf("haproxy refused del server %s/%s: %s", backend, server, got)
}

func (r *socketRuntime) SetWeight(ctx context.Context, backend, server string, weight int) error {
	if err := checkServer(backend, server); err != nil {
		return err
	}
	return r.expect(ctx, fmt.Sprintf("set server %s/%s weight %d", backend, server, weight), nil, "")
}

func (r *socketRuntime) SetAddr(ctx context.Context, backend, server string, addr netip.AddrPort) error {
	if err := checkServer(backend, server); err != nil {
		return err
	}
	out, err := r.do(ctx, fmt.Sprintf("set server %s/%s addr %s port %d", backend, server, addr.Addr(), addr.Port()), nil)
	if err != nil {
		return err
	}
	if got := strings.TrimSpace(out); !strings.Contains(got, "changed from") && !strings.Contains(got, "no need to change") {
		return fmt.Errorf("haproxy refused set server %s/%s addr: %s", backend, server, got)
	}
	return nil
}

func (r *socketRuntime) SetState(ctx context.Context, backend, server string, state AdminState) error {
	if err := checkServer(backend, server); err != nil {
		return err
	}
	switch state {
	case StateReady, StateDrain, StateMaint:
	default:
		return fmt.Errorf("unknown server state %q", state)
	}
	return r.expect(ctx, fmt.Sprintf("set server %s/%s state %s", backend, server, state), nil, "")
}

func (r *socketRuntime) ShutdownSessions(ctx context.Context, backend, server string) error {
	if err := checkServer(backend, server); err != nil {
		return err
	}
	return r.expect(ctx, fmt.Sprintf("shutdown sessions server %s/%s", backend, server), nil, "")
}

func (r *socketRuntime) SetCertificate(ctx context.Context, path string, pem []byte) error {
	if err := render.CheckHAProxyPath("certificate", path); err != nil {
		return err
	}
	if err := r.expect(ctx, "set ssl cert "+path, pem, "Transaction "); err != nil {
		return err
	}
	out, err := r.do(ctx, "commit ssl cert "+path, nil)
	if err != nil {
		return err
	}
	if !strings.Contains(out, "Success!") {
		// Drop the transaction so the next attempt starts clean.
		_, _ = r.do(ctx, "abort ssl cert "+path, nil)
		return fmt.Errorf("haproxy refused commit ssl cert %s: %s", path, strings.TrimSpace(out))
	}
	return nil
}

func (r *socketRuntime) CertificateFingerprint(ctx context.Context, path string) (string, error) {
	if err := render.CheckHAProxyPath("certificate", path); err != nil {
		return "", err
	}
	out, err := r.do(ctx, "show ssl cert "+path, nil)
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "SHA1 FingerPrint" {
			return strings.ToUpper(strings.TrimSpace(v)), nil
		}
	}
	return "", fmt.Errorf("show ssl cert %s: no fingerprint in the answer: %.120q", path, out)
}

func (r *socketRuntime) Sessions(ctx context.Context, backend string) (map[string]int, error) {
	if err := render.CheckHAProxyToken("backend", backend); err != nil {
		return nil, err
	}
	out, err := r.do(ctx, "show stat "+backend+" 4 -1", nil)
	if err != nil {
		return nil, err
	}
	if strings.HasPrefix(out, "No such proxy") {
		return nil, fmt.Errorf("%w: %s", ErrNoBackend, backend)
	}
	all, err := parseStat(out)
	if err != nil {
		return nil, err
	}
	return all[backend], nil
}

// parseStat reads the scur (current sessions) column of `show stat` CSV for
// every server line, by proxy and server name.
func parseStat(out string) (map[string]map[string]int, error) {
	rd := csv.NewReader(strings.NewReader(strings.TrimPrefix(out, "# ")))
	rd.FieldsPerRecord = -1
	recs, err := rd.ReadAll()
	if err != nil {
		return nil, fmt.Errorf("show stat: %w", err)
	}
	if len(recs) == 0 {
		return nil, errors.New("show stat: empty answer")
	}
	col := map[string]int{}
	for i, c := range recs[0] {
		col[c] = i
	}
	px, sv, sc := col["pxname"], col["svname"], col["scur"]
	if _, ok := col["scur"]; !ok {
		return nil, errors.New("show stat: no scur column")
	}
	res := map[string]map[string]int{}
	for _, r := range recs[1:] {
		if len(r) <= max(px, sv, sc) || r[sv] == "FRONTEND" || r[sv] == "BACKEND" {
			continue
		}
		n, err := strconv.Atoi(r[sc])
		if err != nil {
			continue
		}
		if res[r[px]] == nil {
			res[r[px]] = map[string]int{}
		}
		res[r[px]][r[sv]] = n
	}
	return res, nil
}

// mapChunk bounds the payload of one `add map` command: HAProxy reads a
// command with its payload into one buffer (tune.bufsize, 16 KiB by
// default).
const mapChunk = 8 << 10

func checkMapEntries(entries []render.HTTPMapEntry) error {
	for _, e := range entries {
		if err := render.CheckHTTPMapKey(e.Key); err != nil {
			return err
		}
		if err := render.CheckHTTPSlot(e.Backend); err != nil {
			return err
		}
	}
	return nil
}

func (r *socketRuntime) ReplaceMap(ctx context.Context, path string, entries []render.HTTPMapEntry) error {
	if err := render.CheckHAProxyPath("map", path); err != nil {
		return err
	}
	if err := checkMapEntries(entries); err != nil {
		return err
	}
	out, err := r.do(ctx, "prepare map "+path, nil)
	if err != nil {
		return err
	}
	_, v, ok := strings.Cut(strings.TrimSpace(out), "New version created:")
	ver, verr := strconv.ParseUint(strings.TrimSpace(v), 10, 32)
	if !ok || verr != nil {
		return fmt.Errorf("haproxy refused prepare map %s: %s", path, strings.TrimSpace(out))
	}
	at := "@" + strconv.FormatUint(ver, 10) + " " + path
	var chunk bytes.Buffer
	flush := func() error {
		if chunk.Len() == 0 {
			return nil
		}
		defer chunk.Reset()
		return r.expect(ctx, "add map "+at, chunk.Bytes(), "")
	}
	for _, e := range entries {
		if chunk.Len()+len(e.Key)+len(e.Backend)+2 > mapChunk {
			if err := flush(); err != nil {
				return err
			}
		}
		chunk.WriteString(e.Key + " " + e.Backend + "\n")
	}
	if err := flush(); err != nil {
		return err
	}
	// Committing an empty version clears the map atomically.
	return r.expect(ctx, "commit map "+at, nil, "")
}

func (r *socketRuntime) ShowMap(ctx context.Context, path string) ([]render.HTTPMapEntry, error) {
	if err := render.CheckHAProxyPath("map", path); err != nil {
		return nil, err
	}
	out, err := r.do(ctx, "show map "+path, nil)
	if err != nil {
		return nil, err
	}
	var entries []render.HTTPMapEntry
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) == 0:
		case len(f) == 3 && strings.HasPrefix(f[0], "0x"):
			entries = append(entries, render.HTTPMapEntry{Key: f[1], Backend: f[2]})
		default:
			return nil, fmt.Errorf("show map %s: unexpected answer: %.120q", path, out)
		}
	}
	return entries, nil
}

func (r *socketRuntime) NewCertificate(ctx context.Context, path string) error {
	if err := render.CheckHAProxyPath("certificate", path); err != nil {
		return err
	}
	out, err := r.do(ctx, "new ssl cert "+path, nil)
	if err != nil {
		return err
	}
	switch got := strings.TrimSpace(out); {
	case strings.HasPrefix(got, "New empty certificate store"):
		return nil
	case strings.Contains(got, "already exists"):
		return fmt.Errorf("new ssl cert %s: %w", path, ErrCertExists)
	default:
		return fmt.Errorf("haproxy refused new ssl cert %s: %s", path, got)
	}
}

func (r *socketRuntime) DelCertificate(ctx context.Context, path string) error {
	if err := render.CheckHAProxyPath("certificate", path); err != nil {
		return err
	}
	out, err := r.do(ctx, "del ssl cert "+path, nil)
	if err != nil {
		return err
	}
	if got := strings.TrimSpace(out); !strings.HasSuffix(got, "deleted!") {
		return fmt.Errorf("haproxy refused del ssl cert %s: %s", path, got)
	}
	return nil
}

func checkCrtList(list, cert string) error {
	if err := render.CheckHAProxyPath("crt-list", list); err != nil {
		return err
	}
	return render.CheckHAProxyPath("certificate", cert)
}

func (r *socketRuntime) AddCrtListEntry(ctx context.Context, list, cert string) error {
	if err := checkCrtList(list, cert); err != nil {
		return err
	}
	out, err := r.do(ctx, "add ssl crt-list "+list+" "+cert, nil)
	if err != nil {
		return err
	}
	if !strings.Contains(out, "Success!") {
		return fmt.Errorf("haproxy refused add ssl crt-list %s %s: %s", list, cert, strings.TrimSpace(out))
	}
	return nil
}

func (r *socketRuntime) DelCrtListEntry(ctx context.Context, list, cert string) error {
	if err := checkCrtList(list, cert); err != nil {
		return err
	}
	out, err := r.do(ctx, "del ssl crt-list "+list+" "+cert, nil)
	if err != nil {
		return err
	}
	if got := strings.TrimSpace(out); !strings.HasSuffix(got, "deleted in crtlist '"+list+"'!") {
		return fmt.Errorf("haproxy refused del ssl crt-list %s %s: %s", list, cert, got)
	}
	return nil
}

func (r *socketRuntime) CrtList(ctx context.Context, list string) ([]string, error) {
	if err := render.CheckHAProxyPath("crt-list", list); err != nil {
		return nil, err
	}
	out, err := r.do(ctx, "show ssl crt-list "+list, nil)
	if err != nil {
		return nil, err
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) == 0 || lines[0] != "# "+list {
		return nil, fmt.Errorf("show ssl crt-list %s: unexpected answer: %.120q", list, out)
	}
	var certs []string
	for _, l := range lines[1:] {
		if f := strings.Fields(l); len(f) > 0 {
			certs = append(certs, f[0])
		}
	}
	return certs, nil
}
