#!/bin/sh
# Prepare a backend for IPVS direct routing (dr) or IP-in-IP tunnelling (tun).
#
#   dr-backend.sh [-d] VIP [NS [dr|tun]]
#
# VIP   the virtual address (IPv4 or IPv6) the backend must accept as its own
# NS    the backend's network namespace; "-" or empty = the current one (a host)
# mode  dr  (default): VIP/32 (or /128) on lo, arp_ignore=1, arp_announce=2,
#           so the backend accepts packets for the VIP but never answers ARP
#           for it (the load balancer owns the VIP on the segment)
#       tun: also brings up tunl0 (ipip) with the VIP and turns rp_filter off,
#           so decapsulated packets for the VIP are accepted (IPv4 only)
# -d    undo: remove the VIP again (sysctls are left as they are)
#
# POSIX sh; calls /sbin/ip by full path (busybox's ip applet has no netns).
set -eu

IP=${IP:-/sbin/ip}
undo=0
if [ "${1:-}" = -d ]; then undo=1; shift; fi
if [ $# -lt 1 ]; then
	echo "usage: $0 [-d] VIP [NS [dr|tun]]" >&2
	exit 2
fi
VIP=$1
NS=${2:--}
MODE=${3:-dr}

run() {
	if [ "$NS" = - ] || [ -z "$NS" ]; then "$@"; else "$IP" netns exec "$NS" "$@"; fi
}
# set KEY VALUE: write a sysctl (dots -> slashes) in the namespace.
set_sysctl() {
	run sh -c "echo $2 > /proc/sys/$(echo "$1" | tr . /)"
}

case $VIP in
*:*) plen=128 ;;
*) plen=32 ;;
esac

case $MODE in
dr) dev=lo ;;
tun)
	if [ $plen = 128 ]; then
		echo "$0: tun mode is IPv4 only here" >&2
		exit 2
	fi
	dev=tunl0
	;;
*)
	echo "$0: unknown mode $MODE (dr|tun)" >&2
	exit 2
	;;
esac

if [ $undo = 1 ]; then
	run "$IP" addr del "$VIP/$plen" dev "$dev" 2>/dev/null || true
	exit 0
fi

if [ $plen = 32 ]; then
	set_sysctl net.ipv4.conf.all.arp_ignore 1
	set_sysctl net.ipv4.conf.all.arp_announce 2
	set_sysctl net.ipv4.conf.lo.arp_ignore 1
	set_sysctl net.ipv4.conf.lo.arp_announce 2
fi
if [ "$MODE" = tun ]; then
	# tunl0 appears in every namespace once the ipip module is loaded.
	if ! run "$IP" link show tunl0 >/dev/null 2>&1; then
		modprobe ipip 2>/dev/null || true
	fi
	run "$IP" link set tunl0 up
	set_sysctl net.ipv4.conf.all.rp_filter 0
	set_sysctl net.ipv4.conf.tunl0.rp_filter 0
fi
# replace: idempotent when run twice
if [ $plen = 128 ]; then
	run "$IP" -6 addr replace "$VIP/$plen" dev "$dev" nodad
else
	run "$IP" addr replace "$VIP/$plen" dev "$dev"
fi
