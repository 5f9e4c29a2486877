#!/usr/bin/env bash
# Make (once) the Debian 12 root filesystem the system test boots as two
# containers, and print its path. It is cached under
# /var/cache/phaul-test and made again when the recipe below changes.
set -euo pipefail
cache=${PHAUL_SYSTEM_CACHE:-/var/cache/phaul-test}
recipe="debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2,procps,ca-certificates bookworm"
root=$cache/rootfs
if [ -d "$root" ] && [ "$(cat "$cache/rootfs.recipe" 2>/dev/null)" = "$recipe" ]; then
	echo "$root"
	exit 0
fi
mirror=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
mkdir -p "$cache"
rm -rf "$root.tmp"
echo "test-system: making the container root filesystem (about a minute, once)" >&2
$recipe "$root.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
rm -rf "$root"
mv "$root.tmp" "$root"
echo "$recipe" >"$cache/rootfs.recipe"
echo "$root"
