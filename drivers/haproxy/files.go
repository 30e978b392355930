package haproxy

import (
	"bytes"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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

// writeAtomic writes data to path with mode 0600 through a temporary file
// in the same directory and a rename, so a reader sees the old or the new
// content, never a mix.
func writeAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
