#!/bin/sh
# Vagrant lab, load-balancer host: IPVS, HAProxy, forwarding, and the
# switchman agent as a systemd unit, sharing the VIPs with the other LB
# (--ha-interface on the front network). It also writes the settings of the
# HA group "default": the floating addresses the owner holds besides the
# VIPs (the client's route to the VIPs, the backends' route back).
# Usage: vagrant-lb.sh NODE ETCD_ENDPOINTS BACK_ADDRESS FRONT_ADDRESS FLOAT_FRONT/LEN FLOAT_BACK/LEN
set -eu
NODE=${1:?usage: vagrant-lb.sh NODE ETCD_ENDPOINTS BACK_ADDRESS FRONT_ADDRESS FLOAT_FRONT FLOAT_BACK}
ETCD=${2:?etcd endpoints}
BACK=${3:?back network address}
FRONT=${4:?front network address}
FLOAT_FRONT=${5:?floating front address with its prefix length}
FLOAT_BACK=${6:?floating back address with its prefix length}
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends ipvsadm haproxy etcd-client kmod

# the same modules the QEMU lab loads (e2e/lab/run.sh)
cat >/etc/modules-load.d/switchman.conf <<'EOT'
ip_vs
ip_vs_rr
ip_vs_wrr
ip_vs_lc
ip_vs_wlc
ip_vs_sh
ip_vs_mh
ipip
dummy
nf_conntrack
EOT
for m in $(cat /etc/modules-load.d/switchman.conf); do modprobe "$m"; done

# forwarding; DR/TUN replies from the VIP come back through this host, which
# owns the VIP, so accept packets with a local source on the back network
backif=$(/sbin/ip -o -4 addr show | awk -v a="$BACK" '$4 ~ "^"a"/" {print $2; exit}')
frontif=$(/sbin/ip -o -4 addr show | awk -v a="$FRONT" '$4 ~ "^"a"/" {print $2; exit}')
[ -n "$backif" ] && [ -n "$frontif" ] || { echo "vagrant-lb: no interface holds $BACK or $FRONT" >&2; exit 1; }
cat >/etc/sysctl.d/60-switchman.conf <<EOT
net.ipv4.ip_forward = 1
net.ipv6.conf.all.forwarding = 1
net.ipv4.conf.${backif:-all}.accept_local = 1
net.ipv4.conf.${backif:-all}.rp_filter = 0
net.ipv4.conf.all.rp_filter = 0
EOT
sysctl -q -p /etc/sysctl.d/60-switchman.conf

if [ -x /vagrant/bin/switchman ]; then
	install -m 0755 /vagrant/bin/switchman /usr/local/bin/switchman
else
	echo "vagrant-lb: /vagrant/bin/switchman not found: run 'make build' on the host, then 'vagrant provision $NODE'" >&2
	exit 0
fi
mkdir -p /var/lib/switchman
# The HA group's settings (both LBs write the same value; interface names
# are the same on both).
group="{\"addresses\": [{\"address\": \"$FLOAT_FRONT\", \"interface\": \"$frontif\"}, {\"address\": \"$FLOAT_BACK\", \"interface\": \"$backif\"}]}"
i=0
until ETCDCTL_API=3 etcdctl --endpoints "$ETCD" --dial-timeout 3s put /switchman/groups/default "$group" >/dev/null; do
	i=$((i + 1))
	[ $i -lt 30 ] || { echo "vagrant-lb: cannot write /switchman/groups/default to $ETCD" >&2; exit 1; }
	sleep 2
done
cat >/etc/systemd/system/switchman.service <<EOT
[Unit]
Description=switchman load-balancer agent
After=network-online.target
Wants=network-online.target

[Service]
Environment=SWITCHMAN_ETCD_ENDPOINTS=$ETCD
Environment=SWITCHMAN_HA_INTERFACE=$frontif
ExecStart=/usr/local/bin/switchman agent --node $NODE --data-dir /var/lib/switchman
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
EOT
systemctl daemon-reload
systemctl enable switchman
systemctl restart switchman
echo "switchman agent running on $NODE against $ETCD, sharing the VIPs on $frontif"
