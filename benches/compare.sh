#!/usr/bin/env bash
# Side by side: this engine's `chain3` bench and the BullMQ peer's (`../shared/peers`) on the
# same private redis-server (same binary, same settings: in-memory, no AOF, like the peer's
# start-redis.sh default), 3 times each per concurrency, then a markdown table of medians.
#
#   benches/compare.sh
#
# Environment (all optional):
#   CONCURRENCIES  default "1 50 200"
#   N              runs per measurement, default 20000
#   REPS           repetitions per side and concurrency, default 3
#   TIME_LIMIT     seconds per measurement (both sides), default 60
#   OURS_ARGS      extra arguments for ours, e.g. "--shards 1"
#   PEERS_DIR      where the peer is copied and `npm ci`-ed, default /tmp/peers
#   RESULTS        file for the raw JSON lines, default a new file under /tmp
#
# The redis-server is started daemonized on a free loopback port in a temp dir and stopped by
# its pid at the end, whatever happens. Both benchmarks FLUSHALL it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONCURRENCIES="${CONCURRENCIES:-1 50 200}"
N="${N:-20000}"
REPS="${REPS:-3}"
TIME_LIMIT="${TIME_LIMIT:-60}"
OURS_ARGS="${OURS_ARGS:-}"
PEERS_SRC="$ROOT/../shared/peers"
PEERS_DIR="${PEERS_DIR:-/tmp/peers}"
RESULTS="${RESULTS:-$(mktemp /tmp/chain3-compare.XXXXXX.jsonl)}"
LOG="${RESULTS%.jsonl}.log"

say() { echo "[compare $(date +%H:%M:%S)] $*" >&2; }
for tool in redis-server redis-cli node npm jq cargo; do
  command -v "$tool" >/dev/null || { echo "compare.sh needs $tool" >&2; exit 2; }
done

# ---------------------------------------------------------------- the peer
if [ ! -f "$PEERS_DIR/bullmq/bench.mjs" ]; then
  [ -d "$PEERS_SRC" ] || { echo "no peer benchmark at $PEERS_SRC" >&2; exit 2; }
  say "copying $PEERS_SRC to $PEERS_DIR"
  mkdir -p "$PEERS_DIR"
  cp -r "$PEERS_SRC"/. "$PEERS_DIR"/
fi
if [ ! -d "$PEERS_DIR/bullmq/node_modules/bullmq" ]; then
  say "npm ci in $PEERS_DIR/bullmq"
  (cd "$PEERS_DIR/bullmq" && npm ci --no-audit --no-fund >&2)
fi

# ---------------------------------------------------------------- ours, built once
say "building the chain3 bench (release)"
OURS="$(cd "$ROOT" && cargo bench --bench chain3 --no-run --message-format=json 2>/dev/null \
  | jq -r 'select(.executable != null and .target.name == "chain3") | .executable' | tail -n 1)"
[ -x "$OURS" ] || { echo "could not build the chain3 bench; run: cargo bench --bench chain3 --no-run" >&2; exit 1; }

# ---------------------------------------------------------------- a private redis-server
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT=""
for candidate in $(seq 6400 6499 | shuf); do
  if port_free "$candidate"; then PORT="$candidate"; break; fi
done
[ -n "$PORT" ] || { echo "no free port in 6400-6499" >&2; exit 1; }

REDIS_DIR="$(mktemp -d /tmp/chain3-redis.XXXXXX)"
REDIS_PID=""
cleanup() {
  if [ -n "$REDIS_PID" ] && kill -0 "$REDIS_PID" 2>/dev/null; then
    kill "$REDIS_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$REDIS_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$REDIS_PID" 2>/dev/null || true
  fi
  rm -rf "$REDIS_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The peer's settings (start-redis.sh, default mode): in-memory, no RDB, no AOF.
redis-server --bind 127.0.0.1 --port "$PORT" --protected-mode yes \
  --dir "$REDIS_DIR" --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log" \
  --daemonize yes --save "" --appendonly no
for _ in $(seq 1 100); do
  if [ "$(redis-cli -h 127.0.0.1 -p "$PORT" PING 2>/dev/null || true)" = "PONG" ]; then break; fi
  sleep 0.1
done
REDIS_PID="$(cat "$REDIS_DIR/redis.pid" 2>/dev/null || true)"
if [ -z "$REDIS_PID" ] || [ "$(redis-cli -h 127.0.0.1 -p "$PORT" PING 2>/dev/null || true)" != "PONG" ]; then
  echo "redis-server on 127.0.0.1:$PORT did not answer PING within 10 s" >&2
  tail -n 20 "$REDIS_DIR/redis.log" >&2 || true
  exit 1
fi
say "redis-server $(redis-server --version | awk '{sub("v=", "", $3); print $3}') on 127.0.0.1:$PORT pid=$REDIS_PID (in-memory, no AOF)"
say "results: $RESULTS  log: $LOG"

# ---------------------------------------------------------------- the runs
run_ours() { # concurrency rep
  # shellcheck disable=SC2086
  "$OURS" --port "$PORT" --concurrency "$1" --n "$N" --time-limit "$TIME_LIMIT" --run-index "$2" $OURS_ARGS \
    2>>"$LOG" | tail -n 1
}
run_peer() { # concurrency rep
  (cd "$PEERS_DIR/bullmq" && node bench.mjs --scenario chain3 --mode add --concurrency "$1" --n "$N" \
    --port "$PORT" --time-limit "$TIME_LIMIT" --run-index "$2" 2>>"$LOG" | tail -n 1)
}
record() { # side concurrency line
  if jq -e . >/dev/null 2>&1 <<<"$3"; then
    jq -c --arg side "$1" '. + {side: $side}' <<<"$3" >>"$RESULTS"
    jq -r --arg side "$1" '"  \($side) c=\(.concurrency): \(.runs_per_s) runs/s, p50 \(.run_latency_ms.p50) ms, p99 \(.run_latency_ms.p99) ms, \(.redis_cmds_per_step) cmds/step, \(.mem.bytes_per_run) B/run (\(.stop_reason))"' <<<"$3" >&2
  else
    say "$1 c=$2: no result (see $LOG)"
  fi
}
for c in $CONCURRENCIES; do
  for rep in $(seq 1 "$REPS"); do
    say "concurrency $c, run $rep/$REPS"
    record ours "$c" "$(run_ours "$c" "$rep" || true)"
    record bullmq "$c" "$(run_peer "$c" "$rep" || true)"
  done
done

# ---------------------------------------------------------------- the table
jq -rs --arg n "$N" --arg reps "$REPS" '
  def median: sort | if length == 0 then null elif length % 2 == 1 then .[(length - 1) / 2]
    else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def fmt(d): if . == null then "-" else (. * pow(10; d) | round / pow(10; d) | tostring) end;
  def engine_name: if . == "ours" then "workflow-orchestrator" else "BullMQ 6.7 (add)" end;
  group_by(.concurrency) | map(
    . as $rows | ($rows | map(select(.side == "bullmq")) | map(.runs_per_s) | median) as $peer |
    ["ours", "bullmq"] | map(. as $side | $rows | map(select(.side == $side)) | select(length > 0) | {
      c: .[0].concurrency, side: $side, count: length,
      stops: (map(.stop_reason) | unique | join(",")),
      runs: (map(.runs_per_s) | median), steps: (map(.steps_per_s) | median),
      p50: (map(.run_latency_ms.p50) | map(select(. != null)) | median),
      p99: (map(.run_latency_ms.p99) | map(select(. != null)) | median),
      cmds: (map(.redis_cmds_per_step) | median), cpu: (map(.redis_cpu_us_per_step) | median),
      mem: (map(.mem.bytes_per_run) | map(select(. != null)) | median),
      ratio: (if $peer == null or $peer == 0 then null else ((map(.runs_per_s) | median) / $peer) end)
    })) | flatten |
  ("chain3, N = \($n), medians of \($reps) runs, same redis-server (in-memory, no AOF)\n",
   "| concurrency | engine | runs/s | steps/s | p50 ms | p99 ms | Redis cmds/step | Redis CPU us/step | Redis bytes/run | runs/s vs BullMQ | runs (stop) |",
   "|---|---|---|---|---|---|---|---|---|---|---|",
   (.[] | "| \(.c) | \(.side | engine_name) | \(.runs | fmt(0)) | \(.steps | fmt(0)) | \(.p50 | fmt(2)) | \(.p99 | fmt(2)) | \(.cmds | fmt(1)) | \(.cpu | fmt(1)) | \(.mem | fmt(0)) | \(if .side == "ours" then (.ratio | fmt(2)) + "x" else "1x" end) | \(.count) (\(.stops)) |"))
' "$RESULTS"
