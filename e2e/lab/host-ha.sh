#!/usr/bin/env bash
# The HA scenarios on this host's own kernel, with no VM: the lab topology
# (e2e/topology/setup.sh) is built inside a private network and mount
# namespace (unshare), so nothing of it is visible to the host or to other
# runs, and the agents serve the HA service through HAProxy (this kernel
# has no IPVS). The HA timings are the defaults (100 ms rounds, 3 s lease).
#
#   e2e/lab/host-ha.sh [-run REGEX]     (default: TestHA; root, haproxy, iproute2)
#
# Output: the test output on stdout; exit status: the test binary's.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
RUN=TestHA
while [ $# -gt 0 ]; do
	case $1 in
	-run | --run) RUN=${2:?-run needs a REGEX}; shift 2 ;;
	-run=* | --run=*) RUN=${1#*=}; shift ;;
	*) echo "host-ha.sh: unknown argument $1 (usage: e2e/lab/host-ha.sh [-run REGEX])" >&2; exit 2 ;;
	esac
done
[ "$(id -u)" = 0 ] || { echo "host-ha.sh: needs root (network namespaces)" >&2; exit 1; }
for b in ip:iproute2 haproxy:haproxy unshare:util-linux; do
	command -v "${b%%:*}" >/dev/null 2>&1 || { echo "host-ha.sh: ${b%%:*} not found; install ${b#*:}" >&2; exit 1; }
done
OUT=$ROOT/.lab/host
mkdir -p "$OUT"
export CGO_ENABLED=0
go build -o "$OUT/switchman" ./cmd/switchman
go build -o "$OUT/labserver" ./e2e/topology/labserver
go test -c -tags e2e -o "$OUT/e2e.test" ./e2e/

# In the private namespaces: /run/netns and /run/labserver are private
# tmpfs mounts, so namespace names cannot clash with anyone else's; /tmp
# (etcd's data and the agents' data dirs) is a tmpfs too, as fsync on a
# busy shared disk is not what an etcd on an SSD sees.
exec unshare --net --mount --propagation private -- env ROOT="$ROOT" OUT="$OUT" RUN="$RUN" sh -c '
	set -e
	mkdir -p /run/netns /run/labserver
	mount -t tmpfs tmpfs /run/netns
	mount -t tmpfs tmpfs /run/labserver
	mount -t tmpfs tmpfs /tmp
	ip link set lo up
	IP=$(command -v ip) LABSERVER=$OUT/labserver sh "$ROOT/e2e/topology/setup.sh" >"$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
	rc=0
	cd "$ROOT/e2e"
	SWITCHMAN_BIN=$OUT/switchman E2E_NATIVE=1 "$OUT/e2e.test" -test.v -test.timeout 30m -test.run "$RUN" || rc=$?
	IP=$(command -v ip) sh "$ROOT/e2e/topology/setup.sh" down >/dev/null 2>&1 || true
	exit $rc
'
