# site-lib.sh - what scripts/icinga-site.sh and scripts/naemon-site.sh share:
# messages, the command line, the site directory, and one Livestatus query
# over TCP. Sourced, not run; the sourcing script sets `prog` first.

say() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }

# The command line: a command, then --dir/--port/--hosts/--services/--sig/--fast.
dir="" port="" hosts=100 services=10 sig="" fast=0
cmd=${1:-}
[ $# -gt 0 ] && shift
while [ $# -gt 0 ]; do
    case $1 in
        --dir) dir=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --hosts) hosts=$2; shift 2 ;;
        --services) services=$2; shift 2 ;;
        --sig) sig=$2; shift 2 ;;
        --fast) fast=1; shift ;;
        *) die "unknown argument '$1'" ;;
    esac
done

need_dir() {
    [ -n "$dir" ] || die "--dir is required"
    case $dir in /*) ;; *) dir=$PWD/$dir ;; esac
    dir=${dir%/}
}

# Send one query over TCP (bash /dev/tcp), print the body; status 0 on 200.
lq() {
    local q=$1 fd head len body=""
    exec {fd}<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null || return 2
    printf '%s' "$q" >&"$fd" || { exec {fd}>&-; return 3; }
    IFS= LC_ALL=C read -r -t 10 -u "$fd" head || { exec {fd}>&-; return 4; }
    len=${head:4}; len=${len// /}
    [[ $len =~ ^[0-9]+$ ]] || { exec {fd}>&-; return 5; }
    [ "$len" -eq 0 ] || IFS= LC_ALL=C read -r -d '' -t 10 -N "$len" -u "$fd" body || true
    exec {fd}>&-
    printf '%s' "$body"
    [ "${head:0:3}" = 200 ]
}

# Check the arguments of `start` and `run`.
check_start_args() {
    need_dir
    [[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "--port must be 1..65535"
    [[ $hosts =~ ^[0-9]+$ ]] && [ "$hosts" -ge 1 ] || die "--hosts must be a positive number"
    [[ $services =~ ^[0-9]+$ ]] || die "--services must be a number"
    [ ${#dir} -le 100 ] || die "directory path too long for the UNIX socket: $dir"
}
