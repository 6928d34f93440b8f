#!/usr/bin/env bash
# A Ray cluster on THIS machine, listening on 127.0.0.1 only: a head and N worker nodes, with token
# authentication, for tests and demos of `ray job submit`. See cluster/README.md.
#
#   cluster/local_cluster.sh start [--workers N] [--cpus C] [--object-store-mb M]
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop
#
# start: N worker nodes (default 1), C CPUs per node (default 1), M MiB object store per node
# (default 1024). State in $ALPHAFUSE_CLUSTER_DIR (default ${TMPDIR:-/tmp}/alphafuse-cluster-$UID):
# `source cluster.env` there to reach the cluster (RAY_ADDRESS, RAY_API_SERVER_ADDRESS, auth).
# Ray: $RAY_BIN, default the `ray` beside `python` on PATH, else this repository's .venv/bin/ray.
# stop ends only this cluster's processes (never `ray stop`, which ends every Ray on the machine).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
STATE_DIR=${ALPHAFUSE_CLUSTER_DIR:-${TMPDIR:-/tmp}/alphafuse-cluster-$(id -u)}
ENV_FILE=$STATE_DIR/cluster.env
NODES_FILE=$STATE_DIR/nodes  # one line per node, head first: "<session id> <Ray temp dir>"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }
usage() { sed -n '5,7p' "$0" | sed 's/^# *//' >&2; exit 2; }

if [ -z "${RAY_BIN:-}" ]; then
  python_on_path=$(command -v python || true)
  if [ -n "$python_on_path" ] && [ -x "$(dirname "$python_on_path")/ray" ]; then
    RAY_BIN=$(dirname "$python_on_path")/ray
  else
    RAY_BIN=$REPO/.venv/bin/ray
  fi
fi
[ -x "$RAY_BIN" ] || die "no ray executable at $RAY_BIN (run .ci/setup, or set RAY_BIN)"
BIN_DIR=$(cd "$(dirname "$RAY_BIN")" && pwd)
PYTHON=$BIN_DIR/python

# The processes of one node share a session id: each node is started under `setsid` (start_node).
session_pids() { ps -eo pid=,sid= | awk -v s="$1" '$2 == s {print $1}'; }

# Whether session $1 still is the node with temp dir $2: one of its processes (gcs_server, raylet,
# the agents) names that dir. A bare session id may have been reused after the node died.
session_is_ours() {
  local pid
  [ -n "$2" ] || return 1
  for pid in $(session_pids "$1"); do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" && return 0
  done
  return 1
}

running() {
  local sid tmpdir
  [ -f "$ENV_FILE" ] && [ -f "$NODES_FILE" ] || return 1
  read -r sid tmpdir <"$NODES_FILE" || return 1
  session_is_ours "$sid" "$tmpdir"
}

# Pids among "$@" that are still running (zombies count as gone).
alive_pids() {
  local pid state
  for pid in "$@"; do
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || continue
    [ "$state" != Z ] && echo "$pid"
  done
}

# TERM, wait up to 10 s, then KILL.
terminate() {
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq 40); do
    [ -z "$(alive_pids "$@")" ] && return 0
    sleep 0.25
  done
  kill -KILL $(alive_pids "$@") 2>/dev/null || true
}

stop_cluster() {
  [ -f "$NODES_FILE" ] || [ -f "$ENV_FILE" ] || { echo "no cluster state in $STATE_DIR"; return 0; }
  local sid tmpdir pid raylets=() others=() gcs=() tmpdirs=()
  while read -r sid tmpdir; do
    tmpdirs+=("$tmpdir")
    session_is_ours "$sid" "$tmpdir" || continue
    for pid in $(session_pids "$sid"); do
      case $(cat "/proc/$pid/comm" 2>/dev/null) in
        raylet) raylets+=("$pid") ;;
        gcs_server) gcs+=("$pid") ;;
        *) others+=("$pid") ;;
      esac
    done
  done < <(cat "$NODES_FILE" 2>/dev/null)
  # the order of `ray stop`: raylets first (their agents fate-share), the GCS last
  terminate "${raylets[@]}"
  terminate "${others[@]}"
  terminate "${gcs[@]}"
  for tmpdir in "${tmpdirs[@]}"; do
    case $tmpdir in */afray.??????) rm -rf -- "$tmpdir" ;; esac  # only what start's mktemp made
  done
  rm -f -- "$ENV_FILE" "$NODES_FILE" "$STATE_DIR/auth_token" "$STATE_DIR"/*.log
  rmdir -- "$STATE_DIR" 2>/dev/null || true
  echo "stopped the cluster of $STATE_DIR ($((${#raylets[@]} + ${#others[@]} + ${#gcs[@]})) processes)"
}

# start_node LOG TMPDIR CMD...: run CMD (which starts a node with temp dir TMPDIR, then returns) in
# a new session, output to $STATE_DIR/LOG; records the session id and TMPDIR in $NODES_FILE.
start_node() {
  local log=$1 tmpdir=$2 rc=0
  shift 2
  setsid --wait bash -c 'echo $$ >"$0"; exec "$@"' "$STATE_DIR/.sid" "$@" >"$STATE_DIR/$log" 2>&1 || rc=$?
  echo "$(cat "$STATE_DIR/.sid") $tmpdir" >>"$NODES_FILE"
  rm -f "$STATE_DIR/.sid"
  return $rc
}

alive_nodes() {
  "$RAY_BIN" status --address "$RAY_ADDRESS" 2>/dev/null \
    | awk '/^Active:/ {on = 1; next} /^[A-Z]/ {on = 0} on && /node_/ {n++} END {print n + 0}'
}

free_ports() {
  "$PYTHON" - "$1" <<'EOF'
import socket, sys
# held open together so that the ports differ; Ray binds them right after (a small race).
# Ray refuses ports inside its worker port range (10002-19999 by default).
socks = []
while len(socks) < int(sys.argv[1]):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    if 10002 <= s.getsockname()[1] <= 19999:
        s.close()
    else:
        socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# On a failed start: show the nodes' start-up output, then remove what was started.
failed_start() {
  [ "$1" -eq 0 ] && return
  tail -n 20 "$STATE_DIR"/*.log >&2 2>/dev/null || true
  stop_cluster >/dev/null 2>&1 || true
}

start_cluster() {
  local workers=1 cpus=1 store_mb=1024
  while [ $# -gt 0 ]; do
    case $1 in
      --workers) workers=$2; shift 2 ;;
      --cpus) cpus=$2; shift 2 ;;
      --object-store-mb) store_mb=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  if running; then die "a cluster is already running (state: $STATE_DIR); stop it first"; fi
  stop_cluster >/dev/null  # leftovers of a cluster that died

  mkdir -p "$STATE_DIR"
  STATE_DIR=$(cd "$STATE_DIR" && pwd)
  ENV_FILE=$STATE_DIR/cluster.env
  NODES_FILE=$STATE_DIR/nodes
  local gcs_port dash_port client_port agent_port store_bytes=$((store_mb * 1024 * 1024)) i tmpdir
  read -r gcs_port dash_port client_port agent_port < <(free_ports 4)

  # Token authentication with this cluster's own token: Ray's default file (~/.ray/auth_token) is
  # shared with every other Ray of this user, and `ray get-auth-token --generate` writes there.
  (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$STATE_DIR/auth_token")
  cat >"$ENV_FILE" <<EOF
# written by cluster/local_cluster.sh; source it to reach the cluster
export RAY_ADDRESS=127.0.0.1:$gcs_port
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dash_port
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE_DIR/auth_token
unset RAY_AUTH_TOKEN
# Without this Ray replaces 127.0.0.1 by the machine's address, in clients too.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
EOF
  trap 'failed_start $?' EXIT
  # shellcheck disable=SC1090
  source "$ENV_FILE"
  unset RAY_ADDRESS  # `ray start --head` would try to join it
  export RAY_USAGE_STATS_ENABLED=0
  # Job drivers run `python` from the raylet's PATH: make that this Ray's environment.
  export PATH=$BIN_DIR:$PATH

  # Each node gets its own short temp dir: unix socket paths must stay under 108 bytes, and nodes
  # sharing one delete each other's job working directories (runtime_resources/).
  tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/afray.XXXXXX")
  start_node head.log "$tmpdir" "$RAY_BIN" start --head --node-ip-address=127.0.0.1 --port="$gcs_port" \
    --dashboard-host=127.0.0.1 --dashboard-port="$dash_port" --ray-client-server-port="$client_port" \
    --dashboard-agent-listen-port="$agent_port" --num-cpus="$cpus" --object-store-memory="$store_bytes" \
    --temp-dir="$tmpdir" --disable-usage-stats \
    || die "the head did not start"
  for i in $(seq "$workers"); do
    read -r agent_port < <(free_ports 1)
    tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/afray.XXXXXX")
    start_node "worker-$i.log" "$tmpdir" "$PYTHON" "$REPO/cluster/loopback_worker_node.py" \
      --address "127.0.0.1:$gcs_port" --num-cpus "$cpus" --object-store-memory "$store_bytes" \
      --agent-port "$agent_port" --temp-dir "$tmpdir" \
      || die "worker node $i did not start"
  done

  export RAY_ADDRESS=127.0.0.1:$gcs_port
  for _ in $(seq 60); do
    [ "$(alive_nodes)" -eq $((workers + 1)) ] && break
    sleep 1
  done
  [ "$(alive_nodes)" -eq $((workers + 1)) ] || die "only $(alive_nodes) of $((workers + 1)) nodes came up"
  trap - EXIT
  echo "Ray cluster up: $((workers + 1)) nodes x $cpus CPUs, GCS $RAY_ADDRESS, dashboard $RAY_API_SERVER_ADDRESS"
  echo "state: $ENV_FILE"
}

case ${1:-} in
  start) shift; start_cluster "$@" ;;
  stop) stop_cluster ;;
  status)
    running || { echo "not running (state: $STATE_DIR)"; exit 1; }
    grep '^export' "$ENV_FILE"
    # shellcheck disable=SC1090
    source "$ENV_FILE"
    "$RAY_BIN" status --address "$RAY_ADDRESS"
    ;;
  *) usage ;;
esac
