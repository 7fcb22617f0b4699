#!/usr/bin/env bash
# Side by side, in one sitting, on the same private redis-server (same binary, same settings:
# in-memory, no AOF, like the peer's start-redis.sh default), REPS times each, interleaved:
#   - ours in process: `cargo bench --bench chain3` at each of CONCURRENCIES;
#   - the BullMQ peer (`../shared/peers/bullmq`, `node bench.mjs --scenario chain3 --mode add`)
#     at each of CONCURRENCIES, and at BINARY_CONCURRENCY (the reference of the binary's rows);
#   - ours through the release binary: `cargo bench --bench binary` (benches/binary.rs), one
#     replica with MAX_CONCURRENT_STEPS = BINARY_CONCURRENCY, runs started by N pipelined XADDs
#     of an event (`events`) and over REST by BINARY_CONCURRENCY keep-alive clients (`rest`);
# then ONE markdown table of medians: path, runs/s, p50, p99, Redis commands per step, Redis
# CPU per step, engine CPU per step, Redis bytes per finished run, runs/s against BullMQ (at the
# same concurrency; the binary's rows against BullMQ at BINARY_CONCURRENCY).
#
#   benches/compare.sh
#   N=300 REPS=1 CONCURRENCIES=50 benches/compare.sh     # a quick smoke run, not a measurement
#
# Environment (all optional):
#   CONCURRENCIES      in-process chain3 and BullMQ, default "1 50 200"
#   N                  runs per measurement, default 20000
#   REPS               repetitions per row, default 3
#   TIME_LIMIT         seconds per measurement (every side), default 60
#   OURS_ARGS          extra arguments for the in-process chain3 bench, e.g. "--shards 1"
#   BINARY_SCENARIOS   the binary's scenarios, default "events rest"; "" skips the binary
#   BINARY_CONCURRENCY default 50
#   BINARY_ARGS        extra arguments for benches/binary.rs, e.g. "--poll-ms 2"
#   CHAIN3_BENCH, BINARY_BENCH, BINARY
#                      prebuilt executables of the chain3 bench, the binary bench and the release
#                      binary, to skip the build (default: built now, see below)
#   PEERS_DIR          where the peer is copied and `npm ci`-ed, default /tmp/peers
#   RESULTS            file for the raw JSON lines, default a new file under /tmp
#
# It builds the release binary (`cargo build --release --bin workflow-orchestrator`) and both
# bench drivers first. The redis-server is started daemonized on a free loopback port in a temp
# dir and stopped by its pid at the end, whatever happens. Every benchmark FLUSHALLs it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONCURRENCIES="${CONCURRENCIES:-1 50 200}"
N="${N:-20000}"
REPS="${REPS:-3}"
TIME_LIMIT="${TIME_LIMIT:-60}"
OURS_ARGS="${OURS_ARGS:-}"
BINARY_SCENARIOS="${BINARY_SCENARIOS-events rest}"
BINARY_CONCURRENCY="${BINARY_CONCURRENCY:-50}"
BINARY_ARGS="${BINARY_ARGS:-}"
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
bench_executable() { # name
  (cd "$ROOT" && cargo bench --bench "$1" --no-run --message-format=json 2>/dev/null \
    | jq -r --arg name "$1" 'select(.executable != null and .target.name == $name) | .executable' | tail -n 1)
}
OURS="${CHAIN3_BENCH:-}"
if [ -z "$OURS" ]; then
  say "building the chain3 bench (release)"
  OURS="$(bench_executable chain3)"
fi
[ -x "$OURS" ] || { echo "could not build the chain3 bench; run: cargo bench --bench chain3 --no-run" >&2; exit 1; }
if [ -n "$BINARY_SCENARIOS" ]; then
  if [ -z "${BINARY:-}" ]; then
    say "building the release binary"
    (cd "$ROOT" && cargo build --release --bin workflow-orchestrator >&2)
    BINARY="${CARGO_TARGET_DIR:-$ROOT/target}/release/workflow-orchestrator"
  fi
  [ -x "$BINARY" ] || { echo "no release binary at $BINARY; run: cargo build --release --bin workflow-orchestrator" >&2; exit 1; }
  DRIVER="${BINARY_BENCH:-}"
  if [ -z "$DRIVER" ]; then
    say "building the binary bench (release)"
    DRIVER="$(bench_executable binary)"
  fi
  [ -x "$DRIVER" ] || { echo "could not build the binary bench; run: cargo bench --bench binary --no-run" >&2; exit 1; }
fi

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
run_binary() { # scenario rep
  # shellcheck disable=SC2086
  "$DRIVER" --port "$PORT" --binary "$BINARY" --scenario "$1" --concurrency "$BINARY_CONCURRENCY" --n "$N" \
    --time-limit "$TIME_LIMIT" --run-index "$2" $BINARY_ARGS 2>>"$LOG" | tail -n 1
}
record() { # side concurrency line
  if jq -e . >/dev/null 2>&1 <<<"$3"; then
    jq -c --arg side "$1" '. + {side: $side}' <<<"$3" >>"$RESULTS"
    jq -r --arg side "$1" '"  \($side) c=\(.concurrency): \(.runs_per_s) runs/s, p50 \(.run_latency_ms.p50) ms, p99 \(.run_latency_ms.p99) ms, \(.redis_cmds_per_step) cmds/step, \(.mem.bytes_per_run) B/run (\(.stop_reason))"' <<<"$3" >&2
  else
    say "$1 c=$2: no result (see $LOG)"
  fi
}
peer_at_binary_concurrency=yes
for c in $CONCURRENCIES; do
  if [ "$c" = "$BINARY_CONCURRENCY" ]; then peer_at_binary_concurrency=""; fi
done
[ -n "$BINARY_SCENARIOS" ] || peer_at_binary_concurrency=""
for rep in $(seq 1 "$REPS"); do
  for c in $CONCURRENCIES; do
    say "in process and BullMQ, concurrency $c, run $rep/$REPS"
    record ours "$c" "$(run_ours "$c" "$rep" || true)"
    record bullmq "$c" "$(run_peer "$c" "$rep" || true)"
  done
  if [ -n "$peer_at_binary_concurrency" ]; then
    say "BullMQ, concurrency $BINARY_CONCURRENCY (the binary's reference), run $rep/$REPS"
    record bullmq "$BINARY_CONCURRENCY" "$(run_peer "$BINARY_CONCURRENCY" "$rep" || true)"
  fi
  for scenario in $BINARY_SCENARIOS; do
    say "the binary, $scenario, concurrency $BINARY_CONCURRENCY, run $rep/$REPS"
    record "binary-$scenario" "$BINARY_CONCURRENCY" "$(run_binary "$scenario" "$rep" || true)"
  done
done

# ---------------------------------------------------------------- the table
jq -rs --arg n "$N" --arg reps "$REPS" --arg bc "$BINARY_CONCURRENCY" '
  def median: sort | if length == 0 then null elif length % 2 == 1 then .[(length - 1) / 2]
    else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def fmt(d): if . == null then "-" else (. * pow(10; d) | round / pow(10; d) | tostring) end;
  def binary: startswith("binary-");
  def order: {"ours": 0, "bullmq": 1, "binary-events": 2, "binary-rest": 3}[.] // 4;
  def path_name($c): if . == "ours" then "in-process chain3 c=\($c)"
    elif . == "bullmq" then "BullMQ 6.7 chain3 c=\($c) (add)"
    elif . == "binary-events" then "binary, runs started by pipelined XADDs (\($c) executors)"
    elif . == "binary-rest" then "binary, REST c=\($c) (keep-alive)"
    else "\(.) c=\($c)" end;
  # Engine CPU per step: ours print it; the peer prints its process CPU utilisation.
  def engine_cpu: if .engine_cpu_us_per_step != null then .engine_cpu_us_per_step
    elif .node_cpu_util != null and (.steps_per_s // 0) > 0 then .node_cpu_util / .steps_per_s * 1e6
    elif .engine_cpu_util != null and (.steps_per_s // 0) > 0 then .engine_cpu_util / .steps_per_s * 1e6
    else null end;
  (map(select(.side == "bullmq")) | group_by(.concurrency)
    | map({key: (.[0].concurrency | tostring), value: (map(.runs_per_s) | median)}) | from_entries) as $peer |
  group_by([(if (.side | binary) then 1 else 0 end), .concurrency, (.side | order)]) | map(
    .[0].side as $side | .[0].concurrency as $c |
    (if ($side | binary) then $peer[$bc] else $peer[$c | tostring] end) as $ref | {
      path: ($side | path_name($c)), side: $side, count: length,
      stops: (map(.stop_reason) | unique | join(",")),
      runs: (map(.runs_per_s) | median),
      p50: (map(.run_latency_ms.p50) | map(select(. != null)) | median),
      p99: (map(.run_latency_ms.p99) | map(select(. != null)) | median),
      cmds: (map(.redis_cmds_per_step) | median), cpu: (map(.redis_cpu_us_per_step) | median),
      engine: (map(engine_cpu) | map(select(. != null)) | median),
      mem: (map(.mem.bytes_per_run) | map(select(. != null)) | median),
      ratio: (if $side == "bullmq" then 1 elif $ref == null or $ref == 0 then null else ((map(.runs_per_s) | median) / $ref) end)
    }) |
  ("chain3 (3 sequential no-op steps), N = \($n) runs per measurement, medians of \($reps), one redis-server (in-memory, no AOF); the binary rows: one replica of the release binary, compared with BullMQ c=\($bc)\n",
   "| path | runs/s | p50 ms | p99 ms | Redis cmds/step | Redis CPU us/step | engine CPU us/step | Redis bytes/run | runs/s vs BullMQ | runs (stop) |",
   "|---|---|---|---|---|---|---|---|---|---|",
   (.[] | "| \(.path) | \(.runs | fmt(0)) | \(.p50 | fmt(2)) | \(.p99 | fmt(2)) | \(.cmds | fmt(1)) | \(.cpu | fmt(1)) | \(.engine | fmt(1)) | \(.mem | fmt(0)) | \(.ratio | fmt(2))x | \(.count) (\(.stops)) |"))
' "$RESULTS"
