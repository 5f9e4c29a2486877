#!/usr/bin/env bash
# Make a working CRIU >= 4.2 available as /usr/local/sbin/criu.
#
# Debian 12 ships criu 3.17, which does not start on kernels that have the
# [vvar_vclock] mapping (6.x), and CRIU 4.1 cannot dump inet sockets on
# kernels >= 6.16. CRIU 4.2 from Debian unstable works, but it needs a newer
# glibc than bookworm has. So this script:
#
#   1. does nothing if the criu on PATH is >= 4.2 and passes `criu check`;
#   2. otherwise downloads criu and its whole library closure from Debian
#      unstable with a *private* apt state (the system's apt sources are
#      never touched), unpacks the packages into a private root, and
#   3. installs /usr/local/sbin/criu, a wrapper that runs that criu through
#      the private root's own dynamic loader and libraries;
#   4. ends with `criu check`.
#
# Environment:
#   PHAUL_CRIU_PREFIX  where the private root lives (default /usr/local/lib/phaul-criu)
#   PHAUL_CRIU_CACHE   private apt state and downloads (default /var/cache/phaul-criu)
#   PHAUL_CRIU_SUITE   Debian suite to take criu from (default sid)
#   PHAUL_CRIU_FORCE   set to 1 to reinstall even if the current criu works
set -euo pipefail

prefix=${PHAUL_CRIU_PREFIX:-/usr/local/lib/phaul-criu}
cache=${PHAUL_CRIU_CACHE:-/var/cache/phaul-criu}
suite=${PHAUL_CRIU_SUITE:-sid}
wrapper=/usr/local/sbin/criu
min_major=4
min_minor=2

log() { printf 'make criu: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# criu_ok CRIU: true if CRIU reports a version >= 4.2 and `criu check` passes.
criu_ok() {
	local bin=$1 version major minor
	version=$("$bin" --version 2>/dev/null | awk '/^Version:/ {print $2; exit}') || return 1
	[ -n "$version" ] || return 1
	major=${version%%.*}
	minor=${version#*.}
	minor=${minor%%.*}
	[[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] || return 1
	if ((major < min_major || (major == min_major && minor < min_minor))); then
		log "$bin is version $version; phaul needs >= $min_major.$min_minor"
		return 1
	fi
	if ! "$bin" check >/dev/null 2>&1; then
		log "$bin (version $version) fails 'criu check'"
		return 1
	fi
	return 0
}

# register CRIU VERSION: when the criu in use is not a Debian package, tell
# dpkg that CRIU VERSION is installed, with a package of no files,
# phaul-criu, that provides "criu (= VERSION)". The phaul package depends
# on criu (>= 4.2) and then installs.
register() {
	local version=$1 path=$2 stage
	command -v dpkg-deb >/dev/null || return 0
	dpkg -S "$(readlink -f "$path")" >/dev/null 2>&1 && return 0
	if [ "$(dpkg-query -W -f='${Status} ${Provides}' phaul-criu 2>/dev/null)" = "install ok installed criu (= $version)" ]; then
		return 0
	fi
	stage=$(mktemp -d)
	mkdir -p "$stage/pkg/DEBIAN"
	cat >"$stage/pkg/DEBIAN/control" <<CTRL
Package: phaul-criu
Version: $version
Architecture: all
Maintainer: phaul maintainers <phaul@localhost>
Provides: criu (= $version)
Section: admin
Priority: optional
Description: marks CRIU $version, installed by phaul's 'make criu', for dpkg
 CRIU $version runs as $path, with its own libraries, outside dpkg. This
 package holds no files: it tells dpkg that CRIU $version is there.
CTRL
	dpkg-deb --root-owner-group --build "$stage/pkg" "$stage/phaul-criu.deb" >/dev/null
	dpkg -i "$stage/phaul-criu.deb" >/dev/null
	rm -rf "$stage"
	log "registered $path with dpkg as criu $version (package phaul-criu)"
}

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs $wrapper)"

if [ "${PHAUL_CRIU_FORCE:-0}" != 1 ] && current=$(command -v criu) && criu_ok "$current"; then
	version=$("$current" --version | awk '/^Version:/ {print $2}')
	log "using $current ($version)"
	register "$version" "$current"
	exec "$current" check
fi

command -v apt-get >/dev/null || die "apt-get not found: this installer supports Debian only; install CRIU >= 4.2 yourself"
command -v dpkg >/dev/null || die "dpkg not found"

# The mirror the system already uses, so that a machine behind a proxy or a
# local mirror keeps using it. Falls back to deb.debian.org.
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
	[ -f "$f" ] || continue
	mirror=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' "$f")
	[ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
	mirror=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) {print $i; exit}}' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || die "$keyring missing: apt-get install debian-archive-keyring"

mkdir -p "$cache/lists/partial" "$cache/archives/partial" "$cache/etc"
printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$suite" >"$cache/etc/private.list"
# Dir::State::status=/dev/null makes apt resolve the *whole* dependency
# closure (glibc included) instead of relying on what bookworm has.
apt_opts=(
	-o "Dir::Etc::SourceList=$cache/etc/private.list"
	-o "Dir::Etc::SourceParts=/dev/null"
	-o "Dir::State::Lists=$cache/lists"
	-o "Dir::State::status=/dev/null"
	-o "Dir::Cache=$cache"
	-o "Dir::Cache::archives=$cache/archives"
	-o "APT::Install-Recommends=false"
	-o "Debug::NoLocking=true"
)
log "resolving criu from Debian $suite at $mirror (private apt state in $cache)"
apt-get "${apt_opts[@]}" -qq update
rm -f "$cache"/archives/*.deb
apt-get "${apt_opts[@]}" -qq -y install --download-only criu >/dev/null

version=$(dpkg-deb -f "$cache"/archives/criu_*.deb Version)
root="$prefix/$version"
log "unpacking criu $version and $(($(ls "$cache"/archives/*.deb | wc -l) - 1)) libraries into $root"
rm -rf "$root.new"
mkdir -p "$root.new"
for deb in "$cache"/archives/*.deb; do
	dpkg-deb -x "$deb" "$root.new"
done
libdir="$root/usr/lib/x86_64-linux-gnu"
[ -x "$root.new/usr/sbin/criu" ] || die "criu binary missing from the downloaded package"
[ -x "$root.new/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ] || die "dynamic loader missing from the downloaded libc6"
rm -rf "$root"
mv "$root.new" "$root"

# The wrapper runs criu through the private loader with an explicit library
# path (not LD_LIBRARY_PATH), so programs that criu itself executes (ip,
# action scripts) still use the system's libraries.
tmp=$(mktemp "$wrapper.XXXXXX")
cat >"$tmp" <<EOF
#!/bin/sh
# Installed by phaul's 'make criu': CRIU $version from Debian $suite with its
# own libraries under $root.
exec $libdir/ld-linux-x86-64.so.2 --library-path $libdir $root/usr/sbin/criu "\$@"
EOF
chmod 0755 "$tmp"
mv "$tmp" "$wrapper"
hash -r
log "installed $wrapper (criu $version)"
criu_ok "$wrapper" || die "$wrapper does not work on this kernel; see its 'criu check' output"
register "$("$wrapper" --version | awk '/^Version:/ {print $2}')" "$wrapper"
exec "$wrapper" check
