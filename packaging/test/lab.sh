# shellcheck shell=bash
# lab.sh (sourced): a throwaway Debian host for the packaging tests. A
# systemd runs as PID 1 in namespaces of its own (mount, PID, network, UTS,
# IPC, cgroup) on an overlay of this machine's root with a tmpfs on top:
# packages installed there, units started there and addresses added there
# never reach this machine, and all of it is gone when the lab stops. The
# network namespace has only lo (and whatever a test adds), so traffic
# stays inside.
#
#   lab_boot            start it; LAB_PID is its systemd (as this host sees it)
#   lab_run CMD...      run a command in it, as root
#   lab_stop            power it off and remove what it left

LAB_PID=
LAB_CGROUP=

lab_boot() {
	local base
	if [ -d /sys/fs/cgroup/unified ] && grep -q ' /sys/fs/cgroup/unified cgroup2 ' /proc/mounts; then
		base=/sys/fs/cgroup/unified # hybrid hierarchy
	elif grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts; then
		base=/sys/fs/cgroup
	else
		echo "lab: no cgroup v2 hierarchy to give the lab's systemd" >&2
		return 1
	fi
	LAB_CGROUP=$(mktemp -d "$base/switchman-lab.XXXXXX")
	local dir
	dir=$(mktemp -d /tmp/switchman-lab.XXXXXX)
	# The subshell moves itself into the lab's cgroup, so that the cgroup
	# namespace's root is that cgroup and systemd manages only its subtree.
	(
		echo $BASHPID > "$LAB_CGROUP/cgroup.procs"
		exec unshare --mount --pid --fork --net --uts --ipc --cgroup --propagation private -- bash -euc '
			d=$1
			mount -t tmpfs -o size=4g,mode=700 tmpfs "$d"
			mkdir "$d/upper" "$d/work" "$d/root"
			mount -t overlay overlay -o "lowerdir=/,upperdir=$d/upper,workdir=$d/work" "$d/root"
			r=$d/root
			mount -t proc proc "$r/proc"
			mount -t sysfs -o ro sysfs "$r/sys"
			mount -t cgroup2 cgroup2 "$r/sys/fs/cgroup"
			mount --rbind /dev "$r/dev"
			mount -t tmpfs -o mode=755 tmpfs "$r/run"
			mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"
			mkdir -p "$r/run/systemd/system" "$r/run/lock" "$r/.oldroot"
			printf "[Unit]\nDescription=switchman packaging lab\nWants=systemd-journald.socket systemd-journald.service\n" > "$r/run/systemd/system/switchman-lab.target"
			# A machine id of its own, and no unit of this host started in it.
			: > "$r/etc/machine-id"
			cd "$r"
			pivot_root . .oldroot
			umount -l /.oldroot
			hostname switchman-lab
			exec env -i container=switchman-lab PATH=/usr/sbin:/usr/bin:/sbin:/bin /lib/systemd/systemd --unit=switchman-lab.target
		' lab "$dir"
	) > "$dir.log" 2>&1 &
	local unshare_pid=$!
	local deadline=$((SECONDS + 60))
	while :; do
		LAB_PID=$(cat "/proc/$unshare_pid/task/$unshare_pid/children" 2>/dev/null | awk '{print $1}')
		if [ -n "$LAB_PID" ] && [ "$(cat "/proc/$LAB_PID/comm" 2>/dev/null)" = systemd ]; then
			if state=$(lab_run systemctl is-system-running 2>/dev/null) || [ "$state" = degraded ]; then
				break
			fi
		fi
		if [ $SECONDS -gt $deadline ] || ! kill -0 "$unshare_pid" 2>/dev/null; then
			echo "lab: systemd did not come up within 60s (state: ${state:-none})" >&2
			cat "$dir.log" >&2 || true
			LAB_PID=
			return 1
		fi
		sleep 0.2
	done
	rmdir "$dir" 2>/dev/null || true
	rm -f "$dir.log"
	lab_run ip link set lo up
}

lab_run() {
	nsenter --target "$LAB_PID" --all --root --wd -- "$@"
}

lab_stop() {
	if [ -n "$LAB_PID" ] && kill -0 "$LAB_PID" 2>/dev/null; then
		kill -s RTMIN+4 "$LAB_PID" 2>/dev/null || true # poweroff
		local deadline=$((SECONDS + 30))
		while kill -0 "$LAB_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
		kill -KILL "$LAB_PID" 2>/dev/null || true # ends every process in its PID namespace
		while kill -0 "$LAB_PID" 2>/dev/null; do sleep 0.1; done
	fi
	LAB_PID=
	if [ -n "$LAB_CGROUP" ] && [ -d "$LAB_CGROUP" ]; then
		local deadline=$((SECONDS + 10))
		until find "$LAB_CGROUP" -depth -type d -exec rmdir {} + 2>/dev/null; do
			[ $SECONDS -lt $deadline ] || { echo "lab: could not remove $LAB_CGROUP" >&2; break; }
			sleep 0.2
		done
	fi
	LAB_CGROUP=
}
