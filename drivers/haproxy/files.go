package haproxy

import (
	"bytes"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/switchman-lb/switchman/internal/atomicfile"
)

// canonicalPEM re-encodes a certificate bundle (certificates and one
// private key) from its decoded blocks, dropping anything between them, so
// the result has no empty line (which would end a runtime API payload
// early) and no text HAProxy or the runtime API could read as anything but
// PEM. Blocks with headers (encrypted keys) are refused; so is a bundle
// that Go's TLS stack cannot pair.
func canonicalPEM(in []byte) ([]byte, error) {
	if len(in) == 0 {
		return nil, errors.New("certificate PEM is empty")
	}
	var out bytes.Buffer
	certs, keys := 0, 0
	rest := in
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if len(b.Headers) > 0 {
			return nil, fmt.Errorf("PEM block %q has headers (an encrypted key?); HAProxy needs a clear key", b.Type)
		}
		switch b.Type {
		case "CERTIFICATE":
			certs++
		case "PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY":
			keys++
		default:
			continue
		}
		if err := pem.Encode(&out, &pem.Block{Type: b.Type, Bytes: b.Bytes}); err != nil {
			return nil, err
		}
	}
	if certs == 0 || keys != 1 {
		return nil, fmt.Errorf("certificate PEM must hold at least one CERTIFICATE and exactly one private key (found %d and %d)", certs, keys)
	}
	if _, err := tls.X509KeyPair(out.Bytes(), out.Bytes()); err != nil {
		return nil, fmt.Errorf("certificate PEM: %w", err)
	}
	return out.Bytes(), nil
}

// writeAtomic writes data to path with mode 0600, atomically.
func writeAtomic(path string, data []byte) error { return atomicfile.Write(path, data, 0o600) }
