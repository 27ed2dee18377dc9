#!/usr/bin/env bash
# naemon-site.sh - throw-away Naemon sites with naemon-livestatus (the
# mk-livestatus family), for livemux's integration tests and benchmarks.
#
#   naemon-site.sh build
#       Build Naemon core and naemon-livestatus from the pinned tarballs in
#       third_party/naemon into a private prefix (printed on stdout), unless
#       a build of the same tarballs is already there. Installs the Debian
#       build dependencies when they are missing (root or sudo -n). Safe to
#       run concurrently: one build at a time, the others wait for it.
#   naemon-site.sh start --dir DIR --port PORT [--hosts N] [--services M]
#       Generate a site in DIR (empty, or a previous site of this script),
#       start the core, give every object its static state, wait until
#       Livestatus answers with all objects checked. Prints the core's PID
#       on stdout; everything else goes to stderr.
#   naemon-site.sh stop --dir DIR [--fast]
#       Stop the site (SIGTERM, then SIGKILL after 20 s; --fast: SIGKILL at
#       once). Idempotent.
#   naemon-site.sh run --dir DIR --port PORT [--hosts N] [--services M]
#       start, print "ready <pid>" on stdout, then wait until stdin reaches
#       EOF (the parent went away) and kill the site. Tests use this so that
#       a site never outlives the test process, however it ends.
#   naemon-site.sh signal --dir DIR --sig STOP|CONT|...
#       Send a signal to every process of the site.
#   naemon-site.sh reload --dir DIR
#       SIGHUP to the core: it reads its configuration again and its
#       program_start changes.
#
# Livestatus listens on 127.0.0.1:PORT and on the UNIX socket DIR/live (a
# second copy of the module: one module instance serves one socket).
# Objects and states are those of scripts/icinga-site.sh, so tests can
# expect the same answers from both cores:
#   hosts     host-0000 .. ; DOWN when i % 50 == 49; groups all + web/db/app/infra
#   services  ping cpu memory load disk swap procs ssh http ntp, then svc-NNN;
#             global index g: WARNING if g%7==3, else CRITICAL if g%13==5,
#             else UNKNOWN if g%29==11, else OK
#   comments  on hosts with i % 100 == 0; downtimes on hosts with i % 100 == 50
# Active checks are off; states come from passive results submitted once at
# start-up (max_check_attempts 1: every state is hard and stays).
#
# Environment: LIVEMUX_NAEMON_PREFIX overrides the build prefix.
set -euo pipefail

prog=${0##*/}
here=$(cd "$(dirname "$0")" && pwd)

core_version=1.5.2
ls_version=1.5.1
tarballs=$here/../third_party/naemon
prefix=${LIVEMUX_NAEMON_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/livemux/naemon-$core_version-livestatus-$ls_version}

# shellcheck source=site-lib.sh
. "$(dirname "$0")/site-lib.sh"

# ------------------------------------------------------------------ build

built() {
    [ -x "$prefix/bin/naemon" ] && [ -f "$prefix/lib/naemon-livestatus/livestatus.so" ] &&
        [ "$(cat "$prefix/.livemux-built" 2>/dev/null)" = "$(cat "$tarballs/SHA256SUMS")" ]
}

install_build_deps() {
    local missing=()
    command -v gperf >/dev/null 2>&1 || missing+=(gperf)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    command -v g++ >/dev/null 2>&1 || missing+=(g++)
    command -v make >/dev/null 2>&1 || missing+=(make)
    pkg-config --exists glib-2.0 2>/dev/null || missing+=(libglib2.0-dev)
    [ ${#missing[@]} -gt 0 ] || return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} to build Naemon, and no apt-get"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    say "installing ${missing[*]} from Debian"
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
        -o DPkg::Lock::Timeout=600 "${missing[@]}")
    $sudo "${apt[@]}" >&2 || { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2; $sudo "${apt[@]}" >&2; }
}

build_naemon() {
    if built; then
        echo "$prefix"
        return 0
    fi
    mkdir -p "$(dirname "$prefix")"
    exec 8>>"$(dirname "$prefix")/.naemon-build.lock"
    flock -w 900 8 || die "timed out waiting for another Naemon build"
    if built; then
        flock -u 8
        echo "$prefix"
        return 0
    fi
    (cd "$tarballs" && sha256sum --quiet -c SHA256SUMS) || die "tarballs in $tarballs do not match SHA256SUMS"
    install_build_deps
    local work t0=$SECONDS jobs
    jobs=$(nproc 2>/dev/null || echo 2)
    work=$(mktemp -d /tmp/livemux-naemon-build.XXXXXX)
    rm -rf "$prefix"
    tar -xzf "$tarballs/naemon-core-$core_version.tar.gz" -C "$work"
    tar -xzf "$tarballs/naemon-livestatus-$ls_version.tar.gz" -C "$work"
    say "building naemon-core $core_version and naemon-livestatus $ls_version into $prefix"
    local log=$work/build.log
    if ! (
        set -e
        cd "$work/naemon-core-$core_version"
        ./configure --prefix="$prefix" --with-tests=no --disable-dependency-tracking --disable-static \
            --with-naemon-user="$(id -un)" --with-naemon-group="$(id -gn)"
        # HELP2MAN=true: no man pages, so help2man is not needed.
        make -j"$jobs" HELP2MAN=true
        make install HELP2MAN=true
        cd "$work/naemon-livestatus-$ls_version"
        touch .naemon.official # the version reads 1.5.1, not 1.5.1.source
        PKG_CONFIG_PATH="$prefix/lib/pkgconfig" ./configure --prefix="$prefix" \
            --disable-dependency-tracking --disable-static
        make -j"$jobs"
        make install-strip
    ) >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "the Naemon build failed (log: $log)"
    fi
    cp "$tarballs/SHA256SUMS" "$prefix/.livemux-built"
    rm -rf "$work"
    flock -u 8
    say "built in $((SECONDS - t0)) s"
    echo "$prefix"
}

# ------------------------------------------------------------------ sites

# PIDs of every process of this site: the core, its command-file helper and
# its check worker, recognised by this site's paths on their command lines.
site_pids() {
    pgrep -f -- "$dir/etc/naemon.cfg( |\$)|--worker $dir/run/naemon.qh" || true
}

core_pid() {
    local pid
    pid=$(cat "$dir/run/naemon.pid" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && site_pids | grep -qx "$pid" && echo "$pid"
}

# The number a Stats query answers, or "?".
count() {
    local v
    v=$(lq "$1"$'ResponseHeader: fixed16\n\n' 2>/dev/null) || v="?"
    echo "${v%$'\n'}"
}

write_config() {
    local so=$1
    mkdir -p "$dir"/{etc,var/spool,var/archives,run,log}
    echo "livemux naemon test site" >"$dir/.livemux-naemon-site"
    # dlopen() loads a file once per process: the UNIX socket's instance of
    # the module must be a copy, not a link.
    cp "$so" "$dir/run/livestatus-unix.so"
    cat >"$dir/etc/naemon.cfg" <<EOF
# Written by livemux's $prog; rewritten on every start.
cfg_file=$dir/etc/objects.cfg
log_file=$dir/log/naemon.log
log_archive_path=$dir/var/archives
log_rotation_method=n
object_cache_file=$dir/var/objects.cache
precached_object_file=$dir/var/objects.precache
status_file=$dir/var/status.dat
status_update_interval=3600
temp_file=$dir/var/naemon.tmp
temp_path=$dir/var/spool
check_result_path=$dir/var/spool
lock_file=$dir/run/naemon.lock
command_file=$dir/run/naemon.cmd
query_socket=$dir/run/naemon.qh
check_external_commands=1
state_retention_file=$dir/var/retention.dat
retain_state_information=1
use_retained_program_state=0
use_retained_scheduling_info=0
use_syslog=0
log_initial_states=0
log_current_states=0
log_external_commands=0
log_passive_checks=0
check_workers=1
execute_service_checks=0
execute_host_checks=0
accept_passive_service_checks=1
accept_passive_host_checks=1
passive_host_checks_are_soft=0
enable_notifications=0
enable_event_handlers=0
enable_flap_detection=0
process_performance_data=0
check_service_freshness=0
check_host_freshness=0
interval_length=60
allow_empty_hostgroup_assignment=1
event_broker_options=-1
broker_module=$so inet_addr=127.0.0.1:$port log_file=$dir/log/livestatus-tcp.log
broker_module=$dir/run/livestatus-unix.so $dir/live log_file=$dir/log/livestatus-unix.log
EOF
    # Naemon's object language has no loops: awk writes the objects, and
    # the passive results and comments that give them their static states.
    awk -v hosts="$hosts" -v services="$services" -v now="$(date +%s)" \
        -v objects="$dir/etc/objects.cfg" -v cmds="$dir/var/initial.cmds" '
    function pad(n, w,   s) { s = n ""; while (length(s) < w) s = "0" s; return s }
    function svc(j) { return j < nkinds ? kinds[j + 1] : "svc-" pad(j, 3) }
    function state(g) { return g % 7 == 3 ? 1 : g % 13 == 5 ? 2 : g % 29 == 11 ? 3 : 0 }
    BEGIN {
        nkinds = split("ping cpu memory load disk swap procs ssh http ntp", kinds, " ")
        split("web db app infra", roles, " ")
        width = length((hosts - 1) ""); if (width < 4) width = 4
        o = objects
        print "define timeperiod {\n  timeperiod_name always\n  alias Always" > o
        print "  sunday 00:00-24:00\n  monday 00:00-24:00\n  tuesday 00:00-24:00\n  wednesday 00:00-24:00" > o
        print "  thursday 00:00-24:00\n  friday 00:00-24:00\n  saturday 00:00-24:00\n}" > o
        print "define command {\n  command_name lm-static\n  command_line /bin/true\n}" > o
        print "define contactgroup {\n  contactgroup_name admins\n  alias Admins\n}" > o
        print "define contact {\n  contact_name icingaadmin\n  alias Icinga Admin\n  email icingaadmin@localhost" > o
        print "  contactgroups admins\n  host_notification_period always\n  service_notification_period always" > o
        print "  host_notification_options d,u,r\n  service_notification_options w,u,c,r" > o
        print "  host_notification_commands lm-static\n  service_notification_commands lm-static\n}" > o
        print "define hostgroup {\n  hostgroup_name all\n  alias All hosts\n}" > o
        for (r = 1; r <= 4; r++) printf "define hostgroup {\n  hostgroup_name %s\n  alias Role %s\n}\n", roles[r], roles[r] > o
        for (j = 0; j < services; j++)
            printf "define servicegroup {\n  servicegroup_name sg-%s\n  alias Service %s\n}\n", svc(j), svc(j) > o
        for (i = 0; i < hosts; i++) {
            hn = "host-" pad(i, width); role = roles[i % 4 + 1]; fixed = (i % 50 == 49) ? 2 : 0
            printf "define host {\n  host_name %s\n  alias %s\n  display_name Host %d\n  address 10.0.%d.%d\n", \
                hn, hn, i, int(i / 256) % 256, i % 256 > o
            printf "  hostgroups all,%s\n  check_command lm-static\n  max_check_attempts 1\n  check_period always\n", role > o
            printf "  notification_period always\n  contacts icingaadmin\n  _ROLE %s\n  _IDX %d\n  _FIXED_STATE %d\n}\n", \
                role, i, fixed > o
            printf "[%d] PROCESS_HOST_CHECK_RESULT;%s;%d;host %s state %d\n", now, hn, fixed ? 1 : 0, hn, fixed > cmds
            if (i % 100 == 0) printf "[%d] ADD_HOST_COMMENT;%s;1;livemux;comment on %s\n", now, hn, hn > cmds
            if (i % 100 == 50)
                printf "[%d] SCHEDULE_HOST_DOWNTIME;%s;%d;%d;1;0;0;livemux;maintenance of %s\n", \
                    now, hn, now - 3600, now + 30 * 86400, hn > cmds
            for (j = 0; j < services; j++) {
                g = i * services + j; s = state(g)
                printf "define service {\n  host_name %s\n  service_description %s\n  servicegroups sg-%s\n", hn, svc(j), svc(j) > o
                printf "  check_command lm-static\n  max_check_attempts 1\n  check_period always\n" > o
                printf "  notification_period always\n  _IDX %d\n  _FIXED_STATE %d\n}\n", g, s > o
                printf "[%d] PROCESS_SERVICE_CHECK_RESULT;%s;%s;%d;%s on %s state %d|value=%d%%;80;90\n", \
                    now, hn, svc(j), s, svc(j), hn, s, g % 100 > cmds
            }
        }
    }'
}

start_site() {
    check_start_args
    local built_prefix
    built_prefix=$(build_naemon)
    if [ -e "$dir" ] && [ ! -f "$dir/.livemux-naemon-site" ] && [ -n "$(ls -A "$dir")" ]; then
        die "$dir is not empty and not a site of this script"
    fi
    [ -z "$(site_pids)" ] || stop_site
    rm -rf "${dir:?}/etc" "${dir:?}/var" "${dir:?}/run" "${dir:?}/log" "${dir:?}/live"
    write_config "$built_prefix/lib/naemon-livestatus/livestatus.so"
    local args=()
    [ "$(id -u)" -ne 0 ] || args+=(--allow-root)
    setsid "$built_prefix/bin/naemon" "${args[@]}" "$dir/etc/naemon.cfg" </dev/null >"$dir/log/console.log" 2>&1 &
    local pid=$! i
    echo "$pid" >"$dir/run/naemon.pid"
    failed() {
        say "---- $dir/log/console.log, naemon.log, livestatus-tcp.log ----"
        tail -n 20 "$dir/log/console.log" "$dir/log/naemon.log" "$dir/log/livestatus-tcp.log" >&2 2>/dev/null || true
        fast=1 stop_site
        die "$*"
    }
    local want="$hosts;$((hosts * services))"
    for ((i = 0; i < 600; i++)); do
        kill -0 "$pid" 2>/dev/null || failed "naemon exited during start-up"
        grep -qi "cannot bind\|failed to bind\|address already in use" "$dir/log/livestatus-tcp.log" 2>/dev/null &&
            failed "Livestatus could not bind 127.0.0.1:$port"
        [ "$(lq $'GET status\nColumns: num_hosts num_services\nResponseHeader: fixed16\n\n' 2>/dev/null)" = "$want" ] && break
        sleep 0.1
    done
    [ $i -lt 600 ] || failed "Livestatus did not answer within 60 s"
    # The static states, comments and downtimes, through the command pipe.
    [ -p "$dir/run/naemon.cmd" ] || failed "command pipe $dir/run/naemon.cmd missing"
    timeout 60 dd if="$dir/var/initial.cmds" of="$dir/run/naemon.cmd" bs=64k status=none ||
        failed "could not write the initial results to the command pipe"
    local comments=$(((hosts + 99) / 100)) downtimes=$(((hosts + 49) / 100)) got=""
    for ((i = 0; i < 600; i++)); do
        got="$(count $'GET hosts\nStats: has_been_checked = 0\n') $(count $'GET services\nStats: has_been_checked = 0\n')"
        got+=" $(count $'GET comments\nFilter: entry_type = 1\nStats: id > 0\n') $(count $'GET downtimes\nStats: id > 0\n')"
        [ "$got" = "0 0 $comments $downtimes" ] && break
        sleep 0.1
    done
    [ $i -lt 600 ] ||
        failed "static states not reached after 60 s (unchecked hosts, services, comments, downtimes: $got)"
    [ -S "$dir/live" ] || failed "UNIX socket $dir/live missing"
    say "site in $dir up: tcp 127.0.0.1:$port, unix $dir/live, $hosts hosts, $((hosts * services)) services"
    echo "$pid"
}

# Stop the site: SIGTERM to the core and up to 20 s for a clean exit, then
# SIGKILL. With --fast (throw-away teardown) SIGKILL at once.
stop_site() {
    need_dir
    local i pid
    [ -n "$(site_pids)" ] || return 0
    if [ "$fast" -eq 0 ] && pid=$(core_pid); then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 200; i++)); do
            [ -n "$(site_pids)" ] || return 0
            sleep 0.1
        done
    fi
    site_pids | xargs -r kill -KILL 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        [ -n "$(site_pids)" ] || return 0
        sleep 0.1
    done
    die "could not stop the processes of $dir: $(site_pids | xargs)"
}

case $cmd in
    build) build_naemon ;;
    start) start_site ;;
    stop) stop_site ;;
    run)
        pid=$(start_site)
        echo "ready $pid"
        trap 'fast=1; stop_site' EXIT
        trap '' INT
        cat >/dev/null || true
        ;;
    signal)
        need_dir
        [ -n "$sig" ] || die "--sig is required"
        site_pids | xargs -r kill -"$sig"
        ;;
    reload)
        need_dir
        pid=$(core_pid) || die "site $dir is not running"
        kill -HUP "$pid"
        ;;
    *) die "usage: $prog build|start|stop|run|signal|reload --dir DIR [--port PORT] [--hosts N] [--services M] [--sig SIG]" ;;
esac
