package sysctl

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

func TestEnsure(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "net", "ipv4"), 0o755); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "net", "ipv4", "ip_forward")
	tests := []struct {
		name, on, value, wantOld string
		wantWrote                bool
	}{
		{"differs", "0\n", "1", "0", true},
		{"already", "1\n", "1", "1", false},
		{"fields normalised", "4096\t87380   6291456\n", "4096 87380 6291456", "4096 87380 6291456", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := os.WriteFile(file, []byte(tt.on), 0o644); err != nil {
				t.Fatal(err)
			}
			old, wrote, err := Ensure(dir, "net/ipv4/ip_forward", tt.value)
			if err != nil || old != tt.wantOld || wrote != tt.wantWrote {
				t.Fatalf("Ensure = %q, %v, %v; want %q, %v, nil", old, wrote, err, tt.wantOld, tt.wantWrote)
			}
			if got, _ := Read(dir, "net/ipv4/ip_forward"); got != tt.value {
				t.Errorf("after Ensure the file holds %q, want %q", got, tt.value)
			}
		})
	}
	if _, err := Read(dir, "net/ipv4/absent"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Read of a missing setting: %v, want ErrNotExist", err)
	}
	if _, err := Read(dir, "../etc/passwd"); err == nil {
		t.Error("Read outside procSys: no error")
	}
}
