// Command switchman is the layer-4 load-balancer agent and its CLI:
// `switchman agent` runs the agent; validate, plan and status help operators.
package main

import (
	"fmt"
	"log/slog"
	"os"
	"runtime/pprof"
	"strings"

	"github.com/urfave/cli/v2"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if err := newApp().Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "switchman:", err)
		os.Exit(1)
	}
}

func newApp() *cli.App {
	return &cli.App{
		Name:    "switchman",
		Usage:   "layer-4 load balancer agent: etcd definitions -> IPVS and HAProxy",
		Version: version,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error", EnvVars: env("log-level")},
			&cli.StringFlag{Name: "log-format", Value: "text", Usage: "text or json", EnvVars: env("log-format")},
			&cli.StringFlag{Name: "cpu-profile", Usage: "write a CPU profile (go tool pprof) of the whole run to this file", Hidden: true, EnvVars: env("cpu-profile")},
		},
		Before:   startProfile,
		After:    stopProfile,
		Commands: []*cli.Command{agentCommand(), validateCommand(), planCommand(), statusCommand(), demoCommand(), manCommand()},
	}
}

// startProfile starts the CPU profile of --cpu-profile, a tool for
// finding where a start-up or a benchmark spends its time.
func startProfile(c *cli.Context) error {
	path := c.String("cpu-profile")
	if path == "" {
		return nil
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("--cpu-profile %q: %w", path, err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return fmt.Errorf("--cpu-profile %q: %w", path, err)
	}
	return nil
}

// stopProfile ends the CPU profile started by startProfile.
func stopProfile(c *cli.Context) error {
	if c.String("cpu-profile") != "" {
		pprof.StopCPUProfile()
	}
	return nil
}

// noArgs refuses positional arguments to a command that takes none: flag
// parsing stops at the first one, so `switchman agent stray --data-dir /x`
// would run with every flag after it ignored.
func noArgs(c *cli.Context) error {
	if c.NArg() > 0 {
		return fmt.Errorf("%s takes no arguments, but got %q; the flags after it were not read (give flags only; see switchman %s --help)", c.Command.Name, c.Args().First(), c.Command.Name)
	}
	return nil
}

// env names the environment variable of a flag: --etcd-endpoints reads
// SWITCHMAN_ETCD_ENDPOINTS.
func env(flag string) []string {
	return []string{"SWITCHMAN_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))}
}

// etcdFlags are the flags every etcd-reading command takes; endpoints is
// the help of --etcd-endpoints, which differs by command.
func etcdFlags(endpoints string) []cli.Flag {
	return []cli.Flag{
		&cli.StringSliceFlag{Name: "etcd-endpoints", Usage: endpoints, EnvVars: env("etcd-endpoints")},
		&cli.StringFlag{Name: "prefix", Value: "/switchman", Usage: "etcd key prefix", EnvVars: env("prefix")},
		&cli.StringFlag{Name: "etcd-ca", Usage: "CA bundle (PEM) to verify etcd's certificate", EnvVars: env("etcd-ca")},
		&cli.StringFlag{Name: "etcd-cert", Usage: "client certificate (PEM) for etcd", EnvVars: env("etcd-cert")},
		&cli.StringFlag{Name: "etcd-key", Usage: "client key (PEM) for etcd", EnvVars: env("etcd-key")},
		&cli.StringFlag{Name: "etcd-user", Usage: "etcd user name", EnvVars: env("etcd-user")},
		&cli.StringFlag{Name: "etcd-password", Usage: "etcd password", EnvVars: env("etcd-password")},
	}
}

func newLogger(c *cli.Context) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", c.String("log-level"), err)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch c.String("log-format") {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	default:
		return nil, fmt.Errorf("--log-format %q is not text or json", c.String("log-format"))
	}
}
