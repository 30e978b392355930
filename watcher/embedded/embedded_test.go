package embedded

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/switchman-lb/switchman/internal/etcdtest"
	"github.com/switchman-lb/switchman/internal/logtest"
)

// TestListenOffLoopbackRefused: the embedded etcd has no TLS and no
// authentication; it used to start on any address given, without a word.
// Off loopback it is refused, before anything listens, unless allowed.
func TestListenOffLoopbackRefused(t *testing.T) {
	tests := []struct {
		name, client, peer, flag string
	}{
		{"client on a network address", "http://192.0.2.1:2379", "http://" + etcdtest.FreeAddr(t), "--embedded-etcd-client-url"},
		{"client on a host name", "http://lb1.example.com:2379", "http://" + etcdtest.FreeAddr(t), "--embedded-etcd-client-url"},
		{"peer on a network address", "http://" + etcdtest.FreeAddr(t), "http://192.0.2.1:2380", "--embedded-etcd-peer-url"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "etcd")
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			s, err := Start(ctx, slog.New(slog.DiscardHandler), Options{Dir: dir, ClientURL: tc.client, PeerURL: tc.peer})
			if err == nil {
				s.Close()
			}
			if err == nil || !strings.Contains(err.Error(), tc.flag) || !strings.Contains(err.Error(), "not a loopback address") || !strings.Contains(err.Error(), "--embedded-etcd-allow-remote") {
				t.Fatalf("error = %v; want a refusal naming %s and --embedded-etcd-allow-remote", err, tc.flag)
			}
			if _, err := os.Stat(dir); err == nil {
				t.Error("etcd was started (its data directory exists)")
			}
		})
	}
}

func TestListenURL(t *testing.T) {
	for _, tc := range []struct {
		url         string
		allowRemote bool
		ok          bool
	}{
		{"http://127.0.0.1:2379", false, true},
		{"http://127.0.0.2:2379", false, true},
		{"http://[::1]:2379", false, true},
		{"http://localhost:2379", false, true},
		{"http://0.0.0.0:2379", false, false},
		{"http://[::]:2379", false, false},
		{"http://10.0.0.1:2379", false, false},
		{"http://[::ffff:127.0.0.1]:2379", false, true},
		{"http://0.0.0.0:2379", true, true},
		{"http://etcd.example.com:2379", true, true},
	} {
		_, err := listenURL("--embedded-etcd-client-url", tc.url, tc.allowRemote)
		if (err == nil) != tc.ok {
			t.Errorf("listenURL(%s, allow %v) = %v; want ok %v", tc.url, tc.allowRemote, err, tc.ok)
		}
	}
}

// TestCloseIsQuiet: a clean shutdown used to print etcd's error-level
// messages with stack traces ("setting up serving from embedded etcd
// failed ... mux: server closed") on stderr.
func TestCloseIsQuiet(t *testing.T) {
	// etcd's default logger writes to the process's stderr: catch it.
	stderr, err := os.CreateTemp(t.TempDir(), "stderr")
	if err != nil {
		t.Fatal(err)
	}
	orig := os.Stderr
	os.Stderr = stderr
	defer func() { os.Stderr = orig }()

	rec := &logtest.Recorder{}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := Start(ctx, slog.New(rec), Options{Dir: filepath.Join(t.TempDir(), "etcd"),
		ClientURL: "http://" + etcdtest.FreeAddr(t), PeerURL: "http://" + etcdtest.FreeAddr(t)})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	os.Stderr = orig
	if _, err := stderr.Seek(0, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	if out, _ := io.ReadAll(stderr); len(out) > 0 {
		t.Errorf("etcd wrote to stderr:\n%.2000s", out)
	}
	for _, r := range rec.Records() {
		if r.Level >= slog.LevelWarn {
			t.Errorf("logged at %s: %s", r.Level, r.Message)
		}
	}
}
