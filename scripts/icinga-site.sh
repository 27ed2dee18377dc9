#!/usr/bin/env bash
# icinga-site.sh - throw-away Icinga 2 sites with the Livestatus feature, for
# livemux's integration tests and benchmarks.
#
#   icinga-site.sh start --dir DIR --port PORT [--hosts N] [--services M]
#       Generate a site in DIR (which must be empty or a previous site of this
#       script), start Icinga 2, force the first check of every object, wait
#       until Livestatus answers with all objects checked. Prints the daemon's
#       PID on stdout; everything else goes to stderr.
#   icinga-site.sh stop --dir DIR [--fast]
#       Stop the site (SIGTERM, then SIGKILL after 20 s; --fast: SIGKILL at
#       once). Idempotent.
#   icinga-site.sh run --dir DIR --port PORT [--hosts N] [--services M]
#       start, print "ready <pid>" on stdout, then wait until stdin reaches
#       EOF (the parent went away) and kill the site. Tests use this so that
#       a site never outlives the test process, however it ends.
#   icinga-site.sh signal --dir DIR --sig STOP|CONT
#       Send a signal to every process of the site (SIGSTOP hangs the core
#       while its port stays open).
#   icinga-site.sh reload --dir DIR
#       Reload the core (SIGHUP to the umbrella process): program_start changes.
#   icinga-site.sh install
#       Install Icinga 2 from Debian if it is missing.
#
# Livestatus listens on 127.0.0.1:PORT and on the UNIX socket DIR/live.
# Objects (states are static, so tests can predict every answer):
#   hosts     host-0000 .. ; DOWN when i % 50 == 49; groups all + web/db/app/infra
#   services  ping cpu memory load disk swap procs ssh http ntp, then svc-NNN;
#             global index g: WARNING if g%7==3, else CRITICAL if g%13==5,
#             else UNKNOWN if g%29==11, else OK
#   comments  on hosts with i % 100 == 0; downtimes on hosts with i % 100 == 50
set -euo pipefail

prog=${0##*/}

# shellcheck source=site-lib.sh
. "$(dirname "$0")/site-lib.sh"

install_icinga() {
    command -v icinga2 >/dev/null 2>&1 && [ -d /usr/share/icinga2/include ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "icinga2 is missing and apt-get is not available"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    # One installer at a time when several tests start sites at once.
    exec 9>>/tmp/.livemux-icinga-install.lock
    flock -w 900 9 || die "timed out waiting for another icinga2 install"
    if ! command -v icinga2 >/dev/null 2>&1; then
        say "installing icinga2 from Debian"
        # Keep the package from starting a system-wide daemon.
        local policy=/usr/sbin/policy-rc.d made_policy=0
        if [ ! -e $policy ]; then
            printf '#!/bin/sh\nexit 101\n' | $sudo tee $policy >/dev/null && $sudo chmod 755 $policy && made_policy=1
        fi
        local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
            -o DPkg::Lock::Timeout=300 icinga2-bin icinga2-common)
        $sudo "${apt[@]}" >&2 || { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2; $sudo "${apt[@]}" >&2; }
        [ $made_policy -eq 1 ] && $sudo rm -f $policy
    fi
    flock -u 9
    command -v icinga2 >/dev/null 2>&1 || die "icinga2 is still missing after the install"
}

# PIDs of every process of this site (umbrella, worker, helper, orphans),
# recognised by this site's config path on their command line.
site_pids() {
    pgrep -f -- "-c $dir/etc/icinga2.conf( |\$)" || true
}

# The umbrella: the site process whose parent is not a site process.
umbrella() {
    local pids p ppid
    pids=" $(site_pids | xargs) "
    for p in $pids; do
        ppid=$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ')
        [[ $pids == *" $ppid "* ]] || echo "$p"
    done
}

write_config() {
    mkdir -p "$dir"/{etc,var/lib,var/cache,var/spool,run,log}
    echo "livemux icinga test site" >"$dir/.livemux-icinga-site"
    cat >"$dir/etc/icinga2.conf" <<EOF
/* Written by livemux's $prog; rewritten on every start. */
const SiteHosts = $hosts
const SiteServices = $services
include <itl>
object IcingaApplication "app" { }
object CheckerComponent "checker" { }
object FileLogger "log" { severity = "warning"; path = LogDir + "/icinga2.log" }
object LivestatusListener "tcp" { socket_type = "tcp"; bind_host = "127.0.0.1"; bind_port = "$port" }
object LivestatusListener "unix" { socket_type = "unix"; socket_path = "$dir/live" }
include "objects.conf"
EOF
    cat >"$dir/etc/objects.conf" <<'EOF'
const Kinds = [ "ping", "cpu", "memory", "load", "disk", "swap", "procs", "ssh", "http", "ntp" ]
const Roles = [ "web", "db", "app", "infra" ]

function pad(n, width) {
  var s = string(n)
  while (len(s) < width) { s = "0" + s }
  return s
}
function svc_name(j) {
  if (j < len(Kinds)) { return Kinds[j] }
  return "svc-" + pad(j, 3)
}
function svc_state(g) {
  if (g % 7 == 3) { return 1 }
  if (g % 13 == 5) { return 2 }
  if (g % 29 == 11) { return 3 }
  return 0
}

object CheckCommand "lm-host" {
  import "dummy-check-command"
  vars.dummy_state = {{ return host.vars.fixed_state }}
  vars.dummy_text = {{ return "host " + host.name + " state " + string(host.vars.fixed_state) }}
}
object CheckCommand "lm-service" {
  import "dummy-check-command"
  vars.dummy_state = {{ return service.vars.fixed_state }}
  vars.dummy_text = {{ return service.name + " on " + host.name + " state " + string(service.vars.fixed_state) + "|value=" + string(service.vars.idx % 100) + "%;80;90" }}
}
object NotificationCommand "lm-nothing" { command = [ "/bin/true" ] }

object User "icingaadmin" { display_name = "Icinga Admin"; email = "icingaadmin@localhost"; groups = [ "admins" ] }
object UserGroup "admins" { display_name = "Admins" }
object HostGroup "all" { display_name = "All hosts" }
for (r in Roles) {
  object HostGroup r use(r) { display_name = "Role " + r }
}
for (j in range(SiteServices)) {
  object ServiceGroup "sg-" + svc_name(j) use(j) { display_name = "Service " + svc_name(j) }
}

var width = len(string(SiteHosts - 1))
if (width < 4) { width = 4 }
var now = DateTime().value

for (i in range(SiteHosts)) {
  var hn = "host-" + pad(i, width)
  var role = Roles[i % 4]
  object Host hn use(i, role) {
    check_command = "lm-host"
    max_check_attempts = 1
    check_interval = 1h
    retry_interval = 1h
    address = "10.0." + string(i / 256 % 256) + "." + string(i % 256)
    display_name = "Host " + string(i)
    groups = [ "all", role ]
    vars.role = role
    vars.idx = i
    vars.fixed_state = (i % 50 == 49) ? 2 : 0
  }
  for (j in range(SiteServices)) {
    var g = i * SiteServices + j
    object Service svc_name(j) use(hn, j, g) {
      host_name = hn
      check_command = "lm-service"
      max_check_attempts = 1
      check_interval = 1h
      retry_interval = 1h
      groups = [ "sg-" + svc_name(j) ]
      vars.idx = g
      vars.fixed_state = svc_state(g)
    }
  }
  if (i % 100 == 0) {
    object Comment hn + "-note" use(hn) { host_name = hn; author = "livemux"; text = "comment on " + hn }
  }
  if (i % 100 == 50) {
    object Downtime hn + "-maint" use(hn, now) {
      host_name = hn; author = "livemux"; comment = "maintenance of " + hn
      start_time = now - 3600; end_time = now + 30 * 86400; fixed = true
    }
  }
}

apply Notification "lm-notify" to Host {
  command = "lm-nothing"
  users = [ "icingaadmin" ]
  assign where true
}
EOF
}

start_site() {
    check_start_args
    install_icinga
    if [ -e "$dir" ] && [ ! -f "$dir/.livemux-icinga-site" ] && [ -n "$(ls -A "$dir")" ]; then
        die "$dir is not empty and not a site of this script"
    fi
    [ -z "$(site_pids)" ] || stop_site
    rm -rf "${dir:?}/etc" "${dir:?}/var" "${dir:?}/run" "${dir:?}/log" "${dir:?}/live"
    write_config
    ICINGA2_USER=$(id -un) ICINGA2_GROUP=$(id -gn) setsid icinga2 daemon -c "$dir/etc/icinga2.conf" \
        -DConfigDir="$dir/etc" -DDataDir="$dir/var/lib" -DCacheDir="$dir/var/cache" \
        -DSpoolDir="$dir/var/spool" -DLogDir="$dir/log" -DInitRunDir="$dir/run" \
        </dev/null >"$dir/log/console.log" 2>&1 &
    local pid=$! i
    failed() {
        say "---- $dir/log/console.log ----"
        tail -n 20 "$dir/log/console.log" >&2 || true
        stop_site
        die "$*"
    }
    local want="$hosts;$((hosts * services))"
    for ((i = 0; i < 600; i++)); do
        kill -0 "$pid" 2>/dev/null || failed "icinga2 exited during start-up"
        grep -q "Cannot bind" "$dir/log/console.log" 2>/dev/null && failed "Livestatus could not bind 127.0.0.1:$port"
        [ "$(lq $'GET status\nColumns: num_hosts num_services\nResponseHeader: fixed16\n\n' 2>/dev/null)" = "$want" ] && break
        sleep 0.1
    done
    [ $i -lt 600 ] || failed "Livestatus did not answer within 60 s"
    # Check every object now instead of at random times within an hour.
    local t fd
    t=$(date +%s)
    exec {fd}<>"/dev/tcp/127.0.0.1/$port"
    {
        for ((i = 0; i < hosts; i++)); do
            printf 'COMMAND [%d] SCHEDULE_FORCED_HOST_CHECK;host-%0*d;%d\n\n' "$t" 4 "$i" "$t"
            printf 'COMMAND [%d] SCHEDULE_FORCED_HOST_SVC_CHECKS;host-%0*d;%d\n\n' "$t" 4 "$i" "$t"
        done
        printf 'GET status\nColumns: num_hosts\nResponseHeader: fixed16\n\n'
    } >&"$fd"
    IFS= read -r -t 30 -u "$fd" _ || true
    exec {fd}>&-
    for ((i = 0; i < 600; i++)); do
        if [ "$(lq $'GET hosts\nStats: has_been_checked = 0\nResponseHeader: fixed16\n\n')" = 0 ] &&
            [ "$(lq $'GET services\nStats: has_been_checked = 0\nResponseHeader: fixed16\n\n')" = 0 ]; then
            break
        fi
        sleep 0.1
    done
    [ $i -lt 600 ] || failed "objects still pending after 60 s"
    [ -S "$dir/live" ] || failed "UNIX socket $dir/live missing"
    echo "$pid" >"$dir/run/started.pid"
    say "site in $dir up: tcp 127.0.0.1:$port, unix $dir/live, $hosts hosts, $((hosts * services)) services"
    echo "$pid"
}

# Stop the site: SIGTERM and up to 20 s for a clean exit, then SIGKILL.
# With --fast (throw-away teardown) SIGKILL at once.
stop_site() {
    need_dir
    local i
    [ -n "$(site_pids)" ] || return 0
    if [ "$fast" -eq 0 ]; then
        # Only the umbrella process: it forwards SIGTERM to its worker.
        # Signalling every process at once wedges Icinga's shutdown.
        umbrella | xargs -r kill -TERM 2>/dev/null || true
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
        # signal --dir DIR --sig STOP|CONT|...: signal every process of the site.
        need_dir
        [ -n "$sig" ] || die "--sig is required"
        site_pids | xargs -r kill -"$sig"
        ;;
    reload)
        # reload --dir DIR: SIGHUP to the umbrella, as `systemctl reload`
        # does; a new worker takes over with a new program_start.
        need_dir
        [ -n "$(umbrella)" ] || die "site $dir is not running"
        umbrella | xargs -r kill -HUP
        ;;
    install) install_icinga ;;
    *) die "usage: $prog start|stop|run|signal|reload|install --dir DIR [--port PORT] [--hosts N] [--services M] [--sig SIG]" ;;
esac
