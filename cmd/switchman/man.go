package main

import (
	"fmt"

	md2man "github.com/cpuguy83/go-md2man/v2/md2man"
	"github.com/urfave/cli/v2"
)

// manCommand prints switchman(8), generated from the CLI itself so that it
// names every command, flag and default the binary has (the Debian
// package ships it: make deb). Hidden: it is a build step, not a tool.
func manCommand() *cli.Command {
	return &cli.Command{
		Name:   "man",
		Usage:  "print the switchman(8) manual page (roff)",
		Hidden: true,
		Before: noArgs,
		Action: func(c *cli.Context) error {
			page, err := manPage(newApp())
			if err != nil {
				return err
			}
			_, err = fmt.Fprint(c.App.Writer, page)
			return err
		},
	}
}

// manDescription, environment and files are the parts of the page that
// are not in the flags.
const (
	manDescription = `switchman is a layer-4 (TCP/UDP) load-balancer agent. One agent runs on each
load-balancer host: it watches service definitions in etcd and programs the
host's data plane (kernel IPVS or nf_tables for plain TCP/UDP, HAProxy for TLS
termination and HTTP routing, iptables for source ranges and masquerade). Its
own health checker sets a failed backend's weight to 0 and restores it when the
backend recovers. Several agents started with **--ha-interface** share their
VIPs per HA group.

Operators write definitions with **etcdctl put /switchman/services/NAME**, check
them offline with **switchman validate** and **switchman plan**, and read what
every agent did with **switchman status**. Stopping the agent leaves the data
plane in place; the next agent adopts it and, when nothing changed, writes
nothing.`

	manSections = `
# ENVIRONMENT

Every flag also reads an environment variable: **SWITCHMAN_** followed by the
flag's name in capitals with dashes as underscores (**--etcd-endpoints** reads
**SWITCHMAN_ETCD_ENDPOINTS**, **--vip-cidrs** reads **SWITCHMAN_VIP_CIDRS**; a
list is comma-separated). A flag given on the command line wins. The systemd
unit reads them from */etc/default/switchman*.

**NOTIFY_SOCKET**: set by systemd for a Type=notify unit; the agent reports
READY=1 once its first pass is applied, and STOPPING=1 when it stops.

# FILES

*/etc/default/switchman*
: the agent's settings (SWITCHMAN_* variables) for the systemd unit.

*/var/lib/switchman* (**--data-dir**)
: ipvs-owned.json (the IPVS services this agent created), lastgood/ (the last
good version of each service, kept in force across restarts), etcd/ (the
embedded etcd's data, when no **--etcd-endpoints** is given).

*/run/switchman/haproxy* (**--haproxy-dir**)
: haproxy.cfg, the admin and master sockets and the server state of the
HAProxy the agent supervises.

# EXIT STATUS

**validate** exits 1 when a definition is invalid, naming file, field and value.
The agent exits 0 on SIGTERM or SIGINT, leaving the data plane in place, and
non-zero when it cannot start.

# SEE ALSO

**etcdctl**(1), **ipvsadm**(8), **nft**(8), **haproxy**(1), **systemctl**(1);
/usr/share/doc/switchman/operations.md.
`
)

// manPage renders app's manual page in roff.
func manPage(app *cli.App) (string, error) {
	app.Description = manDescription
	md, err := app.ToMarkdown()
	if err != nil {
		return "", fmt.Errorf("render the manual page: %w", err)
	}
	return string(md2man.Render([]byte("% switchman 8\n\n" + md + manSections))), nil
}
