#!/usr/bin/env bash
# install-test-deps.sh - install what livemux's tests need, from Debian, when
# it is missing: Icinga 2 (a real Livestatus server), Monitoring::Livestatus
# (the real third-party client), nftables and iproute2 (fault injection), HAProxy (the
# benchmark's comparison proxy), stunnel4 and openssl (TLS tests),
# systemd-analyze (checks the shipped unit file), and the
# tools to build the second real server, Naemon with naemon-livestatus, from
# third_party/naemon (built once by scripts/naemon-site.sh into ~/.cache).
# Needs root (or sudo) and apt-get. Safe to run repeatedly and concurrently.
set -euo pipefail
say() { printf 'install-test-deps: %s\n' "$*" >&2; }

missing=()
command -v icinga2 >/dev/null 2>&1 && [ -d /usr/share/icinga2/include ] || missing+=(icinga2-bin icinga2-common)
perl -MMonitoring::Livestatus -e1 >/dev/null 2>&1 || missing+=(libmonitoring-livestatus-perl)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
# strace counts the system calls per query (tests/it/hotpath.rs).
command -v strace >/dev/null 2>&1 || missing+=(strace)
command -v stunnel4 >/dev/null 2>&1 || missing+=(stunnel4)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# systemd-analyze verifies dist/livemux.service.
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# Naemon's build (scripts/naemon-site.sh build)
command -v gperf >/dev/null 2>&1 || missing+=(gperf)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
pkg-config --exists glib-2.0 2>/dev/null || missing+=(libglib2.0-dev)

build_naemon() {
    "$(dirname "$0")/naemon-site.sh" build >/dev/null
}
if [ ${#missing[@]} -eq 0 ]; then
    build_naemon
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || { say "missing ${missing[*]} and no apt-get"; exit 1; }
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
exec 9>>/tmp/.livemux-apt.lock
flock -w 900 9
say "installing ${missing[*]}"
# Packages must not start system-wide services (icinga2, haproxy).
policy=/usr/sbin/policy-rc.d made_policy=0
if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee $policy >/dev/null && $sudo chmod 755 $policy && made_policy=1
fi
restore() { [ $made_policy -eq 0 ] || $sudo rm -f $policy; }
trap restore EXIT
apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600)
if ! $sudo "${apt[@]}" "${missing[@]}" >&2; then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q -o DPkg::Lock::Timeout=600 >&2
    $sudo "${apt[@]}" "${missing[@]}" >&2
fi
build_naemon
say "done"
