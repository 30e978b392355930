#!/bin/sh
# Vagrant lab, every host: packages and kernel settings the lab relies on.
# Runs as root from the Vagrantfile's shell provisioner (Debian bookworm box).
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends iproute2 iptables busybox curl socat ca-certificates
# the QEMU lab's scripts call /sbin/ip; on merged-/usr Debian it is there already
[ -x /sbin/ip ] || ln -s "$(command -v ip)" /sbin/ip
