// Package sysctl reads and sets kernel settings under /proc/sys (or a
// folder standing for it in tests), writing only what differs.
package sysctl

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Name is the dotted name of path (net/ipv4/ip_forward: net.ipv4.ip_forward).
func Name(path string) string { return strings.ReplaceAll(path, "/", ".") }

// Read returns the value of the setting at path (relative to procSys,
// slash-separated), its fields joined by single spaces.
func Read(procSys, path string) (string, error) {
	if !filepath.IsLocal(path) {
		return "", fmt.Errorf("sysctl %q is not a path under /proc/sys", path)
	}
	b, err := os.ReadFile(filepath.Join(procSys, filepath.FromSlash(path)))
	if err != nil {
		return "", fmt.Errorf("read sysctl %s: %w", Name(path), err)
	}
	return strings.Join(strings.Fields(string(b)), " "), nil
}

// Ensure sets the setting at path to value unless it holds it already. It
// returns the value it found and whether it wrote.
func Ensure(procSys, path, value string) (old string, wrote bool, err error) {
	old, err = Read(procSys, path)
	if err != nil || old == value {
		return old, false, err
	}
	if err := os.WriteFile(filepath.Join(procSys, filepath.FromSlash(path)), []byte(value+"\n"), 0o644); err != nil {
		return old, false, fmt.Errorf("set sysctl %s=%s: %w", Name(path), value, err)
	}
	return old, true, nil
}
