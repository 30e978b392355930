package watcher_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/switchman-lb/switchman/internal/etcdtest"
	"github.com/switchman-lb/switchman/watcher"
)

// cutProxy forwards TCP from a loopback address to etcd until cut: then
// it closes every connection and stops listening, so etcd is unreachable
// for the client, as when the network between them fails.
type cutProxy struct {
	t      *testing.T
	addr   string
	target string

	mu    sync.Mutex
	ln    net.Listener
	conns []net.Conn
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	p := &cutProxy{t: t, addr: etcdtest.FreeAddr(t), target: target}
	p.restore()
	t.Cleanup(p.cut)
	return p
}

func (p *cutProxy) restore() {
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		p.t.Fatal(err)
	}
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(u, c); u.Close() }()
			go func() { _, _ = io.Copy(c, u); c.Close() }()
		}
	}()
}

func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// TestConnectedFollowsEtcd: switchman_etcd_connected is 0 before the first
// list, 1 while the watch runs, 0 while etcd cannot be reached (the
// client resumes a broken watch behind the watcher's back, so the
// watcher's own state alone would still say 1), and 1 again once etcd is
// back.
func TestConnectedFollowsEtcd(t *testing.T) {
	ep := etcdtest.Start(t, nil)
	proxy := newCutProxy(t, strings.TrimPrefix(ep, "http://"))
	cli, err := watcher.Connect(watcher.ConnOptions{Endpoints: []string{"http://" + proxy.addr}, DialTimeout: 2 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	w := watcher.New(cli, slog.New(slog.DiscardHandler), watcher.Options{Prefix: "/switchman", MaxBackoff: 500 * time.Millisecond})
	gauge := w.Collector()
	if v := testutil.ToFloat64(gauge); v != 0 {
		t.Fatalf("before Run: switchman_etcd_connected %v, want 0", v)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = w.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	want := func(what string, v float64) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for testutil.ToFloat64(gauge) != v {
			if time.Now().After(deadline) {
				t.Fatalf("%s: switchman_etcd_connected is not %v after 60s", what, v)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	want("watching", 1)
	proxy.cut()
	want("etcd cut off", 0)
	proxy.restore()
	want("etcd back", 1)
}
