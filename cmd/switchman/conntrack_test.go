package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheckHAConntrack(t *testing.T) {
	tests := []struct {
		name  string
		files map[string]string // under net/netfilter; nil: no conntrack
		want  []string          // a word of each finding, in order
	}{
		{name: "no conntrack loaded", files: nil},
		{name: "both on", files: map[string]string{"nf_conntrack_tcp_loose": "1\n", "nf_conntrack_tcp_be_liberal": "1\n"}},
		{name: "defaults: liberal off", files: map[string]string{"nf_conntrack_tcp_loose": "1\n", "nf_conntrack_tcp_be_liberal": "0\n"},
			want: []string{"nf_conntrack_tcp_be_liberal is 0"}},
		{name: "both off", files: map[string]string{"nf_conntrack_tcp_loose": "0\n", "nf_conntrack_tcp_be_liberal": "0\n"},
			want: []string{"nf_conntrack_tcp_loose is 0", "nf_conntrack_tcp_be_liberal is 0"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.files != nil {
				nf := filepath.Join(dir, "net", "netfilter")
				if err := os.MkdirAll(nf, 0o755); err != nil {
					t.Fatal(err)
				}
				for n, v := range tc.files {
					if err := os.WriteFile(filepath.Join(nf, n), []byte(v), 0o644); err != nil {
						t.Fatal(err)
					}
				}
			}
			got := checkHAConntrack(dir)
			if len(got) != len(tc.want) {
				t.Fatalf("got %q, want %d findings", got, len(tc.want))
			}
			for i, w := range tc.want {
				if !strings.Contains(got[i], w) {
					t.Errorf("finding %d: %q does not say %q", i, got[i], w)
				}
			}
		})
	}
}
