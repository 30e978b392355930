#!/usr/bin/env bash
# The real-kernel lab: boots Debian's kernel (which has IPVS) under QEMU's
# software emulation with an initramfs holding the switchman binary, the e2e
# test binary and the tools they call, builds the namespace topology
# (e2e/topology/setup.sh) and runs the e2e suite in it.
#
#   e2e/lab/run.sh [-run REGEX]        (from anywhere; works on the repo root)
#
# Root is not needed (apt-get download, dpkg-deb, depmod -b and qemu all run
# as any user). Debian packages: qemu-system-x86 busybox-static kmod cpio
# ipvsadm iproute2 iptables haproxy etcd-client (see e2e/lab/README.md).
#
# Environment:
#   LAB_TIMEOUT      whole VM run, a timeout(1) duration      (default 45m)
#   LAB_TEST_TIMEOUT go test -test.timeout inside the VM      (default 40m)
#   LAB_MEM / LAB_SMP   VM memory (MiB) and CPUs              (default 2048 / 2)
#   LAB_KERNEL_PKG   versioned package, e.g. linux-image-6.1.0-56-amd64
#                    (default: what linux-image-amd64 depends on, looked up once
#                    and cached in .lab/kernel/package)
#   LAB_REFRESH_KERNEL=1  look the kernel package up again
#   LAB_HAPROXY=0    leave haproxy out of the initramfs (default: include it)
#   LAB_INITRD_COMPRESS  none (default: boots ~1.7 s faster under tcg) or gzip
#   SWITCHMAN_BIN    use this switchman binary instead of building ./cmd/switchman
#   E2E_TEST_BIN     use this e2e test binary instead of building ./e2e/
#
# Output: the test output streams to stdout; everything stays in .lab/out/
# (console.log = ttyS0, test.log = ttyS1). Exit status: the in-VM test
# binary's exit code, or 1 when the VM never reported one (timeout, panic).
set -euo pipefail

t_start=$(date +%s)
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
LAB=$ROOT/.lab
RUN_REGEX=""

while [ $# -gt 0 ]; do
	case $1 in
	-run | --run)
		[ $# -ge 2 ] || { echo "run.sh: -run needs a REGEX" >&2; exit 2; }
		RUN_REGEX=$2
		shift 2
		;;
	-run=* | --run=*)
		RUN_REGEX=${1#*=}
		shift
		;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$0" | sed '$d'
		exit 0
		;;
	*)
		echo "run.sh: unknown argument $1 (usage: e2e/lab/run.sh [-run REGEX])" >&2
		exit 2
		;;
	esac
done

LAB_TIMEOUT=${LAB_TIMEOUT:-45m}
LAB_TEST_TIMEOUT=${LAB_TEST_TIMEOUT:-40m}
LAB_MEM=${LAB_MEM:-2048}
LAB_SMP=${LAB_SMP:-2}
LAB_HAPROXY=${LAB_HAPROXY:-1}

say() { echo "lab: $*" >&2; }
die() { echo "lab: error: $*" >&2; exit 1; }
need() {
	command -v "$1" >/dev/null 2>&1 || die "$1 not found; install the Debian package $2 (apt-get install -y $2)"
}
elapsed() { echo $(($(date +%s) - $1)); }

need qemu-system-x86_64 qemu-system-x86
need apt-get apt
need dpkg-deb dpkg
need depmod kmod
need cpio cpio
need go "golang (Go 1.26, https://go.dev/dl/)"
[ -x /bin/busybox ] || die "/bin/busybox not found; install busybox-static"
# busybox-static, not the dynamic busybox package: the initramfs has no libc for it
if ldd /bin/busybox >/dev/null 2>&1; then die "/bin/busybox is dynamically linked; install busybox-static"; fi
for b in ip:iproute2 ipvsadm:ipvsadm xtables-nft-multi:iptables etcdctl:etcd-client; do
	need "${b%%:*}" "${b#*:}"
done
if [ "$LAB_HAPROXY" = 1 ]; then need haproxy haproxy; fi

mkdir -p "$LAB/kernel" "$LAB/bin" "$LAB/out"
# One lab at a time per checkout: a second run.sh waits for the first.
if command -v flock >/dev/null 2>&1; then
	exec 9>"$LAB/lock"
	if ! flock -n 9; then
		say "another e2e/lab/run.sh is using $LAB; waiting for it"
		flock 9
	fi
fi

# --- kernel -----------------------------------------------------------------
t_phase=$(date +%s)
kpkg=${LAB_KERNEL_PKG:-}
if [ -z "$kpkg" ] && [ -s "$LAB/kernel/package" ] && [ "${LAB_REFRESH_KERNEL:-0}" != 1 ]; then
	kpkg=$(cat "$LAB/kernel/package")
fi
if [ -z "$kpkg" ]; then
	say "looking up the kernel package behind linux-image-amd64"
	tmp=$(mktemp -d)
	# apt-get download as root warns that _apt cannot write here; harmless.
	(cd "$tmp" && apt-get download -q linux-image-amd64 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) ||
		die "apt-get download linux-image-amd64 failed (run apt-get update first?)"
	kpkg=$(dpkg-deb -f "$tmp"/linux-image-amd64_*.deb Depends | tr ',' '\n' |
		sed -n 's/^ *\(linux-image-[0-9][^ ]*\).*/\1/p' | head -n1)
	rm -rf "$tmp"
	[ -n "$kpkg" ] || die "cannot tell the versioned kernel package from linux-image-amd64"
	echo "$kpkg" >"$LAB/kernel/package"
fi
KDIR=$LAB/kernel/$kpkg
if [ ! -f "$KDIR/.done" ]; then
	say "downloading and unpacking $kpkg"
	rm -rf "$KDIR"
	mkdir -p "$KDIR/deb"
	(cd "$KDIR/deb" && apt-get download -q "$kpkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) ||
		die "apt-get download $kpkg failed"
	dpkg-deb -x "$KDIR"/deb/*.deb "$KDIR/root"
	rm -rf "$KDIR/deb"
	touch "$KDIR/.done"
fi
VMLINUZ=$(ls "$KDIR"/root/boot/vmlinuz-* | head -n1)
KVER=${VMLINUZ##*/vmlinuz-}
KMOD=$KDIR/root/lib/modules/$KVER
[ -d "$KMOD" ] || die "no modules for $KVER in $kpkg"
if [ ! -s "$KMOD/modules.dep" ]; then
	depmod -b "$KDIR/root" "$KVER" || die "depmod -b $KDIR/root $KVER failed"
fi
say "kernel $KVER ($kpkg) ready in $(elapsed "$t_phase")s"

# --- binaries -----------------------------------------------------------------
t_phase=$(date +%s)
export CGO_ENABLED=0
if [ -n "${SWITCHMAN_BIN:-}" ]; then
	[ -x "$SWITCHMAN_BIN" ] || die "SWITCHMAN_BIN=$SWITCHMAN_BIN is not an executable"
	[ "$(readlink -f "$SWITCHMAN_BIN")" = "$(readlink -f "$LAB/bin/switchman")" ] ||
		cp "$SWITCHMAN_BIN" "$LAB/bin/switchman"
else
	[ -d "$ROOT/cmd/switchman" ] ||
		die "./cmd/switchman does not exist yet; build it first or set SWITCHMAN_BIN=/path/to/switchman"
	version=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo dev)
	go build -ldflags "-X main.version=$version" -o "$LAB/bin/switchman" ./cmd/switchman ||
		die "go build ./cmd/switchman failed"
fi
if [ -n "${E2E_TEST_BIN:-}" ]; then
	[ -x "$E2E_TEST_BIN" ] || die "E2E_TEST_BIN=$E2E_TEST_BIN is not an executable"
	[ "$(readlink -f "$E2E_TEST_BIN")" = "$(readlink -f "$LAB/bin/e2e.test")" ] ||
		cp "$E2E_TEST_BIN" "$LAB/bin/e2e.test"
else
	go test -c -tags e2e -o "$LAB/bin/e2e.test" ./e2e/ || die "go test -c -tags e2e ./e2e/ failed"
fi
go build -o "$LAB/bin/labserver" ./e2e/topology/labserver || die "go build ./e2e/topology/labserver failed"
for b in switchman e2e.test labserver; do
	if ldd "$LAB/bin/$b" >/dev/null 2>&1; then die "$LAB/bin/$b is not static (CGO_ENABLED=0 is needed)"; fi
done
say "binaries built in $(elapsed "$t_phase")s"

# --- initramfs ----------------------------------------------------------------
t_phase=$(date +%s)
STAGE=$LAB/initramfs
rm -rf "$STAGE"
mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,etc,proc,sys,dev,tmp,run,root,var,e2e,lab}
ln -s ../run "$STAGE/var/run"
ln -s usr/lib "$STAGE/lib"
ln -s usr/lib64 "$STAGE/lib64"

# copy_libs FILE: copy the shared libraries FILE needs (ldd) to the same paths.
copy_libs() {
	ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' |
		while read -r lib; do
			dst=$STAGE$(readlink -f "$(dirname "$lib")")/$(basename "$lib")
			[ -e "$dst" ] || install -D -m 0755 "$(readlink -f "$lib")" "$dst"
		done
}
# copy_bin SRC DST: copy a binary (following symlinks) and its libraries.
copy_bin() {
	local src
	src=$(readlink -f "$(command -v "$1")")
	install -D -m 0755 "$src" "$STAGE$2"
	copy_libs "$src"
}

cp /bin/busybox "$STAGE/bin/busybox"
for applet in $(/bin/busybox --list); do
	case $applet in busybox) continue ;; esac
	[ -e "$STAGE/bin/$applet" ] || ln -s busybox "$STAGE/bin/$applet"
done
copy_bin ip /sbin/ip
copy_bin ipvsadm /sbin/ipvsadm
copy_bin xtables-nft-multi /usr/sbin/xtables-nft-multi
for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore \
	iptables-nft iptables-nft-save iptables-nft-restore ip6tables-nft ip6tables-nft-save ip6tables-nft-restore; do
	ln -s xtables-nft-multi "$STAGE/usr/sbin/$t"
	ln -s ../usr/sbin/xtables-nft-multi "$STAGE/sbin/$t"
done
XT=/usr/lib/x86_64-linux-gnu/xtables
mkdir -p "$STAGE$XT"
cp -a "$XT"/. "$STAGE$XT/"
for so in "$XT"/*.so; do copy_libs "$so"; done
copy_bin etcdctl /usr/bin/etcdctl
if [ "$LAB_HAPROXY" = 1 ]; then copy_bin haproxy /usr/sbin/haproxy; fi
install -m 0755 "$LAB/bin/switchman" "$STAGE/bin/switchman"
install -m 0755 "$LAB/bin/e2e.test" "$STAGE/bin/e2e.test"
install -m 0755 "$LAB/bin/labserver" "$STAGE/bin/labserver"
cp -a "$ROOT/e2e/topology" "$STAGE/e2e/topology"
rm -rf "$STAGE/e2e/topology/labserver"
# the test binary runs in /e2e, as go test would run it in ./e2e
if [ -d "$ROOT/e2e/testdata" ]; then cp -a "$ROOT/e2e/testdata" "$STAGE/e2e/testdata"; fi
if [ -d "$ROOT/examples" ]; then cp -a "$ROOT/examples" "$STAGE/examples"; fi

# Kernel modules: whole trees where tests may need anything (netfilter and
# IPVS, ipv4/ipv6 tunnels, crypto and lib for crc32c), a few drivers by name,
# then depmod over exactly what is staged.
MODS_WANTED="ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_sh ip_vs_mh ipip ip6_tunnel
veth dummy bridge nf_conntrack nf_nat nf_tables nft_compat nft_chain_nat xt_ipvs xt_conntrack
xt_comment xt_MASQUERADE iptable_nat iptable_filter ip6table_nat ip6table_filter crc32c_generic"
KSTAGE=$STAGE/lib/modules/$KVER
mkdir -p "$KSTAGE/kernel"
for tree in net/netfilter net/ipv4 net/ipv6 net/bridge net/802 net/llc crypto lib drivers/net/dummy.ko drivers/net/veth.ko; do
	src=$KMOD/kernel/$tree
	[ -e "$src" ] || continue
	mkdir -p "$KSTAGE/kernel/$(dirname "$tree")"
	cp -a "$src" "$KSTAGE/kernel/$(dirname "$tree")/"
done
# plus whatever the wanted modules depend on outside those trees
for m in $MODS_WANTED; do
	modprobe -d "$KDIR/root" -S "$KVER" --show-depends "$m" 2>/dev/null |
		awk '$1 == "insmod" {print $2}' | while read -r ko; do
		rel=${ko#"$KDIR/root"}
		[ -e "$STAGE$rel" ] || install -D -m 0644 "$ko" "$STAGE$rel"
	done
done
cp "$KMOD"/modules.order "$KMOD"/modules.builtin* "$KSTAGE/" 2>/dev/null || true
depmod -b "$STAGE" "$KVER"
for m in $MODS_WANTED; do
	modprobe -d "$STAGE" -S "$KVER" --show-depends "$m" >/dev/null 2>&1 ||
		grep -q "/$m.ko" "$KMOD/modules.builtin" 2>/dev/null ||
		die "kernel module $m is missing from the initramfs"
done
echo "$MODS_WANTED" | tr '\n' ' ' >"$STAGE/lab/modules"

cat >"$STAGE/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$STAGE/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
printf '127.0.0.1 localhost lab\n::1 localhost ip6-localhost\n' >"$STAGE/etc/hosts"
printf 'hosts: files\n' >"$STAGE/etc/nsswitch.conf"
for f in /etc/protocols /etc/services /etc/ethertypes; do [ -f "$f" ] && cp "$f" "$STAGE/etc/"; done
printf '%s' "$RUN_REGEX" >"$STAGE/lab/run-regex"
printf '%s' "$LAB_TEST_TIMEOUT" >"$STAGE/lab/test-timeout"
install -m 0755 "$ROOT/e2e/lab/init" "$STAGE/init"

case ${LAB_INITRD_COMPRESS:-none} in
gzip) INITRD=$LAB/initrd.cpio.gz compress="gzip -1" ;;
none) INITRD=$LAB/initrd.cpio compress=cat ;;
*) die "LAB_INITRD_COMPRESS must be gzip or none" ;;
esac
(cd "$STAGE" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) | $compress >"$INITRD.tmp"
mv "$INITRD.tmp" "$INITRD"
say "initramfs: $(du -sm "$STAGE" | cut -f1) MiB unpacked, $(($(stat -c %s "$INITRD") / 1048576)) MiB as ${INITRD##*/}, built in $(elapsed "$t_phase")s"

# --- boot -----------------------------------------------------------------------
OUT=$LAB/out
rm -f "$OUT/console.log" "$OUT/test.log"
: >"$OUT/test.log"
say "booting $KVER under qemu (tcg, ${LAB_MEM} MiB, $LAB_SMP CPUs, timeout $LAB_TIMEOUT)${RUN_REGEX:+, -run $RUN_REGEX}"
t_boot=$(date +%s)
timeout --kill-after=30s "$LAB_TIMEOUT" qemu-system-x86_64 \
	-accel tcg -cpu max -m "$LAB_MEM" -smp "$LAB_SMP" \
	-nographic -monitor none -parallel none -no-reboot -nic none \
	-kernel "$VMLINUZ" -initrd "$INITRD" \
	-serial "file:$OUT/console.log" -serial "file:$OUT/test.log" \
	-append "console=ttyS0 quiet loglevel=0 panic=-1 oops=panic random.trust_cpu=on" \
	</dev/null >"$OUT/qemu.log" 2>&1 &
qpid=$!
# Stream the test output while the VM runs; tail ends when qemu does.
# (/init puts ttyS1 in raw mode, so there are no carriage returns to strip.)
tail -n +1 -f --pid="$qpid" "$OUT/test.log" &
tpid=$!
qrc=0
wait "$qpid" || qrc=$?
wait "$tpid" 2>/dev/null || true
t_end=$(date +%s)

code=$(tr -d '\r' <"$OUT/test.log" | sed -n 's/^E2E-EXIT-CODE=\([0-9][0-9]*\)$/\1/p' | tail -n1)
if [ -z "$code" ]; then
	code=$(tr -d '\r' <"$OUT/console.log" 2>/dev/null | sed -n 's/^E2E-EXIT-CODE=\([0-9][0-9]*\)$/\1/p' | tail -n1)
fi
boot=$(tr -d '\r' <"$OUT/test.log" | sed -n 's/^lab: init reached at uptime \([0-9.]*\)s.*/\1/p' | head -n1)
echo
say "VM ran $((t_end - t_boot))s (kernel reached /init after ${boot:-?}s of guest uptime); whole lab run $(elapsed "$t_start")s"
if [ -z "$code" ]; then
	if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
		say "FAIL: the VM timed out after $LAB_TIMEOUT without reporting an exit code"
	else
		say "FAIL: the VM stopped (qemu exit $qrc) without reporting an exit code"
	fi
	say "last lines of $OUT/console.log:"
	tail -n 40 "$OUT/console.log" 2>/dev/null | tr -d '\r' >&2 || true
	[ -s "$OUT/qemu.log" ] && { say "qemu said:"; cat "$OUT/qemu.log" >&2; }
	exit 1
fi
say "in-VM tests exited $code (full output: $OUT/test.log, console: $OUT/console.log)"
exit "$code"
