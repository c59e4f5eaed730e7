#!/usr/bin/env bash
# The scale-out lab (docs/scale-out.md): an Icecast relay tree feeding three splitters, and peer
# hosts, each a network namespace on one bridge (198.18.0.0/24 only). Needs root, iproute2,
# icecast2, ffmpeg and a built target/release/p2psp. tests/scaleout.rs drives it.
#
#   lab/scaleout.sh [--dir DIR] [--owner PID] up     build it and start the servers; keep it
#   lab/scaleout.sh --dir DIR down                   stop everything in it and delete it
#   lab/scaleout.sh --dir DIR kill-splitter N        kill -9 splitter N (1 to 3)
#   lab/scaleout.sh --dir DIR start-splitter N       start splitter N again
#   lab/scaleout.sh --dir DIR restart-relay N        stop Icecast relay N (1 or 2) and start it again
#   lab/scaleout.sh [--dir DIR] [--peers N] run [-- COMMAND...]
#       up, start N peers (default 0) spread over the peer hosts, run COMMAND (default: a shell)
#       with the variables of DIR/lab.env set, and down when it ends, however it ends.
#
# Hosts (namespace <prefix>-<name>, address):
#   origin  198.18.0.10  icecast2 on :8000, mount /stream fed by ffmpeg (MP3, 32 kbit/s, live)
#   relay1  198.18.0.11  icecast2 on :8000 relaying origin's /stream with <relay>
#   relay2  198.18.0.12  the same
#   split1  198.18.0.21  p2psp splitter on :8001 pulling relay1; --metrics on :9000
#   split2  198.18.0.22  pulling relay2
#   split3  198.18.0.23  pulling relay1
#   peers1..peers3  198.18.0.31..33  peer hosts
# The prefix is scaleout-<owner pid> (--owner, default the calling shell; `run`: itself); `up` first deletes labs whose owner is gone (a test killed
# before it could clean up). `down` kills every process in the lab's namespaces (only the lab's
# own programs run there) before deleting them, so two runs back to back leave nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
p2psp=${P2PSP:-$here/../target/release/p2psp}
dir="" owner="" peers=0
while (($#)); do
    case $1 in
        --dir) dir=$2; shift 2 ;;
        --owner) owner=$2; shift 2 ;;
        --peers) peers=$2; shift 2 ;;
        *) break ;;
    esac
done
cmd=${1:-}
shift || true
[[ -n $cmd ]] || { echo "scaleout.sh: say up, down, kill-splitter N, restart-relay N or run" >&2; exit 2; }

password=scaleout-lab
splitter_args=(--port 8001 --chunk-size 256 --buffer-size 32 --shards 1 --team-size 16)

# Every process in namespace $1, then the namespace.
delete_ns() {
    local pids
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    [[ -z $pids ]] || kill -9 $pids 2>/dev/null || true
    ip netns del "$1" 2>/dev/null || true
}

reap_stale() {
    local ns pid
    for ns in $(ls /run/netns 2>/dev/null | grep '^scaleout-' || true); do
        pid=${ns#scaleout-}; pid=${pid%%-*}
        if [[ ! -d /proc/$pid ]]; then
            echo "scaleout.sh: deleting $ns left by process $pid" >&2
            delete_ns "$ns"
        fi
    done
}

down() {
    local prefix ns
    prefix=$(cat "$dir/prefix" 2>/dev/null || true)
    [[ -n $prefix ]] || return 0
    for ns in $(ls /run/netns 2>/dev/null | grep "^$prefix-" || true); do delete_ns "$ns"; done
    rm -f "$dir/prefix"
}

# Waits up to $3 s until http://$2:8000/stream serves audio, seen from namespace $1.
wait_mount() {
    local i n
    for ((i = 0; i < $3 * 2; i++)); do
        n=$(ip netns exec "$1" curl -s -m 2 "http://$2:8000/stream" 2>/dev/null | head -c 512 | wc -c || true)
        ((n >= 512)) && return 0
        sleep 0.5
    done
    echo "scaleout.sh: http://$2:8000/stream not up after $3 s (see $dir/*.log)" >&2
    return 1
}

# Waits up to $3 s until icecast2 at $2 answers, seen from namespace $1.
wait_listening() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        ip netns exec "$1" curl -sf -m 1 -o /dev/null "http://$2:8000/status-json.xsl" && return 0
        sleep 0.1
    done
    echo "scaleout.sh: icecast2 at $2 not up after $3 s (see $dir/*.log and $dir/*/error.log)" >&2
    return 1
}

# Starts icecast2 in host $1 on address $2, relaying origin when $3 is "relay".
icecast() {
    local host=$1 addr=$2 d="$dir/$1" relay=""
    mkdir -p "$d"
    chmod 777 "$d"
    if [[ ${3:-} == relay ]]; then
        relay="<relay><server>198.18.0.10</server><port>8000</port><mount>/stream</mount>
  <local-mount>/stream</local-mount><on-demand>0</on-demand>
  <relay-shoutcast-metadata>0</relay-shoutcast-metadata></relay>"
    fi
    local group=nogroup
    grep -q '^nogroup:' /etc/group || group=nobody
    cat >"$d/icecast.xml" <<EOF
<icecast>
  <location>p2psp scale-out lab</location><admin>lab@localhost</admin>
  <limits>
    <clients>100</clients><sources>4</sources><queue-size>1048576</queue-size>
    <client-timeout>30</client-timeout><header-timeout>15</header-timeout>
    <source-timeout>10</source-timeout><burst-on-connect>1</burst-on-connect>
    <burst-size>65535</burst-size>
  </limits>
  <authentication>
    <source-password>$password</source-password><relay-password>$password</relay-password>
    <admin-user>admin</admin-user><admin-password>$password</admin-password>
  </authentication>
  <hostname>$addr</hostname>
  <listen-socket><port>8000</port><bind-address>$addr</bind-address></listen-socket>
  <master-update-interval>1</master-update-interval>
  $relay
  <fileserve>0</fileserve>
  <paths>
    <basedir>$d</basedir><logdir>$d</logdir><pidfile>$d/icecast.pid</pidfile>
    <webroot>/usr/share/icecast2/web</webroot><adminroot>/usr/share/icecast2/admin</adminroot>
  </paths>
  <logging><accesslog>access.log</accesslog><errorlog>error.log</errorlog><loglevel>3</loglevel></logging>
  <security><chroot>0</chroot><changeowner><user>nobody</user><group>$group</group></changeowner></security>
</icecast>
EOF
    ip netns exec "$prefix-$host" setsid icecast2 -c "$d/icecast.xml" </dev/null >>"$dir/$host.log" 2>&1 &
    echo $! >"$dir/$host.pid"
    disown
}

# Waits up to 20 s until splitter $1 takes joins (it listens once its source answered): it
# answers the load probe.
wait_splitter() {
    local i
    for ((i = 0; i < 200; i++)); do
        ip netns exec "$prefix-split$1" curl -sf -m 1 -o /dev/null "http://198.18.0.2$1:8001/.p2psp/load" &&
            return 0
        sleep 0.1
    done
    echo "scaleout.sh: splitter $1 not listening after 20 s (see $dir/split$1.log)" >&2
    return 1
}

splitter() {  # N: splitter N on relay 1, 2, 1
    local n=$1 relay=$(( $1 == 2 ? 2 : 1 ))
    ip netns exec "$prefix-split$n" setsid "$p2psp" splitter --bind "198.18.0.2$n" \
        --source "http://198.18.0.1$relay:8000/stream" --metrics "198.18.0.2$n:9000" \
        "${splitter_args[@]}" </dev/null >>"$dir/split$n.log" 2>&1 &
    echo $! >"$dir/split$n.pid"
    disown
}

up() {
    [[ -x $p2psp ]] || { echo "scaleout.sh: no $p2psp (cargo build --release)" >&2; exit 2; }
    local t
    for t in ip icecast2 ffmpeg curl; do
        command -v $t >/dev/null || { echo "scaleout.sh: $t missing" >&2; exit 2; }
    done
    reap_stale
    prefix="scaleout-${owner:-$PPID}"
    mkdir -p "$dir"
    chmod a+x "$dir"  # icecast2 runs as nobody and writes its logs below
    echo "$prefix" >"$dir/prefix"
    ip netns add "$prefix-switch"
    ip -n "$prefix-switch" link set lo up
    ip -n "$prefix-switch" link add br0 type bridge
    ip -n "$prefix-switch" link set br0 up
    local host addr i=0
    for host in origin:10 relay1:11 relay2:12 split1:21 split2:22 split3:23 peers1:31 peers2:32 peers3:33; do
        addr=198.18.0.${host#*:} host=${host%:*} i=$((i + 1))
        ip netns add "$prefix-$host"
        ip -n "$prefix-$host" link set lo up
        ip -n "$prefix-$host" link add eth0 type veth peer name "p$i" netns "$prefix-switch"
        ip -n "$prefix-switch" link set "p$i" master br0 up
        ip -n "$prefix-$host" addr add "$addr/24" dev eth0
        ip -n "$prefix-$host" link set eth0 up
    done
    icecast origin 198.18.0.10
    wait_listening "$prefix-origin" 198.18.0.10 10
    ip netns exec "$prefix-origin" setsid ffmpeg -nostdin -hide_banner -loglevel error -re \
        -f lavfi -i sine=frequency=440:sample_rate=44100 -c:a libmp3lame -b:a 32k \
        -content_type audio/mpeg -f mp3 "icecast://source:$password@198.18.0.10:8000/stream" \
        </dev/null >>"$dir/ffmpeg.log" 2>&1 &
    echo $! >"$dir/ffmpeg.pid"
    disown
    wait_mount "$prefix-origin" 198.18.0.10 20
    icecast relay1 198.18.0.11 relay
    icecast relay2 198.18.0.12 relay
    wait_mount "$prefix-relay1" 198.18.0.11 20
    wait_mount "$prefix-relay2" 198.18.0.12 20
    for i in 1 2 3; do splitter $i; done
    for i in 1 2 3; do wait_splitter $i; done
    cat >"$dir/lab.env" <<EOF
SCALEOUT_PREFIX=$prefix
SCALEOUT_SPLITTERS=198.18.0.21:8001,198.18.0.22:8001,198.18.0.23:8001
SCALEOUT_PEER_HOSTS="$prefix-peers1 $prefix-peers2 $prefix-peers3"
SCALEOUT_DIR=$dir
EOF
    echo "$prefix"
}

case $cmd in
    up)
        dir=${dir:-$(mktemp -d /tmp/scaleout.XXXXXX)}
        up ;;
    down)
        [[ -n $dir ]] || { echo "scaleout.sh: down needs --dir" >&2; exit 2; }
        down ;;
    kill-splitter)
        n=${1:?splitter number}
        kill -9 "$(cat "$dir/split$n.pid")" ;;
    start-splitter)
        n=${1:?splitter number}
        prefix=$(cat "$dir/prefix")
        splitter "$n"
        wait_splitter "$n" ;;
    restart-relay)
        n=${1:?relay number}
        prefix=$(cat "$dir/prefix")
        kill "$(cat "$dir/relay$n.pid")"
        for _ in $(seq 50); do kill -0 "$(cat "$dir/relay$n.pid")" 2>/dev/null || break; sleep 0.1; done
        icecast "relay$n" "198.18.0.1$n" relay
        wait_mount "$prefix-relay$n" "198.18.0.1$n" 20 ;;
    run)
        dir=${dir:-$(mktemp -d /tmp/scaleout.XXXXXX)}
        trap down EXIT
        trap 'exit 130' INT TERM
        owner=${owner:-$$}
        up >/dev/null
        set -a; . "$dir/lab.env"; set +a
        for ((i = 0; i < peers; i++)); do
            h=$((i % 3 + 1))
            ip netns exec "$prefix-peers$h" setsid "$p2psp" peer --splitter "$SCALEOUT_SPLITTERS" \
                --player-port $((10000 + i)) --metrics "127.0.0.1:$((11000 + i))" -q \
                </dev/null >>"$dir/peer$i.log" 2>&1 &
            disown
            sleep 0.05
        done
        echo "scaleout.sh: lab $prefix up (logs in $dir); $peers peers" >&2
        if (($#)); then [[ $1 == -- ]] && shift; "$@"; else "${SHELL:-bash}" -i; fi ;;
    *) echo "scaleout.sh: unknown command $cmd" >&2; exit 2 ;;
esac
