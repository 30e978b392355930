package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/switchman-lb/switchman/agent"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/watcher"
)

func validateCommand() *cli.Command {
	return &cli.Command{
		Name:      "validate",
		Usage:     "check service definitions offline; exit 1 naming file, field and value of every error",
		ArgsUsage: "FILE...",
		Action: func(c *cli.Context) error {
			if c.NArg() == 0 {
				return errors.New("validate needs at least one FILE")
			}
			_, problems := loadFiles(c.Args().Slice())
			for _, p := range problems {
				fmt.Fprintln(c.App.ErrWriter, p)
			}
			if len(problems) > 0 {
				return cli.Exit(fmt.Sprintf("%d problem(s) in %d file(s)", len(problems), c.NArg()), 1)
			}
			fmt.Fprintf(c.App.Writer, "%d definition(s) valid\n", c.NArg())
			return nil
		},
	}
}

// loadFiles parses definition files (the service name is the file's base
// name without extension), merges them without pool members and resolves
// conflicts in file order. It returns the valid services and one line per
// problem, "FILE: field: message".
func loadFiles(paths []string) ([]*spec.Service, []string) {
	var problems []string
	var claims []spec.Claim
	file := map[string]string{}
	for i, p := range paths {
		name := strings.TrimSuffix(filepath.Base(p), filepath.Ext(p))
		data, err := os.ReadFile(p)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", p, err))
			continue
		}
		svc, err := spec.Parse(name, data)
		if err == nil {
			svc, err = spec.Merge(svc, nil)
		}
		if err != nil {
			problems = append(problems, fileErrors(p, err)...)
			continue
		}
		if prev, dup := file[name]; dup {
			problems = append(problems, fmt.Sprintf("%s: name: service %q is also defined by %s", p, name, prev))
			continue
		}
		file[name] = p
		claims = append(claims, spec.Claim{Service: svc, CreateRevision: int64(i + 1)})
	}
	losers := spec.ResolveConflicts(claims)
	var out []*spec.Service
	for _, c := range claims {
		if err, lost := losers[c.Service.Name]; lost {
			problems = append(problems, fmt.Sprintf("%s: %v", file[c.Service.Name], err))
			continue
		}
		out = append(out, c.Service)
	}
	return out, problems
}

func fileErrors(path string, err error) []string {
	var list spec.Errors
	if errors.As(err, &list) {
		out := make([]string, len(list))
		for i, fe := range list {
			out[i] = path + ": " + fe.Error()
		}
		return out
	}
	return []string{path + ": " + err.Error()}
}

func planCommand() *cli.Command {
	return &cli.Command{
		Name:      "plan",
		Usage:     "print what the agent would program (ipvsadm -S lines, haproxy.cfg), touching nothing",
		ArgsUsage: "[FILE...]  (with no FILE, read the definitions from etcd)",
		Flags:     etcdFlags("etcd client URLs to read the definitions from when no FILE is given (plan starts no etcd)"),
		Action: func(c *cli.Context) error {
			var services []*spec.Service
			var problems []string
			if c.NArg() > 0 {
				services, problems = loadFiles(c.Args().Slice())
				for _, p := range problems {
					fmt.Fprintln(c.App.ErrWriter, "skipped:", p)
				}
			} else {
				var err error
				if services, err = servicesFromEtcd(c); err != nil {
					return err
				}
			}
			if err := printPlan(c.App.Writer, render.Render(render.Input{Services: services})); err != nil {
				return err
			}
			if len(problems) > 0 {
				// Like validate: a file given that is not valid fails the
				// command, after the plan of the valid ones.
				return cli.Exit(fmt.Sprintf("%d problem(s) in the files given; the plan above leaves them out", len(problems)), 1)
			}
			return nil
		},
	}
}

// printPlan writes the IPVS part and the HAProxy part of a desired state.
func printPlan(w io.Writer, st *render.State) error {
	fmt.Fprintf(w, "# IPVS: %d virtual service(s) (ipvsadm -S -n format)\n", len(st.IPVS))
	fmt.Fprint(w, render.IPVSRules(st.IPVS))
	if len(st.HAProxy) > 0 {
		cfg, err := haproxyPlan(st.HAProxy)
		if err != nil {
			return fmt.Errorf("render haproxy.cfg: %w", err)
		}
		fmt.Fprintf(w, "\n# HAProxy: %d service(s), haproxy.cfg:\n", len(st.HAProxy))
		_, err = w.Write(cfg)
		return err
	}
	return nil
}

// servicesFromEtcd reads the definitions and pool members from etcd and
// keeps the valid ones, the way the agent would.
func servicesFromEtcd(c *cli.Context) ([]*spec.Service, error) {
	if len(c.StringSlice("etcd-endpoints")) == 0 {
		return nil, errors.New("plan needs FILE arguments or --etcd-endpoints")
	}
	cli, err := watcher.Connect(connOptions(c), nil)
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(c.Context, 15*time.Second)
	defer cancel()
	// At once, with the cause, when etcd cannot be reached.
	if err := watcher.Check(ctx, cli, strings.TrimSuffix(c.String("prefix"), "/")); err != nil {
		return nil, err
	}
	snap, err := watcher.ReadOnce(ctx, cli, c.String("prefix"))
	if err != nil {
		return nil, watcher.Explain(err, cli.Endpoints())
	}
	services, rejected := agent.Evaluate(c.String("prefix"), nil, snap)
	names := make([]string, 0, len(rejected))
	for n := range rejected {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(c.App.ErrWriter, "skipped %s: %v\n", n, rejected[n])
	}
	return services, nil
}

func connOptions(c *cli.Context) watcher.ConnOptions {
	return watcher.ConnOptions{
		Endpoints: c.StringSlice("etcd-endpoints"),
		CA:        c.String("etcd-ca"), Cert: c.String("etcd-cert"), Key: c.String("etcd-key"),
		User: c.String("etcd-user"), Password: c.String("etcd-password"),
	}
}
