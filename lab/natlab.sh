#!/usr/bin/env bash
# The NAT lab for manual runs (the tests build the same lab in Rust: tests/natlab/mod.rs; both
# use the rules in lab/nft/). Needs root, iproute2 and nftables. See docs/nat.md.
#
#   lab/natlab.sh [--loss PERMILLE] [--udp-timeout SECONDS] [--port-step N] KIND... [-- COMMAND...]
#
# KIND: full-cone, address-restricted, port-restricted, symmetric-sequential, symmetric-random.
# Builds a public segment (bridge) with host `pub` (198.18.0.1 and 198.18.0.2) and one home per
# KIND (home i: host 198.19.i.2 behind NAT 198.18.0.(100+i)), runs COMMAND (default: a shell)
# with NATLAB_PUB, NATLAB_HOME<i>, NATLAB_NAT<i> naming the namespaces, and tears everything
# down when COMMAND ends, however it ends. Example:
#
#   lab/natlab.sh port-restricted symmetric-random -- bash -c '
#     ip netns exec $NATLAB_PUB target/release/p2psp splitter --bind 198.18.0.1 & sleep 1
#     ip netns exec $NATLAB_HOME1 target/release/p2psp peer --splitter 198.18.0.1:8001 --player-port 0 &
#     sleep 10; kill %1 %2'
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
loss=0 timeout=60 step=1
kinds=()
while (($#)); do
    case $1 in
        --loss) loss=$2; shift 2 ;;
        --udp-timeout) timeout=$2; shift 2 ;;
        --port-step) step=$2; shift 2 ;;
        --) shift; break ;;
        full-cone|address-restricted|port-restricted|symmetric-sequential|symmetric-random)
            kinds+=("$1"); shift ;;
        *) echo "natlab.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
((${#kinds[@]})) || { echo "natlab.sh: name at least one NAT kind" >&2; exit 2; }
((${#kinds[@]} <= 150)) || { echo "natlab.sh: at most 150 homes" >&2; exit 2; }
((step >= 1 && step <= 45)) || { echo "natlab.sh: --port-step 1 to 45" >&2; exit 2; }
command -v nft >/dev/null || { echo "natlab.sh: nft missing (apt-get install nftables)" >&2; exit 2; }

prefix="natlab-$$-sh"
made=()
cleanup() {
    local i
    for ((i = ${#made[@]} - 1; i >= 0; i--)); do ip netns del "${made[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Namespaces of earlier labs whose process is gone (killed before their trap ran).
for ns in $(ls /run/netns 2>/dev/null | grep '^natlab-' || true); do
    pid=${ns#natlab-}; pid=${pid%%-*}
    [[ -d /proc/$pid ]] || { echo "natlab.sh: deleting $ns left by process $pid" >&2; ip netns del "$ns" || true; }
done

netns() { ip netns add "$prefix-$1"; made+=("$prefix-$1"); ip -n "$prefix-$1" link set lo up; }
plug() {  # namespace, inside name, bridge port name
    ip -n "$1" link add "$2" type veth peer name "$3" netns "$prefix-inet"
    ip -n "$prefix-inet" link set "$3" master br0 up
    ip -n "$1" link set "$2" up
}

netns inet
ip -n "$prefix-inet" link add br0 type bridge
ip -n "$prefix-inet" link set br0 up
netns pub
plug "$prefix-pub" eth0 p0
ip -n "$prefix-pub" addr add 198.18.0.1/24 dev eth0
ip -n "$prefix-pub" addr add 198.18.0.2/24 dev eth0
export NATLAB_PUB="$prefix-pub"

port_map=$(awk -v s="$step" 'BEGIN { for (i = 0; i < 1000; i++) printf "%s%d : %d", (i ? ", " : ""), i, 20000 + i * s }')
i=0
for kind in "${kinds[@]}"; do
    i=$((i + 1))
    nat="$prefix-nat$i" home="$prefix-home$i" wan="198.18.0.$((100 + i))"
    netns "nat$i"; netns "home$i"
    plug "$nat" wan "n$i"
    ip -n "$nat" addr add "$wan/24" dev wan
    ip -n "$nat" link add lan type veth peer name eth0 netns "$home"
    ip -n "$nat" addr add "198.19.$i.1/24" dev lan
    ip -n "$nat" link set lan up
    ip -n "$home" addr add "198.19.$i.2/24" dev eth0
    ip -n "$home" link set eth0 up
    ip -n "$home" route add default via "198.19.$i.1"
    ip netns exec "$nat" sysctl -qw net.ipv4.ip_forward=1 \
        net.netfilter.nf_conntrack_udp_timeout="$timeout" \
        net.netfilter.nf_conntrack_udp_timeout_stream="$timeout"
    cat "$here/nft/base.nft" "$here/nft/$kind.nft" | sed \
        -e "s/\$PORT_MAP/$port_map/" -e "s/\$PORT_STEP/$step/g" -e "s/\$PORT_COUNT/1000/g" \
        -e "s/\$PORT_BASE/20000/g" -e "s/\$WAN_IP/$wan/g" -e "s/\$LOSS/$loss/g" \
        -e "s/\$MAP_TIMEOUT/${timeout}s/g" | ip netns exec "$nat" nft -f -
    export "NATLAB_HOME$i=$home" "NATLAB_NAT$i=$nat"
    echo "natlab: home$i $kind: host 198.19.$i.2 (netns $home) behind $wan (netns $nat)" >&2
done
echo "natlab: public host 198.18.0.1, 198.18.0.2 (netns $NATLAB_PUB)" >&2

if (($#)); then
    "$@"
else
    echo "natlab: a shell with NATLAB_* set; the lab goes away when it exits" >&2
    "${SHELL:-bash}" -i
fi
