#!/bin/sh
# Vagrant lab, etcd host: a single-node etcd (Debian's etcd-server) that
# listens on the back network. Usage: vagrant-etcd.sh ADDRESS
set -eu
ADDR=${1:?usage: vagrant-etcd.sh ADDRESS}
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends etcd-server etcd-client
cat >/etc/default/etcd <<EOT
ETCD_NAME=etcd
ETCD_DATA_DIR=/var/lib/etcd/default
ETCD_LISTEN_CLIENT_URLS=http://$ADDR:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$ADDR:2379
ETCD_LISTEN_PEER_URLS=http://127.0.0.1:2380
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://127.0.0.1:2380
ETCD_INITIAL_CLUSTER=etcd=http://127.0.0.1:2380
EOT
systemctl restart etcd
systemctl enable etcd
# wait (bounded) until it serves
i=0
until etcdctl --endpoints "http://$ADDR:2379" endpoint health >/dev/null 2>&1; do
	i=$((i + 1))
	[ $i -lt 60 ] || { echo "etcd did not become healthy" >&2; exit 1; }
	sleep 1
done
echo "etcd ready on http://$ADDR:2379"
