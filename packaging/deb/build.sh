#!/usr/bin/env bash
# build.sh BINARY VERSION OUTDIR: the switchman .deb, assembled from the
# built binary and packaging/ and packed with dpkg-deb (no fakeroot: files
# are owned by root through --root-owner-group). `make deb` runs it.
# DEB_COMPRESS_LEVEL (default 6, as dpkg-deb) trades size for time: the
# tests use 0.
set -euo pipefail
bin=$(readlink -f "$1")
version=$2
out=$(readlink -f "$3")
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
arch=$(dpkg --print-architecture)
maintainer=$(git -C "$top" log -1 --format='%an <%ae>' 2>/dev/null || echo "switchman maintainers <root@localhost>")
# Reproducible: every timestamp is the commit's.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$top" log -1 --format=%ct 2>/dev/null || date +%s)}

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/switchman
doc=$root/usr/share/doc/switchman

install -D -m 0755 "$bin" "$root/usr/bin/switchman"
install -D -m 0644 "$top/packaging/switchman.service" "$root/lib/systemd/system/switchman.service"
install -D -m 0640 "$top/packaging/default" "$root/etc/default/switchman"
install -d -m 0755 "$root/usr/share/man/man8" "$doc/examples"
"$bin" man | gzip -9n > "$root/usr/share/man/man8/switchman.8.gz"
install -m 0644 "$top/README.md" "$top/docs/operations.md" "$doc/"
install -m 0644 "$top"/examples/*.yaml "$top"/examples/*.json "$top/examples/README.md" "$doc/examples/"
install -D -m 0644 "$top/packaging/prometheus/switchman-alerts.yaml" "$root/usr/share/switchman/prometheus/switchman-alerts.yaml"
install -D -m 0644 "$top/packaging/grafana/switchman.json" "$root/usr/share/switchman/grafana/switchman.json"
install -D -m 0644 "$here/lintian-overrides" "$root/usr/share/lintian/overrides/switchman"
"$here/copyright.sh" "$bin" > "$doc/copyright"
chmod 0644 "$doc/copyright"

# The changelog: this build's entry, then the hand-written history.
{
	if ! head -1 "$here/changelog" | grep -qF "($version)"; then
		commit=$(git -C "$top" rev-parse --short HEAD 2>/dev/null || echo unknown)
		printf 'switchman (%s) unstable; urgency=medium\n\n  * Snapshot of commit %s.\n\n -- %s  %s\n\n' \
			"$version" "$commit" "$maintainer" "$(date -R -u -d "@$SOURCE_DATE_EPOCH")"
	fi
	cat "$here/changelog"
} | gzip -9n > "$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"

install -d -m 0755 "$root/DEBIAN"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$root/DEBIAN/"
install -m 0644 "$here/conffiles" "$root/DEBIAN/"
size=$(du -s -k --apparent-size --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" -e "s|@SIZE@|$size|" \
	"$here/control.in" > "$root/DEBIAN/control"
(cd "$root" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$out"
deb="$out/switchman_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz -z"${DEB_COMPRESS_LEVEL:-6}" --build "$root" "$deb" >/dev/null
echo "$deb"
