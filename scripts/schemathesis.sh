#!/usr/bin/env bash
# Fuzz the HTTP API with schemathesis against a live server, driven by the server's own
# OpenAPI document (GET /api/openapi.json).
#
# Starts a private redis-server and the service on free loopback ports (nothing else is
# contacted), runs `schemathesis run` with a bounded number of examples per operation and a
# bounded time, then stops both. Fails (non-zero) on any 5xx, any status code, content type,
# header or body that the document does not allow, any invalid request the server accepts,
# and any route that works without the bearer token.
#
# Needs: redis-server and redis-cli, and schemathesis in target/venv (scripts/test.sh sets
# both up). Called by scripts/test.sh after `cargo test`.
#
# Usage: scripts/schemathesis.sh [extra args passed to `schemathesis run`]
#   e.g. scripts/schemathesis.sh --max-examples 200
#        scripts/schemathesis.sh --include-operation-id listRuns
# Environment:
#   WFO_BIN           the binary to serve (default: target/debug/workflow-orchestrator, built
#                     with `cargo build` if missing)
#   SCHEMATHESIS      the schemathesis executable (default: target/venv/bin/schemathesis)
#   MAX_EXAMPLES      test cases per operation and phase (default 50)
#   TIME_LIMIT        seconds the schemathesis run may take before it is stopped (default 900)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

SCHEMATHESIS=${SCHEMATHESIS:-$ROOT/target/venv/bin/schemathesis}
MAX_EXAMPLES=${MAX_EXAMPLES:-50}
TIME_LIMIT=${TIME_LIMIT:-900}

if [ ! -x "$SCHEMATHESIS" ]; then
    echo "error: $SCHEMATHESIS not found; run scripts/test.sh (it creates target/venv) or:" >&2
    echo "  python3 -m venv target/venv && target/venv/bin/pip install schemathesis==<SCHEMATHESIS_VERSION in scripts/test.sh>" >&2
    exit 1
fi
for tool in redis-server redis-cli python3 timeout; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "error: $tool is not on PATH (scripts/test.sh installs redis-server and redis-tools)" >&2
        exit 1
    fi
done

if [ -z "${WFO_BIN:-}" ]; then
    WFO_BIN=$ROOT/target/debug/workflow-orchestrator
    if [ ! -x "$WFO_BIN" ]; then
        cargo build --bin workflow-orchestrator
    fi
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wfo-schemathesis.XXXXXX")
REDIS_PID=
SERVER_PID=

# Stops what this script started, by pid, and removes its scratch directory.
cleanup() {
    local status=$?
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ -n "$REDIS_PID" ] && kill -0 "$REDIS_PID" 2>/dev/null; then
        kill -TERM "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
    fi
    if [ "$status" -ne 0 ]; then
        for log in "$WORK/server.log" "$WORK/redis.log"; do
            if [ -s "$log" ]; then
                echo "---- last lines of $(basename "$log") ----" >&2
                tail -n 40 "$log" >&2
            fi
        done
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A port free on loopback now (another process could take it before we bind: the callers retry).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# ---- a private redis-server on loopback, nothing persisted ----
REDIS_PORT=
for _ in 1 2 3 4 5; do
    port=$(free_port)
    redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$WORK" \
        --protected-mode yes --logfile "$WORK/redis.log" &
    REDIS_PID=$!
    for _ in $(seq 50); do
        if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -qx PONG; then
            REDIS_PORT=$port
            break
        fi
        kill -0 "$REDIS_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ -n "$REDIS_PORT" ] && break
    kill -TERM "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=
done
if [ -z "$REDIS_PORT" ]; then
    echo "error: could not start redis-server on a loopback port" >&2
    exit 1
fi
echo "redis-server: 127.0.0.1:$REDIS_PORT (pid $REDIS_PID)"

# ---- the service, on an ephemeral loopback port, with a token and a small registry ----
# The ids are the ones the document's examples use, so the examples phase starts real runs:
# `cms-sync` completes at once (noop steps); `database-backup` stays running for a second and
# then fails, so that cancel (200) and retry (202) of live and failed runs are exercised too.
cat >"$WORK/workflows.toml" <<'EOF'
[[workflow]]
id = "cms-sync"
description = "schemathesis: scheduled and event-triggered, two noop steps"
schedule = "0 3 1 1 *"
events = ["cms.content.updated"]
[[workflow.step]]
id = "sync-content"
action = "noop"
[[workflow.step]]
id = "publish"
action = "noop"

[[workflow]]
id = "database-backup"
description = "schemathesis: on demand, a step that runs for a second and fails"
[[workflow.step]]
id = "dump"
action = "exec"
with = { command = ["sh", "-c", "sleep 1; echo 'backup failed' >&2; exit 3"] }
retry = { max_attempts = 1 }
EOF
# The token and the Inngest signing key are random. With a key the webhook is on, so its
# signature check is what schemathesis meets: it cannot sign, so every call there is a 401.
TOKEN=st-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
SIGNING_KEY=signkey-test-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
env -i PATH="$PATH" HOME="${HOME:-/tmp}" \
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT" KEY_PREFIX=wfo-schemathesis \
    PORT=0 BIND_ADDR=127.0.0.1 WORKFLOWS_FILE="$WORK/workflows.toml" \
    API_TOKEN="$TOKEN" INNGEST_SIGNING_KEY="$SIGNING_KEY" \
    REPLICA_ID=schemathesis SHUTDOWN_GRACE=2s LOG_LEVEL=warn \
    "$WFO_BIN" serve >"$WORK/server.out" 2>"$WORK/server.log" &
SERVER_PID=$!
BASE=
for _ in $(seq 300); do
    # The announcement: `listening on http://...` in text, a JSON line with an `address`
    # field in JSON (the default when standard output is a file, as here).
    BASE=$(sed -n -e 's|^listening on \(http://127\.0\.0\.1:[0-9]*\)$|\1|p' \
        -e 's|^{.*"message":"listening on http://[^"]*".*"address":"\(http://127\.0\.0\.1:[0-9]*\)".*}$|\1|p' \
        "$WORK/server.out" | head -n1)
    [ -n "$BASE" ] && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "error: $WFO_BIN exited before listening" >&2
        exit 1
    fi
    sleep 0.1
done
if [ -z "$BASE" ]; then
    echo "error: $WFO_BIN did not report its address within 30 s" >&2
    exit 1
fi
echo "workflow-orchestrator: $BASE (pid $SERVER_PID)"
echo "schemathesis: $("$SCHEMATHESIS" --version)"

# ---- the run ----
# Every check but positive_data_acceptance: no 5xx; status codes, content types, headers and
# bodies as documented; invalid input refused with a 4xx; 405 with a matching Allow header for
# undocumented methods; no operation that needs the token works without it; a run a response
# links to can be read. (positive_data_acceptance wants every schema-valid request accepted,
# which no schema can promise for e.g. a `fromStep` the run's workflow does not have: 400.)
# One worker: with two, CPython 3.11's ast.parse (called by hypothesis from several threads)
# sometimes fails with "AST constructor recursion depth mismatch", a schemathesis error that
# says nothing about the API. Run from the scratch directory so that nothing is written into
# the tree.
status=0
(
    cd "$WORK"
    timeout --signal=INT --kill-after=30 "$TIME_LIMIT" \
        "$SCHEMATHESIS" run "$BASE/api/openapi.json" \
        --checks all --exclude-checks positive_data_acceptance \
        --header "Authorization: Bearer $TOKEN" \
        --max-examples "$MAX_EXAMPLES" \
        --workers 1 \
        --request-timeout 10 \
        --generation-database none \
        --no-color \
        "$@"
) || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "error: schemathesis did not finish within $TIME_LIMIT s" >&2
fi
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "error: the server died during the run" >&2
    status=1
fi
if [ "$status" -ne 0 ]; then
    echo "schemathesis: FAILED (exit $status)" >&2
    exit "$status"
fi
echo "schemathesis: no problems found"
