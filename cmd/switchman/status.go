package main

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/urfave/cli/v2"

	"github.com/switchman-lb/switchman/status"
	"github.com/switchman-lb/switchman/watcher"
)

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:   "status",
		Usage:  "read every agent's status keys from etcd: one row per service and node",
		Flags:  etcdFlags("etcd client URLs (default http://127.0.0.1:2379, where an agent's embedded etcd listens; status starts none)"),
		Before: noArgs,
		Action: func(c *cli.Context) error {
			eps := c.StringSlice("etcd-endpoints")
			if len(eps) == 0 {
				eps = []string{"http://127.0.0.1:2379"} // the agent's embedded etcd
			}
			o := connOptions(c)
			o.Endpoints = eps
			cli, err := watcher.Connect(o, nil)
			if err != nil {
				return err
			}
			defer cli.Close()
			ctx, cancel := context.WithTimeout(c.Context, 15*time.Second)
			defer cancel()
			// At once, with the cause, when etcd cannot be reached.
			if err := watcher.Check(ctx, cli, strings.TrimSuffix(c.String("prefix"), "/")); err != nil {
				return err
			}
			all, err := status.ReadStatuses(ctx, cli, c.String("prefix"))
			if err != nil {
				return watcher.Explain(err, eps)
			}
			tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SERVICE\tNODE\tVIP\tDRIVER\tSTATE\tHEALTHY\tERROR")
			for _, row := range statusRows(all) {
				fmt.Fprintln(tw, row)
			}
			return tw.Flush()
		},
	}
}

// statusRows formats one tab-separated row per service and node, sorted.
func statusRows(all map[string]map[string]status.Status) []string {
	var rows []string
	for node, services := range all {
		for name, st := range services {
			healthy, total := st.Counts()
			state := printable(st.State)
			if st.FailingOpen {
				state += " (failing open)"
			}
			errText := printable(strings.ReplaceAll(st.Error, "\n", " "))
			if errText == "" {
				errText = "-"
			}
			vip := printable(st.VIP)
			if vip == "" {
				vip = "-"
			}
			rows = append(rows, fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%d/%d\t%s", printable(name), printable(node), vip, printable(st.Driver), state, healthy, total, errText))
		}
	}
	sort.Strings(rows)
	return rows
}

// printable returns s when every character of it prints as itself, and
// else s quoted with Go escapes: keys and values in etcd are anyone's
// text, and a terminal escape, a newline, a tab or a right-to-left mark
// must not reach the operator's terminal or shift the table.
func printable(s string) string {
	for _, r := range s {
		if r == utf8.RuneError || !unicode.IsPrint(r) {
			return strconv.Quote(s)
		}
	}
	return s
}
