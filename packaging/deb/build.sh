#!/usr/bin/env bash
# Build phaul's Debian package: both binaries, the systemd units, sysusers
# and tmpfiles entries (group phaul, /var/lib/phauld), man pages and shell
# completion. Usage: packaging/deb/build.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-build}
arch=$(dpkg --print-architecture)
# Debian versions start with a digit: 0.1.0+git<sha> for a checkout.
rev=$(git describe --tags --always --dirty 2>/dev/null || echo unknown)
version=${PHAUL_DEB_VERSION:-0.1.0+git${rev//-/.}}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/phaul
ldflags="-X github.com/phaul/phaul/pkg/version.Version=$version"

install -d "$root/DEBIAN" "$root/usr/sbin" "$root/usr/bin" "$root/lib/systemd/system" \
	"$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d" "$root/usr/share/man/man1" "$root/usr/share/man/man8" \
	"$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
	"$root/usr/share/fish/vendor_completions.d" "$root/usr/share/doc/phaul"
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$root/usr/sbin/phauld" ./daemon
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$root/usr/bin/phaulctl" ./ctl
install -m 0644 packaging/systemd/phauld.socket packaging/systemd/phauld.service "$root/lib/systemd/system/"
install -m 0644 packaging/deb/sysusers.conf "$root/usr/lib/sysusers.d/phauld.conf"
install -m 0644 packaging/deb/tmpfiles.conf "$root/usr/lib/tmpfiles.d/phauld.conf"
gzip -9n <packaging/man/phauld.8 >"$root/usr/share/man/man8/phauld.8.gz"
gzip -9n <packaging/man/phaulctl.1 >"$root/usr/share/man/man1/phaulctl.1.gz"
"$root/usr/bin/phaulctl" completion bash >"$root/usr/share/bash-completion/completions/phaulctl"
"$root/usr/bin/phaulctl" completion zsh >"$root/usr/share/zsh/vendor-completions/_phaulctl"
"$root/usr/bin/phaulctl" completion fish >"$root/usr/share/fish/vendor_completions.d/phaulctl.fish"
install -m 0644 README.md docs/*.md "$root/usr/share/doc/phaul/"
cat >"$root/usr/share/doc/phaul/copyright" <<'TXT'
phaul: live migration of running Linux processes between hosts, with CRIU.
Copyright: the phaul authors.
TXT

installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CTRL
Package: phaul
Version: $version
Architecture: $arch
Maintainer: phaul maintainers <phaul@localhost>
Installed-Size: $installed_size
Depends: criu (>= 4.2), systemd
Recommends: iptables, rsync, runc
Section: admin
Priority: optional
Homepage: https://github.com/phaul/phaul
Description: live migration of running processes between hosts
 phauld, a daemon on every host, moves running process trees to another
 host's phauld with CRIU: the process keeps running there with its memory
 and state. Until the destination has committed, the process stays on the
 source, frozen; any failure resumes it there. Daemons authenticate each
 other with mutual TLS. phaulctl drives the local phauld.
 .
 CRIU >= 4.2 is required; on Debian 12, where criu is 3.17, phaul's
 'make criu' installs a working one and registers it (package phaul-criu).
CTRL
cat >"$root/DEBIAN/postinst" <<'SH'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
	systemd-sysusers /usr/lib/sysusers.d/phauld.conf || true
	systemd-tmpfiles --create /usr/lib/tmpfiles.d/phauld.conf || true
	if [ -d /run/systemd/system ]; then
		systemctl daemon-reload || true
		# A running phauld picks up the new binary; its migrations are
		# finished or undone by its commit rule.
		systemctl try-restart phauld.service || true
	fi
fi
SH
cat >"$root/DEBIAN/prerm" <<'SH'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
	systemctl stop phauld.socket phauld.service || true
	systemctl disable phauld.socket phauld.service || true
fi
SH
cat >"$root/DEBIAN/postrm" <<'SH'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
fi
SH
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
mkdir -p "$out"
deb="$out/phaul_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
# A stable name for scripts and tests.
cp "$deb" "$out/phaul.deb"
echo "$deb"
