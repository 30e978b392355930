#!/bin/sh
# Vagrant lab, client host: routes the VIP range via the HA group's floating
# front address, held by whichever LB owns the group (gratuitous ARP moves
# it on a takeover).
# Usage: vagrant-client.sh VIP_RANGE FLOATING_FRONT_ADDRESS
set -eu
VIPS=${1:?usage: vagrant-client.sh VIP_RANGE LB_ADDRESS}
LB=${2:?floating front address}
/sbin/ip route replace "$VIPS" via "$LB"
cat >/etc/network/if-up.d/switchman-lab <<EOT
#!/bin/sh
/sbin/ip route replace $VIPS via $LB 2>/dev/null || true
EOT
chmod +x /etc/network/if-up.d/switchman-lab
echo "client: $VIPS via $LB"
