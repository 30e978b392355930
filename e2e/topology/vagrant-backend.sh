#!/bin/sh
# Vagrant lab, backend host: the same backend server as the QEMU lab
# (labserver: HTTP on 80/8080/8443, UDP echo on 53/5353, every answer starts
# with the host's name) and a route to the client network via the HA group's
# floating back address, held by whichever LB owns the group, so NAT replies
# pass back through its IPVS.
# Usage: vagrant-backend.sh NAME FRONT_NET FLOATING_BACK_ADDRESS
# For direct routing: /vagrant/e2e/topology/dr-backend.sh VIP - [dr|tun]
set -eu
NAME=${1:?usage: vagrant-backend.sh NAME FRONT_NET LB_ADDRESS}
FRONT=${2:?front network}
LB=${3:?floating back address}
export DEBIAN_FRONTEND=noninteractive

/sbin/ip route replace "$FRONT" via "$LB"
# keep the route across reboots
cat >/etc/network/if-up.d/switchman-lab <<EOT
#!/bin/sh
/sbin/ip route replace $FRONT via $LB 2>/dev/null || true
EOT
chmod +x /etc/network/if-up.d/switchman-lab

if [ -x /vagrant/.lab/bin/labserver ]; then
	install -m 0755 /vagrant/.lab/bin/labserver /usr/local/bin/labserver
	exec_start="/usr/local/bin/labserver -name $NAME -tcp 80,8080,8443 -udp 53,5353"
else
	# fallback: busybox httpd (TCP 80) and socat (UDP 53), same answers
	mkdir -p /srv/lab
	echo "$NAME" >/srv/lab/index.html
	echo ok >/srv/lab/healthz
	cat >/etc/systemd/system/lab-udp.service <<EOT
[Unit]
Description=lab UDP echo (answers with the host name)
[Service]
ExecStart=/usr/bin/socat UDP6-RECVFROM:53,fork SYSTEM:"echo $NAME"
Restart=always
[Install]
WantedBy=multi-user.target
EOT
	exec_start="/bin/busybox httpd -f -p 80 -h /srv/lab"
	systemctl daemon-reload
	systemctl enable --now lab-udp
fi
mkdir -p /run/labserver
cat >/etc/systemd/system/labserver.service <<EOT
[Unit]
Description=lab backend server ($NAME)
After=network-online.target
[Service]
RuntimeDirectory=labserver
RuntimeDirectoryPreserve=yes
ExecStart=$exec_start
Restart=always
[Install]
WantedBy=multi-user.target
EOT
systemctl daemon-reload
systemctl enable labserver
systemctl restart labserver
echo "$NAME serving; front net $FRONT via $LB"
