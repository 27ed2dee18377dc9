#!/usr/bin/env bash
# install-test-deps.sh - install what livemux's tests need, from Debian, when
# it is missing: Icinga 2 (a real Livestatus server), Monitoring::Livestatus
# (the real third-party client), nftables and iproute2 (fault injection), HAProxy (the
# benchmark's comparison proxy), stunnel4 and openssl (TLS tests),
# systemd-analyze (checks the shipped unit file), and the
# tools to build the second real server, Naemon with naemon-livestatus, from
# third_party/naemon (built once by scripts/naemon-site.sh into ~/.cache);
# for scripts/package-test.sh: cargo-deb (builds the .deb), man-db, zsh
# and fish (the man pages and completions are tried in them).
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
# scripts/package-test.sh
command -v man >/dev/null 2>&1 || missing+=(man-db)
command -v zsh >/dev/null 2>&1 || missing+=(zsh)
command -v fish >/dev/null 2>&1 || missing+=(fish)

# cargo-deb, pinned: the package's layout and maintainer scripts come from
# it, so a new release is taken on purpose (about a minute to build, once
# per machine).
CARGO_DEB_VERSION=3.8.0
install_cargo_deb() {
    case "$(cargo deb --version 2>/dev/null)" in
    *" $CARGO_DEB_VERSION") return 0 ;;
    esac
    exec 8>>/tmp/.livemux-cargo-install.lock
    flock -w 900 8
    case "$(cargo deb --version 2>/dev/null)" in
    *" $CARGO_DEB_VERSION") return 0 ;;
    esac
    say "installing cargo-deb $CARGO_DEB_VERSION"
    cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION" >&2
}

build_naemon() {
    "$(dirname "$0")/naemon-site.sh" build >/dev/null
}
if [ ${#missing[@]} -eq 0 ]; then
    install_cargo_deb
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
install_cargo_deb
build_naemon
say "done"
