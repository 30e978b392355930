package main

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"

	"github.com/switchman-lb/switchman/internal/sysctl"
)

// conntrackSetting is one conntrack sysctl that nf_tables services of an
// HA group rely on to keep established connections across a takeover.
type conntrackSetting struct {
	name string // under net/netfilter
	why  string
}

// haConntrackSettings are the conntrack sysctls (both must be 1) that
// carry established TCP connections through a takeover on nf_tables; the
// agent reads them and warns, it does not set them (they are the host's).
func haConntrackSettings() []conntrackSetting {
	return []conntrackSetting{
		{"nf_conntrack_tcp_loose", "the new owner of an HA group picks an established connection up mid-stream only with it; with 0, every established nf_tables connection is reset at a takeover"},
		{"nf_conntrack_tcp_be_liberal", "a host that owned an HA group before and comes back with its conntrack entries finds the flows' packets outside the window it last saw; with 0, it resets those connections at the failback"},
	}
}

// checkHAConntrack reads haConntrackSettings under procSys and returns a
// sentence for each that is not 1. A kernel without conntrack loaded yet
// (no file) is not reported: the nf_tables driver loads it with its first
// NAT chain, with the defaults.
func checkHAConntrack(procSys string) []string {
	var out []string
	for _, s := range haConntrackSettings() {
		v, err := sysctl.Read(procSys, "net/netfilter/"+s.name)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			continue
		case err != nil:
			out = append(out, err.Error())
		case v != "1":
			out = append(out, fmt.Sprintf("net.netfilter.%s is %s, not 1: %s (sysctl -w net.netfilter.%s=1)", s.name, v, s.why, s.name))
		}
	}
	return out
}

// warnHAConntrack logs checkHAConntrack's findings as warnings.
func warnHAConntrack(log *slog.Logger, procSys string) {
	for _, w := range checkHAConntrack(procSys) {
		log.Warn("nf_tables with HA: established connections will not survive a takeover", "why", w)
	}
}
