#!/usr/bin/env bash
# The NAT lab: three network namespaces joined by veth pairs,
#
#   <P>r (runner, 10.77.1.2/24) ── <P>n (NAT: 10.77.1.1 inside, 10.77.2.1 outside) ── <P>b (broker, 10.77.2.2/24)
#
# The NAT namespace masquerades the runner subnet toward the broker with random source
# ports, and drops every new connection from the broker side toward the runner side (as a
# home or office NAT does). The broker namespace even has a route to the runner subnet
# through the NAT, so "no way in" is the NAT's filter, not a missing route.
# Addresses exist only inside these namespaces. <P> is a per-run prefix (letters and
# digits, at most 8), so that two runs never collide.
#
# netlab.sh up P | down P | rebind P | expire P SECS | impair P LOSS% DELAY_MS
#           | mtu P BYTES | delay-line P PORT | exec P r|n|b CMD...
set -euo pipefail

cmd=${1:?usage: netlab.sh up|down|rebind|expire|impair|exec PREFIX ...}
p=${2:?prefix}
[[ $p =~ ^[a-z0-9]{1,8}$ ]] || { echo "netlab: prefix must be 1-8 of [a-z0-9]" >&2; exit 64; }
R=${p}r N=${p}n B=${p}b
RUNNER_IP=10.77.1.2 NAT_IN=10.77.1.1 NAT_OUT=10.77.2.1 BROKER_IP=10.77.2.2

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

down() {
  for ns in "$R" "$N" "$B"; do
    ip netns del "$ns" 2>/dev/null || true
  done
  # The veths die with their namespaces; one left in the root namespace by a failed
  # `up` is removed here.
  for l in "${p}rn" "${p}nr" "${p}nb" "${p}bn"; do
    ip link del "$l" 2>/dev/null || true
  done
}

up() {
  down
  trap 'down' ERR
  for ns in "$R" "$N" "$B"; do
    ip netns add "$ns"
    nsx "$ns" ip link set lo up
  done
  ip link add "${p}rn" type veth peer name "${p}nr"
  ip link add "${p}nb" type veth peer name "${p}bn"
  ip link set "${p}rn" netns "$R"
  ip link set "${p}nr" netns "$N"
  ip link set "${p}nb" netns "$N"
  ip link set "${p}bn" netns "$B"
  nsx "$R" ip addr add "$RUNNER_IP/24" dev "${p}rn"
  nsx "$R" ip link set "${p}rn" up
  nsx "$R" ip route add default via "$NAT_IN"
  nsx "$N" ip addr add "$NAT_IN/24" dev "${p}nr"
  nsx "$N" ip addr add "$NAT_OUT/24" dev "${p}nb"
  nsx "$N" ip link set "${p}nr" up
  nsx "$N" ip link set "${p}nb" up
  nsx "$B" ip addr add "$BROKER_IP/24" dev "${p}bn"
  nsx "$B" ip link set "${p}bn" up
  nsx "$B" ip route add 10.77.1.0/24 via "$NAT_OUT"
  nsx "$N" sysctl -qw net.ipv4.ip_forward=1
  nsx "$N" iptables -t nat -A POSTROUTING -s 10.77.1.0/24 -o "${p}nb" -j MASQUERADE --random
  nsx "$N" iptables -A FORWARD -i "${p}nb" -o "${p}nr" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
  nsx "$N" iptables -A FORWARD -i "${p}nb" -o "${p}nr" -j DROP
  trap - ERR
}

case "$cmd" in
  up) up ;;
  down) down ;;
  # Forget every mapping: the runner's next packet leaves from a new random port.
  rebind) nsx "$N" conntrack -F >/dev/null 2>&1 || true ;;
  # UDP mappings expire after SECS without traffic.
  expire)
    secs=${3:?seconds}
    nsx "$N" sysctl -qw net.netfilter.nf_conntrack_udp_timeout="$secs"
    nsx "$N" sysctl -qw net.netfilter.nf_conntrack_udp_timeout_stream="$secs"
    ;;
  # Loss and delay on the NAT's outer link, each way (RTT = 2 × DELAY_MS).
  impair)
    loss=${3:?loss percent} delay=${4:?delay ms}
    nsx "$N" tc qdisc replace dev "${p}nb" root netem loss "${loss}%" delay "${delay}ms"
    nsx "$B" tc qdisc replace dev "${p}bn" root netem loss "${loss}%" delay "${delay}ms"
    ;;
  # A link smaller than Ethernet (a tunnel, PPPoE) between the NAT and the broker: IP
  # packets over BYTES are dropped there, both ways.
  mtu)
    bytes=${3:?bytes}
    nsx "$N" ip link set dev "${p}nb" mtu "$bytes"
    nsx "$B" ip link set dev "${p}bn" mtu "$bytes"
    ;;
  # Where the kernel has no netem: new UDP flows from the runner side toward the broker's
  # QUIC port go to a user-space delay line listening on PORT in the NAT namespace
  # (tests/src/bin/delay-line-under-test.rs), which relays them with loss and delay.
  delay-line)
    port=${3:?port}
    nsx "$N" iptables -t nat -I PREROUTING -i "${p}nr" -p udp -d "$BROKER_IP" --dport 7443 \
      -j REDIRECT --to-ports "$port"
    ;;
  exec)
    which=${3:?r|n|b}
    shift 3
    case "$which" in r) ns=$R ;; n) ns=$N ;; b) ns=$B ;; *) exit 64 ;; esac
    exec ip netns exec "$ns" "$@"
    ;;
  *) echo "netlab: unknown command $cmd" >&2; exit 64 ;;
esac
