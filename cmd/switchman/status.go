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
			groups, err := status.ReadGroups(ctx, cli, c.String("prefix"))
			if err != nil {
				return watcher.Explain(err, eps)
			}
			nodes, err := status.ReadNodes(ctx, cli, c.String("prefix"))
			if err != nil {
				return watcher.Explain(err, eps)
			}
			tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SERVICE\tNODE\tVIP\tDRIVER\tSTATE\tHEALTHY\tERROR")
			for _, row := range statusRows(all) {
				fmt.Fprintln(tw, row)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if len(groups) > 0 {
				fmt.Fprintln(c.App.Writer)
				tw = tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "GROUP\tOWNER\tSINCE\tSTANDBYS")
				for _, row := range groupRows(groups, time.Now()) {
					fmt.Fprintln(tw, row)
				}
				if err := tw.Flush(); err != nil {
					return err
				}
			}
			if rows := syncRows(nodes); len(rows) > 0 {
				fmt.Fprintln(c.App.Writer)
				tw = tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "NODE\tIPVS SYNC\tERROR")
				for _, row := range rows {
					fmt.Fprintln(tw, row)
				}
				return tw.Flush()
			}
			return nil
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

// groupRows formats one tab-separated row per HA group: its owner ("-"
// when none), since when (and how long), and the live agents that may take
// it over. Text from etcd goes through printable.
func groupRows(groups []status.Group, now time.Time) []string {
	rows := make([]string, 0, len(groups))
	for _, g := range groups {
		owner, since := "-", "-"
		if g.Owner != "" {
			owner = printable(g.Owner)
			since = fmt.Sprintf("%s (%s ago)", g.Since.UTC().Format(time.RFC3339), now.Sub(g.Since).Round(time.Second))
		}
		list := printableList(g.Standbys, ",", "-")
		if g.Error != "" {
			list += "  (" + printable(g.Error) + ")"
		}
		rows = append(rows, fmt.Sprintf("%s\t%s\t%s\t%s", printable(g.Name), owner, since, list))
	}
	return rows
}

// syncRows formats one tab-separated row per node that reports IPVS
// connection sync: the daemons that run, where, and the error; none when
// no node does.
func syncRows(nodes map[string]status.Node) []string {
	var rows []string
	for name, n := range nodes {
		s := n.IPVSSync
		if s == nil {
			continue
		}
		state := "off"
		if s.Interface != "" {
			list := printableList(s.Running, "+", "no daemon")
			state = fmt.Sprintf("%s on %s (sync id %d)", list, printable(s.Interface), s.SyncID)
		}
		errText := printable(strings.ReplaceAll(s.Error, "\n", " "))
		if errText == "" {
			errText = "-"
		}
		rows = append(rows, fmt.Sprintf("%s\t%s\t%s", printable(name), state, errText))
	}
	sort.Strings(rows)
	return rows
}

// printableList joins the printable forms of items with sep, or says none
// when there are no items.
func printableList(items []string, sep, none string) string {
	if len(items) == 0 {
		return none
	}
	out := make([]string, len(items))
	for i, it := range items {
		out[i] = printable(it)
	}
	return strings.Join(out, sep)
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
