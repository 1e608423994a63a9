#!/usr/bin/env bash
# A bandwidth-shaped prefill <-> decode link on one machine: two network namespaces joined by a
# veth pair shaped with `tc tbf`, each also reachable from the root namespace over an unshaped
# veth (where the router, the benchmark client and the tests run).
#
# usage: scripts/shaped_link.sh up     [--rate 1gbit] [--prefix memha] [--subnet 10.200.0]
#                                      [--mtu 1500] [--burst BYTES]
#        scripts/shaped_link.sh rate   --rate 500mbit [--prefix memha]   (re-shape, servers keep running)
#        scripts/shaped_link.sh status [--prefix memha]                  (exit 3 when not up)
#        scripts/shaped_link.sh down   [--prefix memha]
# Needs root (ip netns add mounts under /run/netns; tc needs CAP_NET_ADMIN).
#
# Topology (defaults: --prefix memha --subnet 10.200.0):
#
#     root namespace: 10.200.0.254 (router, client, tests)
#       memha-p (veth, unshaped)            memha-d (veth, unshaped)
#          |                                    |
#        host0                                host0
#     [ns memha-p] 10.200.0.1 --pd0==tbf==pd0-- 10.200.0.2 [ns memha-d]
#          prefill                                decode
#
# Every namespace has one service IP; all links are point-to-point /32 routes, so there is no
# bridge, no IP forwarding and no netfilter involved, and whichever address a server advertises,
# prefill <-> decode traffic (Mooncake data, its handshake, the bootstrap HTTP call, ZMQ) can only
# take pd0.
#
# What is shaped: pd0's egress on both ends, i.e. prefill -> decode at RATE (tbf in memha-p) and
# decode -> prefill at RATE (tbf in memha-d): a full-duplex link like a real NIC. Root <-> server
# links have no qdisc (veth default: noqueue) and run at memory speed (14-17 Gbit/s measured here).
# tbf parameters:
#   rate    RATE (tc units: kbit, mbit, gbit are bits per second; wire bytes incl. Ethernet and
#           IP/TCP headers, so TCP payload at MTU 1500 is ~95.6 % of RATE).
#   burst   bucket depth, default 1 ms of traffic at RATE, at least 32 KiB. A transfer that starts
#           on an idle link gets at most this many bytes at veth speed, so it finishes at most
#           ~1 ms early. A much smaller bucket under-shoots fast links (timer wake-ups): at 5gbit,
#           32 KiB gave 3.8-4.2 Gbit/s of TCP payload, 128 KiB and 625 KB (the default) 4.75-4.8.
#   latency 5ms: the longest a packet may queue in tbf (sets the queue length). Enough to absorb
#           TCP bursts without drops; it adds no delay to an idle link. This kernel has no netem,
#           so fixed delay cannot be emulated; a veth's base TCP RTT is ~30 us, datacenter-like.
# lo is up in both namespaces (SGLang registers with its bootstrap server on 127.0.0.1 when
# --host is 0.0.0.0). Each namespace has a default route to the root namespace only so that
# SGLang's IP auto-detection (a UDP connect to 8.8.8.8) picks the namespace's IP; this script
# enables no forwarding, so nothing leaves the machine that way.
#
# Run a server inside: ip netns exec memha-p env SGLANG_HOST_IP=10.200.0.1 python -m ... --host 10.200.0.1
set -euo pipefail

usage() { sed -n '6,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "shaped_link: $*" >&2; exit 1; }

CMD=${1:-}; [ $# -gt 0 ] && shift
RATE=1gbit PREFIX=memha SUBNET=10.200.0 MTU=1500 BURST="" LATENCY=5ms RATE_GIVEN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) RATE=${2:?--rate needs a value}; RATE_GIVEN=1; shift 2 ;;
    --prefix) PREFIX=${2:?--prefix needs a value}; shift 2 ;;
    --subnet) SUBNET=${2:?--subnet needs a value}; shift 2 ;;
    --mtu) MTU=${2:?--mtu needs a value}; shift 2 ;;
    --burst) BURST=${2:?--burst needs a value}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "shaped_link: unknown argument '$1'" >&2; usage ;;
  esac
done
case "$CMD" in up|down|status|rate) ;; *) usage ;; esac

[[ $PREFIX =~ ^[a-z][a-z0-9]{0,9}$ ]] ||
  die "--prefix '$PREFIX': expected 1-10 characters [a-z0-9], starting with a letter (interface names max 15)"
[[ $SUBNET =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] &&
  [ "${BASH_REMATCH[1]}" -le 255 ] && [ "${BASH_REMATCH[2]}" -le 255 ] && [ "${BASH_REMATCH[3]}" -le 255 ] ||
  die "--subnet '$SUBNET': expected the first three octets of an IPv4 /24, e.g. 10.200.0"
[[ $MTU =~ ^[0-9]+$ ]] && [ "$MTU" -ge 576 ] && [ "$MTU" -le 65535 ] ||
  die "--mtu '$MTU': expected an integer in 576..65535"
[[ $RATE =~ ^[0-9]+(\.[0-9]+)?(kbit|mbit|gbit)$ ]] ||
  die "--rate '$RATE': expected a number with kbit, mbit or gbit (bits/s; tc's 'mbps' would mean megaBYTES/s)"
RATE_BPS=$(awk -v r="$RATE" 'BEGIN { n = r + 0; u = substr(r, match(r, /[a-z]/));
  printf "%.0f", n * (u == "kbit" ? 1e3 : u == "mbit" ? 1e6 : 1e9) }')
[ "$RATE_BPS" -ge 100000 ] || die "--rate '$RATE': expected at least 100kbit"
if [ -z "$BURST" ]; then  # 1 ms of traffic at RATE, at least 32 KiB
  BURST=$(( RATE_BPS / 8000 > 32768 ? RATE_BPS / 8000 : 32768 ))
fi
[[ $BURST =~ ^[0-9]+$ ]] && [ "$BURST" -ge $(( MTU + 14 )) ] ||
  die "--burst '$BURST': expected bytes (an integer) of at least MTU + 14 = $(( MTU + 14 ))"

NS_P=$PREFIX-p; NS_D=$PREFIX-d            # namespaces
HOST_P=$PREFIX-p; HOST_D=$PREFIX-d        # root-side veth ends (separate name space from netns names)
IP_P=$SUBNET.1; IP_D=$SUBNET.2; IP_HOST=$SUBNET.254

[ "$(id -u)" = 0 ] || die "needs root (ip netns add / tc); run: sudo $0 $CMD ..."
command -v ip >/dev/null && command -v tc >/dev/null || die "needs iproute2 (ip, tc): apt-get install iproute2"

ns_exists() { [ -e "/run/netns/$1" ]; }
link_exists() { ip link show "$1" >/dev/null 2>&1; }

shape() {  # (re)apply tbf on pd0 in both namespaces
  local ns
  for ns in "$NS_P" "$NS_D"; do
    tc -n "$ns" qdisc replace dev pd0 root tbf rate "$RATE" burst "$BURST" latency "$LATENCY" ||
      die "tc tbf failed in $ns (does this kernel have CONFIG_NET_SCH_TBF?)"
  done
}

print_keys() {  # machine-readable lines, parsed by sglang_memha/testing/netns.py
  echo "prefix=$PREFIX"
  echo "prefill_ns=$NS_P"
  echo "decode_ns=$NS_D"
  echo "prefill_ip=$IP_P"
  echo "decode_ip=$IP_D"
  echo "host_ip=$IP_HOST"
}

teardown() {
  local ns pids pid i
  for ns in "$NS_P" "$NS_D"; do
    ns_exists "$ns" || continue
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then  # they would be left on a deleted network; stop them by PID
      echo "shaped_link: stopping processes still in $ns: $(echo $pids)" >&2
      for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
      for i in $(seq 50); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true); [ -z "$pids" ] && break; sleep 0.1
      done
      for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
    fi
  done
  # Delete the root-side ends first: synchronous, and it destroys the peers (host0) too.
  # Namespace deletion is asynchronous in the kernel, so its veths can linger for a moment.
  local l
  for l in "$HOST_P" "$HOST_D"; do link_exists "$l" && ip link del "$l"; done
  for ns in "$NS_P" "$NS_D"; do ns_exists "$ns" && ip netns del "$ns"; done
  return 0
}

check_free() {  # refuse a subnet that the root namespace already uses
  local ip used
  for ip in "$IP_P" "$IP_D" "$IP_HOST"; do
    used=$( { ip -o addr show to "$ip/32"; ip route show match "$ip" | grep -v '^default'; } 2>/dev/null || true)
    [ -z "$used" ] || die "$ip is already in use in the root namespace:
$used
pass another --subnet (or run '$0 down --prefix OTHER' for a link set up with another prefix)"
  done
}

up() {
  teardown
  check_free
  UP_DONE=0
  trap '[ "$UP_DONE" = 1 ] || { echo "shaped_link: up failed; removing what was created" >&2; teardown; }' EXIT
  ip netns add "$NS_P"
  ip netns add "$NS_D"
  # the shaped prefill <-> decode cable
  ip link add pd0 netns "$NS_P" mtu "$MTU" type veth peer name pd0 netns "$NS_D" mtu "$MTU"
  # unshaped cables from the root namespace
  ip link add "$HOST_P" mtu "$MTU" type veth peer name host0 netns "$NS_P" mtu "$MTU"
  ip link add "$HOST_D" mtu "$MTU" type veth peer name host0 netns "$NS_D" mtu "$MTU"
  # point-to-point addresses: "addr X peer Y" installs the /32 route to Y on that link
  ip -n "$NS_P" addr add "$IP_P" peer "$IP_D" dev pd0
  ip -n "$NS_P" addr add "$IP_P" peer "$IP_HOST" dev host0
  ip -n "$NS_D" addr add "$IP_D" peer "$IP_P" dev pd0
  ip -n "$NS_D" addr add "$IP_D" peer "$IP_HOST" dev host0
  ip addr add "$IP_HOST" peer "$IP_P" dev "$HOST_P"
  ip addr add "$IP_HOST" peer "$IP_D" dev "$HOST_D"
  local ns dev
  for ns in "$NS_P" "$NS_D"; do
    for dev in lo pd0 host0; do ip -n "$ns" link set "$dev" up; done
  done
  ip link set "$HOST_P" up
  ip link set "$HOST_D" up
  ip -n "$NS_P" route add default via "$IP_HOST" dev host0 src "$IP_P"
  ip -n "$NS_D" route add default via "$IP_HOST" dev host0 src "$IP_D"
  shape
  # the path the KV bytes take must be the shaped one
  local route
  route=$(ip -n "$NS_P" route get "$IP_D"); [[ $route == *" dev pd0 "* ]] || die "P -> D does not use pd0: $route"
  route=$(ip -n "$NS_D" route get "$IP_P"); [[ $route == *" dev pd0 "* ]] || die "D -> P does not use pd0: $route"
  UP_DONE=1
  print_keys
  echo "rate=$RATE"
  echo "shaped link $PREFIX up: $NS_P $IP_P <-pd0: tbf $RATE each way, burst ${BURST}B, latency $LATENCY->" \
       "$NS_D $IP_D; root $IP_HOST reaches both unshaped"
}

status() {
  if ! ns_exists "$NS_P" || ! ns_exists "$NS_D"; then
    echo "shaped link $PREFIX: not up"
    local x
    for x in "$NS_P" "$NS_D"; do ns_exists "$x" && echo "  leftover namespace $x (run: $0 down --prefix $PREFIX)"; done
    for x in "$HOST_P" "$HOST_D"; do link_exists "$x" && echo "  leftover link $x (run: $0 down --prefix $PREFIX)"; done
    exit 3
  fi
  print_keys
  local r
  r=$(tc -n "$NS_P" qdisc show dev pd0 | sed -n 's/.* rate \([^ ]*\).*/\1/p')
  echo "rate=${r:-none}"
  local ns
  for ns in "$NS_P" "$NS_D"; do
    echo "--- $ns"
    ip -n "$ns" -br addr show
    tc -s -n "$ns" qdisc show dev pd0 | sed 's/^/  /'
    echo "  processes: $(ip netns pids "$ns" | tr '\n' ' ')"
  done
  echo "--- root"
  ip -br addr show dev "$HOST_P"
  ip -br addr show dev "$HOST_D"
}

case "$CMD" in
  up) up ;;
  down) teardown; echo "shaped link $PREFIX down" ;;
  status) status ;;
  rate)
    [ "$RATE_GIVEN" = 1 ] || die "rate: pass --rate (e.g. --rate 500mbit)"
    ns_exists "$NS_P" && ns_exists "$NS_D" || die "shaped link $PREFIX is not up (run: $0 up --prefix $PREFIX)"
    shape; echo "rate=$RATE" ;;
esac
