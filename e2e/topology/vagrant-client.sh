#!/bin/sh
# Vagrant lab, client host: routes the VIP range via the active LB.
# Usage: vagrant-client.sh VIP_RANGE ACTIVE_LB_FRONT_ADDRESS
# Fail over by hand: ip route replace VIP_RANGE via OTHER_LB
set -eu
VIPS=${1:?usage: vagrant-client.sh VIP_RANGE LB_ADDRESS}
LB=${2:?active LB address}
/sbin/ip route replace "$VIPS" via "$LB"
cat >/etc/network/if-up.d/switchman-lab <<EOT
#!/bin/sh
/sbin/ip route replace $VIPS via $LB 2>/dev/null || true
EOT
chmod +x /etc/network/if-up.d/switchman-lab
echo "client: $VIPS via $LB"
