// Command scale measures the agent at scale, outside the pass/fail tests:
// the time from a burst of N definitions put into etcd until the agent has
// applied all of them (read from its /metrics), and the agent's resident
// memory with N services x B backends loaded.
//
//	go build -o bin/switchman ./cmd/switchman
//	go run ./bench/scale -agent bin/switchman -services 10000 -backends 4
//
// It starts Debian's etcd (etcd-server package) on loopback ports in a
// temporary folder, and the agent with --drivers none, so it measures the
// agent's own work: watch, parse, validate, render, status.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

func main() {
	agentBin := flag.String("agent", "bin/switchman", "switchman binary")
	etcdBin := flag.String("etcd", "etcd", "etcd server binary")
	services := flag.Int("services", 10000, "services to put in one burst")
	backends := flag.Int("backends", 4, "backends per service")
	flag.Parse()
	if err := run(*agentBin, *etcdBin, *services, *backends); err != nil {
		fmt.Fprintln(os.Stderr, "scale:", err)
		os.Exit(1)
	}
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func run(agentBin, etcdBin string, n, b int) error {
	dir, err := os.MkdirTemp("", "switchman-scale-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	client, _ := freeAddr()
	peer, _ := freeAddr()
	metrics, _ := freeAddr()
	etcd := exec.Command(etcdBin, "--data-dir", filepath.Join(dir, "etcd"), "--name", "bench",
		"--listen-client-urls", "http://"+client, "--advertise-client-urls", "http://"+client,
		"--listen-peer-urls", "http://"+peer, "--initial-advertise-peer-urls", "http://"+peer,
		"--initial-cluster", "bench=http://"+peer, "--log-level", "error", "--quota-backend-bytes", "4294967296")
	if err := etcd.Start(); err != nil {
		return fmt.Errorf("start %s (apt-get install etcd-server): %w", etcdBin, err)
	}
	defer func() { _ = etcd.Process.Kill(); _ = etcd.Wait() }()

	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{client}, DialTimeout: 5 * time.Second})
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	if err := waitFor(ctx, 30*time.Second, func() bool {
		c, cc := context.WithTimeout(ctx, time.Second)
		defer cc()
		_, err := cli.Get(c, "x")
		return err == nil
	}); err != nil {
		return errors.New("etcd did not start")
	}

	agent := exec.Command(agentBin, "--log-level", "error", "agent", "--etcd-endpoints", "http://"+client,
		"--data-dir", filepath.Join(dir, "agent"), "--node", "bench", "--drivers", "none", "--metrics-addr", metrics)
	agent.Stderr = os.Stderr
	if err := agent.Start(); err != nil {
		return err
	}
	defer func() { _ = agent.Process.Signal(os.Interrupt); _ = agent.Wait() }()
	if err := waitFor(ctx, 30*time.Second, func() bool { _, err := applied(metrics); return err == nil }); err != nil {
		return errors.New("agent metrics did not come up")
	}

	start := time.Now()
	var ops []clientv3.Op
	flush := func() error {
		if len(ops) == 0 {
			return nil
		}
		_, err := cli.Txn(ctx).Then(ops...).Commit()
		ops = ops[:0]
		return err
	}
	for i := 0; i < n; i++ {
		var bs []string
		for j := 0; j < b; j++ {
			bs = append(bs, fmt.Sprintf(`{"address":"10.%d.%d.%d","port":8080}`, 1+i/65536, (i/256)%256, (i%256+j)%256))
		}
		def := fmt.Sprintf(`{"vip":"198.%d.%d.%d","port":%d,"health":{"protocol":"none"},"backends":[%s]}`,
			18+i/(256*256*50), (i/256)%256, i%256, 80+(i/(256*256))%50, strings.Join(bs, ","))
		ops = append(ops, clientv3.OpPut(fmt.Sprintf("/switchman/services/s%05d", i), def))
		if len(ops) == 100 { // under etcd's default of 128 ops per txn
			if err := flush(); err != nil {
				return fmt.Errorf("put: %w", err)
			}
		}
	}
	if err := flush(); err != nil {
		return fmt.Errorf("put: %w", err)
	}
	putDone := time.Since(start)
	if err := waitFor(ctx, 20*time.Minute, func() bool { a, err := applied(metrics); return err == nil && a == n }); err != nil {
		a, _ := applied(metrics)
		return fmt.Errorf("only %d of %d applied", a, n)
	}
	all := time.Since(start)
	time.Sleep(2 * time.Second) // let the status writes and GC settle before reading RSS
	rss, err := rssKiB(agent.Process.Pid)
	if err != nil {
		return err
	}
	fmt.Printf("services=%d backends_each=%d\n", n, b)
	fmt.Printf("burst_put_seconds=%.2f\n", putDone.Seconds())
	fmt.Printf("all_applied_seconds=%.2f (from the first put)\n", all.Seconds())
	fmt.Printf("agent_rss_mib=%.1f\n", float64(rss)/1024)
	return nil
}

func waitFor(ctx context.Context, d time.Duration, cond func() bool) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if cond() {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("timed out")
}

// applied reads how many services the agent has settled (a status in
// any state) from its switchman_services metric. With --drivers none every
// service is "failed" (no driver serves it), which is what this benchmark
// expects: it measures the loop, not a data plane.
func applied(addr string) (int, error) {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	n := 0.0
	for sc.Scan() {
		for _, st := range []string{"applied", "failed", "rejected"} {
			if v, ok := strings.CutPrefix(sc.Text(), `switchman_services{state="`+st+`"} `); ok {
				f, err := strconv.ParseFloat(v, 64)
				if err != nil {
					return 0, err
				}
				n += f
			}
		}
	}
	return int(n), nil
}

func rssKiB(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
		}
	}
	return 0, errors.New("no VmRSS")
}
