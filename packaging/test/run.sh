#!/usr/bin/env bash
# run.sh DEB UPGRADE_DEB LABSERVER: the packaging test (`make test` runs it
# through `make packaging-check`; root).
#
# 1. The .deb as built: control fields, every file with its owner and mode,
#    the conffile, the checksums, the man page.
# 2. Installed with dpkg into a lab host (lab.sh: a systemd as PID 1 in
#    namespaces of its own, on an overlay of this machine's root), whose
#    maintainer scripts start the unit with the packaged defaults:
#    `systemd-analyze verify`, the user, directories and capabilities.
# 3. A demo on loopback only: two backends (labserver), a service on the
#    default layer-4 plane and one on HAProxy behind an allow_cidrs filter,
#    both "applied" and answering.
# 4. Every metric the alert rules and the dashboard name exists on the
#    running agent (the HA ones with --ha-interface on a veth pair of the
#    lab, when this build has the flag).
# 5. A package upgrade under a client loop: no request fails, an
#    established connection goes on, HAProxy is not restarted and the new
#    agent writes nothing to nf_tables.
# 6. A stop leaves the data plane serving; the documented backup and
#    restore of the data directory; removal and purge.
set -euo pipefail
deb=$(readlink -f "$1")
deb2=$(readlink -f "$2")
labserver=$(readlink -f "$3")
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
# shellcheck source=lab.sh
source "$here/lab.sh"

fails=0
ok() { echo "ok: $*"; }
fail() { echo "FAIL: $*" >&2; fails=$((fails + 1)); }
# eventually WHAT CMD...: CMD succeeds within 60s.
eventually() {
	local what=$1 deadline=$((SECONDS + 60))
	shift
	until "$@" >/dev/null 2>&1; do
		if [ $SECONDS -ge $deadline ]; then
			fail "$what: not within 60s"
			return 1
		fi
		sleep 0.2
	done
	ok "$what"
}

echo "== 1. the package as built: $(basename "$deb")"
field() { dpkg-deb -f "$deb" "$1"; }
[ "$(field Package)" = switchman ] && ok "Package" || fail "Package is $(field Package)"
[ "$(field Architecture)" = "$(dpkg --print-architecture)" ] && ok "Architecture" || fail "Architecture is $(field Architecture)"
for r in haproxy ipvsadm nftables etcd-client; do
	field Recommends | tr ',' '\n' | grep -qx " *$r" && ok "Recommends $r" || fail "Recommends lacks $r: $(field Recommends)"
done
field Depends | grep -qw adduser && ok "Depends adduser" || fail "Depends lacks adduser"
listing=$(dpkg-deb -c "$deb" | awk '{print $1, $2, $6}' | sed 's|^\(.*\) \./|\1 /|')
while read -r mode owner path; do
	if grep -qxF -- "$mode $owner $path" <<<"$listing"; then
		ok "$mode $owner $path"
	else
		fail "$path: want $mode $owner, have: $(grep -- " $path\$" <<<"$listing" || echo missing)"
	fi
done <<'FILES'
-rwxr-xr-x root/root /usr/bin/switchman
-rw-r--r-- root/root /lib/systemd/system/switchman.service
-rw-r----- root/root /etc/default/switchman
-rw-r--r-- root/root /usr/share/man/man8/switchman.8.gz
-rw-r--r-- root/root /usr/share/doc/switchman/copyright
-rw-r--r-- root/root /usr/share/doc/switchman/changelog.gz
-rw-r--r-- root/root /usr/share/doc/switchman/operations.md
-rw-r--r-- root/root /usr/share/doc/switchman/README.md
-rw-r--r-- root/root /usr/share/doc/switchman/examples/web-rr.yaml
-rw-r--r-- root/root /usr/share/switchman/prometheus/switchman-alerts.yaml
-rw-r--r-- root/root /usr/share/switchman/grafana/switchman.json
FILES
unpacked=$(mktemp -d)
# On a failure, what the lab's agent says, before the lab goes.
diagnose() {
	if [ "$fails" != 0 ] && [ -n "$LAB_PID" ]; then
		echo "--- switchman status and the agent's last log lines:" >&2
		lab_run switchman status >&2 || true
		lab_run journalctl -u switchman --no-pager -n 30 >&2 || true
	fi
}
trap 'diagnose; rm -rf "$unpacked"; lab_stop' EXIT
dpkg-deb -R "$deb" "$unpacked"
[ "$(cat "$unpacked/DEBIAN/conffiles")" = /etc/default/switchman ] && ok "conffiles: /etc/default/switchman" || fail "conffiles: $(cat "$unpacked/DEBIAN/conffiles")"
(cd "$unpacked" && md5sum --quiet -c DEBIAN/md5sums) && ok "md5sums" || fail "md5sums"
cmp -s "$unpacked/lib/systemd/system/switchman.service" "$top/packaging/switchman.service" && ok "the unit is packaging/switchman.service" || fail "the packaged unit differs"
warn=$(zcat "$unpacked/usr/share/man/man8/switchman.8.gz" | groff -man -Tutf8 -ww -z 2>&1 || true)
[ -z "$warn" ] && ok "man page renders without warnings" || fail "man page: $warn"
zcat "$unpacked/usr/share/doc/switchman/changelog.gz" | head -1 | grep -qF "($(field Version))" && ok "changelog names $(field Version)" || fail "changelog: $(zcat "$unpacked/usr/share/doc/switchman/changelog.gz" | head -1)"
# Every query of the dashboard parses as PromQL: promtool checks them as
# recording rules.
queries=$unpacked/dashboard-queries.yaml
{
	echo "groups: [{name: dashboard, rules: ["
	grep -o '"expr": ".*",$' "$top/packaging/grafana/switchman.json" | sed -e 's/^"expr": "//' -e 's/",$//' -e 's/\\"/"/g' |
		awk '{printf "{record: q%d, expr: '"'"'%s'"'"'},\n", NR, $0}'
	echo "]}]"
} >"$queries"
n=$(grep -c '"expr":' "$top/packaging/grafana/switchman.json")
promtool check rules "$queries" >/dev/null && ok "the dashboard's $n queries parse (promtool)" || fail "dashboard queries: $(promtool check rules "$queries" 2>&1 | tail -3)"
grep -q "^License: UNKNOWN" "$unpacked/usr/share/doc/switchman/copyright" && fail "copyright: a module's license is UNKNOWN" || ok "copyright: every module's license identified"

echo "== 2. installed in a lab host with systemd"
lab_boot
ok "lab systemd up (pid $LAB_PID)"
# This machine's policy-rc.d forbids starting services (a container
# convention); a real host has none.
lab_run rm -f /usr/sbin/policy-rc.d
lab_run sh -c 'cat > /root/switchman.deb' <"$deb"
lab_run sh -c 'cat > /root/switchman-upgrade.deb' <"$deb2"
lab_run install -m 0755 /dev/stdin /usr/local/bin/labserver <"$labserver"
lab_run dpkg -i /root/switchman.deb
[ "$(lab_run systemctl is-enabled switchman)" = enabled ] && ok "unit enabled" || fail "unit not enabled"
[ "$(lab_run systemctl is-active switchman)" = active ] && ok "unit active (READY=1 came)" || { fail "unit not active"; lab_run journalctl -u switchman --no-pager | tail -20 >&2; }
lab_run systemctl show -p StatusText --value switchman | grep -q "first pass applied" && ok "status text: first pass applied" || fail "status text: $(lab_run systemctl show -p StatusText --value switchman)"
out=$(lab_run systemd-analyze verify /lib/systemd/system/switchman.service 2>&1 || echo "exit $?")
[ -z "$out" ] && ok "systemd-analyze verify" || fail "systemd-analyze verify: $out"
lab_run dpkg-query -W -f='${Conffiles}\n' switchman | grep -q '/etc/default/switchman ' && ok "dpkg knows the conffile" || fail "dpkg does not list the conffile"
lab_run getent passwd switchman | grep -q ':/var/lib/switchman:' && ok "system user switchman" || fail "no user switchman"
[ "$(lab_run stat -c '%U %a' /var/lib/switchman)" = "switchman 700" ] && ok "/var/lib/switchman switchman 700" || fail "/var/lib/switchman: $(lab_run stat -c '%U %a' /var/lib/switchman)"
[ "$(lab_run stat -c '%U %a' /run/switchman)" = "switchman 700" ] && ok "/run/switchman switchman 700" || fail "/run/switchman: $(lab_run stat -c '%U %a' /run/switchman)"
pid=$(lab_run systemctl show -p MainPID --value switchman)
caps=$(lab_run awk '/^CapEff/ {print $2}' "/proc/$pid/status")
# CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_NET_RAW (13) and nothing else.
[ "$caps" = 0000000000003400 ] && ok "agent runs with NET_BIND_SERVICE, NET_ADMIN, NET_RAW only" || fail "agent capabilities $caps"
[ "$(lab_run ps -o user= -p "$pid")" = switchman ] && ok "agent runs as switchman" || fail "agent runs as $(lab_run ps -o user= -p "$pid")"
echo "info: $(lab_run systemd-analyze security switchman 2>/dev/null | tail -1)"

echo "== 3. demo on loopback"
lab_run systemd-run -q --unit be1 /usr/local/bin/labserver -name be1 -tcp 18081 -udp 18091
lab_run systemd-run -q --unit be2 /usr/local/bin/labserver -name be2 -tcp 18082 -udp 18092
backends='"backends":[{"address":"127.0.0.1","port":18081},{"address":"127.0.0.1","port":18082}],"health":{"protocol":"http","path":"/healthz","interval":"1s","timeout":"500ms","rise":1}'
lab_run etcdctl put /switchman/services/web "{\"vip\":\"127.0.0.10\",\"port\":80,$backends}" >/dev/null
lab_run etcdctl put /switchman/services/web-tls-less "{\"vip\":\"127.0.0.11\",\"port\":80,\"driver\":\"haproxy\",\"allow_cidrs\":[\"127.0.0.0/8\"],$backends}" >/dev/null
applied() { lab_run switchman status | awk -v s="$1" '$1==s && $5=="applied" && $6=="2/2" {found=1} END {exit !found}'; }
eventually "web applied, 2/2 healthy (default layer-4 plane)" applied web
eventually "web-tls-less applied, 2/2 healthy (HAProxy, allow_cidrs)" applied web-tls-less
lab_run switchman status
answers() { for _ in 1 2 3 4; do lab_run curl -s -m 2 "http://$1/"; done | sort -u | tr '\n' ' '; }
[ "$(answers 127.0.0.10)" = "be1 be2 " ] && ok "127.0.0.10:80 answers from be1 and be2" || fail "127.0.0.10:80 answers: $(answers 127.0.0.10)"
[ "$(answers 127.0.0.11)" = "be1 be2 " ] && ok "127.0.0.11:80 (HAProxy) answers from be1 and be2" || fail "127.0.0.11:80 answers: $(answers 127.0.0.11)"

echo "== 4. the metrics the rules and the dashboard name"
names=$(grep -oh 'switchman_[a-z0-9_]*' "$top/packaging/prometheus/switchman-alerts.yaml" "$top/packaging/grafana/switchman.json" | sort -u)
ha=
if lab_run switchman agent --help | grep -q -- '--ha-interface'; then
	ha=yes
	lab_run ip link add ha0 type veth peer name ha1
	lab_run ip addr add 192.0.2.1/24 dev ha0
	lab_run ip link set ha0 up
	lab_run ip link set ha1 up
	lab_run sh -c 'echo SWITCHMAN_HA_INTERFACE=ha0 >> /etc/default/switchman'
	lab_run etcdctl put /switchman/services/web-ha "{\"vip\":\"192.0.2.10\",\"port\":80,\"ha_group\":\"g1\",$backends}" >/dev/null
	lab_run systemctl restart switchman
	eventually "web-ha applied with --ha-interface ha0" applied web-ha
	ha_held() { lab_run curl -s http://127.0.0.1:9469/metrics | grep -qx 'switchman_ha_group_held{group="g1"} 1'; }
	eventually "HA group g1 held by the agent" ha_held
else
	echo "SKIP: HA metrics (switchman_ha_*): this build has no --ha-interface yet; only the others are checked"
fi
metrics=$(lab_run curl -s http://127.0.0.1:9469/metrics)
for n in $names; do
	if [ -z "$ha" ] && [[ $n == switchman_ha_* ]]; then
		continue
	fi
	grep -q "^${n}[{ ]" <<<"$metrics" && ok "metric $n" || fail "metric $n named by the rules or the dashboard is not exported"
done

echo "== 5. package upgrade under load"
old_agent=$(lab_run systemctl show -p MainPID --value switchman)
old_haproxy=$(lab_run cat /run/switchman/haproxy/haproxy.pid)
# Clients: new connections to both VIPs in a loop, and one established
# connection per VIP used before and after the upgrade.
lab_run install -m 0755 /dev/stdin /usr/local/bin/client <<'CLIENT'
#!/bin/bash
# client VIP: requests until /run/client.stop exists (at most 10 minutes).
vip=$1 okc=0 failc=0 end=$((SECONDS + 600))
while [ ! -e /run/client.stop ] && [ $SECONDS -lt $end ]; do
	if [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "http://$vip/")" = 200 ]; then okc=$((okc + 1)); else failc=$((failc + 1)); fi
	echo $((okc + failc)) > "/run/client.$vip.count"
done
echo "$okc $failc" > "/run/client.$vip"
CLIENT
lab_run install -m 0755 /dev/stdin /usr/local/bin/held <<'HELD'
#!/bin/bash
# held VIP: one HTTP/1.1 connection, a request now and one after /run/client.stop.
vip=$1
req() { printf 'GET / HTTP/1.1\r\nHost: x\r\n\r\n' >&3; IFS= read -r -t 5 status <&3 || return 1;
	while IFS= read -r -t 5 line <&3 && [ "$line" != $'\r' ]; do :; done; IFS= read -r -t 5 body <&3; echo "${status%$'\r'} $body"; }
exec 3<>"/dev/tcp/$vip/80" || { echo "connect failed" > "/run/held.$vip"; exit; }
first=$(req)
while [ ! -e /run/client.stop ]; do sleep 0.1; done
second=$(req || echo "connection lost")
echo "$first | $second" > "/run/held.$vip"
HELD
for vip in 127.0.0.10 127.0.0.11; do
	lab_run systemd-run -q --unit "client-$vip" /usr/local/bin/client "$vip"
	lab_run systemd-run -q --unit "held-$vip" /usr/local/bin/held "$vip"
done
# requests made by both clients so far
sent() { for vip in 127.0.0.10 127.0.0.11; do lab_run cat "/run/client.$vip.count" 2>/dev/null || echo 0; done | sort -n | head -1; }
atleast() { [ "$(sent)" -ge "$1" ]; }
eventually "clients running (50 requests to each VIP)" atleast 50
start=$SECONDS
lab_run dpkg -i /root/switchman-upgrade.deb >/dev/null
echo "info: dpkg -i of the upgrade took $((SECONDS - start))s (postinst restarts the agent and waits for READY=1)"
new_agent=$(lab_run systemctl show -p MainPID --value switchman)
[ "$new_agent" != "$old_agent" ] && [ "$(lab_run systemctl is-active switchman)" = active ] && ok "agent restarted by the upgrade ($old_agent -> $new_agent) and ready" || fail "agent after upgrade: pid $new_agent, $(lab_run systemctl is-active switchman)"
[ "$(lab_run dpkg-query -W -f='${Version}' switchman)" = "$(dpkg-deb -f "$deb2" Version)" ] && ok "upgraded to $(dpkg-deb -f "$deb2" Version)" || fail "version after upgrade"
before=$(sent)
eventually "clients go on after the upgrade (50 more requests to each VIP)" atleast $((before + 50))
lab_run touch /run/client.stop
for vip in 127.0.0.10 127.0.0.11; do
	eventually "client of $vip finished" lab_run test -e "/run/client.$vip"
	eventually "held connection to $vip finished" lab_run test -e "/run/held.$vip"
	read -r okc failc < <(lab_run cat "/run/client.$vip")
	echo "info: $vip: $okc requests answered, $failc failed during the upgrade"
	[ "$failc" = 0 ] && [ "$okc" -gt 0 ] && ok "no request to $vip failed during the upgrade ($okc answered)" || fail "$vip: $failc of $((okc + failc)) requests failed during the upgrade"
	held=$(lab_run cat "/run/held.$vip")
	[[ $held == "HTTP/1.1 200 OK be"*" | HTTP/1.1 200 OK be"* ]] && ok "connection to $vip established before the upgrade still works after it" || fail "established connection to $vip: $held"
done
[ "$(lab_run cat /run/switchman/haproxy/haproxy.pid)" = "$old_haproxy" ] && ok "HAProxy kept running (master $old_haproxy), adopted by the new agent" || fail "HAProxy master changed: $old_haproxy -> $(lab_run cat /run/switchman/haproxy/haproxy.pid)"
writes=$(lab_run curl -s http://127.0.0.1:9469/metrics | awk '/^switchman_dataplane_writes_total\{driver="nftables"\}/ {print $2}')
[ "$writes" = 0 ] && ok "the new agent wrote nothing to nf_tables" || fail "the new agent made $writes nf_tables writes after the upgrade"

# A structural change reloads HAProxy (master CLI, re-exec) under the
# unit's restrictions (system call filter, capabilities).
lab_run etcdctl put /switchman/services/web-reload "{\"vip\":\"127.0.0.12\",\"port\":443,\"driver\":\"haproxy\",$backends}" >/dev/null
eventually "web-reload applied (HAProxy reloaded by the new agent)" applied web-reload
[ "$(answers 127.0.0.12:443)" = "be1 be2 " ] && ok "127.0.0.12:443 answers after the reload" || fail "127.0.0.12:443 answers: $(answers 127.0.0.12:443)"

echo "== 6. backup, stop, restore, remove, purge"
# The backup and restore of docs/operations.md, word for word.
lab_run mkdir -p /backup
lab_run etcdctl snapshot save /backup/switchman-etcd.db >/dev/null 2>&1
lab_run tar -C /var/lib/switchman -czf /backup/switchman-state.tgz --ignore-failed-read lastgood ipvs-owned.json 2>/dev/null
lab_run systemctl stop switchman
[ "$(answers 127.0.0.10)" = "be1 be2 " ] && [ "$(answers 127.0.0.11)" = "be1 be2 " ] && ok "after systemctl stop both VIPs still answer (the data plane stays)" || fail "after stop: $(answers 127.0.0.10) / $(answers 127.0.0.11)"
lab_run rm -rf /var/lib/switchman/etcd /var/lib/switchman/lastgood
lab_run sh -c 'etcdctl snapshot restore /backup/switchman-etcd.db --data-dir /var/lib/switchman/etcd --name "$(hostname)" --initial-cluster "$(hostname)=http://127.0.0.1:2380" --initial-advertise-peer-urls http://127.0.0.1:2380' >/dev/null 2>&1
lab_run tar -C /var/lib/switchman -xzf /backup/switchman-state.tgz
lab_run chown -R switchman:switchman /var/lib/switchman
lab_run systemctl start switchman
[ "$(lab_run systemctl is-active switchman)" = active ] && ok "started again on the restored data dir" || fail "start after restore"
# The agent's own count, not the status keys (the snapshot holds the old ones).
ndefs=$(lab_run etcdctl get --prefix --keys-only /switchman/services/ | grep -c .)
appliedall() { lab_run curl -s http://127.0.0.1:9469/metrics | grep -qx "switchman_services{state=\"applied\"} $ndefs"; }
eventually "the $ndefs definitions back from the snapshot and applied by the new agent" appliedall
lab_run dpkg -r switchman >/dev/null
[ "$(lab_run systemctl is-active switchman)" != active ] && ok "removal stops the agent" || fail "agent still active after removal"
lab_run dpkg -P switchman >/dev/null 2>&1
lab_run test -d /var/lib/switchman && ok "purge keeps /var/lib/switchman" || fail "purge removed /var/lib/switchman"
lab_run test ! -e /etc/default/switchman && ok "purge removes /etc/default/switchman" || fail "purge left /etc/default/switchman"

echo "packaging: $fails failed"
[ "$fails" = 0 ]
