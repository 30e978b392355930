#!/usr/bin/env bash
# copyright.sh BINARY: writes /usr/share/doc/switchman/copyright in the
# machine-readable format for the static binary: switchman itself, the Go
# standard library and every Go module linked in (read from the binary with
# `go version -m`), each with its license from the module cache.
set -euo pipefail
bin=$1
GO=${GO:-go}
modcache=$($GO env GOMODCACHE)
goroot=$($GO env GOROOT)

# license_of FILE: a short name (common-licenses where Debian has the text).
license_of() {
	local f=$1
	if grep -q "Apache License" "$f" && grep -q "Version 2.0" "$f"; then echo Apache-2.0
	elif grep -q "Mozilla Public License" "$f" && grep -q "2.0" "$f"; then echo MPL-2.0
	elif grep -qi "ISC License\|Permission to use, copy, modify, and/or distribute" "$f"; then echo ISC
	elif grep -q "Permission is hereby granted, free of charge" "$f"; then echo MIT
	elif grep -q "Redistribution and use in source and binary forms" "$f"; then
		if grep -qi "neither the name\|names of its contributors" "$f"; then echo BSD-3-clause; else echo BSD-2-clause; fi
	else echo UNKNOWN
	fi
}

# body FILE: the file as the indented body of a field (blank lines as " .").
body() { sed -e 's/^[[:space:]]*$/./' -e 's/^/ /' "$1"; }

cat <<HDR
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: switchman
Comment: /usr/bin/switchman is a static Go binary. It contains the Go standard
 library and the Go modules listed below, each under its own license; the
 list is read from the binary itself (go version -m) when the package is
 built.

Files: *
Copyright: 2026 switchman maintainers
License: UNDECLARED
 The switchman project has not declared a license for its own code yet.

Files: go-stdlib/*
Copyright: The Go Authors
License: BSD-3-clause
$(body "$goroot/LICENSE")
HDR

$GO version -m "$bin" | awk '$1=="dep"||$1=="=>"{print $2, $3}' | while read -r mod ver; do
	dir="$modcache/$(echo "$mod" | sed 's/[A-Z]/!\L&/g')@$ver"
	lic=""
	for name in LICENSE LICENSE.txt LICENSE.md LICENCE COPYING LICENSE-APACHE-2.0.txt; do
		if [ -f "$dir/$name" ]; then lic="$dir/$name"; break; fi
	done
	echo
	echo "Files: go-modules/$mod"
	echo "Comment: Go module $mod $ver"
	if [ -z "$lic" ]; then
		echo "Copyright: see the module's source"
		echo "License: UNKNOWN"
		echo " No license file was found in the module cache for $mod $ver."
		continue
	fi
	short=$(license_of "$lic")
	echo "Copyright: see below"
	echo "License: $short"
	case $short in
	Apache-2.0|MPL-2.0)
		echo " On Debian systems the complete text of the license is in"
		echo " /usr/share/common-licenses/$short."
		grep -i "copyright" "$lic" | grep -vi "copyright license\|copyright owner\|copyright notice\|copyright statement\|copyright \[yyyy\]\|copyright {yyyy}" | head -3 | sed 's/^[[:space:]]*/ /' || true
		;;
	*)
		body "$lic"
		;;
	esac
done
