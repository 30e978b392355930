#!/bin/sh
# Lab topology: the single-host load balancer is the ROOT network namespace;
# the backends be1, be2, be3 and the client each live in their own namespace,
# on two bridges of the root (brbe: backends, brcl: clients). Two more
# load-balancer hosts for the HA scenarios, lb1 and lb2, are namespaces on
# the same two bridges and on a third (brctl) where the tests' etcd listens;
# their own backends hbe1, hbe2 route through the HA group's floating
# gateway. Addresses are in e2e/topology/README.md.
#
#   setup.sh          build the topology (tears down an old one first)
#   setup.sh down     remove it
#
# POSIX sh: runs under busybox in the QEMU lab and under bash/dash on a host.
# /sbin/ip is called by full path because busybox's own `ip` applet has no
# netns support. Nothing here sends traffic anywhere but between namespaces.
set -eu

IP=${IP:-/sbin/ip}
BACKENDS=${LAB_BACKENDS:-"be1 be2 be3"}
HA_HOSTS=${LAB_HA_HOSTS:-"lb1 lb2"}
HA_BACKENDS=${LAB_HA_BACKENDS:-"hbe1 hbe2"}
# the HA backends' default gateway: a floating address of the HA group
HA_GATEWAY=${LAB_HA_GATEWAY:-10.10.0.254}
RUNDIR=${LAB_RUNDIR:-/run/labserver}
TCP_PORTS=${LAB_TCP_PORTS:-80,8080,8443}
UDP_PORTS=${LAB_UDP_PORTS:-53,5353}
BRIDGE=brbe
CLIENT_BRIDGE=brcl
CONTROL_BRIDGE=brctl

log() { echo "topology: $*"; }

# labserver: the Go backend server (e2e/topology/labserver), when present.
LABSERVER=${LABSERVER:-}
if [ -z "$LABSERVER" ]; then
	for c in /bin/labserver /usr/local/bin/labserver; do
		if [ -x "$c" ]; then LABSERVER=$c; break; fi
	done
fi

# nsexec NS CMD...: run CMD in namespace NS.
nsexec() { ns=$1; shift; "$IP" netns exec "$ns" "$@"; }

# sysctl_set NS KEY VALUE: write /proc/sys/KEY (dots -> slashes) in NS ("-" = here).
sysctl_set() {
	f=/proc/sys/$(echo "$2" | tr . /)
	if [ "$1" = - ]; then echo "$3" >"$f"; else nsexec "$1" sh -c "echo $3 > $f"; fi
}

teardown() {
	for ns in $BACKENDS $HA_BACKENDS $HA_HOSTS client; do
		if [ -f "$RUNDIR/$ns.pid" ]; then
			kill "$(cat "$RUNDIR/$ns.pid")" 2>/dev/null || true
			rm -f "$RUNDIR/$ns.pid"
		fi
		if [ -e "/run/netns/$ns" ]; then "$IP" netns del "$ns"; fi
	done
	for br in "$BRIDGE" "$CLIENT_BRIDGE" "$CONTROL_BRIDGE"; do
		"$IP" link del "$br" 2>/dev/null || true
	done
	"$IP" link del vclient 2>/dev/null || true
}

# wait_listen NS PORT: poll until something in NS listens on TCP PORT (30 s).
wait_listen() {
	hex=$(printf ':%04X ' "$2")
	i=0
	while [ $i -lt 300 ]; do
		# state 0A is LISTEN
		if nsexec "$1" cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -q "$hex[0-9A-F:]* 0A "; then
			return 0
		fi
		i=$((i + 1))
		sleep 0.1
	done
	log "nothing listens on TCP $2 in $1 after 30 s" >&2
	return 1
}

start_server() {
	ns=$1
	mkdir -p "$RUNDIR"
	if [ -n "$LABSERVER" ]; then
		"$IP" netns exec "$ns" "$LABSERVER" -name "$ns" -tcp "$TCP_PORTS" -udp "$UDP_PORTS" \
			-down-file "$RUNDIR/$ns.down" >"$RUNDIR/$ns.log" 2>&1 &
		echo $! >"$RUNDIR/$ns.pid"
	else
		# Fallback for hosts without labserver: busybox httpd on port 80 only.
		mkdir -p "$RUNDIR/www-$ns"
		echo "$ns" >"$RUNDIR/www-$ns/index.html"
		echo ok >"$RUNDIR/www-$ns/healthz"
		"$IP" netns exec "$ns" busybox httpd -f -p 80 -h "$RUNDIR/www-$ns" >"$RUNDIR/$ns.log" 2>&1 &
		echo $! >"$RUNDIR/$ns.pid"
		log "labserver not found: $ns serves HTTP on 80 with busybox httpd, no UDP"
	fi
}

if [ "${1:-}" = down ]; then
	teardown
	exit 0
fi

teardown

# The load balancer (root namespace) routes between the segments.
sysctl_set - net.ipv4.ip_forward 1
sysctl_set - net.ipv6.conf.all.forwarding 1
"$IP" link set lo up

# Backend segment: one bridge in the root namespace, one veth per backend.
"$IP" link add "$BRIDGE" type bridge forward_delay 0
"$IP" addr add 10.10.0.1/24 dev "$BRIDGE"
"$IP" addr add fd00:10::1/64 dev "$BRIDGE" nodad
"$IP" link set "$BRIDGE" up
# DR and TUN: the backends answer from the VIP straight to the client, and
# their gateway is this namespace, which owns the VIP; accept those packets
# instead of dropping them as martians (a local source address).
sysctl_set - "net.ipv4.conf.$BRIDGE.accept_local" 1
sysctl_set - "net.ipv4.conf.$BRIDGE.rp_filter" 0

# backend NS HOST GATEWAY: a backend namespace on the backend bridge at
# 10.10.0.HOST, its default route via GATEWAY, serving labserver.
backend() {
	ns=$1
	"$IP" netns add "$ns"
	"$IP" -n "$ns" link set lo up
	"$IP" link add "v$ns" type veth peer name eth0 netns "$ns"
	"$IP" link set "v$ns" master "$BRIDGE" up
	"$IP" -n "$ns" addr add "10.10.0.$2/24" dev eth0
	"$IP" -n "$ns" addr add "fd00:10::$2/64" dev eth0 nodad
	"$IP" -n "$ns" link set eth0 up
	# NAT mode: replies must come back through the load balancer.
	"$IP" -n "$ns" route add default via "$3"
	start_server "$ns"
}

n=0
for ns in $BACKENDS; do
	n=$((n + 1))
	backend "$ns" $((10 + n)) 10.10.0.1
	"$IP" -n "$ns" -6 route add default via fd00:10::1
done

# Client segment: a bridge, so that the HA hosts share it with the client.
"$IP" link add "$CLIENT_BRIDGE" type bridge forward_delay 0
"$IP" addr add 10.20.0.1/24 dev "$CLIENT_BRIDGE"
"$IP" addr add fd00:20::1/64 dev "$CLIENT_BRIDGE" nodad
"$IP" link set "$CLIENT_BRIDGE" up
"$IP" netns add client
"$IP" -n client link set lo up
"$IP" link add vclient type veth peer name eth0 netns client
"$IP" link set vclient master "$CLIENT_BRIDGE" up
"$IP" -n client addr add 10.20.0.2/24 dev eth0
"$IP" -n client addr add fd00:20::2/64 dev eth0 nodad
"$IP" -n client link set eth0 up
"$IP" -n client route add default via 10.20.0.1
"$IP" -n client -6 route add default via fd00:20::1

# Control segment: the HA hosts reach the tests' etcd at 10.30.0.1.
"$IP" link add "$CONTROL_BRIDGE" type bridge forward_delay 0
"$IP" addr add 10.30.0.1/24 dev "$CONTROL_BRIDGE"
"$IP" link set "$CONTROL_BRIDGE" up

# HA hosts: eth0 on the client segment (the HA interface), eth1 on the
# backend segment, eth2 on the control segment; the root-side ends are
# <host>c, <host>b and <host>e, which a test takes down to cut the host off.
n=0
for ns in $HA_HOSTS; do
	n=$((n + 1))
	"$IP" netns add "$ns"
	"$IP" -n "$ns" link set lo up
	for side in c:eth0:"$CLIENT_BRIDGE":10.20.0.$((10 + n)):fd00:20::$((10 + n)) \
		b:eth1:"$BRIDGE":10.10.0.$((20 + n)):fd00:10::$((20 + n)) \
		e:eth2:"$CONTROL_BRIDGE":10.30.0.$((10 + n)):; do
		suffix=${side%%:*}; rest=${side#*:}
		dev=${rest%%:*}; rest=${rest#*:}
		br=${rest%%:*}; rest=${rest#*:}
		a4=${rest%%:*}; a6=${rest#*:}
		"$IP" link add "$ns$suffix" type veth peer name "$dev" netns "$ns"
		"$IP" link set "$ns$suffix" master "$br" up
		"$IP" -n "$ns" addr add "$a4/24" dev "$dev"
		if [ -n "$a6" ]; then "$IP" -n "$ns" addr add "$a6/64" dev "$dev" nodad; fi
		"$IP" -n "$ns" link set "$dev" up
	done
	sysctl_set "$ns" net.ipv4.ip_forward 1
	sysctl_set "$ns" net.ipv6.conf.all.forwarding 1
done
n=0
for ns in $HA_BACKENDS; do
	n=$((n + 1))
	backend "$ns" $((30 + n)) "$HA_GATEWAY"
done

for ns in $BACKENDS $HA_BACKENDS; do
	wait_listen "$ns" 80
done
log "ready: backends $BACKENDS on 10.10.0.0/24, client 10.20.0.2, VIPs 192.0.2.0/24 via the root namespace; HA hosts $HA_HOSTS with backends $HA_BACKENDS (gateway $HA_GATEWAY)"
