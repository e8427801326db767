#!/usr/bin/env bash
# Local services the remote-tier tests and benchmarks use: redis-server on 127.0.0.1.
#
#   bash scripts/services.sh install   # apt-get install redis-server, libibverbs1 if missing (Debian, root/sudo)
#   bash scripts/services.sh start     # start one on a free port (idempotent); prints the port
#   bash scripts/services.sh port      # port of the running one (exit 1 if none)
#   bash scripts/services.sh stop      # stop it (idempotent)
#   bash scripts/services.sh status
#
# State (pid file, port file, log) lives in $PREFIXKV_SERVICES_DIR (default
# /tmp/prefixkv-services). The tests start their own private servers and need only `install`;
# `start` exports nothing: read the port with `port` (e.g. PREFIXKV_REDIS_PORT=$(... port)).
set -euo pipefail

STATE_DIR="${PREFIXKV_SERVICES_DIR:-/tmp/prefixkv-services}"
PID_FILE="$STATE_DIR/redis.pid"
PORT_FILE="$STATE_DIR/redis.port"

have_redis() { command -v redis-server >/dev/null 2>&1; }

have_ibverbs() { ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1'; }

# Debian packages the tests need: redis-server (Redis tier) and libibverbs1 (loaded by the
# Mooncake store's Python module even on its TCP transport).
install() {
  local pkgs=()
  have_redis || pkgs+=(redis-server)
  have_ibverbs || pkgs+=(libibverbs1 ibverbs-providers)
  if [ "${#pkgs[@]}" -eq 0 ]; then
    echo "services present: $(redis-server --version | head -n1); libibverbs1"
    return 0
  fi
  local SUDO=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
      echo "services.sh: ${pkgs[*]} missing and not root (no sudo): cannot install" >&2
      return 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "services.sh: ${pkgs[*]} missing and no apt-get on this machine" >&2
    return 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  # The Debian package may start a system service on 6379; we use our own instances only.
  have_redis && echo "installed: $(redis-server --version | head -n1)"
  have_ibverbs && echo "installed: libibverbs1"
}

running_pid() {
  [ -f "$PID_FILE" ] || return 1
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

free_port() {
  python3 - <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

start() {
  if running_pid >/dev/null; then
    cat "$PORT_FILE"
    return 0
  fi
  have_redis || install >&2
  mkdir -p "$STATE_DIR"
  local port
  port="${1:-$(free_port)}"
  redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --protected-mode yes --daemonize yes --pidfile "$PID_FILE" --dir "$STATE_DIR" \
    --logfile "$STATE_DIR/redis.log" >/dev/null
  for _ in $(seq 1 100); do
    if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then
      echo "$port" > "$PORT_FILE"
      echo "$port"
      return 0
    fi
    sleep 0.05
  done
  echo "services.sh: redis-server did not answer on 127.0.0.1:$port (see $STATE_DIR/redis.log)" >&2
  return 1
}

stop() {
  local pid
  if pid="$(running_pid)"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  fi
  rm -f "$PID_FILE" "$PORT_FILE"
}

case "${1:-}" in
  install) install ;;
  start) start "${2:-}" ;;
  stop) stop ;;
  port) running_pid >/dev/null && cat "$PORT_FILE" ;;
  status)
    if pid="$(running_pid)"; then echo "redis-server pid $pid port $(cat "$PORT_FILE")";
    else echo "redis-server not running"; fi ;;
  *) echo "usage: $0 {install|start [port]|stop|port|status}" >&2; exit 2 ;;
esac
