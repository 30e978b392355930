#!/bin/sh
# Vagrant lab, load-balancer host: IPVS, HAProxy, forwarding, and the
# switchman agent as a systemd unit.
# Usage: vagrant-lb.sh NODE ETCD_ENDPOINTS BACK_IFACE_ADDRESS
set -eu
NODE=${1:?usage: vagrant-lb.sh NODE ETCD_ENDPOINTS BACK_ADDRESS}
ETCD=${2:?etcd endpoints}
BACK=${3:?back network address}
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
cat >/etc/systemd/system/switchman.service <<EOT
[Unit]
Description=switchman load-balancer agent
After=network-online.target
Wants=network-online.target

[Service]
Environment=SWITCHMAN_ETCD_ENDPOINTS=$ETCD
ExecStart=/usr/local/bin/switchman agent --node $NODE --data-dir /var/lib/switchman
Restart=on-failure

[Install]
WantedBy=multi-user.target
EOT
systemctl daemon-reload
systemctl enable switchman
systemctl restart switchman
echo "switchman agent running on $NODE against $ETCD"
