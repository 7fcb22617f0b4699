#!/usr/bin/env bash
# chain3 on one standalone redis-server against chain3 on a Redis Cluster of three primaries
# (each with a replica), and on that cluster with REDIS_WAIT_REPLICAS=1, on this machine, in one
# sitting: runs/s, run latency, and for every
# primary the Redis CPU and commands the measurement cost it (INFO cpu and commandstats read
# before and after, per node), so that the spread of the work over the nodes shows.
#
#   benches/cluster.sh                  # N=20000 C=50 REPS=2
#   N=5000 C=50 REPS=1 benches/cluster.sh
#
# Everything runs on 127.0.0.1: a private redis-server and six private cluster nodes on free
# ports, stopped by pid at the end. The in-process engine (`cargo bench --bench chain3`) drives
# both; on the cluster it connects with a redis-cluster:// URL (one replica of the engine). Each
# runs with its default shard count: one on the standalone server, 16 on the cluster.
# Set CHAIN3_BENCH to a prebuilt chain3 bench executable to skip the build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N="${N:-20000}"
C="${C:-50}"
REPS="${REPS:-2}"
WARMUP="${WARMUP:-500}"
say() { printf '[cluster.sh] %s\n' "$*" >&2; }
for tool in redis-server redis-cli jq cargo; do
  command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done

OURS="${CHAIN3_BENCH:-}"
if [ -z "$OURS" ]; then
  say "building the chain3 bench (release)"
  OURS="$(cd "$ROOT" && cargo bench --bench chain3 --no-run --message-format=json 2>/dev/null \
    | jq -r 'select(.executable != null and .target.name == "chain3") | .executable' | tail -n 1)"
fi
[ -x "$OURS" ] || { echo "could not build the chain3 bench" >&2; exit 1; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  for candidate in $(seq 20000 29999 | shuf); do
    if port_free "$candidate" && ! grep -qx "$candidate" "$WORK/ports" 2>/dev/null; then
      echo "$candidate" >> "$WORK/ports"; echo "$candidate"; return
    fi
  done
  echo "no free port" >&2; exit 1
}
WORK="$(mktemp -d /tmp/wfo-cluster-bench.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A redis-server daemonized in its own directory; extra arguments follow the defaults.
start_node() { # port, extra args...
  local port="$1"; shift
  local dir="$WORK/$port"; mkdir -p "$dir"
  redis-server --bind 127.0.0.1 --port "$port" --protected-mode yes --dir "$dir" \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --daemonize yes --save "" --appendonly no "$@"
  for _ in $(seq 1 100); do
    [ "$(redis-cli -h 127.0.0.1 -p "$port" PING 2>/dev/null || true)" = "PONG" ] && break
    sleep 0.1
  done
  PIDS+=("$(cat "$dir/redis.pid")")
}

# Used CPU (user + sys, s), commands processed, fcall calls, of one node.
node_stats() { # port
  local info; info="$(redis-cli -h 127.0.0.1 -p "$1" INFO ALL | tr -d '\r')"
  local cpu cmds fcalls
  cpu="$(awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {printf "%.3f", s}' <<< "$info")"
  cmds="$(awk -F: '/^total_commands_processed:/ {print $2}' <<< "$info")"
  fcalls="$(sed -n 's/^cmdstat_fcall:calls=\([0-9]*\),.*/\1/p' <<< "$info")"
  echo "${cpu} ${cmds} ${fcalls:-0}"
}

# Runs chain3 against `url`, with `admin` the node it flushes; prints its JSON line, then one
# line per node in `nodes`: port, CPU s, commands, fcalls spent during the run.
measure() { # label url admin wait-replicas nodes...
  local label="$1" url="$2" admin="$3" wait="$4"; shift 4
  local -A before
  for node in "$@"; do
    redis-cli -h 127.0.0.1 -p "$node" FLUSHALL >/dev/null
    before[$node]="$(node_stats "$node")"
  done
  local line
  if ! line="$("$OURS" --port "$admin" --url "$url" --concurrency "$C" --n "$N" --warmup "$WARMUP" --wait-replicas "$wait" --tag "$label" 2>>"$WORK/bench.log" | tail -n 1)" || [ -z "$line" ]; then
    echo "chain3 ($label) failed:" >&2; tail -n 20 "$WORK/bench.log" >&2; exit 1
  fi
  if [ -n "${SHOW_COMMANDS:-}" ]; then
    for node in "$@"; do
      echo "node $node:" >&2
      redis-cli -h 127.0.0.1 -p "$node" INFO commandstats | tr -d '\r' | grep cmdstat | sort -t= -k2 -n -r | head -12 >&2
    done
  fi
  local per_node="[]"
  for node in "$@"; do
    read -r cpu0 cmd0 fc0 <<< "${before[$node]}"
    read -r cpu1 cmd1 fc1 <<< "$(node_stats "$node")"
    per_node="$(jq -c --arg port "$node" --argjson cpu "$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN {printf "%.3f", b - a}')" \
      --argjson cmds "$((cmd1 - cmd0))" --argjson fcalls "$((fc1 - fc0))" \
      '. + [{port: ($port | tonumber), cpu_s: $cpu, commands: $cmds, fcalls: $fcalls}]' <<< "$per_node")"
  done
  # The nodes' figures cover the warm-up runs too: counted in the steps they are divided by.
  jq -c --arg setup "$label" --argjson nodes "$per_node" --argjson warmup "$WARMUP" \
    '{setup: $setup, runs_per_s, engine_cpu_us_per_step, p50: .run_latency_ms.p50, p99: .run_latency_ms.p99, steps: ((.runs_completed + $warmup) * 3), nodes: $nodes}' <<< "$line"
}

STANDALONE="$(free_port)"
start_node "$STANDALONE" --maxmemory-policy noeviction
say "standalone redis-server on 127.0.0.1:$STANDALONE"

CLUSTER=()
for _ in 1 2 3 4 5 6; do
  port="$(free_port)"; bus="$(free_port)"
  start_node "$port" --cluster-enabled yes --cluster-config-file nodes.conf --cluster-port "$bus" \
    --cluster-node-timeout 2000 --repl-diskless-sync-delay 0 --maxmemory-policy noeviction
  CLUSTER+=("$port")
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CLUSTER[@]}") --cluster-replicas 1 --cluster-yes >/dev/null
for _ in $(seq 1 300); do
  ok=0
  for port in "${CLUSTER[@]}"; do
    redis-cli -h 127.0.0.1 -p "$port" CLUSTER INFO | grep -q cluster_state:ok && ok=$((ok + 1))
  done
  [ "$ok" -eq 6 ] && break
  sleep 0.1
done
PRIMARIES=()
for port in "${CLUSTER[@]}"; do
  redis-cli -h 127.0.0.1 -p "$port" ROLE | head -n 1 | grep -q master && PRIMARIES+=("$port")
done
URL="redis-cluster://127.0.0.1:${CLUSTER[0]}?$(printf 'node=127.0.0.1:%s&' "${CLUSTER[@]:1}" | sed 's/&$//')"
say "cluster: primaries ${PRIMARIES[*]} (of ${CLUSTER[*]})"

# Interleaved: standalone, cluster, standalone, cluster, ...
for rep in $(seq 1 "$REPS"); do
  say "round $rep: standalone"
  measure standalone "redis://127.0.0.1:$STANDALONE" "$STANDALONE" 0 "$STANDALONE"
  say "round $rep: cluster"
  measure cluster "$URL" "${PRIMARIES[0]}" 0 "${PRIMARIES[@]}"
  say "round $rep: cluster, REDIS_WAIT_REPLICAS=1"
  measure cluster-wait-1 "$URL" "${PRIMARIES[0]}" 1 "${PRIMARIES[@]}"
done | tee "$WORK/results.jsonl"
say "per step: Redis CPU us and commands, summed over the nodes"
jq -r '"\(.setup): \(.runs_per_s) runs/s, p50 \(.p50) ms; Redis CPU/step \(([.nodes[].cpu_s] | add) * 1e6 / .steps | floor) us, commands/step \(([.nodes[].commands] | add) / .steps * 10 | floor / 10), per node CPU s \([.nodes[].cpu_s]) commands \([.nodes[].commands])"' "$WORK/results.jsonl"
