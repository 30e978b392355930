package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/switchman-lb/switchman/agent"
	"github.com/switchman-lb/switchman/internal/atomicfile"
	"github.com/switchman-lb/switchman/render"
	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/watcher"
)

func validateCommand() *cli.Command {
	return &cli.Command{
		Name:      "validate",
		Usage:     "check service definitions offline; exit 1 naming file, field and value of every error",
		ArgsUsage: "FILE|DIR|- ...  (a DIR means every .yaml, .yml and .json in it; - reads one definition from standard input)",
		Flags:     policyFlags(),
		Action: func(c *cli.Context) error {
			if c.NArg() == 0 {
				return errors.New("validate needs at least one FILE, DIR or -")
			}
			pol, err := policyFrom(c)
			if err != nil {
				return err
			}
			set, problems := readDefinitions(c.Args().Slice(), c.String("stdin-name"), c.App.Reader)
			j := set.judge(pol)
			problems = append(problems, j.problems...)
			for _, p := range problems {
				fmt.Fprintln(c.App.ErrWriter, p)
			}
			if len(problems) > 0 {
				return cli.Exit(fmt.Sprintf("%d problem(s) in %d definition(s)", len(problems), set.count()), 1)
			}
			fmt.Fprintf(c.App.Writer, "%d definition(s) valid\n", set.count())
			return nil
		},
	}
}

// policyFlags are the agent's policy flags that validate and plan take too,
// so that all three judge a definition the same way.
func policyFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringSliceFlag{Name: "vip-cidrs", Usage: "ranges VIPs must fall in (default: any)", EnvVars: env("vip-cidrs")},
		&cli.StringSliceFlag{Name: "backend-cidrs", Usage: "ranges backend addresses must fall in (default: any)", EnvVars: env("backend-cidrs")},
		&cli.StringFlag{Name: "l4-driver", Value: "auto", Usage: "data plane of definitions that name no driver, as the agent's flag: auto (ipvs where this kernel has it, nftables otherwise), ipvs or nftables", EnvVars: env("l4-driver")},
		&cli.StringFlag{Name: "stdin-name", Value: "stdin", Usage: "service name of a definition read from standard input (-)", EnvVars: env("stdin-name")},
	}
}

// policyFrom reads the policy flags.
func policyFrom(c *cli.Context) (agent.Policy, error) {
	var p agent.Policy
	var err error
	if p.VIPCIDRs, err = parsePrefixes("--vip-cidrs", c.StringSlice("vip-cidrs")); err != nil {
		return p, err
	}
	if p.BackendCIDRs, err = parsePrefixes("--backend-cidrs", c.StringSlice("backend-cidrs")); err != nil {
		return p, err
	}
	if p.Spec.L4Driver, _, err = resolveL4(c.Context, c.String("l4-driver")); err != nil {
		return p, err
	}
	p.Prefix = strings.TrimSuffix(c.String("prefix"), "/")
	if p.Prefix == "" {
		p.Prefix = "/switchman"
	}
	return p, nil
}

// definitions are definitions read from files: the service name is the
// file's base name without extension.
type definitions struct {
	snap watcher.Snapshot
	file map[string]string // service -> where it came from
}

func (d definitions) count() int { return len(d.file) }

// readDefinitions reads FILE, DIR (every .yaml, .yml and .json in it) and
// - (one definition from stdin, named name) arguments, in order; the order
// decides conflicts, as etcd's create revision does. It returns one line
// per problem, "FILE: message".
func readDefinitions(args []string, name string, stdin io.Reader) (definitions, []string) {
	d := definitions{snap: watcher.Snapshot{Services: map[string]watcher.KV{}}, file: map[string]string{}}
	var problems []string
	add := func(where, name string, data []byte) {
		if prev, dup := d.file[name]; dup {
			problems = append(problems, fmt.Sprintf("%s: name: service %q is also defined by %s", where, name, prev))
			return
		}
		d.file[name] = where
		rev := int64(len(d.file))
		d.snap.Services[name] = watcher.KV{Value: data, CreateRevision: rev, ModRevision: rev}
	}
	for _, arg := range args {
		if arg == "-" {
			data, err := io.ReadAll(io.LimitReader(stdin, maxDefinition+1))
			switch {
			case err != nil:
				problems = append(problems, fmt.Sprintf("-: %v", err))
			case len(data) > maxDefinition:
				problems = append(problems, fmt.Sprintf("-: more than %d bytes", maxDefinition))
			default:
				add("-", name, data)
			}
			continue
		}
		files := []string{arg}
		if st, err := os.Stat(arg); err == nil && st.IsDir() {
			files = nil
			entries, err := os.ReadDir(arg)
			if err != nil {
				problems = append(problems, fmt.Sprintf("%s: %v", arg, err))
				continue
			}
			for _, e := range entries {
				switch filepath.Ext(e.Name()) {
				case ".yaml", ".yml", ".json":
					if e.Type().IsRegular() {
						files = append(files, filepath.Join(arg, e.Name()))
					}
				}
			}
			if len(files) == 0 {
				problems = append(problems, fmt.Sprintf("%s: no .yaml, .yml or .json file in this directory", arg))
			}
		}
		for _, f := range files {
			data, err := atomicfile.ReadBounded(f, maxDefinition)
			if err != nil {
				problems = append(problems, fmt.Sprintf("%s: %v", f, err))
				continue
			}
			add(f, strings.TrimSuffix(filepath.Base(f), filepath.Ext(f)), data)
		}
	}
	return d, problems
}

// maxDefinition bounds a definition read from a file or stdin (etcd's own
// request limit is 1.5 MiB).
const maxDefinition = 4 << 20

// judgement is what the one evaluation path said about a set of files.
type judgement struct {
	services []*spec.Service
	problems []string
}

// judge evaluates the definitions with the agent's own evaluator (no
// certificate keys can be looked up offline: only their place under the
// prefix is checked).
func (d definitions) judge(p agent.Policy) judgement {
	j := agent.EvaluateAll(p, d.snap, nil)
	out := judgement{services: j.Services}
	for _, n := range slices.Sorted(maps.Keys(j.Rejected)) {
		out.problems = append(out.problems, fileErrors(d.file[n], j.Rejected[n])...)
	}
	return out
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
		Usage:     "print what the agent would program (ipvsadm -S lines, the nft ruleset, haproxy.cfg), touching nothing",
		ArgsUsage: "[FILE|DIR|- ...]  (with none, read the definitions from etcd at --etcd-endpoints)",
		Flags:     append(etcdFlags("etcd client URLs to read the definitions from when no FILE is given (plan starts no etcd)"), policyFlags()...),
		Action: func(c *cli.Context) error {
			pol, err := policyFrom(c)
			if err != nil {
				return err
			}
			var j judgement
			if c.NArg() > 0 {
				set, problems := readDefinitions(c.Args().Slice(), c.String("stdin-name"), c.App.Reader)
				j = set.judge(pol)
				j.problems = append(problems, j.problems...)
			} else if j, err = judgeEtcd(c, pol); err != nil {
				return err
			}
			for _, p := range j.problems {
				fmt.Fprintln(c.App.ErrWriter, "skipped:", p)
			}
			if err := printPlan(c.App.Writer, render.Render(render.Input{Services: j.services})); err != nil {
				return err
			}
			if len(j.problems) > 0 {
				return cli.Exit(fmt.Sprintf("%d problem(s): the plan leaves those definitions out", len(j.problems)), 1)
			}
			return nil
		},
	}
}

// printPlan writes the IPVS, nf_tables and HAProxy parts of a desired
// state.
func printPlan(w io.Writer, st *render.State) error {
	if len(st.IPVS)+len(st.NFTables)+len(st.HAProxy) == 0 {
		fmt.Fprintln(w, "# nothing to program")
		return nil
	}
	if len(st.IPVS) > 0 {
		fmt.Fprintf(w, "# IPVS: %d virtual service(s) (ipvsadm -S -n format)\n", len(st.IPVS))
		fmt.Fprint(w, render.IPVSRules(st.IPVS))
	}
	if len(st.NFTables) > 0 {
		fmt.Fprintf(w, "# nf_tables: %d service(s) (nft -f format; compare with nft list table ip switchman)\n", len(st.NFTables))
		rules, err := render.NFTablesRuleset(st.NFTables)
		if err != nil {
			return fmt.Errorf("render the nft ruleset: %w", err)
		}
		fmt.Fprint(w, rules)
	}
	if len(st.HAProxy) > 0 {
		cfg, http, err := haproxyPlan(st.HAProxy)
		if err != nil {
			return fmt.Errorf("render haproxy.cfg: %w", err)
		}
		fmt.Fprintf(w, "# HAProxy: %d service(s), haproxy.cfg:\n", len(st.HAProxy))
		if _, err = w.Write(cfg); err != nil || len(http) == 0 {
			return err
		}
		fmt.Fprintln(w, "# HAProxy mode http: the files its frontends read, and the backend slots in use")
		_, err = w.Write(http)
		return err
	}
	return nil
}

// judgeEtcd reads the definitions and pool members from etcd and judges
// them the way the agent does, certificate keys included.
func judgeEtcd(c *cli.Context, p agent.Policy) (judgement, error) {
	if len(c.StringSlice("etcd-endpoints")) == 0 {
		return judgement{}, errors.New("plan needs FILE arguments or --etcd-endpoints")
	}
	cli, err := watcher.Connect(connOptions(c), nil)
	if err != nil {
		return judgement{}, err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(c.Context, 15*time.Second)
	defer cancel()
	// At once, with the cause, when etcd cannot be reached.
	if err := watcher.Check(ctx, cli, p.Prefix); err != nil {
		return judgement{}, err
	}
	snap, err := watcher.ReadOnce(ctx, cli, p.Prefix)
	if err != nil {
		return judgement{}, watcher.Explain(err, cli.Endpoints())
	}
	j := agent.EvaluateAll(p, snap, func(k string) ([]byte, bool) {
		kv, ok := snap.Other[k]
		return kv.Value, ok
	})
	out := judgement{services: j.Services}
	for _, n := range slices.Sorted(maps.Keys(j.Rejected)) {
		out.problems = append(out.problems, fmt.Sprintf("%s: %v", n, j.Rejected[n]))
	}
	return out, nil
}

func connOptions(c *cli.Context) watcher.ConnOptions {
	return watcher.ConnOptions{
		Endpoints: c.StringSlice("etcd-endpoints"),
		CA:        c.String("etcd-ca"), Cert: c.String("etcd-cert"), Key: c.String("etcd-key"),
		User: c.String("etcd-user"), Password: c.String("etcd-password"),
	}
}
