#!/usr/bin/env bash
# Runs a command in a private network namespace of its own, so the servers the tests start
# (redis-server, NIXL/UCX agents, the Mooncake store) can neither be reached from nor talk to
# anything outside it, whatever address they bind. Inside: loopback, plus one veth pair holding
# the test host's address 10.213.0.1 (Mooncake's transfer engine insists on a non-loopback
# "LAN" address); both ends stay in the namespace, so no packet leaves it.
# Falls back to running the command directly (with a note) where namespaces are unavailable.
set -euo pipefail
if [ "$#" -eq 0 ]; then
  echo "usage: scripts/isolated.sh COMMAND [ARGS...]" >&2
  exit 2
fi
if [ "$(id -u)" = "0" ]; then ns=(unshare --net); else ns=(unshare --net --map-root-user); fi
if command -v unshare >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 \
   && "${ns[@]}" ip link set lo up 2>/dev/null; then
  exec "${ns[@]}" bash -c '
    ip link set lo up
    if ip link add pkv0 type veth peer name pkv1 2>/dev/null; then
      ip addr add 10.213.0.1/24 dev pkv0 && ip link set pkv0 up && ip link set pkv1 up
    fi
    exec "$@"' isolated "$@"
fi
echo "isolated.sh: no network namespace available here; running without one" >&2
exec "$@"
